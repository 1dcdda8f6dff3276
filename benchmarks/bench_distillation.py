"""Does distillation beat training the same student from scratch with the same budget? (CPU benchmark)

For each dataset: a resnet34 teacher with a modest budget (get_teacher, cached), then resnet8
students on the same images, epochs, learning rate, seed and initial weights:
  scratch   - plain labels (fit's default label-smoothed CE, augmented): what the lab compares against
  kd_*_aug  - Hinton KD, augmented student inputs, teacher logits of the plain images (cached)
  kd_*_plain- Hinton KD without augmentation (inputs match the cached logits exactly)
at the default temperature 4 and at T=1 (alpha 0.9 throughout), for 2,000 and 500 student images.
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
from core.runner import ExperimentConfig, resolve_teacher  # noqa: E402
from core.teachers import TeacherSettings, get_teacher  # noqa: E402
from core.techniques import get_technique  # noqa: E402
from core.techniques import distillation as kd  # noqa: E402
from core.training import TrainConfig, evaluate_accuracy, recipe_for  # noqa: E402

SRC = Path("/tmp/data")
DST = Path("/tmp/kd_data")

# Budgets sized for ~25 CPU-minutes in all. Batch 32 gives the teacher 4x the optimiser steps of
# batch 128 for the same images (with batch 128 and 2,000 images a resnet34 reached 14.5% on shapes).
TEACHER = TrainConfig(epochs=3, subset=10000, batch_size=32, lr=0.05)
STUDENT = {"student": "resnet8", "temperature": 4.0, "alpha": 0.9, "epochs": 8, "lr": 0.05, "batch_size": 64}
# Student images: 2,000 (a fifth of the teacher's) and 500 (KD's "little labelled data" case).
STUDENT_SUBSETS = (2000, 500)
# KD students: label -> (parameter overrides, augment student inputs); alpha 0.9 throughout
VARIANTS = {
    "kd_t4_aug": ({}, True), "kd_t4_plain": ({}, False),                 # the technique's default T=4
    "kd_t1_aug": ({"temperature": 1.0}, True), "kd_t1_plain": ({"temperature": 1.0}, False),
}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src)


def prepare_cifar(train_per_class: int = 1000, test_per_class: int = 100, seed: int = 0) -> Path:
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
    if name == "shapes" or name.startswith("folder:"):
        return name
    path = {"cifar10": prepare_cifar, "svhn": prepare_svhn}[name]()
    return f"folder:{path}"


def cpu() -> float:
    return time.process_time()


def run_one(name: str, eval_size: int, subsets, variants: list[str], recipe_teacher: bool = False,
            cached_teacher: bool = False) -> list[dict]:
    data = load_dataset(dataset_name(name))
    teacher_cfg = recipe_for(data, "resnet34") if recipe_teacher else TEACHER
    c = cpu()
    if cached_teacher:   # the newest cached resnet34 (what `compress` uses), else the default recipe
        teacher = resolve_teacher(ExperimentConfig(data.name, "resnet34", device="cpu"), data=data)
    else:
        teacher = get_teacher(data, TeacherSettings("resnet34", teacher_cfg), device="cpu", measure=False)
    base = {"dataset": name, "train_images": len(data.train_y), "test_images": len(data.test_y),
            "eval_images": len(data.eval_split(eval_size)[1]), "teacher_cfg": teacher.meta["settings"]["train"]}
    x, y = data.eval_split(eval_size)
    base["teacher_accuracy"] = evaluate_accuracy(teacher.model, data, x, y)
    base["teacher_cached"], base["teacher_cpu_s"] = teacher.cached, cpu() - c

    rows = []
    for subset in subsets:
        t0, c0 = time.perf_counter(), cpu()
        p = get_technique("distill").validate(dict(STUDENT, subset=subset))
        row = dict(base, student=p)
        c = cpu()
        _, metrics, hist, cached = kd.scratch_student(data, p["student"], kd._train_config(p), eval_size=eval_size)
        row["scratch_accuracy"], row["scratch_curve"] = metrics["accuracy"], [h["val_accuracy"] for h in hist]
        row["scratch_cpu_s"], row["scratch_cached"] = cpu() - c, cached
        for label in variants:
            overrides, augment = VARIANTS[label]
            c = cpu()
            _, hist, _ = kd.distill_student(teacher, data, dict(p, **overrides), eval_size=eval_size,
                                            augment=augment)
            row[f"{label}_accuracy"] = hist[-1]["val_accuracy"]
            row[f"{label}_curve"] = [h["val_accuracy"] for h in hist]
            row[f"{label}_cpu_s"] = cpu() - c
        row["students_cpu_s"], row["students_wall_s"] = cpu() - c0, time.perf_counter() - t0
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="shapes,cifar10,svhn",
                    help="comma-separated: shapes, cifar10, svhn (this script's splits) or folder:<path>")
    ap.add_argument("--recipe-teacher", action="store_true",
                    help="the app's teacher (core.training.recipe_for) instead of the small budget above")
    ap.add_argument("--cached-teacher", action="store_true",
                    help="the newest cached resnet34 of the dataset (e.g. what `prepare` trained); "
                         "if none, one trained with the default recipe")
    ap.add_argument("--eval-size", type=int, default=1000, help="held-out test images (0 = all)")
    ap.add_argument("--out", default="/tmp/kd_bench")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="KD students to train: " + ", ".join(VARIANTS))
    ap.add_argument("--subsets", default=",".join(map(str, STUDENT_SUBSETS)), help="student training images")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.datasets.split(","):
        rows = run_one(name.strip(), args.eval_size, [int(v) for v in args.subsets.split(",")],
                       [v.strip() for v in args.variants.split(",") if v.strip()], args.recipe_teacher,
                       args.cached_teacher)
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            with open(out / "results.jsonl", "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
