"""`pipeline`: techniques chained in order, each step starting from the previous one's model."""
from __future__ import annotations

from ..runner import ExperimentConfig, submit_experiment
from ..targets import DEFAULT_TARGET, TARGETS
from ..techniques.pipeline import SEPARATOR
from .common import add_data_args, human_bytes, int_range, print_json, progress_for


def register(sub):
    p = sub.add_parser("pipeline", help="chain prune → distill → quantize; report every step and write the file")
    add_data_args(p)
    p.add_argument("--model", default="resnet34", help="the teacher (its newest cached version; trained if none)")
    p.add_argument("--steps", nargs="+", required=True, metavar="STEP",
                   help='steps in order, each technique:name=value,... e.g. "prune:method=structured,ratio=0.5,'
                        'finetune_epochs=1" "quantize:mode=fake,bits=4" (prune, then distill, then quantize)')
    p.add_argument("--eval-size", type=int_range(0), default=1000, help="test images (0 = the full test set)")
    p.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET, help="where latency is timed")
    p.set_defaults(handler=run)


def summary(result) -> dict:
    """The pipeline's --json object: each step's metrics, the teacher's, the final file's."""
    extra = result.compressed.get("extra") or {}
    steps = [{k: s[k] for k in ("technique", "params", "metrics", "cached")} for s in extra.get("steps", [])]
    out = result.summary()
    out.update(steps=steps, file_path=extra.get("file_path"), file_bytes=extra.get("file_bytes"))
    return out


def run(args) -> int:
    cfg = ExperimentConfig(dataset=args.dataset, model=args.model, technique="pipeline",
                           params={"steps": f"{SEPARATOR} ".join(args.steps)}, eval_size=args.eval_size,
                           data_root=args.data_root, device=args.device, target=args.target).validate()
    result = submit_experiment(cfg, progress=progress_for(args), address=args.ray_address)
    out = summary(result)
    if args.json:
        print_json(out)
        return 0
    b = result.baseline
    print(f"{result.model} on {result.dataset_label}, {result.eval_images} test images")
    print(f"  {'step':<44}{'accuracy':>9}{'file':>11}{'MACs':>10}{'ms b1':>8}")
    print(f"  {'teacher':<44}{b.get('accuracy', 0):>9.2%}{human_bytes(b.get('size_bytes')):>11}"
          f"{(b.get('macs') or 0) / 1e6:>9.1f}M{b.get('latency_ms_b1') or float('nan'):>8.2f}")
    for s in out["steps"]:
        m = s["metrics"]
        name = s["technique"] + (" (cached)" if s["cached"] else "")
        print(f"  {name:<44}{m['accuracy']:>9.2%}{human_bytes(m['size_bytes']):>11}"
              f"{(m.get('macs') or 0) / 1e6:>9.1f}M{m.get('latency_ms_b1') or float('nan'):>8.2f}")
    ratio = (b.get("size_bytes") or 0) / max(1, out["file_bytes"] or 1)
    print(f"file {out['file_path']} ({human_bytes(out['file_bytes'])}, {ratio:.1f}x smaller than the teacher's)")
    return 0
