"""The one entry point for compression: validated config in, `ExperimentResult` out.

The same request (dataset, teacher weights, technique, parameters, evaluation size) is
computed once: a per-key file lock makes a second caller - another process, another app
session - wait and then read the stored result instead of recomputing it.
"""
from __future__ import annotations

import json
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import cache, hardware, metrics, settings
from .datasets import DEFAULT_DATASET, load_dataset
from .errors import InvalidParameter, LabError
from .models import DEFAULT_TEACHER, get_spec
from .progress import ProgressFn, emit
from .results import ExperimentResult, ResultStore
from .teachers import Teacher, TeacherSettings, get_teacher, latest_teacher
from .techniques import Context, get_technique
from .training import TrainConfig, predict_logits, recipe_for

# 2: batch-1 latency timed on one thread (metrics.BATCH1_THREADS); results keyed 1 timed it on all
RUNNER_VERSION = 2


@dataclass
class ExperimentConfig:
    dataset: str = DEFAULT_DATASET
    model: str = DEFAULT_TEACHER
    technique: str = "quantize"
    params: dict = field(default_factory=dict)
    eval_size: int = 1000            # 0 = the full test set
    data_root: str | None = None
    device: str | None = None
    teacher_train: TrainConfig | None = None   # None: the newest cached teacher, else the default recipe

    def validate(self) -> "ExperimentConfig":
        """Check names and every parameter before any work; returns a normalised copy."""
        get_spec(self.model, "teacher")
        spec = get_technique(self.technique)
        if not isinstance(self.eval_size, int) or isinstance(self.eval_size, bool) or self.eval_size < 0:
            raise InvalidParameter("eval_size", self.eval_size, "0 (full test set) or a positive integer")
        if self.device and self.device not in settings.available_devices():
            raise InvalidParameter("device", self.device, "one of " + ", ".join(settings.available_devices()))
        from .datasets import is_dataset_name, dataset_names
        if not is_dataset_name(self.dataset):
            raise LabError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(dataset_names())}")
        return ExperimentConfig(self.dataset, self.model, self.technique, spec.validate(self.params),
                                self.eval_size, self.data_root, self.device, self.teacher_train)


def resolve_teacher(cfg: ExperimentConfig, progress: ProgressFn = None, data=None) -> Teacher:
    """The cached teacher for (dataset, model): the newest one `train` made, else train the default."""
    data = data or load_dataset(cfg.dataset, cfg.data_root)
    if cfg.teacher_train is None:
        t = latest_teacher(data, cfg.model)
        if t is not None:
            return t
        emit(progress, stage="train", kind="message",
             message=f"no cached {cfg.model} teacher for {data.label}: training one with the default recipe")
    return get_teacher(data, TeacherSettings(cfg.model, cfg.teacher_train or recipe_for(data, cfg.model, cfg.device)),
                       device=cfg.device, progress=progress)


def result_key(cfg: ExperimentConfig, teacher: Teacher, data) -> str:
    spec = get_technique(cfg.technique)
    request = {"dataset": data.fingerprint, "teacher": teacher.meta.get("sha256"),
               "technique": cfg.technique, "version": spec.version, "runner": RUNNER_VERSION,
               "params": cfg.params, "eval_size": cfg.eval_size}
    machine = spec.machine_params(cfg.params) if spec.machine_params else {}
    if machine:   # only then: every other key stays as it was
        request["machine"] = machine
    return cache.stable_hash(request, 16)


def compressed_path(key: str) -> Path:
    return settings.cache_dir() / "compressed" / f"{key}.pt"


key_lock = cache.file_lock   # one computation per request key, across processes


def _baseline_path(teacher_meta: dict, eval_size: int) -> Path:
    return settings.cache_dir() / "baselines" / f"{teacher_meta.get('sha256', 'x')[:16]}-{eval_size}.json"


def stored_baseline(teacher_meta: dict, eval_size: int) -> dict | None:
    """The teacher's measured metrics if already stored (a file read: the app's pages call it directly)."""
    path = _baseline_path(teacher_meta, eval_size)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def baseline_metrics(teacher: Teacher, data, eval_size: int, progress: ProgressFn = None) -> dict:
    """The teacher's metrics on this evaluation subset, computed once per teacher and subset."""
    stored = stored_baseline(teacher.meta, eval_size)
    if stored is not None:
        return stored
    path = _baseline_path(teacher.meta, eval_size)
    emit(progress, stage="evaluate", kind="message", message="measuring the teacher (baseline)")
    rep = metrics.report(teacher.model, data, eval_size, latency=False).to_dict()   # timed per run, side by side
    cache.atomic_write_json(rep, path)
    return rep


