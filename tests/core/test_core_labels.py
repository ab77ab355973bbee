"""Label store, ledger, crash safety, oracles (callable with retries/timeouts, async queue), audit."""
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, CACHED, DROPPED, TRUSTED
from care_ext.labels import (CallableOracle, DelayedGoldOracle, GoldOracle, LabelStore,
                             LabelStoreError, Oracle, QueueOracle)
from care_ext.step import CareController

import core_crash_worker
from core_synth import make_batch, make_world

B, G, H = 20, 8, 16
HERE = os.path.dirname(__file__)


def test_store_persists_and_never_charges_a_uid_twice(tmp_path):
    path = tmp_path / "labels.sqlite"
    s = LabelStore(path)
    assert s.reserve(["a", "b", "c"], step=0, cost_each=2.0, kind="sync", step_cap=2, global_cap=None) == ["a", "b"]
    s.put("a", {"answer": "42"}, "judge", 2.0, 0)
    s.release("b")  # the oracle gave up: refunded
    assert s.spent() == (1, 2.0)
    assert s.reserve(["a", "b", "d"], step=1, cost_each=1.0, kind="sync", step_cap=5, global_cap=2) == ["b"]
    s.close()
    s = LabelStore(path)  # reopened from disk
    assert s.get(["a", "zz"])["a"].label == {"answer": "42"} and s.spent() == (2, 3.0)
    assert s.spent(step=1) == (1, 1.0) and s.spent(exclude_step=1) == (1, 2.0)
    assert [r["uid"] for r in s.export()] == ["a"]
    assert s.ledger(["b"])["b"].status == "requested"


def test_put_charged_records_the_paying_row_and_refuses_an_uncharged_uid():
    s = LabelStore()
    assert s.reserve(["a", "b"], step=3, cost_each=2.5, kind="async", step_cap=5, global_cap=None,
                     run="r1") == ["a", "b"]
    s.release("b")  # refunded
    assert s.put_charged("a", 7, "queue") and s.ledger(["a"])["a"].status == "stored"
    a = s.get(["a"])["a"]
    assert (a.label, a.source, a.cost, a.step, a.run) == (7, "queue", 2.5, 3, "r1")
    assert not s.put_charged("b", 8, "queue") and not s.put_charged("zz", 9, "queue")
    assert set(s.get(["a", "b", "zz"])) == {"a"} and s.ledger(["b"])["b"].status == "failed"
    assert s.spent() == (1, 2.5)
    # several in one transaction: each judged on its own row
    assert s.reserve(["c", "d"], step=4, cost_each=1.5, kind="sync", step_cap=5, global_cap=None,
                     run="r2") == ["c", "d"]
    assert s.put_charged_many([("c", [1], "judge"), ("b", 9, "judge"), ("d", {"x": 2}, "judge"),
                               ("yy", 0, "judge")]) == [True, False, True, False]
    got = s.get(["b", "c", "d", "yy"])
    assert set(got) == {"c", "d"} and got["d"].label == {"x": 2} and got["c"].run == "r2"
    assert (got["c"].cost, got["c"].step) == (1.5, 4) and s.spent() == (3, 5.5)
    assert {u: r.status for u, r in s.ledger(["b", "c", "d"]).items()} == {
        "b": "failed", "c": "stored", "d": "stored"}
    with pytest.raises(TypeError):  # json refuses it: nothing of the call is stored
        s.put_charged_many([("a", 5, "judge"), ("c", object(), "judge")])
    assert s.get(["a"])["a"].label == 7


