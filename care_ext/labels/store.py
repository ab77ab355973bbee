"""The label store and budget ledger: one SQLite file (WAL), keyed by a stable prompt uid (§6).

Two tables:

* ``labels(uid, label, source, cost, step, time, run)`` - every label ever obtained. ``label``
  is the oracle's answer as JSON text; a uid present here is never paid again (a later epoch,
  or another run on the same file, gets it free).
* ``ledger(uid, status, step, cost, kind, time, attempts, run)`` - every paid request. A row is
  written with status ``requested`` (synchronous oracle) or ``pending`` (asynchronous queue)
  *before* the oracle is called, in the same transaction that checks the caps; it becomes ``stored``
  in the transaction that writes the label, or ``failed`` (cost refunded to 0) when the oracle gives
  up. A crash between "requested" and "stored" leaves a ``requested`` row: the label counts as paid,
  and a later request for that uid is a free retry (a ``pending`` row whose request the asynchronous
  oracle no longer holds is retried the same way). Charges are therefore never doubled and the caps
  hold across crashes and resumes. A label is stored for a refunded (``failed``) row only by a new
  charged request, never by a late answer to the old one.

``step`` is the index of the paying controller's decide call and ``run`` that controller's run
id (saved in its checkpoint, so a resumed run keeps it): several runs can share one file, and
the per-step cap and "bought at this very step" are per (run, step). Schema 1 files (without
``run``) are migrated in place; their rows belong to run ``""``.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = "2"
CHARGED = ("requested", "pending", "stored")
"""Ledger statuses that count against the budget."""


def json_safe(label: Any) -> Any:
    """``label`` with numpy/torch scalars and arrays turned into Python values (``.item()`` /
    ``.tolist()``), inside lists, tuples and dicts too, so that ``json.dumps`` accepts it.

    A gold column read with pandas holds ``numpy.int64`` values, which ``json`` refuses; the
    converted label is the one the store gives back later, so a caller that resolves the label
    at the purchase step should resolve this value too.
    """
    if isinstance(label, (str, bytes, bool, int, float)) or label is None:
        return label
    if isinstance(label, dict):
        return {k: json_safe(v) for k, v in label.items()}
    if isinstance(label, (list, tuple)):
        items = [json_safe(v) for v in label]
        return items if isinstance(label, list) else tuple(items)
    if getattr(label, "ndim", None) == 0 and callable(getattr(label, "item", None)):
        return label.item()  # numpy scalar, 0-d array or tensor
    if callable(getattr(label, "tolist", None)):
        return label.tolist()  # numpy array, tensor
    return label


class LabelStoreError(RuntimeError):
    """The store file is unreadable, corrupted, or from an incompatible schema."""


@dataclass(frozen=True)
class StoredLabel:
    """A label in the store: the oracle's value (decoded JSON), how and when it was obtained."""

    label: Any
    source: str
    cost: float
    step: int
    time: float
    run: str = ""


@dataclass(frozen=True)
class LedgerRow:
    """A paid request: status in requested/pending/stored/failed, the run and step that paid."""

    status: str
    step: int
    cost: float
    kind: str
    run: str = ""


