"""Dataset registry: every dataset becomes a `DataBundle` of uint8 tensors held in memory.

Names: "shapes" (generated offline default), "cifar10", "svhn" (torchvision, real download code),
and "folder:<path>" (any image folder, `<path>/train/<class>/*`, optional `<path>/test/<class>/*`).

A folder's augmentation is a property of the folder, in `<path>/lab.json` (FOLDER_SETTINGS):
`{"flip": true}` turns random horizontal flips on. Without the file (or the key) a folder trains
without flips: a mirrored digit, letter or sign is a different (or no) class, while natural photos
only lose a little accuracy without flips; guessing from the images cannot tell the two apart. The
setting is part of the folder's fingerprint, so changing it trains (and caches) a new teacher.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import settings, synthetic
from .errors import DataUnavailable, LabError

DEFAULT_DATASET = "shapes"
DEFAULT_EVAL_SIZE = 1000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass
class DataBundle:
    name: str
    title: str
    classes: list[str]
    train_x: torch.Tensor          # uint8, N×3×32×32
    train_y: torch.Tensor          # int64, N
    test_x: torch.Tensor
    test_y: torch.Tensor
    flip: bool                     # horizontal flip is a valid augmentation
    generated: bool = False        # made by the project, not real data
    source: str = ""
    fingerprint: str = ""          # identifies the exact data, for cache keys
    mean: tuple = field(default=None)
    std: tuple = field(default=None)

    def __post_init__(self):
        if self.mean is None:
            flat = self.train_x.permute(1, 0, 2, 3).reshape(3, -1)
            means = _channel_stats(flat if flat.shape[1] < 5e7 else flat[:, ::7])[0]
            stds = _channel_stats(flat[:, ::3])[1]
            self.mean = tuple(round(float(m) / 255, 4) for m in means)
            self.std = tuple(round(max(float(s) / 255, 1e-3), 4) for s in stds)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label(self) -> str:
        """Name shown in the UI and CLI; generated data says so."""
        return f"{self.title} (generated data)" if self.generated else self.title

    def eval_indices(self, size: int = DEFAULT_EVAL_SIZE) -> torch.Tensor:
        """A fixed, stratified subset of the test set (0 or >= len: the full test set)."""
        return stratified_subset(self.test_y, size, seed=1234)

    def eval_split(self, size: int = DEFAULT_EVAL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.eval_indices(size)
        return self.test_x[idx], self.test_y[idx]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float batch (what every model in the lab sees)."""
        mean = torch.tensor(self.mean, device=x_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x_uint8.device).view(1, 3, 1, 1)
        return (x_uint8.float() / 255 - mean) / std

    def summary(self) -> dict:
        return {"name": self.name, "label": self.label, "classes": self.classes,
                "train": int(len(self.train_y)), "test": int(len(self.test_y)),
                "generated": self.generated, "source": self.source, "flip": self.flip}