def test_put_charged_texts_writes_the_rows_one_statement_each_would(tmp_path):
    """put_charged_texts (what the controller stores a step's labels with: pre-encoded labels,
    ledger rows read by IN queries, two executemany) leaves the same labels and ledger as
    put_charged called once per item, over more uids than one IN query takes (500), with a uid
    listed twice (its last label stays), uncharged and unknown uids (False, nothing stored) and
    labels json must encode; the result list is per item, in order."""
    import json

    n = 1203
    uids = [f"u{i}" for i in range(n)]
    items = [(u, {"a": i % 7, "t": [i, "x"]}, "judge") for i, u in enumerate(uids)]
    items += [("u5", "again", "judge2"), ("u9", 1.5, "judge"), ("nope", 3, "judge")]
    stores = []
    for batched in (False, True):
        s = LabelStore(tmp_path / f"labels_{batched}.sqlite")
        assert len(s.reserve(uids, step=2, cost_each=0.5, kind="sync", step_cap=n,
                             global_cap=None, run="r")) == n
        s.release("u9")  # refunded: a label for it is refused
        if batched:
            got = s.put_charged_texts([(u, json.dumps(lab), src) for u, lab, src in items])
        else:
            got = [s.put_charged(u, lab, src) for u, lab, src in items]
        assert got == [u not in ("u9", "nope") for u, _, _ in items]
        stores.append(s)
    seq, bat = stores
    keys = uids + ["nope"]

    def strip(d):
        return {u: (x.label, x.source, x.cost, x.step, x.run) for u, x in d.items()}

    assert strip(bat.get(keys)) == strip(seq.get(keys))
    assert bat.get(["u5"])["u5"].label == "again" and "u9" not in bat.get(["u9"])
    assert bat.ledger(keys) == seq.ledger(keys)
    assert bat.spent() == seq.spent() == (n - 1, 0.5 * (n - 1))
    assert bat.put_charged_texts([]) == []


