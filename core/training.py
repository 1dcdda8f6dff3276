"""The one training loop: teacher training, fine-tuning after pruning, and distillation.

Data stays in memory as uint8; augmentation (random crop with 4-pixel padding, and a random
horizontal flip only where the dataset allows it: `DataBundle.flip`, off for SVHN and for image
folders unless their lab.json says `"flip": true`) runs on whole batches as tensor ops, which is
much faster on a CPU than per-image PIL transforms. SGD with Nesterov momentum, a one-cycle schedule and label smoothing.
"""
from __future__ import annotations

import math
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cache
from .datasets import DataBundle
from .errors import InvalidParameter
from .progress import ProgressFn, emit

# loss hook: (logits, targets, sample indices into the training set) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1               # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    subset: int = 0               # 0 = the whole training set
    seed: int = 0
    warmup_fraction: float = 0.25
    augment: bool = True
    grad_clip: float = 0.0        # max gradient norm per step; 0 = off
    precision: str = "fp32"       # "bf16": forward/backward under bfloat16 autocast (weights stay fp32)

    def validate(self) -> "TrainConfig":
        if not (isinstance(self.epochs, int) and 0 <= self.epochs <= 500):
            raise InvalidParameter("epochs", self.epochs, "an integer from 0 to 500")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= 4096):
            raise InvalidParameter("batch_size", self.batch_size, "an integer from 1 to 4096")
        if not (0 < self.lr <= 10):
            raise InvalidParameter("lr", self.lr, "a number in (0, 10]")
        if not (isinstance(self.subset, int) and self.subset >= 0):
            raise InvalidParameter("subset", self.subset, "0 (all) or a positive number of images")
        if not (isinstance(self.grad_clip, (int, float)) and 0 <= self.grad_clip <= 1e6):
            raise InvalidParameter("grad_clip", self.grad_clip, "0 (off) or a positive gradient norm")
        if self.precision not in PRECISIONS:
            raise InvalidParameter("precision", self.precision, " or ".join(PRECISIONS))
        if not (0 <= self.label_smoothing < 1):
            raise InvalidParameter("label_smoothing", self.label_smoothing, "in [0, 1)")
        return self

    def key(self) -> dict:
        d = asdict(self)
        # added later: their old values keep the keys of teachers trained before they existed
        if not d["grad_clip"]:
            del d["grad_clip"]
        if d["precision"] == "fp32":
            del d["precision"]
        return d


PRECISIONS = ("fp32", "bf16")


def bf16_training_supported(device: str) -> bool:
    """Whether bfloat16 autocast is fast on `device`: oneDNN with AVX-512 BF16/AMX, or a CUDA GPU with it."""
    if device == "cpu":
        try:   # a private oneDNN query: treated as "no" if a later PyTorch drops it
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False   # MPS: bfloat16 autocast is incomplete there


def training_precision(device: str) -> str:
    """The teacher recipe's precision, also used for fine-tuning after pruning and for distillation
    students: "bf16" where the hardware runs bfloat16 autocast natively, else "fp32"."""
    return "bf16" if bf16_training_supported(torch.device(device).type) else "fp32"


# Real data gets at least the optimizer steps of 8 CIFAR-10 epochs (45,000 images, batch 128):
# the 7,200-image SVHN slice stopped after 450 steps at 8 epochs, mostly short of learning at all
# (ResNet-50 22%, docs/teachers.md). Capped so a few hundred images do not mean a thousand epochs.
MIN_DEFAULT_STEPS = 2800
MAX_DEFAULT_EPOCHS = 60


def default_epochs(n_train: int, batch_size: int) -> int:
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return min(MAX_DEFAULT_EPOCHS, max(TrainConfig.epochs, math.ceil(MIN_DEFAULT_STEPS / steps_per_epoch)))


# On sets this large the ResNets train at batch 256 and peak lr 0.2: more images/s than batch 128 on
# the 2-core CPU, so on CIFAR-10 ResNet-34 got 19 epochs instead of 15 in 30 minutes (82.86% vs
# 81.70%) and ResNet-50 18 instead of 15 in 45 (83.02% vs 81.56%; docs/teachers.md). Only where
# measured to pay: VGG16-BN kept 5 epochs with half the steps and fell to 74.32% (from 79.32%);
# DenseNet-121 was not trained at 256. Smaller sets keep batch 128: they are short of steps.
LARGE_SET = 20_000
LARGE_SET_BATCH, LARGE_SET_LR = 256, 0.2   # for the models whose spec has large_set_batch


