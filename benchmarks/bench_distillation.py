"""Does distillation beat training the same student from scratch with the same budget? (CPU benchmark)

For each dataset: a resnet34 teacher with a modest budget (get_teacher, cached), then three
resnet8 students on the same images, epochs, learning rate, seed and initial weights:
  scratch  - plain labels (fit's default label-smoothed CE, augmented): what the lab compares against
  kd_aug   - Hinton KD, augmented student inputs, teacher logits of the plain images (cached)
  kd_plain - Hinton KD without augmentation (inputs match the cached logits exactly)
Accuracy is on a held-out test split never used for training. Prints one JSON line per dataset
and appends it to <out>/results.jsonl. docs/bench_distillation.md holds the numbers and command.

  nice -n 10 python benchmarks/bench_distillation.py                 # shapes, cifar10, svhn
  nice -n 10 python benchmarks/bench_distillation.py --datasets shapes

Real data comes from /tmp/data/{cifar10,svhn}/train/<class>/ (see ../shared/data/README.md),
symlinked into folder datasets under /tmp/kd_data/<name>/{train,test}/<class>/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("COMPRESSION_LAB_CACHE", "/tmp/kd_bench/cache")  # keep benchmark teachers out of the app's cache
os.environ.setdefault("COMPRESSION_LAB_OFFLINE", "1")

from core.datasets import load_dataset  # noqa: E402
from core.teachers import TeacherSettings, get_teacher  # noqa: E402
from core.techniques import get_technique  # noqa: E402
from core.techniques import distillation as kd  # noqa: E402
from core.training import TrainConfig, evaluate_accuracy  # noqa: E402

SRC = Path("/tmp/data")
DST = Path("/tmp/kd_data")

# Budgets sized for ~25 CPU-minutes in all. Batch 32 gives the teacher 4x the optimiser steps of
# batch 128 for the same images: with batch 128 and 2,000 images a resnet34 reached 14.5% on shapes.
TEACHER = TrainConfig(epochs=3, subset=3000, batch_size=32, lr=0.05)
STUDENT = {"student": "resnet8", "temperature": 4.0, "alpha": 0.9, "epochs": 5, "subset": 1000,
           "lr": 0.05, "batch_size": 64}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src)


def prepare_cifar(train_per_class: int = 200, test_per_class: int = 100, seed: int = 0) -> Path:
    """A seeded per-class split of CIFAR-10's training images: disjoint train and test folders."""
    root, dst = SRC / "cifar10" / "train", DST / "cifar10"
    rng = random.Random(seed)
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(cdir.iterdir())
        rng.shuffle(files)
        for i, f in enumerate(files[:train_per_class + test_per_class]):
            _link(f, dst / ("test" if i < test_per_class else "train") / cdir.name / f.name)
    return dst


def prepare_svhn(test_from: int = 8400) -> Path:
    """Files are numbered in crop order; neighbouring crops share a house photo, so the test split
    is the contiguous block of numbers >= test_from (a random split would leak near-duplicates)."""
    root, dst = SRC / "svhn" / "train", DST / "svhn"
    for f in sorted(root.rglob("*.png")):
        _link(f, dst / ("test" if int(f.stem) >= test_from else "train") / f.parent.name / f.name)
    return dst


def dataset_name(name: str) -> str:
    if name == "shapes":
        return "shapes"
    path = {"cifar10": prepare_cifar, "svhn": prepare_svhn}[name]()
    return f"folder:{path}"


def cpu() -> float:
    return time.process_time()


def run_one(name: str, eval_size: int) -> dict:
    t0, c0 = time.perf_counter(), cpu()
    data = load_dataset(dataset_name(name))
    p = get_technique("distill").validate(STUDENT)
    row = {"dataset": name, "train_images": len(data.train_y), "test_images": len(data.test_y),
           "eval_images": len(data.eval_split(eval_size)[1]), "teacher_cfg": TEACHER.key(), "student": p}

    c = cpu()
    teacher = get_teacher(data, TeacherSettings("resnet34", TEACHER), device="cpu", measure=False)
    x, y = data.eval_split(eval_size)
    row["teacher_accuracy"] = evaluate_accuracy(teacher.model, data, x, y)
    row["teacher_cached"] = teacher.cached
    row["teacher_cpu_s"] = cpu() - c

    c = cpu()
    cfg = kd._train_config(p)
    _, metrics, hist, _ = kd.scratch_student(data, p["student"], cfg, eval_size=eval_size)
    row["scratch_accuracy"], row["scratch_curve"] = metrics["accuracy"], [h["val_accuracy"] for h in hist]
    row["scratch_cpu_s"] = cpu() - c

    for label, augment in (("kd_aug", True), ("kd_plain", False)):
        c = cpu()
        _, hist, _ = kd.distill_student(teacher, data, p, eval_size=eval_size, augment=augment)
        row[f"{label}_accuracy"], row[f"{label}_curve"] = hist[-1]["val_accuracy"], [h["val_accuracy"] for h in hist]
        row[f"{label}_cpu_s"] = cpu() - c

    row["cpu_s"], row["wall_s"] = cpu() - c0, time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="shapes,cifar10,svhn")
    ap.add_argument("--eval-size", type=int, default=1000, help="held-out test images (0 = all)")
    ap.add_argument("--out", default="/tmp/kd_bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.datasets.split(","):
        row = run_one(name.strip(), args.eval_size)
        line = json.dumps(row)
        print(line, flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