def test_reserve_charges_a_repeated_uid_once_and_counts_attempts(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite")
    assert s.reserve(["a", "a", "b", "c"], step=0, cost_each=1.0, kind="sync", step_cap=2,
                     global_cap=None) == ["a", "b"]  # the cap counts "a" once
    s.release("a")  # refunded: a new request pays again, as attempt 2
    s.put("b", 1, "judge", 1.0, 0)
    assert s.reserve(["b", "a", "c", "d"], step=1, cost_each=1.0, kind="sync", step_cap=5,
                     global_cap=3) == ["a", "c"]  # b is stored; the global cap stops d
    s.close()
    db = sqlite3.connect(tmp_path / "labels.sqlite")
    attempts = dict(db.execute("SELECT uid, attempts FROM ledger").fetchall())
    assert attempts == {"a": 2, "b": 1, "c": 1}
    db.close()


def test_corrupted_store_file_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.sqlite"
    s = LabelStore(path)
    s.reserve([f"u{i}" for i in range(200)], 0, 1.0, "sync", 1000, None)
    s.close()
    with open(path, "r+b") as f:  # clobber the header and the first pages
        f.write(b"\x00garbage" * 512)
    with pytest.raises(LabelStoreError, match="corrupted"):
        LabelStore(path)
    bad = tmp_path / "not_a_db.sqlite"
    bad.write_text("hello, I am a text file" * 100)
    with pytest.raises(LabelStoreError):
        LabelStore(bad)


def test_store_in_a_missing_directory_names_the_directory(tmp_path):
    """A typo in the run directory is not reported as a corrupted store."""
    missing = tmp_path / "no_such_dir"
    with pytest.raises(LabelStoreError, match="directory") as err:
        LabelStore(missing / "labels.sqlite")
    assert str(missing) in str(err.value) and "corrupted" not in str(err.value)
    assert not missing.exists()


def test_locked_store_says_locked_not_corrupted(tmp_path):
    path = tmp_path / "labels.sqlite"
    LabelStore(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(LabelStoreError, match="locked") as err:
            LabelStore(path, timeout_s=0.05)
        assert "corrupted" not in str(err.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
    LabelStore(path, timeout_s=0.05).close()  # free again: opens


def test_sigkill_between_requested_and_stored_then_resume(tmp_path):
    """A real process is killed inside the oracle call; the resumed run pays nothing twice,
    exceeds no cap and makes the same decisions as an uninterrupted run."""
    straight = core_crash_worker.run("straight", str(tmp_path / "straight.sqlite"), "")
    store, ckpt, marker = (str(tmp_path / n) for n in ("crash.sqlite", "ckpt.pt", "marker"))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # inherits CARE_EXT_*_NATIVE of the run
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "core_crash_worker.py"), "crash",
                             store, ckpt, marker], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(store) as db:  # the crash left paid-but-unstored requests at step 1
        rows = dict(db.execute("SELECT status, COUNT(*) FROM ledger WHERE step = 1 GROUP BY status").fetchall())
    # every purchase of step 1 was entered in the ledger before the judge ran; the blocked 3rd
    # call (and any whose result the main thread had not stored yet) stays "requested"
    assert sum(rows.values()) == math.ceil(0.25 * B)
    assert rows.get("requested", 0) >= 1 and rows.get("stored", 0) <= 2
    resumed = core_crash_worker.run("resume", store, ckpt)
    for s in (1, 2):
        assert resumed[s] == straight[s]
    st, ss = LabelStore(store), LabelStore(str(tmp_path / "straight.sqlite"))
    assert st.spent() == ss.spent()
    cap = math.ceil(0.25 * B)
    for s in range(3):
        assert st.spent(step=s)[0] <= cap
    assert st.spent()[0] <= 12
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM ledger WHERE status != 'stored'").fetchone()[0] == 0


def _commits(store: LabelStore) -> list:
    """COMMIT statements the store's connection runs from now on (sqlite3's trace hook)."""
    seen: list = []
    store._db.set_trace_callback(
        lambda q: seen.append(q) if q.strip().upper() == "COMMIT" else None)
    return seen


def test_an_instant_oracle_s_labels_are_committed_together_a_billing_one_s_one_by_one(tmp_path):
    b = make_batch(make_world(B=B, G=G, H=H), 0)
    n = math.ceil(0.2 * B)
    for name, oracle, want in (("gold", GoldOracle(b.gold), 2),  # reserve + all labels
                               ("judge", CallableOracle(lambda u, p: b.gold[u], backoff_s=0),
                                1 + n)):  # reserve + one per label
        store = LabelStore(tmp_path / f"{name}.sqlite")
        commits = _commits(store)
        c = CareController(CareConfig(strategy="random", group_size=G), oracle, store)
        d = c.decide(b.uids, b.ids)
        assert d.labels_bought == n and store.spent() == (n, float(n)) and len(store) == n
        assert len(commits) == want, name


def test_a_billing_oracle_s_label_is_durable_before_the_rest_come_back(tmp_path):
    b = make_batch(make_world(B=B, G=G, H=H), 0)
    path = tmp_path / "labels.sqlite"
    n, calls, seen_stored = math.ceil(0.2 * B), [], []

    def judge(uid, payload):
        calls.append(uid)
        if len(calls) == n:  # the last call waits until another reader sees the others stored
            deadline = time.time() + 20
            while time.time() < deadline:
                with sqlite3.connect(path) as db:
                    k = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
                if k == n - 1:
                    break
                time.sleep(0.01)
            seen_stored.append(k)
        return b.gold[uid]

    c = CareController(CareConfig(strategy="random", group_size=G),
                       CallableOracle(judge, backoff_s=0, max_workers=1), LabelStore(path))
    assert c.decide(b.uids, b.ids).labels_bought == n
    assert seen_stored == [n - 1]


def _gold_batch(step=0):
    return make_batch(make_world(B=B, G=G, H=H), step)


def test_callable_oracle_retries_then_succeeds_and_failures_are_dropped_uncharged():
    b = _gold_batch()
    tries = {}

    def flaky(uid, payload):
        tries[uid] = tries.get(uid, 0) + 1
        if tries[uid] < 3:
            raise ConnectionError("judge busy")
        return b.gold[uid]

    c = CareController(CareConfig(strategy="random", group_size=G), CallableOracle(flaky, retries=2, backoff_s=0))
    d = c.decide(b.uids, b.ids)
    assert d.labels_bought == 4 and set(tries.values()) == {3}

    def broken(uid, payload):
        raise RuntimeError("judge down")

    c = CareController(CareConfig(strategy="random", group_size=G), CallableOracle(broken, retries=1, backoff_s=0))
    d = c.decide(b.uids, b.ids)
    assert d.labels_bought == 0 and d.metrics["budget/failed"] == 4
    assert int((d.source == DROPPED).sum()) == 4 and c.store.spent() == (0, 0.0) and len(c.store) == 0

    def slow(uid, payload):
        time.sleep(0.5)
        return b.gold[uid]

    c = CareController(CareConfig(strategy="gt", group_size=G, budget_frac=0.1),
                       CallableOracle(slow, retries=0, timeout_s=0.02, max_workers=8))
    d = c.decide(b.uids, b.ids)
    assert (d.source == DROPPED).all() and c.store.spent() == (0, 0.0)


def test_callable_oracle_hung_calls_do_not_starve_later_requests():
    """The judge hangs on its first 4 calls, then answers at once. With max_workers=2, the two
    hung first tries must not hold the slots the retries (and later requests) need: only the
    call itself is timed, never a wait for a free thread."""
    release, lock, calls = threading.Event(), threading.Lock(), [0]

    def judge(uid, payload):
        with lock:
            calls[0] += 1
            hang = calls[0] <= 4
        if hang:
            release.wait(10.0)
        return 7

    o = CallableOracle(judge, retries=2, timeout_s=0.4, backoff_s=0, max_workers=2)
    try:
        t0 = time.monotonic()
        res = list(o.request_many([("a", None), ("b", None)]))
        assert sorted((r.uid, r.status, r.label) for r in res) == [("a", "ok", 7), ("b", "ok", 7)]
        res = list(o.request_many([("c", None), ("d", None)]))  # the 4 hung calls still run
        assert [r.status for r in res] == ["ok", "ok"] and calls[0] == 8
        assert time.monotonic() - t0 < 2.5  # two timed-out tries per uid, then instant answers
    finally:
        release.set()


def test_an_oracle_that_raises_drops_its_prompts_uncharged():
    class Exploding(Oracle):
        def request(self, uid, payload):
            raise OSError("network unreachable")

    b = _gold_batch()
    c = CareController(CareConfig(strategy="entropy", group_size=G), Exploding())
    with pytest.warns(RuntimeWarning, match="not charged"):
        d = c.decide(b.uids, b.ids)
    assert int((d.source == DROPPED).sum()) == 4 and int((d.source == TRUSTED).sum()) == B - 4
    assert c.store.spent() == (0, 0.0)


def test_async_queue_labels_arrive_later_train_and_are_cached():
    world = make_world(B=B, G=G, H=H)
    b0 = make_batch(world, 0)
    q = QueueOracle()
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0), q)
    d0 = c.decide(b0.uids, b0.ids, **b0.kwargs())
    asked = [u for u, _ in q.take_requests()]
    cap = math.ceil(0.2 * B)
    assert len(asked) == cap and d0.labels_bought == 0 and d0.metrics["budget/pending"] == cap
    idx = [b0.uids.index(u) for u in asked]
    assert (d0.source[idx] == DROPPED).all() and c.store.spent()[0] == cap
    assert c.update()["train/samples"] == 0
    # step 1: the same prompts come back before any label arrived: dropped, not paid again
    b1 = make_batch(world, 1)
    b1.uids = b0.uids
    d1 = c.decide(b1.uids, b1.ids, **b1.kwargs())
    assert (d1.source[idx] == DROPPED).all() and d1.metrics["budget/waiting"] == cap
    assert c.store.spent(step=1)[0] == cap and c.store.spent()[0] == 2 * cap  # no repeat charges
    c.update()
    step1_asked = [u for u, _ in q.take_requests()]
    for u in asked:
        q.deliver(u, b0.gold[u])
    q.fail(step1_asked[0])
    b2 = make_batch(world, 2)
    b2.uids = b0.uids
    d2 = c.decide(b2.uids, b2.ids, **b2.kwargs())
    assert d2.metrics["budget/arrived"] == cap
    assert (d2.source[idx] == CACHED).all()  # arrived labels are cached and free
    assert c.store.spent()[0] == 3 * cap - 1  # step 2 bought cap more; the failure was refunded
    m = c.update()
    # the arrivals (with their step-0 features), the cached rows and the new purchases of step 2
    assert m["train/samples"] == cap + cap + d2.labels_bought


