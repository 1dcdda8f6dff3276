"""Predictions for the app's pages: top-k of one image, a grid of test images, cheap cache look-ups.

Everything that touches torch for the app lives here (pages only place results); models are
only read, never modified, so cached models can be shared across sessions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from . import cache
from .datasets import DataBundle
from .results import ExperimentResult, ResultStore


def input_dtype(model: nn.Module) -> torch.dtype:
    """What a (possibly compressed) model takes: half for fp16 models, else float32 (int8 models too)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


@torch.inference_mode()
def predict_probs(model: nn.Module, data: DataBundle, x_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities (float32, CPU) for a uint8 N×3×32×32 batch."""
    if isinstance(x_uint8, np.ndarray):
        x_uint8 = torch.from_numpy(x_uint8)
    if x_uint8.ndim == 3:
        x_uint8 = x_uint8.unsqueeze(0)
    dtype = input_dtype(model)
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = data.normalize(x_uint8[i:i + batch_size]).to(dtype).contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(xb).float(), dim=1))
    return torch.cat(out) if out else torch.zeros(0, data.num_classes)


def image_probs(model: nn.Module, data: DataBundle, image_chw) -> np.ndarray:
    """Class probabilities for one 3×32×32 uint8 image."""
    return predict_probs(model, data, torch.as_tensor(np.asarray(image_chw)))[0].numpy()


def top_k(model: nn.Module, data: DataBundle, image_chw, k: int = 5) -> list[tuple[str, float]]:
    probs = predict_probs(model, data, torch.as_tensor(np.asarray(image_chw)))[0]
    vals, idx = probs.topk(min(k, len(probs)))
    return [(data.classes[int(i)], float(v)) for v, i in zip(vals, idx)]


def prediction_frame(teacher_model: nn.Module, compressed_model: nn.Module, data: DataBundle,
                     indices: torch.Tensor) -> pd.DataFrame:
    """One row per test image: true label, both models' predictions and confidences."""
    x, y = data.test_x[indices], data.test_y[indices]
    pt = predict_probs(teacher_model, data, x)
    pc = predict_probs(compressed_model, data, x)
    t_conf, t_pred = pt.max(1)
    c_conf, c_pred = pc.max(1)
    names = np.array(data.classes)
    return pd.DataFrame({
        "index": indices.numpy(), "true": names[y.numpy()], "teacher_pred": names[t_pred.numpy()],
        "teacher_conf": t_conf.numpy(), "compressed_pred": names[c_pred.numpy()],
        "compressed_conf": c_conf.numpy(), "teacher_correct": (t_pred == y).numpy(),
        "compressed_correct": (c_pred == y).numpy(), "disagree": (t_pred != c_pred).numpy()})


def grid_indices(data: DataBundle, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed, class-balanced sample of test images for the predictions grid."""
    from .datasets import stratified_subset
    return stratified_subset(data.test_y, n, seed=1000 + seed)


def example_images(data: DataBundle, per_class: int = 1) -> list[tuple[str, np.ndarray]]:
    """Bundled examples: the first test images of each class, made from the dataset (nothing committed)."""
    out = []
    for ci, name in enumerate(data.classes):
        idx = (data.test_y == ci).nonzero().flatten()[:per_class]
        for j, i in enumerate(idx.tolist()):
            label = f"{name}" if per_class == 1 else f"{name} #{j + 1}"
            out.append((label, data.test_x[i].numpy().copy()))
    return out


def png_bytes(image_chw: np.ndarray, scale: int = 1) -> bytes:
    """A 3×h×w uint8 image as PNG bytes (nearest-neighbour upscaled by `scale`)."""
    import io

    from PIL import Image
    img = np.asarray(image_chw).transpose(1, 2, 0)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- cheap look-ups
def latest_teacher_entry(data: DataBundle, model: str) -> tuple[Path, dict] | None:
    """(weights path, sidecar) of the teacher `latest_teacher` would pick, without loading weights."""
    folder = cache.teacher_dir(data.fingerprint, model)
    if not folder.exists():
        return None
    best = None
    for side in folder.glob("*.json"):
        if side.name.endswith(".partial.json"):
            continue
        path = side.with_suffix(".pt")
        meta = cache.read_sidecar(path)
        if meta is not None and (best is None or meta.get("created_ts", 0) > best[1].get("created_ts", 0)):
            best = (path, meta)
    return best


def cached_result(cfg, teacher, data: DataBundle, store: ResultStore | None = None) -> ExperimentResult | None:
    """The stored result for this request and teacher if it exists (no work, no lock): instant re-display."""
    from . import runner
    cfg = cfg.validate()
    return runner.cached_result(store or ResultStore.default(), runner.result_key(cfg, teacher, data))


def stored_onnx(result: ExperimentResult) -> bytes | None:
    """The ONNX file inside a result's saved model (int8 runs keep one), else None."""
    path = Path(result.model_path)
    meta = cache.read_sidecar(path)
    if meta is None:
        return None
    state = cache.load_state(path, meta)
    onnx = state.get("onnx") if isinstance(state, dict) and state.get("format") == "onnx" else None
    if onnx is None:
        return None
    from .techniques.ort_session import tensor_to_bytes
    return tensor_to_bytes(onnx)
