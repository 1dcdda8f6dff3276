"""Teacher benchmarks on a CPU: recipe vs plain loop throughput, seconds per epoch, real trainings.

Subcommands (each prints JSON lines; docs/teachers.md holds the numbers and the exact commands):

  build-data  hard-link /tmp/data/{cifar10,svhn}/train into folder datasets under /tmp/teach_data/
              (CIFAR: stratified 5,000-image held-out test split; SVHN: a contiguous held-out block)
  speed       images/s of the recipe (core.training.fit) vs the plain loop, side by side, per teacher
  estimate    core.estimate.estimate_epoch_seconds for each teacher (seconds per epoch)
  shapes-recipe  one fit() of a teacher on the offline "shapes" data (v3, or the old v2 with
              --shapes-v2), with or without zero-init residuals: test accuracy per setting and time
Real trainings go through the CLI: `python -m core prepare --dataset folder:/tmp/teach_data/cifar10 ...`

The plain loop (what the seed study did) lives here, not in core: torchvision DataLoader with
per-image PIL transforms, batch 128, float32 NCHW, constant-lr SGD.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.datasets import DataBundle, load_dataset  # noqa: E402  (core first: it sets OMP_WAIT_POLICY)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from core.models import STUDY_TEACHERS, build_model  # noqa: E402
from core.training import TrainConfig, fit, recipe_for  # noqa: E402

SRC = Path("/tmp/data")
DST = Path("/tmp/teach_data")


def out(row: dict) -> None:
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- data
def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        import shutil
        shutil.copy2(src, dst)


def build_data(src: Path = SRC, dst: Path = DST, cifar_test: int = 5000, svhn_fraction: float = 0.1) -> dict:
    """CIFAR: a seeded, stratified hold-out of `cifar_test` images. SVHN: files are numbered in
    crop order (neighbouring crops come from the same photo), so the held-out part is the
    contiguous block of the highest numbers, which keeps near-duplicates out of the test split."""
    counts = {}
    root = src / "cifar10" / "train"
    if root.is_dir():
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = {c: sorted((root / c).iterdir()) for c in classes}
        total = sum(len(v) for v in files.values())
        rng = random.Random(0)
        for c in classes:
            fs = list(files[c])
            rng.shuffle(fs)
            k = round(cifar_test * len(fs) / total)
            for i, f in enumerate(fs):
                _link(f, dst / "cifar10" / ("test" if i < k else "train") / c / f.name)
        counts["cifar10"] = {s: sum(1 for _ in (dst / "cifar10" / s).rglob("*.*")) for s in ("train", "test")}
    root = src / "svhn" / "train"
    if root.is_dir():
        allf = sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: f.name)
        cut = allf[int(len(allf) * (1 - svhn_fraction))].name
        for f in allf:
            split = "test" if f.name >= cut else "train"
            _link(f, dst / "svhn" / split / f.parent.name / f.name)
        counts["svhn"] = {s: sum(1 for _ in (dst / "svhn" / s).rglob("*.*")) for s in ("train", "test")}
        counts["svhn"]["test_from_file"] = cut
    return counts


# ----------------------------------------------------------------------------- the plain loop
class _PilDataset(torch.utils.data.Dataset):
    """uint8 tensors served one PIL image at a time, the way an ImageFolder/CIFAR10 loader does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.x[i].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.y[i])


def plain_transform(data: DataBundle):
    import torchvision.transforms as T
    ops = [T.RandomCrop(32, padding=4)] + ([T.RandomHorizontalFlip()] if data.flip else [])
    return T.Compose(ops + [T.ToTensor(), T.Normalize(data.mean, data.std)])


def plain_loop(model: nn.Module, data: DataBundle, steps: int, *, batch_size: int = 128, lr: float = 0.01,
               momentum: float = 0.9, subset: int = 0, seed: int = 0, on_step=None) -> dict:
    """The seed-study style loop: DataLoader + per-image transforms, float32 NCHW, constant-lr SGD."""
    from core.training import training_indices
    idx = training_indices(data, TrainConfig(subset=subset, seed=seed))
    ds = _PilDataset(data.train_x[idx], data.train_y[idx], plain_transform(data))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    done, images, t0 = 0, 0, time.perf_counter()
    while done < steps:
        for xb, yb in loader:
            if len(yb) < 2:
                continue
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            images += len(yb)
            if on_step is not None:
                on_step(done, len(yb))
            if done >= steps:
                break
    seconds = time.perf_counter() - t0
    model.eval()
    return {"steps": done, "images": images, "seconds": seconds, "images_per_second": images / seconds}


# ----------------------------------------------------------------------------- measurements
def _timed_batches(stamps: list, sizes: list, warmup: int) -> dict:
    """stamps[i] = (wall, cpu) before batch i+1 ... after the last batch."""
    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][warmup:]
    cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][warmup:]
    imgs = sum(sizes[warmup:])
    return {"images": imgs, "wall": sum(walls), "cpu": sum(cpus)}


def _recipe_run(name: str, data: DataBundle, n: int, warmup: int, bs: int) -> dict:
    stamps, sizes = [], []

    def on_event(ev):
        if ev.kind in ("start", "batch"):
            stamps.append((time.perf_counter(), time.process_time()))
            if ev.kind == "batch":
                sizes.append(bs)
    cfg = dataclasses.replace(recipe_for(data, name, "cpu"), epochs=1, subset=(n + warmup) * bs, batch_size=bs)
    fit(build_model(name, data.num_classes), data, cfg, eval_size=2, progress=on_event)
    return _timed_batches(stamps, sizes, warmup)


