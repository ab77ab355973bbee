"""Oracles: where bought labels come from, behind one interface (§6).

A label is any JSON-serialisable value (typically the gold answer). The controller turns it into
this step's gold answer id with the host's ``resolve_label(label, payload) -> int`` (default: the
label *is* the answer id, which holds when answer ids are stable, e.g. integer answers).

* :class:`GoldOracle` - the dataset's gold column (simulation). The only kind whose ``peek`` works,
  so simulation-only strategies and ``sim/*`` metrics require it.
* :class:`CallableOracle` - a user callable ``fn(uid, payload) -> label`` (verifier, LLM judge),
  with retries and a per-call timeout.
* :class:`QueueOracle` - asynchronous: requests are queued for an annotator, labels arrive later
  through :meth:`QueueOracle.deliver` (from any thread); the controller polls at every decide.
* :class:`DelayedGoldOracle` - a simulated asynchronous queue whose gold labels arrive a fixed
  number of steps later.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping


class SimulationOnlyError(RuntimeError):
    """Something that reads unbought gold was asked of a non-simulation oracle."""


@dataclass
class OracleResult:
    """One answer of an oracle: status 'ok' (label set), 'failed' (error set) or 'pending'."""

    uid: str
    status: str
    label: Any = None
    error: str | None = None


class Oracle:
    """Base class. Subclasses implement :meth:`request` (and :meth:`poll` if asynchronous).

    Attributes:
        simulation: True only for oracles backed by a dataset's gold (enables ``peek``).
        asynchronous: requests answer 'pending'; labels come back through :meth:`poll`.
        cost: cost recorded per label (budget caps count labels; cost is for accounting).
        name: recorded as the label's source in the store.
        instant: :meth:`request_many` yields every result without waiting (an in-process
            lookup): the controller then stores one step's labels in one transaction. False
            (the default): each label is committed as it arrives, so a crash loses at most the
            label in hand, never one that came back earlier (for an oracle that bills per call).
    """

    simulation = False
    asynchronous = False
    instant = False
    cost = 1.0
    name = "oracle"

    def request(self, uid: str, payload: Any) -> OracleResult:
        raise NotImplementedError

    def request_many(self, items: list[tuple[str, Any]]) -> Iterator[OracleResult]:
        """Results of several requests, yielded as each completes (default: one by one)."""
        for uid, payload in items:
            yield self.request(uid, payload)

    def poll(self, step: int) -> list[OracleResult]:
        """Asynchronous results that arrived since the last poll ('ok' or 'failed')."""
        return []

    def peek(self, uid: str, payload: Any) -> Any:
        """The gold label without buying it (simulation only); None: this uid has no gold."""
        raise SimulationOnlyError(
            f"{type(self).__name__} is not a simulation oracle: reading the gold of an unbought "
            "prompt is only possible in simulation (GoldOracle)")

    def outstanding(self) -> set[str] | None:
        """Asynchronous oracles: uids requested whose result :meth:`poll` has not returned yet
        (delivered-but-unpolled ones included). The controller re-requests, free of charge, a
        'pending' uid that neither it nor the oracle still waits for (a crash lost the request,
        or a resume from a checkpoint older than it). None (the default): not tracked, such a
        uid is never re-requested."""
        return None

    def state_dict(self) -> dict:
        """The oracle's own state, saved inside the controller's checkpoint."""
        return {}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`."""


class GoldOracle(Oracle):
    """The dataset's gold labels (simulation).

    Args:
        gold: mapping uid -> label, or a callable (uid, payload) -> label.
        cost: recorded cost per label.
    """

    simulation = True
    instant = True
    name = "gold"

    def __init__(self, gold: Mapping[str, Any] | Callable[[str, Any], Any], cost: float = 1.0) -> None:
        self._gold, self.cost = gold, cost

    def _get(self, uid: str, payload: Any) -> Any:
        return self._gold(uid, payload) if callable(self._gold) else self._gold[uid]

    def request(self, uid: str, payload: Any) -> OracleResult:
        try:
            return OracleResult(uid, "ok", self._get(uid, payload))
        except KeyError:
            return OracleResult(uid, "failed", error=f"no gold for uid {uid!r}")

    def peek(self, uid: str, payload: Any) -> Any:
        """The gold label without buying it, or None when the dataset has no gold for ``uid``
        (a missing key, as :meth:`request` treats it: the controller reads it as gold id -1 and
        leaves the row out of the ``sim/*`` metrics)."""
        try:
            return self._get(uid, payload)
        except KeyError:
            return None


