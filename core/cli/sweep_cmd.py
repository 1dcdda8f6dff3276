"""`sweep`: the whole study (datasets × teachers × technique settings), resumable, with a report."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from ..models import STUDY_TEACHERS
from ..sweep import DEFAULT_GRID, SEED_DATASETS, SweepPlan, run_sweep, write_report
from .common import add_engine_arg, float_range, int_range, print_json, progress_for


def register(sub):
    p = sub.add_parser("sweep", help="run the study grid and write a CSV + Markdown report")
    p.add_argument("--datasets", nargs="+", default=SEED_DATASETS)
    p.add_argument("--models", nargs="+", default=STUDY_TEACHERS)
    p.add_argument("--techniques", nargs="+", default=list(DEFAULT_GRID), choices=list(DEFAULT_GRID))
    p.add_argument("--eval-size", type=int_range(0), default=1000)
    p.add_argument("--max-drop", type=float_range(0, 1), default=0.01,
                   help="accuracy drop (fraction) allowed by the best-technique criterion")
    p.add_argument("--out", default=None, help="report folder (default: <cache>/reports)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrained", action="store_true",
                   help="compress ImageNet-pretrained teachers, as the seed study did: one is trained first where "
                        "the newest cached teacher is not (offline the weights must be in torch's hub cache)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_engine_arg(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from tqdm import tqdm

    from .. import settings
    plan = SweepPlan(datasets=args.datasets, models=args.models, techniques=args.techniques,
                     eval_size=args.eval_size, pretrained=args.pretrained)
    inner = progress_for(args)
    bar = None

    def on_result(i, n, r):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n, desc="sweep", file=sys.stderr, disable=args.quiet, position=1)
        bar.update(1)
        bar.set_postfix_str(f"{r.model} {r.technique} acc {r.compressed['accuracy']:.3f}"
                            + (" (cached)" if r.cached else ""))

    results = run_sweep(plan, progress=inner, data_root=args.data_root, device=args.device, on_result=on_result,
                        address=args.ray_address)
    if bar is not None:
        bar.close()
    out = Path(args.out) if args.out else settings.cache_dir() / "reports"
    csv_path, md_path = write_report(results, out, args.max_drop)
    if args.json:
        print_json({"runs": len(results), "csv": str(csv_path), "report": str(md_path),
                    "cached": sum(r.cached for r in results),
                    "nodes": dict(Counter((r.engine or {}).get("node") or "not recorded" for r in results))})
    else:
        print(md_path.read_text())
        print(f"\nwrote {csv_path} and {md_path}")
    return 0