def _channel_stats(flat: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-row mean and sample standard deviation of uint8 values, from a 256-bin histogram.

    The same numbers as converting to float64 first, without the 8-bytes-per-pixel copy: for 50,000
    CIFAR-10 images that copy took 1.7 s of every load of the dataset."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for row in flat:
        counts = torch.bincount(row.contiguous(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(float(mean))
        stds.append(float(((counts * (values - mean) ** 2).sum() / max(float(n) - 1, 1.0)).sqrt()))
    return means, stds


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    n = len(labels)
    if size <= 0 or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    chosen = []
    classes = labels.unique()
    for c in classes:
        members = perm[labels[perm] == c]
        k = int(round(size * len(members) / n))
        chosen.append(members[:max(k, 1)])
    idx = torch.cat(chosen)
    return idx.sort().values[:size]


# ----------------------------------------------------------------------------- registry
@dataclass
class DatasetSpec:
    name: str
    title: str
    description: str
    loader: Callable[[Path], DataBundle]
    needs_download: bool


def _shapes(_root: Path) -> DataBundle:
    path = settings.cache_dir() / "datasets" / f"shapes-v{synthetic.VERSION}.pt"
    blob = _load_tensor_cache(path)
    if blob is None:
        tx, ty = synthetic.generate(10_000, seed=0)
        vx, vy = synthetic.generate(2_000, seed=1)
        blob = {"train_x": torch.from_numpy(tx), "train_y": torch.from_numpy(ty),
                "test_x": torch.from_numpy(vx), "test_y": torch.from_numpy(vy)}
        _save_tensor_cache(path, blob)
    return DataBundle("shapes", "Shapes", list(synthetic.CLASSES), blob["train_x"], blob["train_y"],
                      blob["test_x"], blob["test_y"], flip=True, generated=True,
                      source="generated by core.synthetic (seed 0 train, seed 1 test)",
                      fingerprint=f"shapes-v{synthetic.VERSION}")


CIFAR_HOWTO = ("download it on a machine with internet (python -m core train --dataset cifar10 does it), "
               "or copy the extracted 'cifar-10-batches-py' folder into {root}")
SVHN_HOWTO = ("download it on a machine with internet (python -m core train --dataset svhn does it), "
              "or copy train_32x32.mat and test_32x32.mat into {root}")


def _torchvision_dataset(cls, root: Path, label: str, howto: str, **split_kwargs):
    """Open a torchvision dataset from root; download if missing; a clear error when offline."""
    try:
        return cls(str(root), download=False, **split_kwargs)
    except (RuntimeError, FileNotFoundError, OSError):
        pass
    if os.environ.get("COMPRESSION_LAB_OFFLINE"):
        raise DataUnavailable(f"{label} is not in {root} and downloads are off "
                              f"(COMPRESSION_LAB_OFFLINE is set): " + howto.format(root=root))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return cls(str(root), download=True, **split_kwargs)
    except Exception as exc:  # network errors come in many types (URLError, timeout, HTTPError)
        raise DataUnavailable(f"{label} is not in {root} and could not be downloaded "
                              f"({type(exc).__name__}: {exc}); " + howto.format(root=root)) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def cifar_arrays_to_tensors(data: np.ndarray, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision CIFAR stores N×32×32×3 uint8 and a list of ints."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).transpose(0, 3, 1, 2)))
    return x, torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def svhn_arrays_to_tensors(data: np.ndarray, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision SVHN stores N×3×32×32 uint8 and labels 0–9 (it already maps 10 to 0)."""
    y = np.asarray(labels, dtype=np.int64) % 10
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8))), torch.from_numpy(y)


def _cifar10(root: Path) -> DataBundle:
    from torchvision.datasets import CIFAR10
    tr = _torchvision_dataset(CIFAR10, root, "CIFAR-10", CIFAR_HOWTO, train=True)
    te = _torchvision_dataset(CIFAR10, root, "CIFAR-10", CIFAR_HOWTO, train=False)
    tx, ty = cifar_arrays_to_tensors(tr.data, tr.targets)
    vx, vy = cifar_arrays_to_tensors(te.data, te.targets)
    return DataBundle("cifar10", "CIFAR-10", list(tr.classes), tx, ty, vx, vy, flip=True,
                      source=f"torchvision CIFAR10 in {root}", fingerprint="cifar10",
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def _svhn(root: Path) -> DataBundle:
    from torchvision.datasets import SVHN
    tr = _torchvision_dataset(SVHN, root, "SVHN", SVHN_HOWTO, split="train")
    te = _torchvision_dataset(SVHN, root, "SVHN", SVHN_HOWTO, split="test")
    tx, ty = svhn_arrays_to_tensors(tr.data, tr.labels)
    vx, vy = svhn_arrays_to_tensors(te.data, te.labels)
    return DataBundle("svhn", "SVHN", [str(i) for i in range(10)], tx, ty, vx, vy, flip=False,
                      source=f"torchvision SVHN in {root}", fingerprint="svhn",
                      mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970))


DATASETS: dict[str, DatasetSpec] = {
    "shapes": DatasetSpec("shapes", "Shapes", "offline default: 10 generated shape classes, "
                          "10,000 train / 2,000 test, made in seconds with no download", _shapes, False),
    "cifar10": DatasetSpec("cifar10", "CIFAR-10", "torchvision CIFAR-10 (50,000 train / 10,000 test)",
                           _cifar10, True),
    "svhn": DatasetSpec("svhn", "SVHN", "torchvision SVHN cropped digits (73,257 train / 26,032 test)",
                        _svhn, True),
}


def dataset_names() -> list[str]:
    return list(DATASETS) + ["folder:<path>"]


# ----------------------------------------------------------------------------- folder datasets
FOLDER_SETTINGS = "lab.json"                 # a folder dataset's own settings, in its root
FOLDER_DEFAULTS = {"flip": False}            # no horizontal flips unless the folder asks for them
FLIP_SUFFIX = "-flip"


def folder_settings(root: str | os.PathLike) -> dict:
    """The folder's settings: FOLDER_DEFAULTS updated from `<root>/lab.json` when it exists.

    A damaged or misspelt file is an error (a typo must not silently train mirrored digits)."""
    path = Path(root).expanduser() / FOLDER_SETTINGS
    out = dict(FOLDER_DEFAULTS)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc}") from None
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise LabError(f"{path} is not valid JSON ({exc}); write e.g. {{\"flip\": true}}") from None
    if not isinstance(given, dict):
        raise LabError(f"{path} must hold a JSON object such as {{\"flip\": true}}")
    unknown = sorted(set(given) - set(FOLDER_DEFAULTS))
    if unknown:
        raise LabError(f"{path}: unknown setting {', '.join(map(repr, unknown))}; "
                       f"known: {', '.join(FOLDER_DEFAULTS)}")
    if "flip" in given and not isinstance(given["flip"], bool):
        raise LabError(f"{path}: \"flip\" must be true or false, not {given['flip']!r}")
    out.update(given)
    return out


def write_folder_settings(root: str | os.PathLike, **changes) -> dict:
    """Change a folder's settings (the app's switch): rewrites `<root>/lab.json`; returns the settings."""
    from .cache import atomic_write_json
    root = Path(root).expanduser()
    unknown = sorted(set(changes) - set(FOLDER_DEFAULTS))
    if unknown:
        raise LabError(f"unknown folder setting {', '.join(map(repr, unknown))}; known: {', '.join(FOLDER_DEFAULTS)}")
    current = folder_settings(root)
    current.update(changes)
    try:
        atomic_write_json(current, root / FOLDER_SETTINGS)
    except OSError as exc:
        raise LabError(f"cannot write {root / FOLDER_SETTINGS}: {exc}") from None
    return current


def _folder_fingerprint(content: str, flip: bool) -> str:
    # the default (no flips) keeps the fingerprint's old form; teachers cached before the setting
    # existed were trained with flips, and teachers.find_teacher tells them apart by their sidecar
    return f"folder-{content}" + (FLIP_SUFFIX if flip else "")


def with_folder_settings(data: DataBundle) -> DataBundle:
    """A folder dataset as its lab.json says now (another flip setting: another fingerprint, so
    another teacher); other datasets unchanged. Cheap: the images are shared, not reloaded."""
    if not data.name.startswith("folder:"):
        return data
    flip = bool(folder_settings(data.name[len("folder:"):])["flip"])
    if flip == data.flip:
        return data
    content = data.fingerprint.removeprefix("folder-").removesuffix(FLIP_SUFFIX)
    return dataclasses.replace(data, flip=flip, fingerprint=_folder_fingerprint(content, flip))


def _image_files(folder: Path) -> list[str]:
    # sorted by name = the order of sorted Paths in one folder (the fingerprint depends on it); scandir
    # and plain strings list a 5,000-image class folder ~10x faster than Path.iterdir/is_file/sort
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries
                      if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)


def _class_dirs(split: Path) -> list[Path]:
    return sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_images(files: list[str]) -> tuple[np.ndarray, list[str]]:
    from .images import load_image_32
    out, bad = [], []
    for f in files:
        try:
            out.append(load_image_32(f))
        except Exception:  # unreadable images are skipped, reported by the caller
            bad.append(f)
    arr = np.stack(out) if out else np.zeros((0, 3, 32, 32), np.uint8)
    return arr, bad


def _folder(path_text: str) -> DataBundle:
    root = Path(path_text).expanduser()
    if not root.is_dir():
        raise DataUnavailable(f"folder dataset {root} does not exist")
    train = root / "train"
    if not train.is_dir():
        raise LabError(f"folder dataset {root} has no train/ folder; expected {root}/train/<class>/<image>")
    flip = bool(folder_settings(root)["flip"])   # read first: a bad lab.json fails before any decoding
    classes = [d.name for d in _class_dirs(train)]
    if len(classes) < 2:
        raise LabError(f"folder dataset {train} needs at least 2 class folders, found {len(classes)}")
    files = {c: _image_files(train / c) for c in classes}
    test = root / "test"
    test_files = None
    if test.is_dir():
        extra = [d.name for d in _class_dirs(test) if d.name not in classes]
        if extra:
            raise LabError(f"folder dataset {test} has classes not in train/: {', '.join(extra)}")
        test_files = {c: _image_files(test / c) if (test / c).is_dir() else [] for c in classes}
    stat = hashlib.sha256()
    skip = len(str(root).rstrip(os.sep)) + 1      # f[skip:] == str(Path(f).relative_to(root)), 10x faster
    for group in (files, test_files or {}):
        for c, fs in group.items():
            for f in fs:
                st = os.stat(f)
                stat.update(f"{f[skip:]}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    fingerprint = stat.hexdigest()[:16]
    cache_path = settings.cache_dir() / "datasets" / f"folder-{root.name}-{fingerprint}.pt"
    blob = _load_tensor_cache(cache_path)
    if blob is None:
        blob = _convert_folder(root, classes, files, test_files)
        _save_tensor_cache(cache_path, blob)
    return DataBundle(f"folder:{root}", root.name, classes, blob["train_x"], blob["train_y"],
                      blob["test_x"], blob["test_y"], flip=flip, source=f"image folder {root}",
                      fingerprint=_folder_fingerprint(fingerprint, flip))


def _convert_folder(root, classes, files, test_files) -> dict:
    xs, ys, txs, tys, bad = [], [], [], [], []
    for ci, c in enumerate(classes):
        fs = files[c]
        if not fs:
            raise LabError(f"folder dataset class {root / 'train' / c} has no images "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        if test_files is None:
            # fixed, stratified 10% hold-out: every 10th file of a seeded order
            order = np.random.default_rng(ci).permutation(len(fs))
            held = set(order[: max(1, len(fs) // 10)].tolist()) if len(fs) > 1 else set()
            tf = [f for i, f in enumerate(fs) if i in held]
            fs = [f for i, f in enumerate(fs) if i not in held]
        else:
            tf = test_files[c]
        for group, gx, gy in ((fs, xs, ys), (tf, txs, tys)):
            arr, b = _read_images(group)
            bad += b
            gx.append(arr)
            gy.append(np.full(len(arr), ci, np.int64))
    train_x = np.concatenate(xs)
    if len(train_x) == 0:
        raise LabError(f"folder dataset {root} has no readable images")
    if bad and len(bad) > 0.5 * (len(bad) + len(train_x)):
        raise LabError(f"folder dataset {root}: {len(bad)} of its images are unreadable, e.g. {bad[0]}")
    test_x = np.concatenate(txs)
    if len(test_x) == 0:
        raise LabError(f"folder dataset {root} has no test images (add test/<class>/ or more images)")
    return {"train_x": torch.from_numpy(train_x), "train_y": torch.from_numpy(np.concatenate(ys)),
            "test_x": torch.from_numpy(test_x), "test_y": torch.from_numpy(np.concatenate(tys)),
            "skipped": torch.tensor(len(bad))}


# ----------------------------------------------------------------------------- helpers
def _load_tensor_cache(path: Path):
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not all(k in blob for k in ("train_x", "train_y", "test_x", "test_y")):
            raise ValueError("missing keys")
        return blob
    except Exception:
        return None  # a damaged conversion cache is rebuilt, never trusted


def _save_tensor_cache(path: Path, blob: dict) -> None:
    from .cache import atomic_torch_save
    try:
        atomic_torch_save(blob, path)
    except OSError:
        pass  # a read-only cache only costs a re-conversion next time


@lru_cache(maxsize=6)
def _load_cached(name: str, root: str) -> DataBundle:
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):])
    return DATASETS[name].loader(Path(root))


def load_dataset(name: str = DEFAULT_DATASET, data_root: str | os.PathLike | None = None) -> DataBundle:
    """Load a dataset by registry name (kept in memory for the process; a folder's lab.json is read
    on every call, so a changed setting applies at once)."""
    name = (name or DEFAULT_DATASET).strip()
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise LabError("folder dataset needs a path: folder:/path/to/images")
        name = "folder:" + str(Path(name[len("folder:"):]).expanduser().resolve())
    elif name not in DATASETS:
        raise LabError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return with_folder_settings(_load_cached(name, str(settings.data_root(data_root))))


def is_dataset_name(name: str) -> bool:
    return name in DATASETS or (name.startswith("folder:") and len(name) > 7)
