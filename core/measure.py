"""Measuring models the same way every time: a technique's output beside its baseline, and the teacher.

Accuracy on the fixed evaluation subset, size, counts, and latency on a deployment target (core.targets),
timed interleaved with the baseline in the same run so the ratio holds on a busy machine.
"""
from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from . import cache, metrics, settings
from .progress import ProgressFn, emit
from .targets import DEFAULT_TARGET, Target, get_target
from .training import predict_logits

# interleaved rounds per batch size: batch 1's are ~20 ms blocks of warm calls (a stable median in a few
# seconds per slider step); batch 64 is one call per round
ROUNDS = {1: 6, 64: 3}
INT8_CPU_ONLY = ("real int8 runs in ONNX Runtime on the CPU only: its latency (and its fp32 baseline's) "
                 "was timed on the CPU with every core, not on the {target} target")


def predict(model, data, x, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Logits of `model` on uint8 images `x`, fed in the dtype the model takes."""
    model = model.to(device) if device != "cpu" else model
    if dtype == torch.float32:
        return predict_logits(model, data, x, device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            xb = data.normalize(x[i:i + 256].to(device)).to(dtype).contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().cpu())
    return torch.cat(out)


def _threads(target: Target, batch_size: int) -> int:
    return (target.threads_b1 or metrics.default_threads()) if batch_size == 1 else metrics.default_threads()


def _on_target(model, target: Target, dtype: torch.dtype):
    """(model, input dtype) as the target runs it: a copy on the GPU (in half precision where the target
    asks) for GPU targets; CPU targets and ONNX Runtime models stay as they are."""
    if target.device == "cpu" or not isinstance(model, nn.Module) or hasattr(model, "onnx_bytes"):
        return model, dtype
    half = target.half_dtype()
    moved = copy.deepcopy(model).to(target.device)
    if half is not None and dtype == torch.float32:
        moved, dtype = moved.to(half), half
    return moved.eval(), dtype


def time_batch(model, base, batch_size: int, target: Target, dtype: torch.dtype = torch.float32):
    """(baseline Latency or None, model Latency) at one batch size; batch 1 gets a real p95 from single calls."""
    device = "cpu" if not isinstance(model, nn.Module) or hasattr(model, "onnx_bytes") else target.device
    model, mdtype = _on_target(model, target, dtype)
    threads = _threads(target, batch_size)
    x = metrics.latency_input(batch_size, device != "mps").to(device=device, dtype=mdtype)
    warmup = 1 if batch_size > 1 else 3
    if base is not None:
        base, bdtype = _on_target(base, target, torch.float32)
        xb = metrics.latency_input(batch_size, device != "mps").to(device=device, dtype=bdtype)
        lb, lc, _ = metrics.compare_latency(base, model, batch_size, rounds=ROUNDS[batch_size], warmup=warmup,
                                            threads=threads, x_a=xb, x_b=x)
    else:
        lb, lc = None, metrics.measure_latency(model, batch_size, repeats=ROUNDS[batch_size], warmup=warmup,
                                               threads=threads, x=x)
    if batch_size == 1:   # block means hide the per-request tail: sample single calls for the p95
        lc.p95_ms = metrics.tail_p95(model, x, threads)
        if lb is not None:
            lb.p95_ms = metrics.tail_p95(base, xb, threads)
    return lb, lc


def _fields(lat: dict, key: str, la: metrics.Latency) -> None:
    lat[f"latency_ms_{key}"] = la.median_ms
    lat[f"latency_p95_ms_{key}"] = la.p95_ms
    if la.batch_size > 1:
        lat[f"latency_max_ms_{key}"] = la.max_ms
        lat["threads"] = la.threads
    else:
        lat["threads_b1"] = la.threads


def evaluate_output(out, data, eval_size: int, baseline_model=None,
                    target: str = DEFAULT_TARGET) -> tuple[dict, dict]:
    """Metrics of a technique's output, measured the same way as the baseline, on `target`.

    Latency is timed interleaved with the baseline model (A, B, A, B...) in this very run, so the
    ratio is honest even on a busy machine; returns (compressed metrics, baseline latency fields).
    """
    tgt = get_target(target)
    if tgt.device != "cpu" and (not isinstance(out.model, nn.Module) or hasattr(out.model, "onnx_bytes")):  # ORT
        out.notes.append(INT8_CPU_ONLY.format(target=tgt.name))
        tgt = get_target("cpu-server")
    x, y = data.eval_split(eval_size)
    model = out.model
    logits = predict(model, data, x, out.eval_device, out.input_dtype)
    base = out.baseline_model if out.baseline_model is not None else baseline_model
    lat, own = {}, {}
    for bs, key in ((1, "b1"), (64, "b64")):
        lb, lc = time_batch(model, base, bs, tgt, out.input_dtype)
        _fields(own, key, lc)
        if lb is not None:
            _fields(lat, key, lb)
    if out.file_bytes is not None and out.gzip_bytes is not None:   # measured by the technique
        size = {"size_bytes": out.file_bytes, "gzip_bytes": out.gzip_bytes}
    else:
        raw = metrics.serialized_bytes(out.state)
        size = {"size_bytes": len(raw),
                "gzip_bytes": out.gzip_bytes if out.gzip_bytes is not None else metrics.gzip_size(raw)}
    rep = metrics.ModelMetrics(
        accuracy=metrics.accuracy(logits, y),
        size_bytes=out.size_bytes if out.size_bytes is not None else size["size_bytes"],
        gzip_bytes=size["gzip_bytes"],
        params=out.params if out.params is not None else metrics.count_params(model),
        nonzero_params=out.nonzero_params if out.nonzero_params is not None else metrics.count_nonzero_params(model),
        macs=out.macs if out.macs is not None else metrics.count_macs(model),
        latency_runtime=out.runtime, eval_images=len(y),
        per_class_accuracy=metrics.per_class_accuracy(logits, y, data.num_classes),
        extra=dict(out.extra, file_bytes=size["size_bytes"]), target=tgt.name, **own)
    plans = batch_plans(own["threads"], baseline=base, compressed=model)
    if plans:
        rep.extra["batch_plan_b64"] = plans
    if out.time_deployed and base is not None and out.runtime == "pytorch-eager" and tgt.device == "cpu":
        rep.extra["deployed"] = deployed_latency(base, model, tgt)
    if lat:
        lat.update(latency_runtime=out.runtime, target=tgt.name)
    return rep.to_dict(), lat


def batch_plans(threads: int, **models) -> dict:
    """How ONNX Runtime ran each model's batches of several images on `threads` threads (ort_session.BATCH_PLANS)."""
    return {role: plan for role, m in models.items() if (plan := getattr(m, "plans", {}).get(threads))}


_TWINS: dict = {}   # one entry: id(eager model) -> (weak reference to it, its ONNX Runtime twin)


def deployed_twin(model: nn.Module):
    """The teacher's ONNX Runtime copy, kept for the next request: a slider moving through pruning
    ratios exports and loads the same teacher each time otherwise (~0.6 s for ResNet-34)."""
    from .techniques import onnx_export, ort_session
    hit = _TWINS.get(id(model))
    if hit is not None and hit[0]() is model:
        return hit[1]
    twin = ort_session.OrtModule(onnx_export.export_onnx(model), "fp32")
    _TWINS.clear()   # one at a time: a process holds a copy of the weights
    _TWINS[id(model)] = (weakref.ref(model), twin)
    return twin


def deployed_latency(base: nn.Module, model: nn.Module, target: Target | None = None) -> dict:
    """Both models exported to ONNX and timed interleaved in ONNX Runtime fp32, as a deployment runs them.

    ONNX Runtime fuses batch norm, ReLU and residual adds into the convolutions; eager PyTorch runs
    each as its own pass over the activations, and those passes shrink only linearly with the
    channels while convolutions shrink quadratically: a ResNet-34 pruned at 0.5 (3.9x fewer MACs)
    ran 2.4x faster at batch 64 in eager PyTorch and 3.9x in ONNX Runtime (docs/bench_pruning.md).
    """
    from .techniques import onnx_export, ort_session
    target = target or get_target(DEFAULT_TARGET)
    try:
        a, b = deployed_twin(base), ort_session.OrtModule(onnx_export.export_onnx(model), "fp32")
    except Exception as exc:   # an architecture the exporter rejects: the eager numbers still stand
        return {"runtime": ort_session.RUNTIME, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    out = {"runtime": ort_session.RUNTIME}
    for bs, key in ((1, "b1"), (64, "b64")):
        la, lb, speedup = metrics.compare_latency(a, b, bs, rounds=ROUNDS[bs], warmup=1 if bs > 1 else 3,
                                                  threads=_threads(target, bs))
        out.update({f"baseline_ms_{key}": la.median_ms, f"compressed_ms_{key}": lb.median_ms,
                    f"speedup_{key}": speedup})
        if bs > 1:
            out["batch_plan_b64"] = batch_plans(la.threads, baseline=a, compressed=b)
    return out


# ----------------------------------------------------------------------------- the teacher
def _baseline_path(teacher_meta: dict, eval_size: int, target: str = DEFAULT_TARGET) -> Path:
    suffix = "" if target == DEFAULT_TARGET else f"-{target}"   # edge-cpu files keep their old names
    return settings.cache_dir() / "baselines" / f"{teacher_meta.get('sha256', 'x')[:16]}-{eval_size}{suffix}.json"


def stored_baseline(teacher_meta: dict, eval_size: int, target: str = DEFAULT_TARGET) -> dict | None:
    """The teacher's measured metrics if already stored (a file read: the app's pages call it directly)."""
    try:
        return json.loads(_baseline_path(teacher_meta, eval_size, target).read_text())
    except (OSError, ValueError):
        return None


def has_latency(m: dict | None) -> bool:
    v = (m or {}).get("latency_ms_b1")
    return isinstance(v, (int, float)) and v == v   # NaN: not timed


def latency_fields(model: nn.Module, target: str = DEFAULT_TARGET) -> dict:
    """One model's batch-1 and batch-64 latency on `target`, in the report's field names."""
    tgt = get_target(target)
    lat = {}
    for bs, key in ((1, "b1"), (64, "b64")):
        _fields(lat, key, time_batch(model, None, bs, tgt)[1])
    return dict(lat, target=tgt.name)


def baseline_metrics(teacher, data, eval_size: int, progress: ProgressFn = None, latency: bool = False,
                     target: str = DEFAULT_TARGET) -> dict:
    """The teacher's metrics on this evaluation subset, computed once per teacher, subset and target.

    Compressed runs time the teacher side by side themselves (latency=False); the Teacher page asks for
    its latency too, which is then stored with the rest.
    """
    stored = stored_baseline(teacher.meta, eval_size, target)
    if stored is not None and (has_latency(stored) or not latency):
        return stored
    path = _baseline_path(teacher.meta, eval_size, target)
    if stored is None:
        emit(progress, stage="evaluate", kind="message", message="measuring the teacher (baseline)")
        stored = metrics.report(teacher.model, data, eval_size, latency=False).to_dict()
    if latency:
        emit(progress, stage="evaluate", kind="message", message=f"timing the teacher ({target})")
        stored.update(latency_fields(teacher.model, target))
    cache.atomic_write_json(stored, path)
    return stored
