"""The one entry point for compression: validated config in, `ExperimentResult` out.

The same request (dataset, teacher weights, technique, parameters, evaluation size) is
computed once: a per-key file lock makes a second caller - another process, another app
session - wait and then read the stored result instead of recomputing it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cache, hardware, settings
from .datasets import DEFAULT_DATASET, load_dataset
from .errors import CorruptCacheEntry, InvalidParameter, LabError
from .measure import baseline_metrics, deployed_twin, evaluate_output
from .models import DEFAULT_TEACHER, get_spec
from .progress import ProgressFn, emit
from .results import ExperimentResult, ResultStore
from .targets import DEFAULT_TARGET, get_target, require_target
from .teachers import Teacher, TeacherSettings, get_teacher, latest_teacher
from .techniques import Context, TechniqueOutput, get_technique
from .training import TrainConfig, recipe_for

# 2: batch-1 latency timed on one thread (metrics.BATCH1_THREADS); results keyed 1 timed it on all
# 3: a real batch-1 p95 (single calls; 2 reported the slowest of 6 rounds), batch 64's slowest round as such
RUNNER_VERSION = 3


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
    target: str = DEFAULT_TARGET     # where latency is timed (core.targets)

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
        get_target(self.target)
        return ExperimentConfig(self.dataset, self.model, self.technique, spec.validate(self.params),
                                self.eval_size, self.data_root, self.device, self.teacher_train, self.target)


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


def _request(cfg: ExperimentConfig, teacher: Teacher, data) -> dict:
    spec = get_technique(cfg.technique)
    request = {"dataset": data.fingerprint, "teacher": teacher.meta.get("sha256"),
               "technique": cfg.technique, "version": spec.version, "runner": RUNNER_VERSION,
               "params": cfg.params, "eval_size": cfg.eval_size}
    request.update(spec.key_parts(cfg.params))   # only when not empty: every other key stays as it was
    if cfg.target != DEFAULT_TARGET:   # likewise: edge-cpu keys are the keys made before targets existed
        request["target"] = cfg.target
    return request


def result_key(cfg: ExperimentConfig, teacher: Teacher, data) -> str:
    """The result's key: the request, evaluation size and target included."""
    return cache.stable_hash(_request(cfg, teacher, data), 16)


def model_key(cfg: ExperimentConfig, teacher: Teacher, data) -> str:
    """The compressed model's key: the request without what only changes its measurement (evaluation
    size, target), so a fine-tuned or distilled model is trained once and measured again as asked."""
    request = _request(cfg, teacher, data)
    request.pop("eval_size")
    request.pop("target", None)
    return "m" + cache.stable_hash(request, 15)


def compressed_path(key: str) -> Path:
    return settings.cache_dir() / "compressed" / f"{key}.pt"


# what a technique's output says besides its model, kept in the compressed model's sidecar for reuse
_OUTPUT_FIELDS = ("eval_device", "size_bytes", "gzip_bytes", "file_bytes", "macs", "params", "nonzero_params",
                  "runtime", "time_deployed", "extra", "history", "notes")


def _output_meta(out: TechniqueOutput) -> dict:
    return dict({f: getattr(out, f) for f in _OUTPUT_FIELDS}, input_dtype=str(out.input_dtype).replace("torch.", ""),
                ort_baseline=out.baseline_model is not None)


def _reuse_output(spec, ctx: Context, path: Path) -> TechniqueOutput | None:
    """The trained model stored under the model key, rebuilt for measuring again; None when absent or damaged."""
    import torch
    meta = cache.read_sidecar(path)
    saved = (meta or {}).get("output")
    if not saved:
        return None
    try:
        state = cache.load_state(path, meta)
        model = spec.load(state, ctx)
    except (CorruptCacheEntry, LabError):
        return None
    fields = {f: saved[f] for f in _OUTPUT_FIELDS if f in saved}
    out = TechniqueOutput(model=model, state=state, input_dtype=getattr(torch, saved.get("input_dtype", "float32")),
                          **fields)
    if saved.get("ort_baseline"):   # int8 is timed beside the teacher's ONNX Runtime twin, as when it was made
        out.baseline_model = deployed_twin(ctx.teacher.model)
    if spec.refresh:
        out = spec.refresh(out, ctx)
    out.notes = list(out.notes) + ["the trained model was served from the cache and measured again"]
    return out


