"""Batch-norm correction benchmark (not a test): accuracy lost with and without `bn_correction`.

For each teacher, side by side in one run on the same held-out images: simulated low-bit weights
(quantize, mode fake) and pruning without fine-tuning (structured and unstructured, layer-wise L1),
each applied twice, bn_correction off and on. Results go in docs/bench_quantization.md and
docs/bench_pruning.md.

    COMPRESSION_LAB_CACHE=/tmp/cifar_bf python benchmarks/bench_bn_correction.py \
        --dataset folder:/tmp/teach_data/cifar10 --json /tmp/bn_cifar.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.datasets import load_dataset  # noqa: E402
from core.runner import ExperimentConfig, resolve_teacher  # noqa: E402
from core.techniques import Context, get_technique  # noqa: E402
from core.training import evaluate_accuracy  # noqa: E402

SETTINGS = [("quantize", {"mode": "fake", "bits": b}) for b in (4, 3, 2)] + \
           [("prune", {"method": "structured", "ratio": r}) for r in (0.3, 0.5)] + \
           [("prune", {"method": "unstructured", "ratio": r}) for r in (0.5, 0.7)]


def label(technique: str, params: dict) -> str:
    if technique == "quantize":
        return f"{params['bits']}-bit weights"
    return f"{params['method']} {params['ratio']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--teachers", nargs="+", default=["resnet34", "resnet50", "densenet121", "vgg16_bn"])
    ap.add_argument("--eval-size", type=int, default=0, help="held-out images (0 = all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    x, y = data.eval_split(args.eval_size)
    rows = []
    for name in args.teachers:
        teacher = resolve_teacher(ExperimentConfig(data.name, name, device="cpu"), None, data)
        base = evaluate_accuracy(teacher.model, data, x, y)
        for technique, params in SETTINGS:
            spec = get_technique(technique)
            row = {"teacher": name, "teacher_acc": base, "setting": label(technique, params)}
            for flag in (False, True):
                t0 = time.perf_counter()
                out = spec.apply(Context(teacher, data, spec.validate({**params, "bn_correction": flag}),
                                         device="cpu", eval_size=args.eval_size))
                seconds = time.perf_counter() - t0
                drop = 100 * (base - evaluate_accuracy(out.model, data, x, y))
                row["on" if flag else "off"] = {"drop_pt": round(drop, 2), "seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{data.label} ({len(y)} held-out images), accuracy lost (points), bn_correction off -> on\n")
    settings = [label(t, p) for t, p in SETTINGS]
    print("| teacher | teacher acc | " + " | ".join(settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for name in args.teachers:
        mine = {r["setting"]: r for r in rows if r["teacher"] == name}
        cells = [f"{mine[s]['off']['drop_pt']:.2f} → **{mine[s]['on']['drop_pt']:.2f}**" for s in settings]
        print(f"| {name} | {100 * mine[settings[0]]['teacher_acc']:.2f}% | " + " | ".join(cells) + " |")
    extra = [r["on"]["seconds"] - r["off"]["seconds"] for r in rows]
    print(f"\ncorrection cost: {min(extra):.1f}–{max(extra):.1f} s per run (the 'on' run minus the 'off' run)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