class LabelStore:
    """SQLite label store + ledger. ``path=":memory:"`` keeps it in memory (tests, dry runs).

    Args:
        path: the SQLite file (created if absent; its directory must exist).
        timeout_s: how long to wait for another connection's lock before giving up.

    Raises:
        LabelStoreError: the file's directory does not exist, the file cannot be opened or is
            locked by another writer, or it is not a healthy care_ext store (a corrupted or
            foreign file is never replaced silently: move it aside or restore a backup).
    """

    def __init__(self, path: str | Path = ":memory:", timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        parent = Path(self.path).parent
        if self.path != ":memory:" and not self.path.startswith("file:") and not parent.is_dir():
            # not created here: a missing run directory is more often a typo than an intent
            raise LabelStoreError(f"label store {self.path!r}: its directory {str(parent)!r} does "
                                  "not exist; create it first (or fix the path)")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=timeout_s)
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._create()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LabelStoreError(
                    f"label store {self.path!r} is locked by another connection or process "
                    f"(waited {timeout_s} s: {exc}); stop the other writer or use another "
                    "store file") from exc
            raise LabelStoreError(f"label store {self.path!r} cannot be opened ({exc}); check "
                                  "the path and its permissions") from exc
        except sqlite3.DatabaseError as exc:
            raise LabelStoreError(
                f"label store {self.path!r} is corrupted or not a care_ext SQLite store ({exc}); "
                "move it aside or restore a backup - it is not replaced automatically, since "
                "that would forget which labels were paid for") from exc

    def _create(self) -> None:
        with self._tx():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS labels (uid TEXT PRIMARY KEY, label TEXT NOT NULL, "
                "source TEXT NOT NULL, cost REAL NOT NULL, step INTEGER NOT NULL, "
                "time REAL NOT NULL, run TEXT NOT NULL DEFAULT '')")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS ledger (uid TEXT PRIMARY KEY, status TEXT NOT NULL "
                "CHECK (status IN ('requested','pending','stored','failed')), step INTEGER NOT NULL, "
                "cost REAL NOT NULL, kind TEXT NOT NULL, time REAL NOT NULL, "
                "attempts INTEGER NOT NULL, run TEXT NOT NULL DEFAULT '')")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] == "1":  # before run ids: every existing row is the legacy run ''
                for table in ("labels", "ledger"):
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN run TEXT NOT NULL DEFAULT ''")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                                 (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {row[0]}, expected {SCHEMA_VERSION}")
            self._db.execute("CREATE INDEX IF NOT EXISTS ledger_step ON ledger(step)")
            self._db.execute("CREATE INDEX IF NOT EXISTS ledger_run_step ON ledger(run, step)")

    class _Tx:
        def __init__(self, store: "LabelStore") -> None:
            self.s = store

        def __enter__(self):
            self.s._lock.acquire()
            self.s._db.execute("BEGIN IMMEDIATE")
            return self.s._db

        def __exit__(self, et, ev, tb):
            try:
                self.s._db.execute("COMMIT" if et is None else "ROLLBACK")
            finally:
                self.s._lock.release()

    def _tx(self) -> "LabelStore._Tx":
        return LabelStore._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- reads -----------------------------------------------------------------------------------
    def _select(self, table: str, cols: str, uids: Iterable[str]) -> list[tuple]:
        uids = list(uids)
        out: list[tuple] = []
        with self._lock:
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                q = (f"SELECT uid{', ' if cols else ''}{cols} FROM {table} "
                     f"WHERE uid IN ({','.join('?' * len(chunk))})")
                out.extend(self._db.execute(q, chunk).fetchall())
        return out

    def get(self, uids: Iterable[str]) -> dict[str, StoredLabel]:
        """Stored labels of those uids that have one."""
        cols = "label, source, cost, step, time, run"
        return {u: StoredLabel(json.loads(lab), src, c, st, t, r)
                for u, lab, src, c, st, t, r in self._select("labels", cols, uids)}

    def ledger(self, uids: Iterable[str]) -> dict[str, LedgerRow]:
        """Ledger rows of those uids that were ever requested."""
        cols = "status, step, cost, kind, run"
        return {u: LedgerRow(s, st, c, k, r)
                for u, s, st, c, k, r in self._select("ledger", cols, uids)}

    def spent(self, step: int | None = None, exclude_step: int | None = None,
              run: str | None = None) -> tuple[int, float]:
        """(labels, cost) charged: in total, at one ``step``, or at every step but ``exclude_step``.

        With ``run``, a step means that run's step: ``step`` counts (run, step) only, and
        ``exclude_step`` leaves out (run, exclude_step) only (every other run's charges count);
        ``run`` alone counts that run's charges.
        """
        q = f"SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM ledger WHERE status IN {CHARGED}"
        args: tuple = ()
        if step is not None:
            q, args = q + " AND step = ?", (step,)
            if run is not None:
                q, args = q + " AND run = ?", (step, run)
        elif exclude_step is not None:
            if run is None:
                q, args = q + " AND step != ?", (exclude_step,)
            else:
                q, args = q + " AND NOT (step = ? AND run = ?)", (exclude_step, run)
        elif run is not None:
            q, args = q + " AND run = ?", (run,)
        with self._lock:
            n, c = self._db.execute(q, args).fetchone()
        return int(n), float(c)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def export(self) -> list[dict]:
        """Every label with its ledger status (an audit log)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT l.uid, l.label, l.source, l.cost, l.step, l.time, g.status FROM labels l "
                "LEFT JOIN ledger g ON g.uid = l.uid ORDER BY l.time").fetchall()
        return [dict(uid=u, label=json.loads(lab), source=s, cost=c, step=st, time=t, status=g)
                for u, lab, s, c, st, t, g in rows]

    # --- writes ----------------------------------------------------------------------------------
    def reserve(self, uids: list[str], step: int, cost_each: float, kind: str,
                step_cap: int, global_cap: int | None, run: str = "") -> list[str]:
        """Charge new requests, in order, while both caps allow; returns the uids charged.

        A uid with a charged ledger row or a stored label is never charged again (it is skipped
        here; the caller retries it for free). ``kind`` is 'sync' (status requested) or 'async'
        (status pending). Caps: labels charged at ``step`` of ``run`` <= step_cap and, if given,
        labels charged in total (every run of the file) <= global_cap.
        """
        status = "pending" if kind == "async" else "requested"
        now = time.time()
        taken: list[str] = []
        with self._tx() as db:
            n_step = db.execute(f"SELECT COUNT(*) FROM ledger WHERE status IN {CHARGED} "
                                "AND step = ? AND run = ?", (step, run)).fetchone()[0]
            n_all = db.execute(f"SELECT COUNT(*) FROM ledger WHERE status IN {CHARGED}").fetchone()[0]
            # the uids' ledger rows and stored labels in a few IN queries (inside the
            # transaction, so no other writer changes them before the inserts)
            rows = {u: (st, a) for u, st, a in self._select("ledger", "status, attempts", uids)}
            stored = {u for (u,) in self._select("labels", "", uids)}
            inserts = []
            for u in uids:
                if n_step >= step_cap or (global_cap is not None and n_all >= global_cap):
                    break
                row = rows.get(u)
                if (row is not None and row[0] in CHARGED) or u in stored:
                    continue  # a uid listed twice is charged once: its row is charged now
                attempts = (row[1] if row else 0) + 1
                inserts.append((u, status, step, float(cost_each), kind, now, attempts, run))
                rows[u] = (status, attempts)
                taken.append(u)
                n_step += 1
                n_all += 1
            db.executemany("INSERT OR REPLACE INTO ledger (uid, status, step, cost, kind, time, "
                           "attempts, run) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", inserts)
        return taken

    def put(self, uid: str, label: Any, source: str, cost: float, step: int,
            only_charged: bool = False, run: str = "") -> bool:
        """Store a label (JSON-serialisable after :func:`json_safe`) and mark its ledger row
        stored, atomically. With ``only_charged``, a uid whose ledger row is not charged
        (refunded 'failed', or no row at all) is left alone and False returned: a late label for
        a refunded request would otherwise become a charge past the caps. ``run`` and ``step``:
        the run and step that paid for it."""
        text = json.dumps(json_safe(label))
        with self._tx() as db:
            if only_charged:
                row = db.execute("SELECT status FROM ledger WHERE uid = ?", (uid,)).fetchone()
                if row is None or row[0] not in CHARGED:
                    return False
            self._write_labels(db, [(uid, text, source, float(cost), int(step), time.time(),
                                     run)])
        return True

    @staticmethod
    def _write_labels(db, rows: list[tuple]) -> None:
        """Inside a transaction: label rows ``(uid, JSON text, source, cost, step, time, run)``
        and their ledger rows marked stored (two ``executemany``, rows in order)."""
        db.executemany("INSERT OR REPLACE INTO labels (uid, label, source, cost, step, time, run) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("UPDATE ledger SET status = 'stored' WHERE uid = ?",
                       [(r[0],) for r in rows])

    def put_charged(self, uid: str, label: Any, source: str) -> bool:
        """Store the label of a charged request, with the cost, step and run of the ledger row
        that paid for it, and mark that row stored, in one transaction (the row is read inside
        it). False, and nothing stored, when the uid has no charged row (refunded 'failed', or
        never requested): a late label for a refunded request would be a charge past the caps."""
        return self.put_charged_many([(uid, label, source)])[0]

    def put_charged_many(self, items: Sequence[tuple[str, Any, str]]) -> list[bool]:
        """:meth:`put_charged` for several ``(uid, label, source)`` in one transaction: one
        commit, so one sync of the file, for all of them instead of one each (a few hundred µs
        each on a local disk, more on a network file system). One result per item, in order.
        Every label is encoded before the transaction starts: one that ``json`` refuses raises
        and nothing is stored."""
        texts = [json.dumps(json_safe(label)) for _, label, _ in items]
        return self.put_charged_texts(
            [(uid, text, source) for (uid, _, source), text in zip(items, texts, strict=True)])

    def put_charged_texts(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        """:meth:`put_charged_many` for labels already encoded: ``(uid, json text, source)``,
        the text as ``json.dumps(json_safe(label))`` gives it (a caller that has encoded its
        labels to check them does not encode them twice). The ledger rows are read in a few IN
        queries and the labels written with two ``executemany``, inside one transaction: the
        same rows as one statement each (a uid listed twice: its last label stays)."""
        if not items:
            return []
        out = []
        now = time.time()
        with self._tx() as db:
            rows = {u: (st, c, sp, r) for u, st, c, sp, r in
                    self._select("ledger", "status, cost, step, run", [u for u, _, _ in items])}
            labels = []
            for uid, text, source in items:
                row = rows.get(uid)
                if row is None or row[0] not in CHARGED:
                    out.append(False)
                    continue
                labels.append((uid, text, source, float(row[1]), int(row[2]), now, row[3]))
                out.append(True)
            self._write_labels(db, labels)
        return out

    def release(self, uid: str) -> None:
        """The oracle gave up on a charged request: mark it failed and refund its cost."""
        with self._tx() as db:
            db.execute("UPDATE ledger SET status = 'failed', cost = 0 WHERE uid = ? AND status != 'stored'",
                       (uid,))