def test_delayed_gold_oracle_delivers_after_n_steps():
    world = make_world(B=B, G=G, H=H)
    batches = [make_batch(world, s) for s in range(4)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    c = CareController(CareConfig(strategy="random", group_size=G), DelayedGoldOracle(gold, delay_steps=2))
    arrived = []
    for b in batches:
        d = c.decide(b.uids, b.ids)
        c.update()
        arrived.append(d.metrics["budget/arrived"])
        assert not (d.source == BOUGHT).any()
    assert arrived == [0, 0, 4, 4] and len(c.store) == 8


def test_audit_slice_estimates_pseudo_label_accuracy_without_bias():
    world = make_world(B=40, G=G, H=H)
    gold, n_ok, n = {}, 0, 0
    c = CareController(CareConfig(strategy="ttrl", group_size=G, audit_frac=1.0, budget_frac=0.25),
                       GoldOracle(gold))
    for s in range(6):
        b = make_batch(world, s)
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids)
        c.update()
        audited = d.source == BOUGHT
        assert int(audited.sum()) == 10
        n_ok += int(b.majority_correct[audited].sum())
        n += 10
    assert d.metrics["audit/n_total"] == n
    assert d.metrics["audit/pseudo_label_acc"] == pytest.approx(n_ok / n)
    assert abs(d.metrics["audit/pseudo_label_acc"] - 0.6) < 0.15  # p_wrong = 0.4 in the batches


