"""Deployment targets by name: where and how a result's latency is measured.

A target fixes the device, the thread count at batch 1 and the precision the timed models run in. Every
result records its target, which is part of its cache key (another target is another measurement).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LabError

DEFAULT_TARGET = "edge-cpu"


@dataclass(frozen=True)
class Target:
    name: str
    title: str
    device: str                 # "cpu" | "cuda" | "mps": where latency is timed
    headline_batch: int         # the batch size the target is about (the other one is shown too)
    threads_b1: int | None      # CPU threads at batch 1 (None: every thread); batch 64 always gets all
    half: bool = False          # time GPU models in half precision (bf16 where supported, else fp16)
    description: str = ""

    def missing(self) -> str | None:
        """Why this target cannot be measured here, or None when it can."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return f"target {self.name} needs a CUDA GPU, and this machine has none (choose edge-cpu or cpu-server)"
        if self.device == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                return f"target {self.name} needs an Apple GPU (MPS), and this machine has none (choose edge-cpu or cpu-server)"
        return None

    def half_dtype(self) -> torch.dtype | None:
        if not self.half:
            return None
        if self.device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("edge-cpu", "Edge CPU", "cpu", 1, 1,
           description="one request at a time on one core (batch 1, one thread); batch 64 on every core"),
    Target("cpu-server", "CPU server", "cpu", 64, None,
           description="every core, batch 1 and batch 64"),
    Target("cuda", "CUDA GPU", "cuda", 64, None, half=True,
           description="an NVIDIA GPU, batch 64 in bf16 (fp16 where bf16 is missing)"),
    Target("mps", "Apple GPU", "mps", 64, None, half=True, description="Apple silicon's GPU, batch 64 in fp16"),
]}


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str | None) -> Target:
    t = TARGETS.get(name or DEFAULT_TARGET)
    if t is None:
        raise LabError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return t


def require_target(name: str | None) -> Target:
    """The target, or one clear LabError when its hardware is absent."""
    t = get_target(name)
    why = t.missing()
    if why:
        raise LabError(why)
    return t


def available_targets() -> list[str]:
    return [n for n, t in TARGETS.items() if t.missing() is None]