def evaluate_output(out, data, eval_size: int, baseline_model=None) -> tuple[dict, dict]:
    """Metrics of a technique's output, measured the same way as the baseline.

    Latency is timed interleaved with the baseline model (A, B, A, B...) in this very run, so the
    ratio is honest even on a busy machine; returns (compressed metrics, baseline latency fields).
    """
    x, y = data.eval_split(eval_size)
    model = out.model
    logits = _predict(model, data, x, out.eval_device, out.input_dtype)
    base = out.baseline_model if out.baseline_model is not None else baseline_model
    lat = {}
    # 6 interleaved batch-1 rounds (each the mean of ~20 ms of warm calls) + 3 of batch 64: a
    # stable median at a few seconds per slider step
    for bs, rounds, key in ((1, 6, "b1"), (64, 3, "b64")):
        xc = metrics.latency_input(bs).to(out.input_dtype)
        if base is not None:
            lb, lc, _ = metrics.compare_latency(base, model, bs, rounds=rounds, warmup=1 if bs > 1 else 3,
                                                x_b=xc)
            lat.update({f"latency_ms_{key}": lb.median_ms, f"latency_p95_ms_{key}": lb.p95_ms,
                        "threads" if bs > 1 else "threads_b1": lb.threads})
        else:
            lc = metrics.measure_latency(model, bs, repeats=rounds, warmup=1 if bs > 1 else 3, x=xc)
        if key == "b1":
            l1 = lc
        else:
            l64 = lc
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
        latency_ms_b1=l1.median_ms, latency_p95_ms_b1=l1.p95_ms, latency_ms_b64=l64.median_ms,
        latency_p95_ms_b64=l64.p95_ms, threads=l64.threads, threads_b1=l1.threads, latency_runtime=out.runtime,
        eval_images=len(y), per_class_accuracy=metrics.per_class_accuracy(logits, y, data.num_classes),
        extra=dict(out.extra, file_bytes=size["size_bytes"]))
    plans = _batch_plans(l64.threads, baseline=base, compressed=model)
    if plans:
        rep.extra["batch_plan_b64"] = plans
    if out.time_deployed and base is not None and out.runtime == "pytorch-eager":
        rep.extra["deployed"] = deployed_latency(base, model)
    if lat:
        lat["latency_runtime"] = out.runtime
    return rep.to_dict(), lat


def _batch_plans(threads: int, **models) -> dict:
    """How ONNX Runtime ran each model's batches of several images on `threads` threads (ort_session.BATCH_PLANS)."""
    return {role: plan for role, m in models.items() if (plan := getattr(m, "plans", {}).get(threads))}


_TWINS: dict = {}   # one entry: id(eager model) -> (weak reference to it, its ONNX Runtime twin)


def _deployed_twin(model: nn.Module):
    """The teacher's ONNX Runtime copy, kept for the next request: a slider moving through pruning
    ratios exports and loads the same teacher each time otherwise (~0.6 s for ResNet-34)."""
    from .techniques import onnx_export, ort_session
    hit = _TWINS.get(id(model))
    if hit is not None and hit[0]() is model:
        return hit[1]
    twin = ort_session.OrtModule(onnx_export.export_onnx(model), "fp32")
    _TWINS.clear()   # one at a time: a session holds a copy of the weights
    _TWINS[id(model)] = (weakref.ref(model), twin)
    return twin