def recipe_for(data: DataBundle, model: str | None = None, device: str | None = None) -> TrainConfig:
    """The default teacher recipe for a dataset (and model): generated data gets a short demo recipe.

    Shapes: 5 epochs at batch 64 (more steps per epoch) reach 88.8% with ResNet-34 in 169 s on two
    idle cores; batch 128 reached 85.0% in 141 s (docs/teachers.md).
    VGG (no residual paths, 4096-wide linear layers) went to NaN in its first epoch at peak lr 0.1
    and batch 64; clipping the gradient norm at 2 keeps it finite.
    Real data: 8 epochs, or more for small sets (default_epochs); the ResNets at batch 256 on large
    sets (LARGE_SET).
    bfloat16 autocast where the hardware runs it natively: on this project's 2-core AVX-512 BF16 CPU
    a ResNet-34 step is 1.36x faster, a whole CIFAR-10 epoch 1.25x (VGG16-BN step 1.6x); docs/teachers.md.
    """
    from .models import MODELS
    from .settings import default_device
    spec = MODELS.get(model) if model else None
    if getattr(data, "generated", False):
        cfg = TrainConfig(epochs=5, batch_size=64, lr=0.1)
    else:
        cfg = TrainConfig(epochs=default_epochs(len(data.train_y), TrainConfig.batch_size))
        if len(data.train_y) >= LARGE_SET and spec is not None and spec.large_set_batch:
            cfg = dataclasses.replace(cfg, batch_size=LARGE_SET_BATCH, lr=LARGE_SET_LR)
    cfg = dataclasses.replace(cfg, precision=training_precision(device or default_device()))
    if spec is not None and spec.grad_clip:
        cfg = dataclasses.replace(cfg, grad_clip=spec.grad_clip)
    return cfg


def training_indices(data: DataBundle, cfg: TrainConfig) -> torch.Tensor:
    """The training images used (a fixed stratified subset when cfg.subset is set)."""
    from .datasets import stratified_subset
    return stratified_subset(data.train_y, cfg.subset, seed=cfg.seed + 99) if cfg.subset else torch.arange(len(data.train_y))


def augment_batch(x: torch.Tensor, flip: bool, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip on a uint8 batch, as tensor ops."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        out[mask] = out[mask].flip(3)
    return out


def one_cycle_lr(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (0.04 + 0.96 * step / warm)
    frac = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * frac)) + 1e-5


@torch.inference_mode()
def predict_logits(model: nn.Module, data: DataBundle, x_uint8: torch.Tensor, device: str = "cpu",
                   batch_size: int = 256) -> torch.Tensor:
    """Logits for a uint8 batch of any length, computed in chunks on `device` (returned on CPU)."""
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = data.normalize(x_uint8[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, data.num_classes)


def evaluate_accuracy(model, data: DataBundle, x, y, device="cpu") -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict_logits(model, data, x, device).argmax(1) == y).float().mean())


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable weights with weight decay; biases and norm parameters (1-d) without."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_sgd(param_groups: list[dict], lr: float) -> torch.optim.SGD:
    """Nesterov SGD, with the fused kernel where the device has one.

    The default per-parameter loop walks every weight several times a step: VGG16-BN's 134M
    parameters took 0.36 s per update on two cores, the fused kernel 0.035 s (a whole step 1.23x
    faster; ResNet-34 1.16x). Same update rule, so cached teachers keep their keys.
    """
    try:
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True, fused=True)
    except (RuntimeError, ValueError):   # a device or dtype without a fused SGD
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)


def fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, *, device: str = "cpu",
        loss_fn: Optional[LossFn] = None, progress: ProgressFn = None, stage: str = "train",
        eval_size: int = 1000, start_epoch: int = 0, history: list | None = None,
        optimizer_state: dict | None = None,
        on_epoch_end: Optional[Callable[[int, nn.Module, torch.optim.Optimizer, list], None]] = None) -> list[dict]:
    """Train `model` in place; return per-epoch history rows.

    `loss_fn` replaces the default label-smoothed cross-entropy (distillation passes its KD loss).
    `on_epoch_end` lets the caller checkpoint (resumable training); `start_epoch`, `history`
    and `optimizer_state` resume from such a checkpoint.
    """
    cfg.validate()
    history = list(history or [])
    model.to(device).to(memory_format=torch.channels_last)
    idx_all = training_indices(data, cfg)
    n = len(idx_all)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total_steps = steps_per_epoch * max(cfg.epochs, 1)
    opt = make_sgd(decay_groups(model, cfg.weight_decay), cfg.lr)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_fn = loss_fn or (lambda logits, y, _idx: ce(logits, y))
    val_x, val_y = data.eval_split(eval_size)
    x_train, y_train = data.train_x, data.train_y
    bf16 = cfg.precision == "bf16"

    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)
        order = idx_all[torch.randperm(n, generator=gen)]
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        emit(progress, stage=stage, kind="start", step=0, total=steps_per_epoch, epoch=epoch + 1, epochs=cfg.epochs)
        for s in range(steps_per_epoch):
            bidx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(bidx) < 2:  # batch norm needs two samples
                continue
            xb = x_train[bidx]
            if cfg.augment:
                xb = augment_batch(xb, data.flip, gen)
            xb = data.normalize(xb.to(device)).contiguous(memory_format=torch.channels_last)
            yb = y_train[bidx].to(device)
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr(epoch * steps_per_epoch + s, total_steps, cfg.lr, cfg.warmup_fraction)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            logits = logits.float()   # the loss (and KD's softmax over T) in fp32
            loss = loss_fn(logits, yb, bidx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += float(loss.detach()) * len(bidx)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(bidx)
            emit(progress, stage=stage, kind="batch", step=s + 1, total=steps_per_epoch,
                 epoch=epoch + 1, epochs=cfg.epochs)
        train_seconds = time.perf_counter() - t0
        val_acc = evaluate_accuracy(model, data, val_x, val_y, device)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), "val_accuracy": val_acc,
               "seconds": train_seconds, "images_per_second": seen / max(train_seconds, 1e-9)}
        history.append(row)
        if on_epoch_end is not None:  # checkpoint first: a stop raised from the epoch event keeps it
            on_epoch_end(epoch + 1, model, opt, history)
        emit(progress, stage=stage, kind="epoch", step=steps_per_epoch, total=steps_per_epoch,
             epoch=epoch + 1, epochs=cfg.epochs, metrics=row)
    model.eval()
    emit(progress, stage=stage, kind="done")
    return history


def resumable_fit(model: nn.Module, data: DataBundle, cfg: TrainConfig, checkpoint: Path, *, what: str,
                  progress: ProgressFn = None, stage: str = "train", **fit_kwargs) -> list[dict]:
    """fit() that leaves an epoch checkpoint at `checkpoint` (unique to this exact work) and resumes
    after the last finished epoch when an interrupted run left one: a stopped teacher, student or
    fine-tuning run, asked for again, costs only its unfinished epochs. The caller removes the
    checkpoint once it has saved what it trained (until then a crash still resumes near the end)."""
    checkpoint = Path(checkpoint)
    start, history, opt_state = 0, [], None
    if checkpoint.exists():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(ck["model"])
            start, history, opt_state = int(ck["epoch"]), list(ck["history"]), ck["optimizer"]
            emit(progress, stage=stage, kind="message", message=f"resuming {what} from epoch {start} of {cfg.epochs}")
        except Exception:
            model.load_state_dict(before)   # a failed load may have copied some tensors already
            start, history, opt_state = 0, [], None
            cache.report_corrupt(checkpoint, "unreadable checkpoint")

    def save(epoch, m, opt, hist):
        if epoch < cfg.epochs:  # the final epoch becomes the caller's finished entry instead
            state = {k: v.detach().cpu() for k, v in m.state_dict().items()}
            cache.atomic_torch_save({"model": state, "optimizer": opt.state_dict(), "epoch": epoch,
                                     "history": hist}, checkpoint)
            cache.trim_checkpoints()

    history = fit(model, data, cfg, progress=progress, stage=stage, start_epoch=start, history=history,
                  optimizer_state=opt_state, on_epoch_end=save, **fit_kwargs)
    return history
