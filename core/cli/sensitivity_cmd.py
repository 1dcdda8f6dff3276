"""`sensitivity`: the teacher's accuracy after compressing one conv/linear layer at a time (core.sensitivity)."""
from __future__ import annotations

from .common import add_engine_arg, int_range, print_json, progress_for


def register(sub):
    from ..sensitivity import DEFAULT_EVAL_SIZE, DEFAULT_SETTINGS, METHODS, TECHNIQUES
    p = sub.add_parser("sensitivity", help="accuracy after compressing one layer at a time (prune or quantize)")
    p.add_argument("--dataset", default="shapes", help="shapes (generated offline default), cifar10, svhn or folder:<path>")
    p.add_argument("--data-root", default=None, help="where cifar10/svhn live (env COMPRESSION_LAB_DATA)")
    p.add_argument("--model", default="resnet34", help="the teacher (its newest cached version)")
    p.add_argument("--technique", required=True, choices=list(TECHNIQUES),
                   help="prune: a ratio of one layer's channels or weights; quantize: one layer's weights at fewer bits")
    p.add_argument("--method", default=None,
                   help="; ".join(f"{t}: {' or '.join(m)} (default {m[0]})" for t, m in METHODS.items()))
    p.add_argument("--settings", default=None,
                   help="comma-separated ratios (prune, default "
                        f"{','.join(f'{v:g}' for v in DEFAULT_SETTINGS['prune'])}) or bit widths (quantize, default "
                        f"{','.join(map(str, DEFAULT_SETTINGS['quantize']))})")
    p.add_argument("--eval-size", type=int_range(0), default=DEFAULT_EVAL_SIZE,
                   help="test images each setting is evaluated on (0 = the full test set)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_arg(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import jobs, sensitivity
    from ..datasets import dataset_names, is_dataset_name, load_dataset
    from ..engine import check_reachable
    from ..errors import LabError
    from ..models import get_spec
    from ..predict import latest_teacher_entry
    technique, method, settings, eval_size, _ = sensitivity.validate(args.technique, args.method, args.settings,
                                                                     args.eval_size)
    get_spec(args.model, "teacher")
    if not is_dataset_name(args.dataset):
        raise LabError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(dataset_names())}")
    data = load_dataset(args.dataset, args.data_root)   # missing data fails here, before any worker starts
    entry = latest_teacher_entry(data, args.model)
    if entry is None:
        raise LabError(f"no cached {args.model} teacher for {data.label}; train one first "
                       f"(python -m core train --dataset {args.dataset} --model {args.model})")
    # served from the cache without starting the job layer: a second call takes well under a second
    key = cache_key(entry[1], data, technique, method, settings, eval_size)
    out = sensitivity.read_cached(key)
    if out is None:
        check_reachable(args.ray_address)
        payload = {"dataset": args.dataset, "data_root": args.data_root, "model": args.model,
                   "technique": technique, "method": method, "settings": settings, "eval_size": eval_size}
        out = jobs.run("sensitivity", payload, progress=progress_for(args), address=args.ray_address,
                       lane="long", label=f"sensitivity {technique} {args.model} on {data.name}")
    if args.json:
        print_json(out)
        return 0
    print_scan(out)
    return 0


def cache_key(teacher_meta: dict, data, technique, method, settings, eval_size) -> str:
    """The scan's cache key from a teacher's sidecar (no weights loaded)."""
    from types import SimpleNamespace

    from .. import sensitivity
    return sensitivity.scan_key(SimpleNamespace(meta=teacher_meta), data, technique, method, settings, eval_size)


def print_scan(r: dict) -> None:
    from ..sensitivity import setting_label
    labels = [setting_label(s) for s in r["settings"]]
    unit = "bits" if r["technique"] == "quantize" else "ratio"
    took = "from cache" if r.get("cached") else f"{r['seconds']:.1f} s"
    print(f"sensitivity of {r['model']} on {r['dataset']}: {r['technique']} {r['method']}, one layer at a time "
          f"({took}; {r['eval_images']} images; "
          f"baseline accuracy {r['baseline_accuracy']:.4f})")
    width = max(len(layer["name"]) for layer in r["layers"]) if r["layers"] else 10
    print(f"  {'layer':<{width}} {'params':>10}  " + " ".join(f"{lab:>6}" for lab in labels) + f"   ({unit})")
    for layer in r["layers"]:
        accs = [layer["accuracy"].get(lab) for lab in labels]   # the stored JSON's keys are sorted
        cells = " ".join(f"{a:6.3f}" if a is not None else f"{'-':>6}" for a in accs)
        print(f"  {layer['name']:<{width}} {layer['params']:>10,}  {cells}")
    print(f"  most fragile (accuracy lost, averaged over the settings): {', '.join(r['fragile'][:8])}")
