"""How long will training take? Time a few real batches of THE training loop and extrapolate.

`estimate_epoch_seconds` runs `core.training.fit` on a fresh model of the same name for a few
batches (the first ones are warm-up: allocator, oneDNN kernel selection), timestamps the loop's
own batch events, and scales the median batch time to a full epoch plus its evaluation pass.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from .datasets import DataBundle
from .errors import InvalidParameter
from .models import build_model
from .progress import Event
from .training import TrainConfig, fit, predict_logits, recipe_for, training_indices

EVAL_SIZE = 1000   # fit()'s default held-out evaluation after every epoch


def human_duration(seconds: float) -> str:
    """'about 40 seconds', 'about 12 minutes', 'about 1.5 hours'."""
    if seconds < 90:
        return f"about {max(1, round(seconds / 5) * 5 if seconds >= 15 else round(seconds))} seconds"
    minutes = seconds / 60
    if minutes < 90:
        return f"about {round(minutes)} minutes"
    return f"about {minutes / 60:.1f} hours"


def estimate_text(seconds_per_epoch: float, epochs: int) -> str:
    return f"{human_duration(seconds_per_epoch * epochs)} for {epochs} epoch{'s' if epochs != 1 else ''}"


def estimate_epoch_seconds(model_name: str, data: DataBundle, cfg: TrainConfig | None = None,
                           device: str = "cpu", *, batches: int = 4, warmup: int = 2) -> dict:
    """Seconds one training epoch of `model_name` on `data` with `cfg` takes on this machine now.

    Trains a throw-away copy for `warmup + batches` batches of cfg.batch_size (the real loop:
    augmentation, channels-last, forward, backward, SGD step). Returns a dict:
    seconds_per_epoch, seconds_per_batch, steps_per_epoch, images_per_second, eval_seconds,
    epochs, total_seconds, text (e.g. "about 12 minutes for 5 epochs"), batches_timed,
    measure_seconds, threads, device.
    """
    cfg = (cfg or recipe_for(data, model_name, device)).validate()
    if not (isinstance(batches, int) and 1 <= batches <= 100):
        raise InvalidParameter("batches", batches, "an integer from 1 to 100")
    if not (isinstance(warmup, int) and 0 <= warmup <= 20):
        raise InvalidParameter("warmup", warmup, "an integer from 0 to 20")
    n_train = len(training_indices(data, cfg))
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    bs = min(cfg.batch_size, n_train)
    n_run = min(warmup + batches, max(steps, 2))
    # the probe run: exactly n_run full batches of the same loop, one epoch, tiny evaluation
    probe_cfg = dataclasses.replace(cfg, epochs=1, subset=min(n_run * bs, len(data.train_y)))
    stamps: list[float] = []

    def on_event(ev: Event) -> None:
        if ev.kind in ("start", "batch", "epoch"):
            stamps.append(time.perf_counter())

    model = build_model(model_name, data.num_classes)
    t0 = time.perf_counter()
    fit(model, data, probe_cfg, device=device, progress=on_event, stage="estimate", eval_size=2)
    # the per-epoch evaluation: forward passes only, timed after a warm-up call
    probe_x = data.test_x[:256]
    predict_logits(model, data, probe_x[:32], device)
    t1 = time.perf_counter()
    predict_logits(model, data, probe_x, device)
    eval_per_image = (time.perf_counter() - t1) / max(len(probe_x), 1)
    measure_seconds = time.perf_counter() - t0
    del model
    batch_times = [b - a for a, b in zip(stamps[:-2], stamps[1:-1])]  # start..last batch
    timed = batch_times[warmup:] or batch_times[-1:]
    per_batch = statistics.median(timed)
    eval_seconds = eval_per_image * min(EVAL_SIZE, len(data.test_y))
    # the last batch of an epoch may be short; bill it by images
    seconds_per_epoch = per_batch * (n_train / bs) + eval_seconds
    return {"model": model_name, "dataset": data.name, "seconds_per_epoch": seconds_per_epoch,
            "seconds_per_batch": per_batch, "steps_per_epoch": steps,
            "images_per_second": bs / per_batch if per_batch > 0 else float("inf"),
            "eval_seconds": eval_seconds, "epochs": cfg.epochs,
            "total_seconds": seconds_per_epoch * cfg.epochs,
            "text": estimate_text(seconds_per_epoch, cfg.epochs),
            "batches_timed": len(timed), "measure_seconds": measure_seconds,
            "threads": torch.get_num_threads(), "device": device}
