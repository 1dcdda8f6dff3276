"""`export`: a stored run (or a cached teacher) as ONNX, a torch.export program and a state dict, with a model card."""
from __future__ import annotations

import os

from ..techniques import technique_names
from .common import human_bytes, print_json


def register(sub):
    p = sub.add_parser("export", help="export a stored run or a cached teacher (onnx, pt2, state_dict) with a model card",
                       description="Files run without the lab: ONNX and .pt2 take uint8 pixels (N x 3 x 32 x 32 RGB, "
                                   "0-255) with the normalization inside; see docs/export.md.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="KEY", help="a run's key (compress --json prints it), or teacher-<stem> for a "
                                                    "cached teacher")
    which.add_argument("--latest", action="store_true",
                       help="the newest run matching --dataset/--model/--technique (--technique teacher: the newest "
                            "cached teacher)")
    p.add_argument("--dataset", default=None, help="with --latest: only runs on this dataset")
    p.add_argument("--model", default=None, help="with --latest: only runs of this teacher architecture")
    p.add_argument("--technique", default=None, choices=[*technique_names(), "teacher"],
                   help="with --latest: only runs of this technique; teacher exports a cached teacher")
    p.add_argument("--format", default="all", choices=["onnx", "pt2", "state_dict", "all"],
                   help="what to write (all: every format the result can take; default all)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import export
    from ..errors import LabError
    if args.run and any(v is not None for v in (args.dataset, args.model, args.technique)):
        raise LabError("--dataset, --model and --technique choose among runs with --latest; --run names one already")
    source = export.find_run(args.run) if args.run else \
        export.find_latest(args.dataset, args.model, args.technique)
    report = export.export(source, args.format, args.out)
    if args.json:
        print_json({"run": report["run"], "files": report["files"], "skipped": report["skipped"]})
        return 0
    print(f"exported {source.technique} {source.params} of {source.model} on {source.dataset} (run {source.run}):")
    for fmt, path in report["files"].items():
        print(f"  {fmt:<11} {path} ({human_bytes(os.path.getsize(path))})")
    for fmt, why in report["skipped"].items():
        print(f"  not {fmt}: {why}")
    return 0
