"""Knowledge distillation (Hinton et al., 2015): a small student learns from the teacher's soft labels.

Every KD student is shown next to the same student trained from scratch with the same budget
(architecture, epochs, images, learning rate, seed, initial weights), so the gain is attributable
to the teacher. Both go through `core.training.fit`; KD only swaps in `kd_loss` via its hook.

Teacher logits are computed once per (teacher weights, dataset) on the un-augmented training
images and cached on disk; only the images a run needs are computed, the rest are filled in by
later runs. Cached logits of plain images and augmented student inputs would disagree, so the KD
student trains on the plain images (`KD_AUGMENT`): that measured better on shapes, CIFAR-10 and
SVHN (docs/bench_distillation.md). The from-scratch twin keeps the lab's standard augmented recipe.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import cache, settings
from ..errors import CorruptCacheEntry, LabError
from ..models import DEFAULT_STUDENT, STUDENTS, build_model
from ..progress import ProgressFn, emit
from ..training import TrainConfig, predict_logits, resumable_fit, training_indices, training_precision
from . import register
from .base import Context, ParamSpec, TechniqueOutput, TechniqueSpec, run_checkpoint

KD_AUGMENT = False       # plain student inputs, matching the cached logits (measured: docs/bench_distillation.md)
STUDENT_RECIPE = 1       # bump when what a given scratch-student budget produces changes
LOGITS_CHUNK = 1024      # images per teacher forward chunk (one progress step each)


# ----------------------------------------------------------------------------- the loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, y).

    T² keeps the soft term's gradient scale independent of T (Hinton et al., 2015).
    """
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                    F.log_softmax(teacher_logits.to(student_logits.dtype) / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)
    hard = F.cross_entropy(student_logits, targets)
    return alpha * soft + (1.0 - alpha) * hard


# ----------------------------------------------------------------------------- locks
_locked = cache.file_lock


# ----------------------------------------------------------------------------- teacher logits
def _teacher_sha(teacher) -> str:
    sha = (teacher.meta or {}).get("sha256")
    if sha:
        return sha
    if teacher.path and Path(teacher.path).exists():
        return cache.file_sha256(Path(teacher.path))
    raise LabError("the teacher has no checksum (sha256) to key its cached logits by; load it from the cache")


def logits_path(teacher, data) -> Path:
    return settings.cache_dir() / "logits" / f"{_teacher_sha(teacher)[:16]}-{cache.slug(data.fingerprint)}.pt"


def _load_logits(path: Path, n: int, c: int) -> dict | None:
    if not path.exists():
        return None
    try:
        blob = cache.load_state(path)
        ok = (isinstance(blob, dict) and blob["logits"].shape == (n, c) and blob["have"].shape == (n,)
              and blob["have"].dtype == torch.bool)
        if not ok:
            raise CorruptCacheEntry("shape mismatch")
        return blob
    except (CorruptCacheEntry, KeyError, AttributeError) as exc:
        cache.report_corrupt(path, str(exc))
        return None