class CallableOracle(Oracle):
    """A user callable ``fn(uid, payload) -> label`` (a verifier, an LLM judge, a remote API).

    Each request is tried up to ``1 + retries`` times; a try that raises or exceeds ``timeout_s``
    (measured off the main thread, so it works inside Ray actors and worker threads) counts as a
    failure, and ``backoff_s * 2**attempt`` seconds pass before the next. Every try runs on its
    own daemon thread and only the call itself is timed: a timed-out call cannot be killed, its
    thread finishes in the background and its result is ignored, but it holds no slot that later
    requests wait for. Requests of one step run ``max_workers`` at a time.
    """

    name = "callable"

    def __init__(self, fn: Callable[[str, Any], Any], retries: int = 2, timeout_s: float = 60.0,
                 backoff_s: float = 0.5, cost: float = 1.0, max_workers: int = 4,
                 name: str = "callable") -> None:
        self.fn, self.retries, self.timeout_s, self.backoff_s = fn, retries, timeout_s, backoff_s
        self.cost, self.max_workers, self.name = cost, max_workers, name

    def _once(self, uid: str, payload: Any) -> Any:
        out: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            t0 = time.monotonic()
            try:
                out["value"] = self.fn(uid, payload)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                out["error"] = exc
            out["took"] = time.monotonic() - t0
            done.set()

        threading.Thread(target=call, name="care-oracle-call", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise cf.TimeoutError()
        if "error" in out:
            raise out["error"]
        # A call that ran longer than timeout_s is a timeout even when this (waiting) thread only
        # looks after it finished (a loaded machine can deschedule it): the outcome must not
        # depend on when the waiter runs.
        if out["took"] > self.timeout_s:
            raise cf.TimeoutError()
        return out["value"]

    def request(self, uid: str, payload: Any) -> OracleResult:
        err = ""
        for attempt in range(self.retries + 1):
            try:
                return OracleResult(uid, "ok", self._once(uid, payload))
            except cf.TimeoutError:
                err = f"timed out after {self.timeout_s}s"
            except Exception as exc:  # noqa: BLE001 - any failure of user code drops the prompt
                err = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries and self.backoff_s > 0:
                time.sleep(self.backoff_s * 2 ** attempt)
        return OracleResult(uid, "failed", error=f"{self.retries + 1} tries: {err}")

    def request_many(self, items: list[tuple[str, Any]]) -> Iterator[OracleResult]:
        if len(items) <= 1:
            yield from super().request_many(items)
            return
        with cf.ThreadPoolExecutor(max_workers=self.max_workers) as ex:
            futs = [ex.submit(self.request, u, p) for u, p in items]
            for f in cf.as_completed(futs):
                yield f.result()


class QueueOracle(Oracle):
    """Asynchronous labels (a human annotator): requests are queued, labels arrive later.

    The annotator side reads :meth:`take_requests` (or ``on_request``, called for each new
    request) and answers with :meth:`deliver` / :meth:`fail` from any thread. A prompt waiting
    for its label is DROPPED at the steps it appears in; when its label arrives it is stored
    (later epochs get it free) and trains the classifiers with the features of the step that
    requested it. A label delivered for a request that was refunded (:meth:`fail`) or never
    made is ignored by the controller: it would be a label outside the budget.

    Saved with the controller (:meth:`state_dict`): the open requests with their payloads and
    the results delivered but not yet polled. After a restore, the open requests without a
    result are handed out again (:meth:`take_requests`, ``on_request``): the annotator of the
    old process may be gone; a late answer to the old hand-out is still taken.
    """

    asynchronous = True
    name = "queue"

    def __init__(self, on_request: Callable[[str, Any], None] | None = None, cost: float = 1.0) -> None:
        self.on_request, self.cost = on_request, cost
        self._lock = threading.Lock()
        self._requests: list[tuple[str, Any]] = []  # not yet handed out
        self._arrived: list[OracleResult] = []  # delivered, not yet polled
        self._open: dict[str, Any] = {}  # uid -> payload: requested, result not yet polled

    def request(self, uid: str, payload: Any) -> OracleResult:
        with self._lock:
            self._open[uid] = payload
            self._requests.append((uid, payload))
        if self.on_request is not None:
            self.on_request(uid, payload)
        return OracleResult(uid, "pending")

    def take_requests(self) -> list[tuple[str, Any]]:
        """Requests not yet handed out (annotator side)."""
        with self._lock:
            out, self._requests = self._requests, []
        return out

    def deliver(self, uid: str, label: Any) -> None:
        """A label arrived (thread-safe)."""
        with self._lock:
            self._arrived.append(OracleResult(uid, "ok", label))

    def fail(self, uid: str, error: str = "annotator gave up") -> None:
        """The annotator will not label this prompt: its charge is refunded."""
        with self._lock:
            self._arrived.append(OracleResult(uid, "failed", error=error))

    def poll(self, step: int) -> list[OracleResult]:
        """Results delivered since the last poll, in order of arrival."""
        with self._lock:
            out, self._arrived = self._arrived, []
            for res in out:
                self._open.pop(res.uid, None)
        return out

    def outstanding(self) -> set[str]:
        """Requested uids whose result was not polled yet."""
        with self._lock:
            return set(self._open)

    def state_dict(self) -> dict:
        """Open requests (uid, payload) and delivered-but-unpolled results."""
        with self._lock:
            return {"open": list(self._open.items()),
                    "arrived": [(r.uid, r.status, r.label, r.error) for r in self._arrived]}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`; open requests without a result are handed out again."""
        with self._lock:
            self._open = dict(sd.get("open", []))
            self._arrived = [OracleResult(*r) for r in sd.get("arrived", [])]
            answered = {r.uid for r in self._arrived}
            again = [(u, p) for u, p in self._open.items() if u not in answered]
            self._requests = list(again)
        if self.on_request is not None:
            for u, p in again:
                self.on_request(u, p)


class DelayedGoldOracle(GoldOracle):
    """Simulated asynchronous queue: the gold label requested at step t arrives at step
    t + ``delay_steps`` (visible to the decide call of that step)."""

    asynchronous = True
    name = "delayed-gold"

    def __init__(self, gold, delay_steps: int = 1, cost: float = 1.0) -> None:
        super().__init__(gold, cost)
        self.delay_steps = delay_steps
        self._due: list[tuple[int, str, Any]] = []
        self._step = 0
        self._lock = threading.Lock()

    def request(self, uid: str, payload: Any) -> OracleResult:
        res = super().request(uid, payload)
        if res.status == "ok":
            with self._lock:
                self._due.append((self._step + self.delay_steps, uid, res.label))
            return OracleResult(uid, "pending")
        return res

    def poll(self, step: int) -> list[OracleResult]:
        with self._lock:
            self._step = step
            ready = [d for d in self._due if d[0] <= step]
            self._due = [d for d in self._due if d[0] > step]
        return [OracleResult(u, "ok", lab) for _, u, lab in ready]

    def outstanding(self) -> set[str]:
        """Requested uids whose label is not due yet."""
        with self._lock:
            return {u for _, u, _ in self._due}

    def state_dict(self) -> dict:
        """The labels not yet due and the last polled step."""
        return {"due": list(self._due), "step": self._step}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`."""
        self._due, self._step = [tuple(d) for d in sd["due"]], sd["step"]