key_lock = cache.file_lock   # one computation per request key, across processes


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
    hit = cached_result(store, key)
    if hit is not None:
        return hit
    require_target(cfg.target)   # a result made elsewhere may be shown; a new one needs the hardware
    with key_lock(key):
        hit = cached_result(store, key)   # another process may have finished it while we waited
        if hit is not None:
            return hit
        timings = {"teacher_s": time.perf_counter() - t0}
        device = cfg.device or settings.default_device()
        ctx = Context(teacher=teacher, data=data, params=cfg.params, device=device, progress=progress,
                      eval_size=cfg.eval_size, target=cfg.target)
        t1 = time.perf_counter()
        baseline = baseline_metrics(teacher, data, cfg.eval_size, progress)
        timings["baseline_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        path = compressed_path(model_key(cfg, teacher, data))
        trains = spec.trains(cfg.params)
        with key_lock(path.stem):   # one training per model key, whatever the evaluation size
            out = _reuse_output(spec, ctx, path) if trains else None
            if out is None:
                emit(progress, stage=cfg.technique, kind="message", message=f"applying {spec.title}")
                out = spec.apply(ctx)
                # saved before measuring: a run that fails while measuring keeps its training
                cache.save_entry(path, out.state, {"kind": "compressed", "key": path.stem, "technique": cfg.technique,
                                                   "params": cfg.params, "dataset": data.name, "model": cfg.model,
                                                   "teacher_path": str(teacher.path),
                                                   "teacher_sha256": teacher.meta.get("sha256"),
                                                   "output": _output_meta(out) if trains else None})
        timings["apply_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        emit(progress, stage="evaluate", kind="message", message="measuring the compressed model")
        compressed, baseline_latency = evaluate_output(out, data, cfg.eval_size, teacher.model, cfg.target)
        # the baseline's latency comes from this run, side by side with the compressed model
        baseline = dict(baseline, **baseline_latency)
        timings["evaluate_s"] = time.perf_counter() - t1
        from .layers import result_layers   # the per-layer table: one shape pass, no images
        layers = result_layers(out, teacher.model, cfg.technique)
        result = ExperimentResult(
            key=key, dataset=data.name, dataset_label=data.label, model=cfg.model, technique=cfg.technique,
            params=cfg.params, baseline=baseline, compressed=compressed, eval_images=compressed["eval_images"],
            seconds=time.perf_counter() - t0, timings=timings, history=out.history, scratch=out.scratch,
            scratch_history=out.scratch_history, model_path=str(path), teacher_path=str(teacher.path),
            runtime=out.runtime, notes=out.notes, cpu=hardware.cpu_id(), engine=dict(where or {}),
            target=cfg.target, layers=layers)
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
    require_target(cfg.target)   # absent hardware: one line before any worker starts
    check_reachable(address)
    data = load_dataset(cfg.dataset, cfg.data_root)   # missing data fails here, before any worker starts
    untrained = latest_teacher_entry(data, cfg.model) is None   # the worker trains the teacher first
    out = jobs.run("compress", asdict(cfg), progress=progress, owner=owner, address=address,
                   lane="long" if untrained else lane(cfg), label=f"{cfg.technique} {cfg.model} on {data.name}")
    return ExperimentResult.from_dict(out)


def cached_result(store: ResultStore, key: str) -> ExperimentResult | None:
    """The stored result under `key` whose compressed model still exists, marked cached; else None."""
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