def test_a_label_the_store_cannot_record_is_refunded_and_the_step_goes_on():
    """A label json refuses (here a set) fails its own row only: refunded, warned as such, and
    the other purchases of the step are still made and stored."""
    b = _gold_batch()
    gold = dict(b.gold)
    c0 = CareController(CareConfig(strategy="entropy", group_size=G, sim_metrics=False),
                        GoldOracle(gold))
    first = c0.decide(b.uids, b.ids)  # which rows entropy buys (deterministic)
    bought = [b.uids[i] for i in (first.source == BOUGHT).nonzero().flatten().tolist()]
    assert len(bought) == 4
    gold[bought[0]] = {1, 2}  # not JSON-serialisable
    c = CareController(CareConfig(strategy="entropy", group_size=G, sim_metrics=False),
                       GoldOracle(gold))
    with pytest.warns(RuntimeWarning, match="refunded"):
        d = c.decide(b.uids, b.ids)
    assert int(d.source[b.uids.index(bought[0])]) == DROPPED and d.labels_bought == 3
    led = c.store.ledger(bought)
    assert led[bought[0]].status == "failed" and led[bought[0]].cost == 0.0
    assert all(led[u].status == "stored" for u in bought[1:])
    assert c.store.spent() == (3, 3.0) and len(c.store) == 3


def test_numpy_scalar_labels_are_stored_as_python_values():
    """A gold column from pandas holds numpy.int64: bought, stored, and read back as int."""
    np = pytest.importorskip("numpy")
    b = _gold_batch()
    gold = {u: np.int64(g) for u, g in b.gold.items()}
    cfg = CareConfig(strategy="entropy", group_size=G, sim_metrics=False)
    c = CareController(cfg, GoldOracle(gold))
    d = c.decide(b.uids, b.ids)
    assert d.labels_bought == 4 and c.store.spent() == (4, 4.0)
    got = c.store.get(b.uids)
    assert len(got) == 4
    assert all(type(s.label) is int and s.label == b.gold[u] for u, s in got.items())


@pytest.mark.parametrize("strategy", ["gt", "entropy", "oracle"])
@pytest.mark.parametrize("as_callable", [False, True])
def test_a_prompt_without_gold_is_dropped_and_left_out_of_sim_metrics(strategy, as_callable):
    """One uid has no gold (a dict without it, or a callable that raises KeyError as the OpenRLHF
    runner's ``GoldOracle(lambda uid, p: gold_by_uid[uid])`` does): decide with the default
    sim_metrics runs, that prompt is refunded if bought, and sim/* are computed on the others."""
    b = _gold_batch()
    gold = {u: g for u, g in b.gold.items() if u != b.uids[0]}
    oracle = GoldOracle((lambda uid, payload: gold[uid]) if as_callable else gold)
    assert oracle.peek(b.uids[0], None) is None and oracle.peek(b.uids[1], None) == gold[b.uids[1]]
    c = CareController(CareConfig(strategy=strategy, group_size=G), oracle)
    d = c.decide(b.uids, b.ids)
    assert int(d.source[0]) in (DROPPED, TRUSTED) and int(d.gold_ids[0]) == -1
    row = c.store.ledger([b.uids[0]]).get(b.uids[0])
    assert row is None or (row.status == "failed" and row.cost == 0.0)
    assert d.metrics["sim/no_gold"] == 1.0
    assert d.metrics["sim/label_acc"] == pytest.approx(float(b.majority_correct[1:].float().mean()))
    if strategy == "gt":
        assert int(d.source[0]) == DROPPED and d.labels_bought == B - 1
        assert c.store.spent() == (B - 1, B - 1.0)