def deployed_latency(base: nn.Module, model: nn.Module) -> dict:
    """Both models exported to ONNX and timed interleaved in ONNX Runtime fp32, as a deployment runs them.

    ONNX Runtime fuses batch norm, ReLU and residual adds into the convolutions; eager PyTorch runs
    each as its own pass over the activations, and those passes shrink only linearly with the
    channels while convolutions shrink quadratically: a ResNet-34 pruned at 0.5 (3.9x fewer MACs)
    ran 2.4x faster at batch 64 in eager PyTorch and 3.9x in ONNX Runtime (docs/bench_pruning.md).
    """
    from .techniques import onnx_export, ort_session
    try:
        a, b = _deployed_twin(base), ort_session.OrtModule(onnx_export.export_onnx(model), "fp32")
    except Exception as exc:   # an architecture the exporter rejects: the eager numbers still stand
        return {"runtime": ort_session.RUNTIME, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    out = {"runtime": ort_session.RUNTIME}
    for bs, rounds, key in ((1, 6, "b1"), (64, 3, "b64")):
        la, lb, speedup = metrics.compare_latency(a, b, bs, rounds=rounds, warmup=1 if bs > 1 else 3)
        out.update({f"baseline_ms_{key}": la.median_ms, f"compressed_ms_{key}": lb.median_ms,
                    f"speedup_{key}": speedup})
        if bs > 1:
            out["batch_plan_b64"] = _batch_plans(la.threads, baseline=a, compressed=b)
    return out


def _predict(model, data, x, device, dtype):
    model = model.to(device) if device != "cpu" else model
    if dtype == torch.float32:
        return predict_logits(model, data, x, device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            xb = data.normalize(x[i:i + 256].to(device)).to(dtype).contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().cpu())
    return torch.cat(out)


def run_experiment(cfg: ExperimentConfig, progress: ProgressFn = None,
                   store: ResultStore | None = None, teacher: Teacher | None = None,
                   data=None, where: dict | None = None) -> ExperimentResult:
    """Validate, get the teacher, apply the technique to a copy, measure, save, store.

    `teacher` and `data`, when the caller already holds them (a warm worker keeps both in memory), skip
    reloading them; the teacher is never modified. `where` (the job layer's engine and node) is recorded.
    """
    cfg = cfg.validate()
    store = store or ResultStore.default()
    spec = get_technique(cfg.technique)
    t0 = time.perf_counter()
    data = data or load_dataset(cfg.dataset, cfg.data_root)
    teacher = teacher or resolve_teacher(cfg, progress, data)
    key = result_key(cfg, teacher, data)
    hit = _cached_result(store, key)
    if hit is not None:
        return hit
    with key_lock(key):
        hit = _cached_result(store, key)   # another process may have finished it while we waited
        if hit is not None:
            return hit
        timings = {"teacher_s": time.perf_counter() - t0}
        device = cfg.device or settings.default_device()
        ctx = Context(teacher=teacher, data=data, params=cfg.params, device=device, progress=progress,
                      eval_size=cfg.eval_size)
        t1 = time.perf_counter()
        baseline = baseline_metrics(teacher, data, cfg.eval_size, progress)
        timings["baseline_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        emit(progress, stage=cfg.technique, kind="message", message=f"applying {spec.title}")
        out = spec.apply(ctx)
        timings["apply_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        emit(progress, stage="evaluate", kind="message", message="measuring the compressed model")
        compressed, baseline_latency = evaluate_output(out, data, cfg.eval_size, teacher.model)
        # the baseline's latency comes from this run, side by side with the compressed model
        baseline = dict(baseline, **baseline_latency)
        timings["evaluate_s"] = time.perf_counter() - t1
        path = compressed_path(key)
        cache.save_entry(path, out.state, {"kind": "compressed", "key": key, "technique": cfg.technique,
                                           "params": cfg.params, "dataset": data.name, "model": cfg.model,
                                           "teacher_path": str(teacher.path),
                                           "teacher_sha256": teacher.meta.get("sha256")})
        result = ExperimentResult(
            key=key, dataset=data.name, dataset_label=data.label, model=cfg.model, technique=cfg.technique,
            params=cfg.params, baseline=baseline, compressed=compressed, eval_images=compressed["eval_images"],
            seconds=time.perf_counter() - t0, timings=timings, history=out.history, scratch=out.scratch,
            scratch_history=out.scratch_history, model_path=str(path), teacher_path=str(teacher.path),
            runtime=out.runtime, notes=out.notes, cpu=hardware.cpu_id(), engine=dict(where or {}))
        store.add(result)
        emit(progress, stage=cfg.technique, kind="done")
        return result


def lane(cfg: ExperimentConfig) -> str:
    """The job layer's lane for this request: "long" when it trains (fine-tuning, distillation, a teacher)."""
    trains = get_technique(cfg.technique).trains(cfg.params) or cfg.teacher_train is not None
    return "long" if trains else "interactive"


def submit_experiment(cfg: ExperimentConfig, progress: ProgressFn = None, owner: str = "cli",
                      address: str | None = None) -> ExperimentResult:
    """run_experiment on the job layer (a Ray worker) for the CLI; the caller waits. Work that trains (or
    a teacher not cached yet) goes to the long lane."""
    from . import jobs
    from .engine import check_reachable
    from .predict import latest_teacher_entry
    cfg = cfg.validate()
    check_reachable(address)
    data = load_dataset(cfg.dataset, cfg.data_root)   # missing data fails here, before any worker starts
    untrained = latest_teacher_entry(data, cfg.model) is None   # the worker trains the teacher first
    out = jobs.run("compress", asdict(cfg), progress=progress, owner=owner, address=address,
                   lane="long" if untrained else lane(cfg), label=f"{cfg.technique} {cfg.model} on {data.name}")
    return ExperimentResult.from_dict(out)


def _cached_result(store: ResultStore, key: str) -> ExperimentResult | None:
    r = store.get(key)
    if r is None or not Path(r.model_path).exists():
        return None
    r.cached = True
    return r


def load_compressed(result: ExperimentResult, progress: ProgressFn = None):
    """Rebuild a result's compressed model from the cache (weights_only), for predictions and upload."""
    spec = get_technique(result.technique)
    meta = cache.read_sidecar(Path(result.model_path))
    if meta is None:
        raise LabError(f"compressed model {result.model_path} is missing; run the experiment again")
    state = cache.load_state(Path(result.model_path), meta)
    from .teachers import load_teacher_file
    teacher = load_teacher_file(Path(result.teacher_path))
    if teacher is None:
        raise LabError(f"teacher {result.teacher_path} is missing or damaged; run the experiment again")
    data = load_dataset(result.dataset)
    ctx = Context(teacher=teacher, data=data, params=result.params, progress=progress)
    return spec.load(state, ctx)