def _plain_run(name: str, data: DataBundle, n: int, warmup: int, bs: int) -> dict:
    stamps, sizes = [(time.perf_counter(), time.process_time())], []

    def on_step(_done, size):
        stamps.append((time.perf_counter(), time.process_time()))
        sizes.append(size)
    plain_loop(build_model(name, data.num_classes), data, steps=n + warmup, batch_size=bs,
               subset=(n + warmup) * bs, on_step=on_step)
    return _timed_batches(stamps, sizes, warmup)


def speed(data: DataBundle, models: list[str], batches: int, warmup: int = 2, bs: int = 128) -> list[dict]:
    """Recipe vs plain images/s per model, interleaved A-B-B-A so load drift hits both alike."""
    rows = []
    for name in models:
        acc = {"recipe": [], "plain": []}
        half = max(1, batches // 2)
        for which in ("recipe", "plain", "plain", "recipe"):
            run = _recipe_run if which == "recipe" else _plain_run
            acc[which].append(run(name, data, half, warmup, bs))
        row = {"model": name, "dataset": data.name, "batch_size": bs, "timed_batches_each": 2 * half,
               "threads": torch.get_num_threads(), "recipe_precision": recipe_for(data, name, "cpu").precision}
        for which, runs in acc.items():
            imgs = sum(r["images"] for r in runs)
            row[f"{which}_images_per_second"] = imgs / sum(r["wall"] for r in runs)
            row[f"{which}_cpu_ms_per_image"] = 1000 * sum(r["cpu"] for r in runs) / imgs
        row["speedup_wall"] = row["recipe_images_per_second"] / row["plain_images_per_second"]
        row["speedup_cpu"] = row["plain_cpu_ms_per_image"] / row["recipe_cpu_ms_per_image"]
        rows.append(row)
        out(row)
    return rows


def estimates(data: DataBundle, models: list[str], epochs: int) -> list[dict]:
    from core.estimate import estimate_epoch_seconds
    rows = []
    for name in models:
        e = estimate_epoch_seconds(name, data, dataclasses.replace(recipe_for(data, name, "cpu"), epochs=epochs), "cpu")
        row = {k: e[k] for k in ("model", "seconds_per_epoch", "images_per_second", "text", "threads")}
        rows.append(row)
        out(row)
    return rows


V2_SHAPES = {"RADIUS": (7, 12), "HUE_SPREAD": 0.07, "HARD_FRACTION": 0.15, "VERSION": 2}


def shapes_recipe(model_name: str, epochs: int, batch_size: int, lr: float, zero_init: bool, v2: bool) -> dict:
    """Train one teacher with fit() on shapes; test accuracy on all 2,000 test images."""
    import core.synthetic as syn
    from core import metrics
    from core.models import build_model
    from core.training import fit, predict_logits
    if v2:
        for k, v in V2_SHAPES.items():
            setattr(syn, k, v)
    data = load_dataset("shapes")
    torch.manual_seed(0)
    model = build_model(model_name, data.num_classes)
    if not zero_init:   # undo torchvision's zero_init_residual: batch-norm scales back to 1
        for name, mod in model.named_modules():
            if isinstance(mod, nn.BatchNorm2d) and name.endswith(("bn2", "bn3")) and not mod.weight.any():
                nn.init.ones_(mod.weight)
    t0 = time.perf_counter()
    hist = fit(model, data, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr))
    seconds = time.perf_counter() - t0
    acc = metrics.accuracy(predict_logits(model, data, data.test_x), data.test_y)
    row = {"model": model_name, "shapes": data.fingerprint, "epochs": epochs, "batch_size": batch_size, "lr": lr,
           "zero_init": zero_init, "test_accuracy": round(acc, 4), "seconds": round(seconds),
           "val": [round(h["val_accuracy"], 3) for h in hist]}
    out(row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["build-data", "speed", "estimate", "shapes-recipe"])
    p.add_argument("--dataset", default="folder:/tmp/teach_data/cifar10")
    p.add_argument("--models", nargs="+", default=STUDY_TEACHERS)
    p.add_argument("--batches", type=int, default=20, help="timed batches per loop per model (speed)")
    p.add_argument("--epochs", type=int, default=8, help="epochs the estimate is quoted for")
    p.add_argument("--threads", type=int, default=None)
    g = p.add_argument_group("shapes-recipe")
    g.add_argument("--model", default="resnet34")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--no-zero-init", action="store_true")
    g.add_argument("--shapes-v2", action="store_true", help="the old shapes data (radius 7-12, spread 0.07, 15%% hard)")
    args = p.parse_args(argv)
    if args.what == "build-data":
        out(build_data())
        return 0
    from core.prepare import configure_threads
    out({"threads": configure_threads(args.threads), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    if args.what == "shapes-recipe":
        shapes_recipe(args.model, args.epochs, args.batch_size, args.lr, not args.no_zero_init, args.shapes_v2)
        return 0
    data = load_dataset(args.dataset)
    if args.what == "speed":
        speed(data, args.models, args.batches)
    else:
        estimates(data, args.models, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