def teacher_logits(teacher, data, indices: torch.Tensor | None = None, device: str = "cpu",
                   progress: ProgressFn = None) -> tuple[torch.Tensor, int]:
    """The teacher's logits for every training image (N×C, float32, CPU) and how many were computed now.

    Rows outside `indices` (default: all) may be zeros if no run has needed them yet. Logits are of
    the un-augmented images, computed once per (teacher weights, dataset) and cached on disk.
    """
    n, c = len(data.train_y), data.num_classes
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    path = logits_path(teacher, data)
    with _locked(f"logits-{path.stem}"):
        blob = _load_logits(path, n, c) or {"logits": torch.zeros(n, c), "have": torch.zeros(n, dtype=torch.bool),
                                            "teacher_sha256": _teacher_sha(teacher),
                                            "dataset": data.fingerprint}
        missing = idx[~blob["have"][idx]].unique()
        if len(missing):
            emit(progress, stage="distill", kind="message",
                 message=f"computing teacher logits for {len(missing)} training images (cached for next time)")
            model = teacher.model if device == "cpu" else copy.deepcopy(teacher.model).to(device)
            chunks = max(1, -(-len(missing) // LOGITS_CHUNK))
            emit(progress, stage="distill", kind="start", step=0, total=chunks)
            for i in range(chunks):
                part = missing[i * LOGITS_CHUNK:(i + 1) * LOGITS_CHUNK]
                blob["logits"][part] = predict_logits(model, data, data.train_x[part], device)
                emit(progress, stage="distill", kind="batch", step=i + 1, total=chunks)
            blob["have"][missing] = True
            cache.atomic_torch_save(blob, path)
    return blob["logits"], len(missing)


# ----------------------------------------------------------------------------- students
def _train_config(p: dict, augment: bool = True, device: str = "cpu") -> TrainConfig:
    # the teacher recipe's precision: a ResNet-8 step is 1.6x faster in bf16 on an AVX-512 BF16 CPU
    return TrainConfig(epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], subset=p["subset"],
                       seed=0, augment=augment, precision=training_precision(device))


def _new_student(name: str, num_classes: int, seed: int) -> nn.Module:
    # same seed -> the KD and the scratch student start from identical weights
    torch.manual_seed(seed)
    return build_model(name, num_classes)


def _to_shipping(model: nn.Module) -> nn.Module:
    return model.cpu().eval().to(memory_format=torch.contiguous_format)


def student_state(model: nn.Module, name: str, num_classes: int) -> dict:
    return {"student": name, "num_classes": num_classes,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}


def load_student(state: dict, ctx: Context | None = None) -> nn.Module:
    """Rebuild a saved student (`student_state`) without unpickling code."""
    try:
        model = build_model(state["student"], int(state["num_classes"]))
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CorruptCacheEntry(f"saved student does not fit its architecture: {str(exc)[:120]}") from None
    return model.eval()


def scratch_key(data, student: str, cfg: TrainConfig) -> dict:
    return {"dataset": data.fingerprint, "student": student, "train": cfg.key(), "recipe": STUDENT_RECIPE}


def scratch_path(data, student: str, cfg: TrainConfig) -> Path:
    h = cache.stable_hash(scratch_key(data, student, cfg), 16)
    return settings.cache_dir() / "students" / cache.slug(data.fingerprint) / f"{student}-{h}.pt"


def _scratch_metrics(model: nn.Module, state: dict, data, eval_size: int) -> dict:
    # measured exactly as the runner measures every compressed model, so the columns compare
    from ..measure import evaluate_output
    return evaluate_output(TechniqueOutput(model=model, state=state), data, eval_size)[0]


def scratch_student(data, student: str, cfg: TrainConfig, *, eval_size: int = 1000, device: str = "cpu",
                    progress: ProgressFn = None) -> tuple[nn.Module, dict, list, bool]:
    """The student trained from scratch with plain labels and this budget: (model, metrics, history, cached).

    Trained once per (dataset, student, budget) and cached under cache/students/; its metrics are
    cached per evaluation size next to it.
    """
    path = scratch_path(data, student, cfg)
    metrics_path = path.with_name(f"{path.stem}-eval{eval_size}.metrics")
    with _locked(f"student-{path.stem}"):
        meta, model = cache.read_sidecar(path), None
        if meta is not None:
            try:
                model = load_student(cache.load_state(path, meta))
            except CorruptCacheEntry as exc:
                cache.report_corrupt(path, str(exc))
        cached = model is not None
        if not cached:
            emit(progress, stage="scratch", kind="message",
                 message=f"training {student} from scratch with the same budget, for comparison")
            model = _new_student(student, data.num_classes, cfg.seed)
            partial = path.with_suffix(".partial.pt")
            history = resumable_fit(model, data, cfg, partial, what=f"the from-scratch {student}", device=device,
                                    progress=progress, stage="scratch", eval_size=eval_size)
            model = _to_shipping(model)
            meta = cache.save_entry(path, student_state(model, student, data.num_classes),
                                    {"kind": "student", "student": student, "num_classes": data.num_classes,
                                     "dataset": data.name, "settings": scratch_key(data, student, cfg),
                                     "history": history})
            partial.unlink(missing_ok=True)
        metrics = None
        if metrics_path.exists():
            try:
                metrics = json.loads(metrics_path.read_text())
            except (OSError, ValueError):
                metrics = None
        if metrics is None:
            metrics = _scratch_metrics(model, student_state(model, student, data.num_classes), data, eval_size)
            cache.atomic_write_json(metrics, metrics_path)
    return model, metrics, list(meta.get("history", [])), cached


def distill_student(teacher, data, params: dict, *, device: str = "cpu", progress: ProgressFn = None,
                    eval_size: int = 1000, augment: bool = KD_AUGMENT, start: nn.Module | None = None,
                    start_key: str | None = None) -> tuple[nn.Module, list, int]:
    """Train a KD student (validated params); returns (model on CPU, history, logits computed now).

    `start` (a pipeline's model so far, identified by `start_key`) is distilled into instead of a new student."""
    cfg = _train_config(params, augment, device)
    logits, computed = teacher_logits(teacher, data, training_indices(data, cfg), device, progress)
    logits = logits.to(device)
    t, a = params["temperature"], params["alpha"]

    def loss_fn(student_out, targets, sample_indices):
        return kd_loss(student_out, logits[sample_indices.to(device)], targets, t, a)

    if start is None:
        model = _new_student(params["student"], data.num_classes, cfg.seed)
        partial = _kd_checkpoint(teacher, data, params, cfg)
    else:
        model = copy.deepcopy(start).train()
        partial = _kd_checkpoint(teacher, data, dict(params, student=None, start=start_key), cfg)
    what = f"the distilled {params['student']}" if start is None else "the model so far, distilled"
    history = resumable_fit(model, data, cfg, partial, what=what, device=device,
                            loss_fn=loss_fn, progress=progress, stage="distill", eval_size=eval_size)
    partial.unlink(missing_ok=True)
    return _to_shipping(model), history, computed


def _kd_checkpoint(teacher, data, params: dict, cfg: TrainConfig) -> Path:
    return run_checkpoint(f"distill-{params['student']}", teacher, data, params, cfg.key(), SPEC.version)


# ----------------------------------------------------------------------------- the technique
def apply(ctx: Context) -> TechniqueOutput:
    p, data = ctx.params, ctx.data
    model, history, computed = distill_student(ctx.teacher, data, p, device=ctx.device,
                                               progress=ctx.progress, eval_size=ctx.eval_size)
    _, scratch, scratch_history, scratch_cached = scratch_student(
        data, p["student"], _train_config(p, device=ctx.device), eval_size=ctx.eval_size, device=ctx.device,
        progress=ctx.progress)
    teacher_params = sum(q.numel() for q in ctx.teacher.model.parameters())
    notes = []
    if scratch_cached:
        notes.append("the from-scratch student (same budget) was served from the cache")
    return TechniqueOutput(
        model=model, state=student_state(model, p["student"], data.num_classes), history=history,
        scratch=scratch, scratch_history=scratch_history, notes=notes,
        extra={"student": p["student"], "temperature": p["temperature"], "alpha": p["alpha"],
               "teacher_params": teacher_params, "teacher_logits_computed": computed,
               "kd_augment": KD_AUGMENT, "scratch_cached": scratch_cached})


def _load(state: dict, ctx: Context) -> nn.Module:
    return load_student(state, ctx)


def continue_from(ctx: Context, model: nn.Module, key: str) -> TechniqueOutput:
    """A pipeline step: distil the original teacher (ctx.teacher) into `model`, the pipeline's model so far."""
    student, history, computed = distill_student(ctx.teacher, ctx.data, ctx.params, device=ctx.device,
                                                 progress=ctx.progress, eval_size=ctx.eval_size, start=model,
                                                 start_key=key)
    return TechniqueOutput(model=student, state={"state_dict": student.state_dict()}, history=history,
                           extra={"temperature": ctx.params["temperature"], "alpha": ctx.params["alpha"],
                                  "teacher_logits_computed": computed})


def refresh(out: TechniqueOutput, ctx: Context) -> TechniqueOutput:
    """A stored distilled student measured on another evaluation size: its twin is measured there too."""
    p = ctx.params
    _, out.scratch, out.scratch_history, _ = scratch_student(
        ctx.data, p["student"], _train_config(p, device=ctx.device), eval_size=ctx.eval_size, device=ctx.device,
        progress=ctx.progress)
    return out


SPEC = register(TechniqueSpec(
    name="distill",
    title="Knowledge distillation",
    summary=("A small student network is trained to match the teacher's softened predictions as well as "
             "the labels. It is compared with the same student trained from scratch on the same budget."),
    params=[
        ParamSpec("student", "choice", DEFAULT_STUDENT, choices=tuple(STUDENTS),
                  help="the small network that learns from the teacher"),
        ParamSpec("temperature", "float", 4.0, 1.0, 20.0, step=0.5,
                  help=("softens both networks' outputs; higher reveals more of the teacher's view of similar "
                        "classes. Briefly trained, label-smoothed teachers are already soft: try 1-2")),
        ParamSpec("alpha", "float", 0.9, 0.0, 1.0, step=0.05,
                  help="weight of the teacher's soft labels (1 - alpha goes to the true labels)"),
        ParamSpec("epochs", "int", 5, 1, 200, help="training epochs for the student (and its from-scratch twin)"),
        ParamSpec("subset", "int", 0, 0, 1_000_000, step=500,
                  help="training images used (0 = all); fewer is faster"),
        ParamSpec("lr", "float", 0.05, 0.0001, 1.0, step=0.005, help="peak learning rate (one-cycle schedule)"),
        ParamSpec("batch_size", "int", 128, 2, 1024, help="images per training step"),
    ],
    apply=apply,
    load=_load,
    refresh=refresh,
    pipeline_stage=1, continue_from=continue_from,
    url="distillation", icon=":material/science:", color="#54a24b", history_series="distill",
    sweep_grid=({"student": "resnet8", "temperature": 4.0, "alpha": 0.9, "epochs": 5},),
    version=3,   # 2: KD student inputs no longer augmented; 3: students train in bf16 where supported
))
