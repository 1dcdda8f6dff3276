"""Where things live and which device computes: one place for environment lookups."""
from __future__ import annotations

import os
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Model cache root; `COMPRESSION_LAB_CACHE` moves it (tests use a temp dir)."""
    path = Path(os.environ.get("COMPRESSION_LAB_CACHE", PROJECT_ROOT / "cached_models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Where torchvision datasets are looked for / downloaded to."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("COMPRESSION_LAB_DATA", PROJECT_ROOT / "data")).expanduser()


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.insert(0, "mps")
    return devices


def default_device() -> str:
    """Train on an accelerator when present; latency is always measured on the CPU."""
    return available_devices()[0]
