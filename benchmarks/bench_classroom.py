"""Classroom benchmark: interactive throughput on 1 vs 2 worker CPUs (target: 2 workers ≥ 1.6× one).

The same load - `--requests` distinct slider settings (fake-quantization bits, structured and
unstructured pruning ratios), submitted at once - runs on a fresh embedded Ray instance with
that many CPUs and one interactive worker per CPU, every worker first warmed with the dataset
and teacher, and every request computed (each run has its own result store). Throughput = requests
/ seconds from the first submission to the last result. Results go in docs/classroom.md.
Run it on an otherwise idle machine: other jobs on the same cores make the ratio meaningless.

  python benchmarks/bench_classroom.py                       # 1 vs 2 workers, 12 requests, 1,000 test images
  python benchmarks/bench_classroom.py --workers 1 2 4 --requests 20
  python benchmarks/bench_classroom.py --requests 2 --eval-size 200    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("COMPRESSION_LAB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core.classroom import compare_workers  # noqa: E402
from core.progress import TqdmProgress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="interactive worker counts to compare")
    ap.add_argument("--requests", type=int, default=12, help="distinct settings per run (at most 29)")
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--json", action="store_true", help="print the comparison as one JSON line at the end")
    args = ap.parse_args()
    out = compare_workers(args.workers, args.requests, dataset=args.dataset, model=args.model,
                          eval_size=args.eval_size, address=args.ray_address, progress=TqdmProgress())
    print(f"{args.model} on {args.dataset}, {args.requests} distinct requests, eval {args.eval_size} images")
    print("| interactive workers | requests | computed | seconds | requests per min |\n| --- | --- | --- | --- | --- |")
    for r in out["runs"]:
        print(f"| {r['workers']} | {r['jobs']} | {r['computed']} | {r['seconds']:.1f} | {r['per_min']:.1f} |")
    print(f"\nthroughput ratio {out['runs'][-1]['workers']} vs {out['runs'][0]['workers']} workers: "
          f"{out['ratio']:.2f}× (target ≥ 1.6× for 2 vs 1)")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