def test_labels_bought_counts_bought_rows_not_the_charge():
    """As Decision documents: an async purchase is charged now but counts 0 in labels_bought;
    a free retry of an earlier step's charge counts 1 while this step is charged nothing."""
    b = _gold_batch()
    c = CareController(CareConfig(strategy="entropy-mask", group_size=G),
                       DelayedGoldOracle(b.gold, 1))
    d = c.decide(b.uids, b.ids)
    assert d.labels_bought == 0 and d.metrics["budget/labels_step"] == 4.0
    s = LabelStore(":memory:")
    assert s.reserve([b.uids[3]], 0, 1.0, "sync", 2, None) == [b.uids[3]]  # then a crash
    c = CareController(CareConfig(strategy="ttrl", group_size=G), GoldOracle(b.gold), s)
    c.step = 1
    d = c.decide(b.uids, b.ids)
    assert d.labels_bought == 1 == int((d.source == BOUGHT).sum()) and int(d.source[3]) == BOUGHT
    assert d.metrics["budget/labels_step"] == 0.0 and s.spent() == (1, 1.0)


def test_async_pending_lost_in_a_crash_is_asked_again_free(tmp_path):
    """Checkpoint, decide (async requests 'pending' in the ledger), crash before the next
    checkpoint: the resumed run asks those uids again for free, and their labels arrive."""
    b = _gold_batch()
    path, ck = str(tmp_path / "s.sqlite"), str(tmp_path / "c.pt")
    cfg = CareConfig(strategy="entropy-mask", group_size=G, sim_metrics=False)

    def ctl():
        return CareController(cfg, DelayedGoldOracle(b.gold, delay_steps=1), LabelStore(path))

    a = ctl()
    a.save(ck)
    d = a.decide(b.uids, b.ids)
    asked = [b.uids[i] for i in range(B) if b.uids[i] in a.store.ledger(b.uids)]
    assert d.metrics["budget/pending"] == 4 and len(asked) == 4
    del a  # crash: the oracle's queue is gone, the ledger keeps 4 pending charges
    r = ctl()
    r.load(ck)
    d = r.decide(b.uids, b.ids)
    r.update()
    assert d.metrics["budget/waiting"] == 0 and d.metrics["budget/pending"] == 4
    assert r.store.spent() == (4, 4.0)  # asked again, not charged again
    d = r.decide(b.uids, b.ids)
    r.update()
    assert d.metrics["budget/arrived"] == 4
    assert all(int(d.source[b.uids.index(u)]) == CACHED for u in asked)
    assert all(s.status == "stored" for s in r.store.ledger(asked).values())


def test_queue_oracle_saves_open_requests_and_delivered_labels(tmp_path):
    """A label delivered before a clean save survives the restart; an open request without an
    answer is handed out again by the restored oracle."""
    b = _gold_batch()
    path, ck = str(tmp_path / "s.sqlite"), str(tmp_path / "c.pt")
    cfg = CareConfig(strategy="entropy-mask", group_size=G, sim_metrics=False)
    q = QueueOracle()
    a = CareController(cfg, q, LabelStore(path))
    a.decide(b.uids, b.ids)
    a.update()
    asked = [u for u, _ in q.take_requests()]
    assert len(asked) == 4
    for u in asked[:3]:
        q.deliver(u, b.gold[u])
    a.save(ck)
    a.store.close()
    q2 = QueueOracle()
    r = CareController(cfg, q2, LabelStore(path))
    r.load(ck)
    assert [u for u, _ in q2.take_requests()] == asked[3:] and q2.outstanding() == set(asked)
    d = r.decide(b.uids, b.ids)
    r.update()
    assert d.metrics["budget/arrived"] == 3 and d.metrics["budget/waiting"] == 1
    assert set(r.store.get(asked)) == set(asked[:3]) and r.store.spent(step=0) == (4, 4.0)


