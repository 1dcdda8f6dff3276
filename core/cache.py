"""The model cache: weights (state dicts, loaded with weights_only=True) plus a JSON sidecar.

An entry counts as finished only when its sidecar exists, says "complete" and the weights'
SHA-256 matches: writes go to a temp file and are renamed, so an interrupted write leaves the
cache as it was. A damaged entry is reported with its path and treated as missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import settings
from .errors import CorruptCacheEntry


def stable_hash(obj, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)
    return keep.strip("-")[:60] or "x"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(obj, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True, default=str).encode()))


def versions() -> dict:
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def save_entry(weights_path: Path, state: dict, meta: dict) -> dict:
    """Write weights then the sidecar (weights_path with .json); return the sidecar dict."""
    weights_path = Path(weights_path)
    atomic_torch_save(state, weights_path)
    meta = dict(meta)
    meta.update(status="complete", weights_file=weights_path.name, sha256=file_sha256(weights_path),
                created=time.strftime("%Y-%m-%dT%H:%M:%S"), created_ts=time.time(), versions=versions(),
                file_bytes=weights_path.stat().st_size)
    atomic_write_json(meta, sidecar_path(weights_path))
    return meta


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def read_sidecar(weights_path: Path) -> dict | None:
    """The sidecar of a finished entry, or None (missing, unfinished, or unreadable)."""
    side = sidecar_path(weights_path)
    if not side.exists() or not Path(weights_path).exists():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        report_corrupt(side, "unreadable sidecar")
        return None
    return meta if meta.get("status") == "complete" else None


def load_state(weights_path: Path, meta: dict | None = None) -> dict:
    """Load a state dict safely; CorruptCacheEntry (with the path) if it is damaged."""
    weights_path = Path(weights_path)
    if meta is not None and meta.get("sha256") and file_sha256(weights_path) != meta["sha256"]:
        raise CorruptCacheEntry(f"cached file {weights_path} does not match its checksum; ignoring it")
    try:
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCacheEntry(f"cached file {weights_path} could not be loaded "
                                f"({type(exc).__name__}); ignoring it") from None


def report_corrupt(path: Path, why: str) -> None:
    warnings.warn(f"cache entry {path} is damaged ({why}); treating it as missing", stacklevel=2)


def checkpoint_path(kind: str, dataset_fingerprint: str, key: dict) -> Path:
    """Where an interrupted training run of this exact work keeps its last finished epoch
    (training.resumable_fit); `key` must hold everything that decides what the run trains."""
    return settings.cache_dir() / "checkpoints" / slug(dataset_fingerprint) / f"{kind}-{stable_hash(key, 16)}.partial.pt"


MAX_CHECKPOINTS = 8   # runs stopped and never asked for again; a pruned ResNet-34's takes ~250 MB


def trim_checkpoints(keep: int = MAX_CHECKPOINTS) -> None:
    """Keep the `keep` most recently written checkpoints: a class moving sliders mid-run leaves many."""
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    files = sorted((settings.cache_dir() / "checkpoints").rglob("*.partial.pt"), key=mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


def teacher_dir(dataset_fingerprint: str, model: str) -> Path:
    return settings.cache_dir() / "teachers" / slug(dataset_fingerprint) / model


def list_entries(kind: str = "teachers") -> list[dict]:
    """Every finished entry under cache/<kind>/ (sidecars), newest first."""
    root = settings.cache_dir() / kind
    out = []
    if root.exists():
        for side in root.rglob("*.json"):
            w = side.with_suffix(".pt")
            meta = read_sidecar(w)
            if meta is not None:
                meta["path"] = str(w)
                out.append(meta)
    return sorted(out, key=lambda m: -m.get("created_ts", 0))


@contextlib.contextmanager
def file_lock(name: str):
    """Cross-process lock under cache/locks/, so two runs never compute (or half-overwrite) one entry."""
    lock_dir = settings.cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
