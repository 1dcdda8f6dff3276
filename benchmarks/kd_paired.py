"""KD student vs the same student from scratch, scored on the same held-out images: a paired test.

Runs (or reuses from the cache) `compress --technique distill` for each teacher, reloads the KD
student and its from-scratch twin, and counts the images only one of them gets right. McNemar's
z = (b - c) / sqrt(b + c) over those counts says whether the gain is more than noise (|z| > 1.96:
the 5% level), which the two accuracies alone cannot on a few thousand images.

  COMPRESSION_LAB_CACHE=/tmp/cifar_bf python benchmarks/kd_paired.py \
      --dataset folder:/tmp/teach_data/cifar10 --teachers densenet121 resnet34 resnet50 vgg16_bn

One JSON line per teacher on stdout; docs/bench_distillation.md holds the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.datasets import load_dataset  # noqa: E402
from core.runner import ExperimentConfig, load_compressed, run_experiment  # noqa: E402
from core.settings import default_device  # noqa: E402
from core.techniques.distillation import _train_config, scratch_student  # noqa: E402
from core.training import predict_logits  # noqa: E402


def paired(kd_right, scratch_right) -> dict:
    b = int((kd_right & ~scratch_right).sum())
    c = int((~kd_right & scratch_right).sum())
    return {"kd_only": b, "scratch_only": c, "mcnemar_z": round((b - c) / math.sqrt(b + c), 2) if b + c else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--teachers", nargs="+", default=["resnet34", "densenet121"])
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eval-size", type=int, default=0, help="held-out images scored (0 = all)")
    args = ap.parse_args()
    data = load_dataset(args.dataset)
    x, y = data.eval_split(args.eval_size)
    params = {"student": args.student, "temperature": args.temperature, "alpha": args.alpha, "epochs": args.epochs}
    for teacher in args.teachers:
        t0 = time.perf_counter()
        r = run_experiment(ExperimentConfig(data.name, teacher, "distill", dict(params), eval_size=args.eval_size))
        kd = load_compressed(r)
        # the twin the experiment compared against: same budget, same device and precision
        device = default_device()
        scratch, _, _, _ = scratch_student(data, args.student, _train_config(r.params, device=device),
                                           eval_size=args.eval_size, device=device)
        kd_right = predict_logits(kd, data, x).argmax(1) == y
        scratch_right = predict_logits(scratch, data, x).argmax(1) == y
        print(json.dumps({"dataset": data.name, "teacher": teacher, "teacher_accuracy": r.baseline["accuracy"],
                          "kd": float(kd_right.float().mean()), "scratch": float(scratch_right.float().mean()),
                          **paired(kd_right, scratch_right), "images": len(y), "cached": r.cached,
                          "experiment_seconds": round(r.seconds, 1),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