def test_a_late_label_for_a_refunded_request_is_ignored():
    """fail() refunds a charge; the annotator's late deliver() for it must not store a label
    (and a 'stored' ledger row) past the global budget."""
    world = make_world(B=B, G=G, H=H)
    b0, b1, b2 = (make_batch(world, s) for s in range(3))
    q = QueueOracle()
    c = CareController(CareConfig(strategy="random", group_size=G, global_budget=4), q)
    c.decide(b0.uids, b0.ids)
    c.update()
    asked = [u for u, _ in q.take_requests()]
    for u in asked[:3]:
        q.deliver(u, b0.gold[u])
    q.fail(asked[3])
    c.decide(b1.uids, b1.ids)  # refund seen: the freed label is spent on b1
    c.update()
    assert c.store.spent()[0] == 4
    q.deliver(asked[3], b0.gold[asked[3]])  # the annotator answers anyway
    with pytest.warns(RuntimeWarning, match="refunded"):
        d = c.decide(b2.uids, b2.ids)
    assert d.metrics["budget/arrived"] == 0 and c.store.spent()[0] == 4
    assert asked[3] not in c.store.get([asked[3]])
    assert c.store.ledger([asked[3]])[asked[3]].status == "failed"


def test_a_new_run_on_an_existing_store_has_its_own_step_cap_and_cache(tmp_path):
    """Runs sharing one store file: a new controller starts at step 0 again, but run A's step-0
    purchases neither fill run B's step-0 cap nor look like run C's own step-0 purchases."""
    world = make_world(B=B, G=G, H=H)
    b0, b1 = make_batch(world, 0), make_batch(world, 1)
    gold = {**b0.gold, **b1.gold}
    path = tmp_path / "labels.sqlite"
    cfg = CareConfig(strategy="entropy", group_size=G, sim_metrics=False)
    run_a = CareController(cfg, GoldOracle(gold), LabelStore(path))
    d = run_a.decide(b0.uids, b0.ids)
    run_a.update()
    bought_a = [b0.uids[i] for i in (d.source == BOUGHT).nonzero().flatten().tolist()]
    assert len(bought_a) == 4
    run_b = CareController(cfg, GoldOracle(gold), LabelStore(path))
    d = run_b.decide(b1.uids, b1.ids)
    assert d.labels_bought == 4 and d.metrics["budget/labels_step"] == 4.0
    cfg_c = CareConfig(strategy="random-mask", group_size=G, sim_metrics=False, seed=5)
    run_c = CareController(cfg_c, GoldOracle(gold), LabelStore(path))
    d = run_c.decide(b0.uids, b0.ids)
    assert all(int(d.source[b0.uids.index(u)]) == CACHED for u in bought_a)
    assert d.labels_bought == 4 and LabelStore(path).spent() == (12, 12.0)


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    """A store written before run ids opens: its rows belong to the legacy run '' (the run of a
    checkpoint without a run id), nothing is lost or charged again."""
    path = tmp_path / "labels.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("CREATE TABLE labels (uid TEXT PRIMARY KEY, label TEXT NOT NULL, source TEXT NOT "
               "NULL, cost REAL NOT NULL, step INTEGER NOT NULL, time REAL NOT NULL)")
    db.execute("CREATE TABLE ledger (uid TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN "
               "('requested','pending','stored','failed')), step INTEGER NOT NULL, cost REAL NOT "
               "NULL, kind TEXT NOT NULL, time REAL NOT NULL, attempts INTEGER NOT NULL)")
    db.execute("INSERT INTO labels VALUES ('a', '42', 'gold', 1.0, 0, 0.0)")
    db.execute("INSERT INTO ledger VALUES ('a', 'stored', 0, 1.0, 'sync', 0.0, 1)")
    db.execute("INSERT INTO ledger VALUES ('b', 'requested', 0, 1.0, 'sync', 0.0, 1)")
    db.close()
    s = LabelStore(path)
    assert s.get(["a"])["a"].label == 42 and s.get(["a"])["a"].run == ""
    assert s.ledger(["b"])["b"].run == "" and s.spent() == (2, 2.0)
    assert s.spent(step=0, run="") == (2, 2.0) and s.spent(step=0, run="other") == (0, 0.0)
    assert s.reserve(["c", "d"], 0, 1.0, "sync", step_cap=3, global_cap=None, run="") == ["c"]
