"""argparse types shared by the benchmark scripts: a bad argument ends in one clear usage error
(exit status 2) instead of a traceback from deep inside a run, or a silently empty run.

    ap.add_argument("--shapes", nargs="+", type=bench_args.shape)
    ap.add_argument("--device", type=bench_args.device, default=bench_args.default_device())
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def shape(text: str) -> str:
    """A ``BxGxH`` shape: three positive integers joined by 'x' (returned as given, the key of
    the rows). G is not capped here: the ops report a G beyond their limit themselves."""
    dims = text.split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape BxGxH of three positive integers (e.g. 64x8x4096)")
    return text


def dims(text: str) -> tuple[int, int, int]:
    """(B, G, H) of a shape string that :func:`shape` accepted."""
    b, g, h = (int(d) for d in shape(text).split("x"))
    return b, g, h


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (thread counts, steps, calls, rounds)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds per measurement)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device(text: str) -> str:
    """'cpu', or 'cuda' where this torch sees a CUDA device."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"'cuda': this torch ({torch.__version__}) sees no CUDA device")
    return text


def default_device() -> str:
    """'cuda' where a CUDA device is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_jsonl(prefix: str | Path, rows: list[dict]) -> Path:
    """Writes ``rows`` as JSON lines to ``prefix`` with the suffix .jsonl (its directory made as
    needed) and returns that path."""
    path = Path(prefix).with_suffix(".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
