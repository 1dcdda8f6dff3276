"""Teachers: train (resumably) or load from the cache, keyed by dataset, model and settings."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import cache, metrics, settings
from .datasets import DataBundle, load_dataset
from .errors import CorruptCacheEntry, LabError
from .models import build_model, get_spec
from .progress import ProgressFn, emit
from .training import TrainConfig, resumable_fit

RECIPE_VERSION = 2  # bump when the training loop changes what a given config produces


@dataclass
class TeacherSettings:
    model: str
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrained: bool = False

    def key_dict(self, data: DataBundle) -> dict:
        return {"dataset": data.fingerprint, "model": self.model, "pretrained": self.pretrained,
                "train": self.train.key(), "recipe": RECIPE_VERSION}

    def key(self, data: DataBundle) -> str:
        return cache.stable_hash(self.key_dict(data))


@dataclass
class Teacher:
    model: nn.Module
    meta: dict                 # the cache sidecar: settings, history, metrics, checksum...
    path: Path
    cached: bool               # served from the cache rather than trained now

    @property
    def name(self) -> str:
        return self.meta["model"]


def imagenet_weights_problem(model: str) -> str | None:
    """Why ImageNet weights for `model` cannot be had here, found without any network call; None
    when they are in torch's hub cache or downloads are allowed (a download that then fails stops
    the training with its reason: a teacher cached as pretrained is never one from random weights).

    The Teacher page shows this before offering the switch; `train`, `prepare` and `sweep` with
    --pretrained stop with it before any training."""
    spec = get_spec(model)
    if not spec.torchvision_name:
        return f"{spec.title} has no ImageNet weights (students are trained here from random initialisation)"
    try:
        import torchvision
        weights = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name   # where torch.hub keeps them
    except Exception as exc:   # an older torchvision without the weights enum
        return f"torchvision offers no ImageNet weights for {spec.title} here ({type(exc).__name__}: {exc})"
    if cached.exists() or not os.environ.get("COMPRESSION_LAB_OFFLINE"):
        return None
    return (f"ImageNet weights for {spec.title} cannot be fetched: downloads are off (COMPRESSION_LAB_OFFLINE "
            f"is set) and torch's hub cache has no {cached.name} (looked in {cached.parent}). On a machine with "
            f"internet, `python -m core train --model {model} --pretrained` downloads it (or copy the file into "
            f"that folder); or train from random initialisation instead (without --pretrained).")


def weights_path(data: DataBundle, s: TeacherSettings) -> Path:
    return cache.teacher_dir(data.fingerprint, s.model) / f"{s.key(data)}.pt"


def _rebuild(meta: dict, state: dict) -> nn.Module:
    model = build_model(meta["model"], meta["num_classes"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CorruptCacheEntry(f"cached weights do not fit {meta['model']}: {str(exc)[:120]}") from None
    return model.eval()


def load_teacher_file(path: Path) -> Teacher | None:
    """Load a finished cache entry; a damaged one is reported (with its path) and gives None."""
    meta = cache.read_sidecar(path)
    if meta is None:
        return None
    try:
        model = _rebuild(meta, cache.load_state(path, meta))
    except CorruptCacheEntry as exc:
        cache.report_corrupt(path, str(exc))
        return None
    return Teacher(model, meta, Path(path), cached=True)


def find_teacher(data: DataBundle, s: TeacherSettings) -> Teacher | None:
    t = load_teacher_file(weights_path(data, s))
    return t if t is not None and same_augmentation(t.meta, data) else None


def pretrained_problem(data: DataBundle, s: TeacherSettings) -> str | None:
    """Why training `s` would stop for want of ImageNet weights (imagenet_weights_problem); None when
    `s` is not pretrained, is cached already, or an unfinished run of it (which holds its weights) resumes.
    Cheap (no weights are loaded): `train`, `prepare`, `sweep` and the Teacher page ask before any work."""
    if not s.pretrained:
        return None
    path = weights_path(data, s)
    if path.with_suffix(".partial.pt").exists():
        return None
    meta = cache.read_sidecar(path)
    if meta is not None and same_augmentation(meta, data):
        return None
    return imagenet_weights_problem(s.model)


def same_augmentation(meta: dict, data: DataBundle) -> bool:
    """Whether a cached teacher was trained with the dataset's flip setting. Image folders always
    flipped before their lab.json could say otherwise, and the default (no flips) kept their
    fingerprint: such a teacher (its sidecar records no flip) is not the one a folder without flips asks for."""
    if not data.name.startswith("folder:"):
        return True
    return bool(meta.get("flip", True)) == bool(data.flip)


def latest_teacher(data: DataBundle, model: str) -> Teacher | None:
    """The newest finished teacher of this dataset and model, whatever its settings."""
    folder = cache.teacher_dir(data.fingerprint, model)
    if not folder.exists():
        return None
    metas = []
    for side in folder.glob("*.json"):
        meta = cache.read_sidecar(side.with_suffix(".pt"))
        if meta is not None:
            metas.append((meta.get("created_ts", 0), side.with_suffix(".pt")))
    for _, path in sorted(metas, reverse=True):
        t = load_teacher_file(path)
        if t is not None and same_augmentation(t.meta, data):
            return t
    return None


def get_teacher(dataset: str | DataBundle, s: TeacherSettings, *, device: str | None = None,
                progress: ProgressFn = None, data_root=None, measure: bool = True,
                train_if_missing: bool = True) -> Teacher:
    """Serve the teacher from the cache, or train it (resuming an interrupted run) and cache it."""
    from .settings import default_device
    data = dataset if isinstance(dataset, DataBundle) else load_dataset(dataset, data_root)
    get_spec(s.model, "teacher")
    s.train.validate()
    found = find_teacher(data, s)
    if found is not None:
        return found
    if not train_if_missing:
        raise LabError(f"no cached {s.model} teacher for {data.label}; train one first")
    path = weights_path(data, s)
    problem = pretrained_problem(data, s)
    if problem:
        raise LabError(problem)
    with cache.file_lock(f"teacher-{path.stem}"):   # a second process waits, then loads what the first trained
        found = find_teacher(data, s)
        if found is not None:
            return found
        return _train_teacher(data, s, path, device or default_device(), progress, measure)


def _train_teacher(data: DataBundle, s: TeacherSettings, path: Path, device: str, progress: ProgressFn,
                   measure: bool) -> Teacher:
    partial = path.with_suffix(".partial.pt")
    notices: list[str] = []
    resuming = partial.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a failed weights download is the error below, not a notice
        model = build_model(s.model, data.num_classes, pretrained=s.pretrained, notices=notices)
    if s.pretrained and notices and not resuming:
        # never cache a teacher from random weights under the pretrained key: the next run would serve it
        raise LabError(f"{notices[0].split(';')[0]}, so no ImageNet-pretrained {s.model} was trained; "
                       f"train from random initialisation instead (without --pretrained), or retry where "
                       f"the weights can be downloaded")
    history = resumable_fit(model, data, s.train, partial, what=s.model, device=device, progress=progress,
                            stage="train")
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    emit(progress, stage="evaluate", kind="message", message="measuring accuracy, size and latency")
    report = metrics.report(model, data, eval_size=0, latency=measure) if measure else None
    meta = {"kind": "teacher", "dataset": data.name, "dataset_label": data.label,
            "dataset_fingerprint": data.fingerprint, "flip": bool(data.flip), "model": s.model,
            "num_classes": data.num_classes,
            "classes": data.classes, "settings": s.key_dict(data), "history": history,
            "metrics": report.to_dict() if report else None, "device": device,
            "train_seconds": sum(h["seconds"] for h in history)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = cache.save_entry(path, state, meta)
    partial.unlink(missing_ok=True)   # only now: a crash before the save still resumes near the end
    return Teacher(model, meta, path, cached=False)


def delete_teacher_file(path: Path) -> list[Path]:
    """Remove a cached teacher: its weights, sidecar and any unfinished checkpoint; the removed paths.

    Only files under the cache's teachers/ folder are touched, whatever path is passed in."""
    path = Path(path).resolve()
    root = (settings.cache_dir() / "teachers").resolve()
    if root not in path.parents or path.suffix != ".pt":
        raise LabError(f"{path} is not a cached teacher")
    removed = []
    for p in (path, cache.sidecar_path(path), path.with_suffix(".partial.pt")):
        if p.exists():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def teacher_summary(t: Teacher) -> dict:
    """The train command's --json shape (and the train job's result)."""
    m = t.meta.get("metrics") or {}
    return {"dataset": t.meta["dataset"], "dataset_label": t.meta.get("dataset_label"), "model": t.meta["model"],
            "accuracy": m.get("accuracy"), "size_bytes": m.get("size_bytes"), "gzip_bytes": m.get("gzip_bytes"),
            "params": m.get("params"), "macs": m.get("macs"), "latency_ms_b1": m.get("latency_ms_b1"),
            "latency_ms_b64": m.get("latency_ms_b64"), "threads": m.get("threads"),
            "history": t.meta.get("history", []), "cached": t.cached, "path": str(t.path),
            "settings": t.meta.get("settings"), "eval_images": m.get("eval_images")}
