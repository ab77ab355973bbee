"""The benchmark scripts run end to end at tiny sizes and write the rows bench/RESULTS.md is made
from (a broken benchmark would otherwise show up only on the GPU machine, costing its session)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.native


def test_bench_ops_writes_every_provider_row(tmp_path):
    import bench_ops

    out = tmp_path / "ops"
    rc = bench_ops.main(["--device", "cpu", "--threads", "1", "--shapes", "6x4x32", "--min-time", "0.01",
                         "--providers", "native", "reference",
                         "--ops", "cluster_stats", "acquisition_step", "acquisition_step_fused",
                         "acquisition_step_fused_split", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["cluster_stats", "acquisition_step", "acquisition_step_fused",
                                       "acquisition_step_fused_split"]
    for r in rows:
        assert r["native_us"] > 0 and r["reference_us"] > 0 and "native_error" not in r, r
        assert r["build_info"]["native"] is True and r["device"] == "cpu"
    assert rows[1]["flops_dense"] >= rows[1]["flops_native_cpu"] > 0
    assert out.with_suffix(".csv").exists()


def test_bench_ops_cpu_split_steps(tmp_path):
    """The CPU-only split steps (MKL's GEMM on 3 pieces, BRGeMM on 3 packed pieces, on 2 packed
    pieces: bf16x2) each write a native and a reference row (on a CPU without AMX the packed ops
    run MKL's path on the plain pieces)."""
    import bench_ops

    out = tmp_path / "ops"
    ops = ["acquisition_step_split", "acquisition_step_split_packed",
           "acquisition_step_split2_packed"]
    rc = bench_ops.main(["--device", "cpu", "--threads", "1", "--shapes", "6x4x32", "--min-time",
                         "0.01", "--providers", "native", "reference", "--ops", *ops,
                         "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ops
    for r in rows:
        assert r["native_us"] > 0 and r["reference_us"] > 0 and "native_error" not in r, r


@pytest.mark.parametrize("extra", [[], ["--first-layer-backward", "autograd", "fused"],
                                   ["--projected"], ["--first-layer-gemm", "float32", "bf16x3"]])
def test_bench_step_runs(tmp_path, extra):
    import bench_step

    out = tmp_path / "step"
    assert bench_step.main(["--device", "cpu", "--shapes", "12x4x32", "--steps", "2", "--warmup", "1",
                            "--out", str(out), *extra]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == (2 if "fused" in extra or "bf16x3" in extra else 1)
    for r in rows:
        assert r["decide_ms"] > 0 and r["update_ms"] > 0 and r["shape"] == "12x4x32"
        assert r["build_info"]["native"] is True  # which build ran (RESULTS.md provenance)
    if "--projected" in extra:
        assert rows[0]["projected"] and rows[0]["project_ms"] > 0
    if "fused" in extra:
        assert [r["first_layer_backward"] for r in rows] == ["autograd", "fused"]
    if "bf16x3" in extra:  # side by side in one run, each row saying what ran
        assert [(r["first_layer_gemm"], r["split_terms"]) for r in rows] == [("float32", 0),
                                                                             ("bf16x3", 3)]
    else:  # the default, 'auto', keeps float32 at this small width
        assert all(r["first_layer_gemm"] == "auto" and r["split_terms"] == 0 for r in rows)


def test_bench_step_packs_when_asked(tmp_path):
    """--first-layer-pack off on: two rows side by side, the second packed exactly where the CPU
    has the packed path (build_info's cpu_brgemm)."""
    import bench_step
    from care_ext.bf16_split import cpu_brgemm_available

    out = tmp_path / "step"
    assert bench_step.main(["--device", "cpu", "--shapes", "12x4x32", "--steps", "2", "--warmup",
                            "1", "--first-layer-gemm", "bf16x3", "--first-layer-pack", "off", "on",
                            "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["first_layer_pack"], r["packed"]) for r in rows] == [
        ("off", False), ("on", cpu_brgemm_available())]


def test_bench_step_packs_float32_weights_where_the_avx2_gemm_runs(tmp_path, monkeypatch):
    """float32 first layers with --first-layer-pack off on: the second row packed exactly where
    the CPU step runs the AVX2 GEMM (CARE_EXT_CPU_GEMM=avx2 on a CPU with AVX2 and FMA), never
    with mkl."""
    import bench_step

    has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    for env, want in (("avx2", has_avx2), ("mkl", False)):
        if env == "avx2" and not has_avx2:
            continue
        monkeypatch.setenv("CARE_EXT_CPU_GEMM", env)
        out = tmp_path / f"step_{env}"
        assert bench_step.main(["--device", "cpu", "--shapes", "12x4x32", "--steps", "2",
                                "--warmup", "1", "--first-layer-gemm", "float32",
                                "--first-layer-pack", "off", "on", "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        assert [(r["first_layer_pack"], r["packed"]) for r in rows] == [("off", False),
                                                                          ("on", want)]


def test_step_goals_reads_a_bench_run(tmp_path, capsys):
    """The goal lines gpu_check.sh prints: PASS/FAIL from the run's own numbers, n/a where a
    provider is missing, other ops and shapes ignored."""
    import step_goals

    rows = [
        dict(op="acquisition_step", shape="64x8x4096", native_us=500.0, reference_us=2000.0,
             cudagraph_us=400.0),
        dict(op="acquisition_step_fused_split", shape="64x8x4096", native_us=20.0,
             reference_us=2000.0, cudagraph_us=400.0),
        dict(op="acquisition_step_fused_split", shape="1024x64x4096", native_us=250.0, floor_us=138.0),
        dict(op="acquisition_step_fused", shape="1024x64x4096", native_us=1000.0, floor_us=138.0),
        dict(op="acquisition_step_fused", shape="512x16x4096", native_us=300.0),
        dict(op="cluster_stats", shape="64x8x4096", native_us=10.0),
        dict(op="acquisition_step_fused", shape="64x8x4096", native_us=30.0),  # no reference row
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_goals.main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert "<=25us:FAIL" in lines[0] and "x4.0 eager (>=70):FAIL" in lines[0] and "graph (>=15):FAIL" in lines[0]
    assert "<=25us:PASS" in lines[1] and "x100.0 eager (>=70):PASS" in lines[1] and "x20.0 graph (>=15):PASS" in lines[1]
    assert "1.81x floor (<=2):PASS" in lines[2] and "7.25x floor (<=2):FAIL" in lines[3]
    assert "<=25us:FAIL" in lines[4] and "eager (>=70):n/a" in lines[4]


def test_step_goals_plan_rows(tmp_path, capsys):
    """A GPU row with native_plan_us (the step through StepGraph) gets the same goals again on a
    line marked (plan), from the plan's own time; a row without it gets none."""
    import step_goals

    rows = [dict(op="acquisition_step_fused_split", shape="64x8x4096", native_us=80.0,
                 native_plan_us=20.0, reference_us=2000.0, cudagraph_us=400.0),
            dict(op="acquisition_step_fused_split2", shape="1024x64x4096", native_us=500.0,
                 native_plan_us=700.0, floor_us=200.0),
            dict(op="acquisition_step", shape="64x8x4096", native_us=500.0)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_goals.main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert "native=80.0us" in lines[0] and "<=25us:FAIL" in lines[0]
    assert "(plan)" in lines[1] and "plan=20.0us" in lines[1] and "<=25us:PASS" in lines[1]
    assert "x100.0 eager (>=70):PASS" in lines[1] and "x20.0 graph (>=15):PASS" in lines[1]
    assert "2.50x floor (<=2):FAIL" in lines[2]
    assert "(plan)" in lines[3] and "3.50x floor (<=2):FAIL" in lines[3]
    assert "(plan)" not in lines[4]


def test_step_goals_show_the_host_only_time(tmp_path, capsys):
    """A GPU row with the host's own time per call (bench_ops' native_host_us and
    native_plan_host_us) ends its goal lines with it; a row without one does not."""
    import step_goals

    rows = [dict(op="acquisition_step_fused_split2", shape="64x8x4096", native_us=77.5,
                 native_host_us=74.0, native_plan_us=49.1, native_plan_host_us=31.5,
                 reference_us=2000.0, cudagraph_us=400.0),
            dict(op="acquisition_step_fused", shape="1024x64x4096", native_us=900.0,
                 floor_us=200.0)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_goals.main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("host-only=74.0us") and "native=77.5us" in lines[0]
    assert "(plan)" in lines[1] and lines[1].endswith("host-only=31.5us")
    assert "host-only" not in lines[2]


def test_host_time_records_the_enqueue_time_per_block():
    """host_time's enqueue list gets one host-only time per timed block, each at most that
    block's host-inclusive time (here on the CPU, where they are the same work)."""
    import bench_ops

    enqueue: list[float] = []
    calls = []
    samples = bench_ops.host_time(lambda: calls.append(sum(range(200))), "cpu", 0.01, enqueue)
    assert len(enqueue) == len(samples) >= 5
    assert all(0 < e <= t * 1.0001 for e, t in zip(enqueue, samples))
    assert len(calls) > len(samples)


def test_step_goals_cpu_rows(tmp_path, capsys):
    """CPU rows get the CPU goal (>= 5x the eager reference at 64x8x4096 and 512x16x4096) with
    the GEMM-floor ratio beside it, never the GPU's microsecond goals; other shapes are skipped."""
    import step_goals

    rows = [
        dict(device="cpu", threads=2, op="acquisition_step", shape="64x8x4096", native_us=8000.0,
             reference_us=16000.0, gemm_floor_us=5000.0),
        dict(device="cpu", threads=2, op="acquisition_step", shape="512x16x4096",
             native_us=90000.0, reference_us=480000.0, gemm_floor_us=60000.0),
        dict(device="cpu", threads=1, op="acquisition_step_fused", shape="512x16x4096",
             native_us=90000.0),
        dict(device="cpu", threads=2, op="acquisition_step", shape="1024x64x4096",
             native_us=1.0, floor_us=1.0),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_goals.main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and not any("us:" in ln or "graph" in ln for ln in lines)
    assert "threads=2" in lines[0] and "x2.0 eager (>=5):FAIL" in lines[0]
    assert "1.60x GEMM floor" in lines[0]
    assert "x5.3 eager (>=5):PASS" in lines[1] and "1.50x GEMM floor" in lines[1]
    assert "eager (>=5):n/a" in lines[2] and "n/ax GEMM floor" in lines[2]


def test_profile_step_reports_every_op(tmp_path):
    import profile_step

    out = tmp_path / "prof"
    assert profile_step.main(["--device", "cpu", "--shapes", "6x4x32", "--calls", "2",
                              "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    # on the CPU every step op, the CPU-only split step too
    assert {r["op"] for r in rows} == set(profile_step.ALL_STEP_OPS)
    assert {r["side"] for r in rows} == {"host"}  # no device side without CUDA
    for op in profile_step.ALL_STEP_OPS:
        mine = [r for r in rows if r["op"] == op]
        assert any(r["kernel"].startswith("care_ext::") for r in mine), op  # the op itself is seen
        assert abs(sum(r["us"] for r in mine) - mine[0]["total_us"]) < 1e-6 * mine[0]["total_us"] + 1e-9
    text = out.with_suffix(".txt").read_text()
    assert all(f"{op} 6x4x32 (cpu, host)" in text for op in profile_step.ALL_STEP_OPS)
    with pytest.raises(SystemExit) as e:  # a usage error, as the other bench scripts' (bench_args)
        profile_step.main(["--device", "cpu", "--calls", "0", "--out", str(out)])
    assert e.value.code == 2


def test_ab_builds_alternates_two_builds(tmp_path):
    """Two builds (here the installed one twice) in alternating processes: one row per round,
    build, thread count and shape, and a summary whose B / A is the ratio of the medians."""
    import ab_builds

    out = tmp_path / "ab"
    assert ab_builds.main(["--a", "installed", "--b", "installed", "--threads", "1", "--shapes",
                           "6x4x32", "5x8x16", "--rounds", "2", "--min-time", "0.05",
                           "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    rows = [r for r in lines if r.get("kind") != "summary"]
    summary = [r for r in lines if r.get("kind") == "summary"]
    assert sorted((r["round"], r["build"], r["shape"]) for r in rows) == sorted(
        (k, v, s) for k in range(2) for v in "ab" for s in ("6x4x32", "5x8x16"))
    assert all(r["ratio"] > 0 and r["samples"] >= 3 and r["git"] for r in rows)
    assert [r["build"] for r in rows if r["shape"] == "6x4x32"] == ["a", "b", "b", "a"]
    assert len(summary) == 2
    for s in summary:
        assert s["b_over_a"] == pytest.approx(s["b"] / s["a"])
        assert s["paired_min"] <= s["paired_max"] and s["rounds"] == 2


def test_ab_builds_gives_each_side_its_environment(tmp_path):
    """--env-a / --env-b reach only their side's processes: a value the op rejects stops the run at
    B's first process, naming the error; a valid pair runs and each row records its side's
    variables; an item without '=' is refused."""
    import ab_builds

    base = ["--a", "installed", "--b", "installed", "--threads", "1", "--shapes", "6x4x32",
            "--rounds", "1", "--min-time", "0.05"]
    with pytest.raises(SystemExit, match="build 'installed' failed(.|\n)*CARE_EXT_CPU_GEMM must be"):
        ab_builds.main([*base, "--env-b", "CARE_EXT_CPU_GEMM=bogus"])
    out = tmp_path / "ab"
    assert ab_builds.main([*base, "--env-a", "CARE_EXT_CPU_GEMM=mkl", "--env-b",
                           "CARE_EXT_CPU_GEMM=auto", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(lines) == 3  # a row per side, one summary
    assert all(r["a_env"] == {"CARE_EXT_CPU_GEMM": "mkl"} for r in lines)
    assert all(r["b_env"] == {"CARE_EXT_CPU_GEMM": "auto"} for r in lines)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        ab_builds.main([*base, "--env-a", "CARE_EXT_CPU_GEMM"])


def test_ab_builds_refuses_a_directory_without_a_build(tmp_path):
    import ab_builds

    with pytest.raises(SystemExit):
        ab_builds.main(["--a", str(tmp_path), "--b", "installed"])


@pytest.mark.parametrize("bad", [["--shapes", "4x8"], ["--threads", "0"], ["--rounds", "0"],
                                 ["--min-time", "0"], ["--min-time", "nan"]])
def test_ab_builds_rejects_bad_arguments(bad):
    """Usage errors before any process starts (bench_args' types, as the other scripts)."""
    import ab_builds

    with pytest.raises(SystemExit) as e:
        ab_builds.main(["--a", "installed", "--b", "installed", *bad])
    assert e.value.code == 2


def test_thread_scaling_rows_and_summary(tmp_path):
    """thread_scaling.py: a sample row per (shape, provider, threads, round), a summary row per
    (shape, provider, threads) whose 1-thread speedup is exactly 1 and whose vs_gemm divides by
    the GEMM's speedup; 1 is added to the thread counts; the thread count is restored."""
    import thread_scaling
    import torch

    before = torch.get_num_threads()
    out = tmp_path / "scaling"
    assert thread_scaling.main(["--threads", "2", "--shapes", "6x4x32", "5x3x16", "--rounds", "2",
                                "--min-time", "0.01", "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        assert out.with_suffix(".png").stat().st_size > 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    samples = [r for r in rows if r["kind"] == "sample"]
    summary = {(r["shape"], r["provider"], r["threads"]): r for r in rows if r["kind"] == "summary"}
    ms = {(r["shape"], r["provider"], r["threads"], r["round"]): r["ms"] for r in samples}
    assert len(samples) == 2 * 3 * 2 * 2 and all(r["ms"] > 0 for r in samples)
    assert {(r["round"], r["threads"]) for r in samples} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    assert set(summary) == {(s, p, t) for s in ("6x4x32", "5x3x16")
                            for p in ("native", "reference", "gemm") for t in (1, 2)}
    for (s, p, t), r in summary.items():
        assert r["rounds"] == 2 and r["build_info"]["native"] is True
        if t == 1:
            assert r["speedup"] == 1.0 and r["vs_gemm"] == 1.0
        else:
            ratios = [ms[(s, p, 1, k)] / ms[(s, p, 2, k)] for k in (0, 1)]
            assert r["speedup"] == pytest.approx(sum(ratios) / 2)
            assert r["vs_gemm"] == pytest.approx(r["speedup"] / summary[(s, "gemm", 2)]["speedup"])
            assert r["efficiency"] == pytest.approx(r["speedup"] / 2)


def test_thread_scaling_times_the_op_asked_for(tmp_path):
    """--op acquisition_step_split_packed: the native rows time the packed split step (the CARE
    core's default on AMX CPUs), every row says so, and the reference is still the eager step."""
    import thread_scaling

    out = tmp_path / "scaling"
    assert thread_scaling.main(["--op", "acquisition_step_split_packed", "--threads", "2",
                                "--shapes", "6x4x32", "--rounds", "1", "--min-time", "0.01",
                                "--providers", "native", "reference", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert rows and all(r["op"] == "acquisition_step_split_packed" for r in rows)
    assert {(r["provider"], r["threads"]) for r in rows if r["kind"] == "summary"} == {
        ("native", 1), ("native", 2), ("reference", 1), ("reference", 2)}


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--rounds", "0"], ["--shapes", "6x4"],
                                 ["--providers", "eager"], ["--op", "cluster_stats"],
                                 ["--op", "acquisition_step_split", "--hidden-dtype", "float32"]])
def test_thread_scaling_rejects_bad_arguments(tmp_path, bad):
    import thread_scaling

    with pytest.raises(SystemExit) as e:
        thread_scaling.main([*bad, "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_step_precision_rows(tmp_path, capsys):
    """bench/step_precision.py: one row per variant with each float output's error against the
    float64 step; float32 and bf16x3 land at float32 rounding, bf16x2 within its 2^-16 weights."""
    import step_precision

    out = tmp_path / "prec"
    assert step_precision.main(["--shapes", "6x4x64", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["eager float32 reference", "native float32",
                                            "native bf16x3", "native bf16x2"]
    for r in rows:
        tol = 1e-4 if r["variant"] == "native bf16x2" else 1e-5
        assert all(0.0 <= r[n] < tol for n in step_precision.OUTPUTS.values()), r
    assert "logits1" in capsys.readouterr().out


def test_step_precision_relative_error_is_max_abs_over_max_ref():
    import step_precision

    ref = [None, None, torch.tensor([2.0, -4.0]), torch.tensor([[1.0]]), torch.tensor([[8.0]]),
           torch.tensor([0.5])]
    got = [None, None, torch.tensor([2.5, -4.0]), torch.tensor([[1.0]]), torch.tensor([[6.0]]),
           torch.tensor([0.5])]
    assert step_precision.relative_errors(got, ref) == {"reliability": 0.125, "logits1": 0.0,
                                                        "probs": 0.25, "ecag": 0.0}


def test_step_precision_rejects_odd_h():
    import step_precision

    with pytest.raises(SystemExit):
        step_precision.main(["--shapes", "2x4x33"])


@pytest.mark.parametrize("bad", [["--shapes", "64x8"], ["--shapes", "0x8x64"], ["--ops", "nope"],
                                 ["--providers", "eager"], ["--threads", "0"],
                                 ["--min-time", "0"], ["--device", "tpu"]])
def test_bench_ops_rejects_bad_arguments(tmp_path, bad):
    """A bad argument is a usage error (exit 2) before anything runs, not a traceback from the
    middle of a run or a run that silently measures nothing (an unknown --ops name did that)."""
    import bench_ops

    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--device", "cpu", *bad, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_bench_ops_op_names_are_its_ops():
    """bench_ops.OP_NAMES (the --ops choices) lists exactly the ops op_calls times, in order."""
    import bench_ops

    x = bench_ops.make_inputs(2, 4, 32, "cpu", torch.bfloat16)
    assert tuple(bench_ops.op_calls(x, bench_ops.R)) == bench_ops.OP_NAMES


@pytest.mark.parametrize("bad", [["--shapes", "4x8"], ["--steps", "0"], ["--warmup", "-1"],
                                 ["--threads", "0"], ["--device", "cuda"]])
def test_bench_step_rejects_bad_arguments(tmp_path, bad):
    import bench_step

    if bad == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as e:
        bench_step.main([*bad, "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_profile_update_finds_every_phase(tmp_path):
    """profile_update wraps the trainer's methods from outside: every phase that runs ops must
    still be found (a renamed method would leave its ops in 'rest'), the phases' host times fit
    in the update's wall time, and the counted ops are the phases' sum."""
    import profile_update

    out = tmp_path / "pu"
    assert profile_update.main(["--device", "cpu", "--shapes", "6x4x32", "--updates", "1",
                                "--warmup", "3", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    by_phase = {r["phase"]: r for r in rows}
    assert set(by_phase) == set(profile_update.PHASES) | {"total"}
    total = by_phase.pop("total")
    for phase in ("replay", "batch", "forward", "backward", "clip", "adam"):
        assert by_phase[phase]["ops"] > 0 and by_phase[phase]["host_ms"] > 0, phase
    assert by_phase["backward"]["ops"] > by_phase["clip"]["ops"]  # backward's ops are counted
    assert sum(r["ops"] for r in by_phase.values()) == total["ops"]
    assert sum(r["host_ms"] for r in by_phase.values()) == pytest.approx(total["host_ms"], rel=1e-6)
    assert total["scalar_reads"].get("cpu", 0) > 0 and total["syncs"] == 0
    assert "update 6x4x32 (cpu, 1 threads)" in out.with_suffix(".txt").read_text()
    # the wrappers are gone afterwards
    import care_ext.trainer as trainer
    assert trainer._StageBatches.batch.__name__ == "batch"
    assert torch.Tensor.backward.__name__ == "backward"


@pytest.mark.parametrize("bad", [["--shapes", "4x8"], ["--updates", "0"], ["--threads", "0"]])
def test_profile_update_rejects_bad_arguments(tmp_path, bad):
    import profile_update

    with pytest.raises(SystemExit) as e:
        profile_update.main([*bad, "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_gpu_check_script_parses_and_names_real_providers_and_ops():
    """bench/gpu_check.sh is the one prepared call of a GPU session (15 minutes, not every
    session gets one): it must parse, and every provider and op it passes to bench_ops.py (in
    --providers / --ops lists and the PROV arrays) must be one bench_ops knows, or the session
    learns it only from an error row."""
    import re
    import subprocess
    from pathlib import Path

    import bench_ops

    script = Path(bench_ops.__file__).with_name("gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = re.sub(r"\\\n\s*", " ", script.read_text())  # join continued lines
    providers, ops = set(), set()
    for m in re.finditer(r"PROV=\(([^)]*)\)", text):
        providers |= set(m.group(1).split())
    for line in text.splitlines():
        if "bench_ops.py" not in line:
            continue
        for flag, found in (("--providers", providers), ("--ops", ops)):
            for m in re.finditer(flag + r"((?:\s+[a-z_0-9]+)+)", line):
                found |= set(m.group(1).split())
    assert {"native_plan", "native_graph"} <= providers and "acquisition_step_fused_split2" in ops
    assert providers <= set(bench_ops.PROVIDERS), providers - set(bench_ops.PROVIDERS)
    assert ops <= set(bench_ops.OP_NAMES), ops - set(bench_ops.OP_NAMES)


def test_bench_bn_linear_rows(tmp_path, capsys):
    """bench_bn_linear: a row per layer (op and twin timed, their ratios) and per update shape
    (updates alternated between the ops and the twins), and care_ext.ops left as it was."""
    import bench_bn_linear

    from care_ext import ops

    before = ops._cpu_native
    out = tmp_path / "bn.jsonl"
    assert bench_bn_linear.main(["--layers", "5x16x40+3", "0x20x33", "--rounds", "1", "--calls",
                                 "2", "--update", "8x4x32", "--pairs", "2", "--warmup", "2",
                                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["layer", "layer", "update"]
    assert [r.get("layer") for r in rows[:2]] == ["5x16x40+3", "0x20x33"]
    for r in rows[:2]:
        assert r["forward_ratio"] > 0 and r["backward_ratio"] > 0
        assert r["threads"] == torch.get_num_threads()
    assert rows[2]["shape"] == "8x4x32" and rows[2]["update_op_ms"] > 0 and rows[2]["pairs"] == 2
    assert ops._cpu_native is before
    assert "update 8x4x32" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--layers", "5x16"], ["--layers", "5x0x40"], ["--layers", "5x4x4+0"],
                                 ["--update", "8x4"], ["--rounds", "0"]])
def test_bench_bn_linear_rejects_bad_arguments(tmp_path, bad):
    import bench_bn_linear

    with pytest.raises(SystemExit) as e:
        bench_bn_linear.main([*bad, "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2
    assert not (tmp_path / "x.jsonl").exists()
