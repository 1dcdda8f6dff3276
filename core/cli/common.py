"""Helpers shared by the subcommands: argument types, JSON output, tqdm progress."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..progress import TqdmProgress


def int_range(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range [{lo}, {hi if hi is not None else '∞'}]")
        return v
    return parse


def float_range(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isnan(v) or v < lo or v > hi or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{v} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
        return v
    return parse


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="shapes",
                   help="shapes (generated offline default), cifar10, svhn or folder:<path>")
    p.add_argument("--data-root", default=None, help="where cifar10/svhn live (env COMPRESSION_LAB_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best present)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_arg(p)


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run on this Ray cluster (env RAY_ADDRESS); default: the lab's own Ray on this machine")


def progress_for(args):
    return TqdmProgress(disable=getattr(args, "quiet", False))


def _clean(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(_clean(obj), default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
