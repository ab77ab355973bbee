"""bench/plot_bench.py: the series it draws come from the rows as written, its figures are made
from the recorded runs in bench/results, and bad input gets an error that names the problem."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _ops_row(op, shape, **kw):
    return dict(device="cuda", device_name="GPU", torch="2.x", op=op, shape=shape, **kw)


def test_ops_series_orders_shapes_and_keeps_gaps():
    import plot_bench

    rows = [_ops_row("acquisition_step", "1024x64x4096", floor_us=138.0, native_us=900.0,
                     native_iqr_us=5.0, reference_us=5000.0),
            _ops_row("acquisition_step", "64x8x4096", floor_us=3.0, native_us=30.0, reference_us=1800.0,
                     cudagraph_us=420.0),
            _ops_row("cag", "64x8x4096", floor_us=3.0, native_us=9.0)]
    s = plot_bench.ops_series(rows)
    assert list(s) == ["acquisition_step", "cag"]
    step = s["acquisition_step"]
    assert step["shapes"] == ["64x8x4096", "1024x64x4096"]  # by B, G, H, not as text
    assert step["floor"] == [3.0, 138.0] and step["floor_kind"] == "memory floor"
    assert list(step["providers"]) == ["native", "reference", "cudagraph"]  # no compile measured
    assert step["providers"]["native"] == ([30.0, 900.0], [None, 5.0])
    assert step["providers"]["cudagraph"][0] == [420.0, None]  # a gap stays a gap
    assert s["cag"]["floor"] == [None]  # the step's memory floor does not bound a single op


def test_ops_series_prefers_the_cpu_gemm_floor():
    import plot_bench

    s = plot_bench.ops_series([_ops_row("acquisition_step", "64x8x4096", floor_us=None,
                                        gemm_floor_us=9070.0, native_us=13881.0)])
    assert s["acquisition_step"]["floor"] == [9070.0]
    assert s["acquisition_step"]["floor_kind"] == "GEMM floor"


def test_step_series_labels_only_what_varies():
    import plot_bench

    base = dict(device="cpu", strategy="care", projected=False, first_layer_gemm="float32")
    rows = [dict(base, shape="64x8x4096", threads=1, first_layer_backward=m, decide_ms=d, update_ms=u)
            for m, d, u in (("autograd", 30.0, 200.0), ("fused", 31.0, 170.0))]
    s = plot_bench.step_series(rows)
    assert s["labels"] == ["64x8x4096 flb=autograd", "64x8x4096 flb=fused"]
    assert s["decide_ms"] == [30.0, 31.0] and s["update_ms"] == [200.0, 170.0]


@pytest.mark.parametrize("name,kind", [("h200_2026-11-26b_bench_ops.jsonl", "ops"),
                                       ("cpu_2026-11-26b_step_t1.jsonl", "ops"),
                                       ("cpu_2026-11-26d_bstep_flb_t2.jsonl", "step")])
def test_recorded_runs_plot(tmp_path, name, kind):
    import plot_bench

    got, rows = plot_bench.read_rows(RESULTS / name)
    assert got == kind and rows
    assert plot_bench.main([str(RESULTS / name), "--out-dir", str(tmp_path)]) == 0
    png = tmp_path / f"{Path(name).stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_recorded_h200_series_match_its_rows():
    import plot_bench

    _, rows = plot_bench.read_rows(RESULTS / "h200_2026-11-26b_bench_ops.jsonl")
    s = plot_bench.ops_series(rows)
    want = {(r["op"], r["shape"]): r["native_us"] for r in rows}
    got = {(op, sh): v for op, d in s.items() for sh, v in zip(d["shapes"], d["providers"]["native"][0])}
    assert got == want


@pytest.mark.parametrize("text,msg", [
    ("", "no rows"),
    ('{"op": "cag", "shape": "1x1x1"}\nnot json\n', ":2: not JSON"),
    ("[1, 2]\n", "a JSON list"),
    ('{"op": "cag", "shape": "1x1x1"}\n{"decide_ms": 1, "shape": "1x1x1", "update_ms": 2}\n', "found kinds"),
    ('{"device": "cpu"}\n', "found kinds ['?']"),
    ('{"op": "cag", "native_us": 1.0}\n', "row 1 has no shape"),
    ('{"op": "cag", "shape": "1x1x1", "kernel": "k", "us": 3.0}\n', "no provider times"),
    ('{"decide_ms": 1.0, "shape": "1x1x1"}\n', "has no update_ms"),
])
def test_bad_input_is_named(tmp_path, text, msg):
    import plot_bench

    p = tmp_path / "rows.jsonl"
    p.write_text(text)
    with pytest.raises(ValueError) as err:
        plot_bench.read_rows(p)
    assert msg in str(err.value)


def test_main_reports_each_bad_file_and_goes_on(tmp_path, capsys):
    import plot_bench

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(dict(device="cpu", shape="2x2x8", decide_ms=1.0, update_ms=3.0)) + "\n")
    rc = plot_bench.main([str(tmp_path / "missing.jsonl"), str(good), "--out-dir", str(tmp_path / "png")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "FileNotFoundError" in err
    assert (tmp_path / "png" / "good.png").exists()


def test_odd_shape_names_sort_last():
    import plot_bench

    assert plot_bench._shape_key("bogus") == (math.inf,)
    assert sorted(["bogus", "2x2x8", "1x4x8"], key=plot_bench._shape_key) == ["1x4x8", "2x2x8", "bogus"]
