"""Prepare teachers on a CPU: thread settings, an epoch plan that fits a time budget, resumable runs.

`prepare(dataset, models, epochs=..., budget_minutes=...)` trains (or serves from the cache) every
selected teacher through `core.teachers.get_teacher`, whose per-epoch checkpoints make a killed
run resume where it stopped. With a budget, each model's epochs come from a short timing of the
real training loop (`core.estimate`); the chosen plan is saved, so a re-run after an interruption
picks the same epochs (and so the same cache keys and checkpoints).

Progress: the inner events are passed through, plus stage="prepare" events whose step/total count
batches over all models and whose metrics carry "eta_seconds" (measured epoch times once an epoch
of that model has finished, the timing estimate before).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import cache, settings
from .datasets import DataBundle, load_dataset
from .errors import InvalidParameter, LabError
from .estimate import estimate_epoch_seconds, human_duration
from .models import STUDY_TEACHERS, get_spec
from .progress import Event, ProgressFn, emit
from .teachers import TeacherSettings, find_teacher, get_teacher, imagenet_weights_problem, pretrained_problem
from .training import TrainConfig, recipe_for, training_indices

MAX_EPOCHS = 60          # a budget never buys more epochs than this per model
BUDGET_RESERVE = 0.07    # share of a budget kept for evaluation, checkpoints and estimate error


# ----------------------------------------------------------------------------- threads
def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings counted once, cgroup CPU quota applied)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores = set()
            break
    n = len(cores)
    if not n and sys.platform == "darwin":
        import subprocess
        try:
            n = int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True,
                                   timeout=5).stdout.strip() or 0)
        except (OSError, ValueError, subprocess.SubprocessError):
            n = 0
    n = n or len(cpus) or 1
    try:  # a container's CPU quota (cgroup v2): "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure_threads(threads: int | None = None) -> dict:
    """Intra-op threads = physical cores (env COMPRESSION_LAB_THREADS overrides); one inter-op
    thread, since a training step runs its ops one after another."""
    env = os.environ.get("COMPRESSION_LAB_THREADS")
    if threads is None and env:
        try:
            threads = int(env)
        except ValueError:
            raise InvalidParameter("COMPRESSION_LAB_THREADS", env, "a positive integer") from None
    if threads is not None and not (isinstance(threads, int) and 1 <= threads <= 1024):
        raise InvalidParameter("threads", threads, "an integer from 1 to 1024")
    n = threads or physical_cores()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before the first parallel work of the process
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


# ----------------------------------------------------------------------------- planning
def plan_epochs(seconds_per_epoch: dict[str, float], budget_seconds: float,
                max_epochs: int = MAX_EPOCHS) -> dict[str, int]:
    """Epochs per model so the sum fits the budget: an equal time share each, and what a model
    cannot use (it hit max_epochs) goes to the others. Raises LabError if one epoch each won't fit."""
    need = sum(seconds_per_epoch.values())
    if need > budget_seconds:
        raise LabError(f"a budget of {budget_seconds / 60:.1f} minutes is too small: one epoch of "
                       f"{', '.join(seconds_per_epoch)} takes {human_duration(need)} here; "
                       f"raise --budget-minutes or choose fewer models")
    epochs = {m: 1 for m in seconds_per_epoch}
    left = budget_seconds - need
    # hand out whole epochs round by round, cheapest first, while they fit (an equal-time share)
    spent = {m: s for m, s in seconds_per_epoch.items()}
    while True:
        open_models = [m for m in epochs if epochs[m] < max_epochs and seconds_per_epoch[m] <= left]
        if not open_models:
            return epochs
        m = min(open_models, key=lambda k: (spent[k] + seconds_per_epoch[k], k))
        epochs[m] += 1
        spent[m] += seconds_per_epoch[m]
        left -= seconds_per_epoch[m]


def _plan_path(data: DataBundle, key: dict) -> Path:
    return settings.cache_dir() / "prepare" / cache.slug(data.fingerprint) / f"plan-{cache.stable_hash(key)}.json"


def _validate_models(models) -> list[str]:
    models = list(dict.fromkeys(models or STUDY_TEACHERS))
    if not models:
        raise InvalidParameter("models", models, "at least one teacher name")
    for m in models:
        get_spec(m, "teacher")
    return models


# ----------------------------------------------------------------------------- the run
class _Tracker:
    """Overall batches done and an ETA from measured epoch times (estimates until then)."""

    def __init__(self, progress: ProgressFn, jobs: list[dict]):
        self.progress, self.jobs = progress, jobs
        self.total = sum(j["epochs"] * j["steps"] for j in jobs)
        self.done_before = 0       # batches of earlier models (or skipped finished epochs)
        self.job = None
        self.epoch_started = 0.0
        self.started = time.perf_counter()

    def seconds_per_batch(self, job) -> float | None:
        if job.get("epoch_walls"):
            return sum(job["epoch_walls"]) / len(job["epoch_walls"]) / job["steps"]
        est = job.get("estimate")
        if est is None:
            return None
        # scale estimates by how far off they were for models already measured
        ratios = [j["measured_spb"] / j["estimate"]["seconds_per_epoch"] * j["steps"]
                  for j in self.jobs if j.get("measured_spb") and j.get("estimate")]
        scale = sum(ratios) / len(ratios) if ratios else 1.0
        return est["seconds_per_epoch"] * scale / job["steps"]

    def eta(self, job, epochs_done: int, step: int) -> float | None:
        total = 0.0
        for j in self.jobs[self.jobs.index(job):]:
            spb = self.seconds_per_batch(j)
            if spb is None:
                return None
            done = epochs_done * j["steps"] + step if j is job else 0
            total += (j["epochs"] * j["steps"] - done) * spb
        return total

    def start_job(self, job):
        self.job = job
        job["first_epoch"] = None
        emit(self.progress, stage="prepare", kind="message",
             message=f"{job['model']}: training {job['epochs']} epoch{'s' if job['epochs'] != 1 else ''}"
                     + (f" ({job['estimate']['text']})" if job.get("estimate") else ""))

    def finish_job(self, job):
        self.done_before += job["epochs"] * job["steps"]
        self.job = None
        later = self.jobs[self.jobs.index(job) + 1:]
        self._emit(job["model"], self.done_before, self.eta(later[0], 0, 0) if later else 0.0)

    def __call__(self, ev: Event) -> None:
        job = self.job
        if job is not None and ev.stage == "train" and ev.kind in ("start", "batch", "epoch"):
            if ev.kind == "start":
                if job["first_epoch"] is None:  # a resumed run starts past its finished epochs
                    job["first_epoch"] = ev.epoch
                self.epoch_started = time.perf_counter()
                epochs_done, step = ev.epoch - 1, 0
            elif ev.kind == "batch":
                epochs_done, step = ev.epoch - 1, ev.step
            else:
                job.setdefault("epoch_walls", []).append(time.perf_counter() - self.epoch_started)
                job["measured_spb"] = sum(job["epoch_walls"]) / len(job["epoch_walls"]) / job["steps"]
                epochs_done, step = ev.epoch, 0
            self._emit(job["model"], self.done_before + epochs_done * job["steps"] + step,
                       self.eta(job, epochs_done, step))
        if self.progress is not None:
            self.progress(ev)

    def _emit(self, model: str, n: int, eta):
        emit(self.progress, stage="prepare", kind="batch", step=min(n, self.total), total=self.total,
             message=model, metrics={"eta_seconds": eta, "model": model,
                                     "elapsed_seconds": time.perf_counter() - self.started})


def prepare(dataset: str | DataBundle, models: list[str] | None = None, *, epochs: int | None = None,
            budget_minutes: float | None = None, device: str | None = None, progress: ProgressFn = None,
            data_root=None, base: TrainConfig | None = None, threads: int | None = None,
            measure: bool = True, train=None, pretrained: bool = False) -> dict:
    """Train or load every selected teacher (default: the study's four) and return a summary.

    epochs: per model (default TrainConfig's); with budget_minutes it is the most any model gets
    and the plan fits the budget using timed estimates. `base` carries the other settings.
    Interrupting (Ctrl-C, or an exception raised from `progress`) keeps finished epochs: calling
    again with the same arguments resumes them. `train(data, settings, device, progress, measure)`
    trains one teacher (default: here, in this process; the CLI passes the job layer's).
    pretrained: start each teacher from ImageNet weights (the seed study's teachers); where they
    cannot be fetched (offline, not in torch's hub cache) it stops before any training, saying so.
    """
    from .settings import default_device
    if epochs is not None and not (isinstance(epochs, int) and 1 <= epochs <= 500):
        raise InvalidParameter("epochs", epochs, "an integer from 1 to 500")
    if budget_minutes is not None and not (isinstance(budget_minutes, (int, float))
                                           and 0 < budget_minutes <= 100_000):
        raise InvalidParameter("budget_minutes", budget_minutes, "a number of minutes in (0, 100000]")
    models = _validate_models(models)
    train = train or _train_here
    data = dataset if isinstance(dataset, DataBundle) else load_dataset(dataset, data_root)
    given = base.validate() if base else None
    device = device or default_device()
    base = given or recipe_for(data, device=device)   # per model below when not given (VGG clips its gradients)
    thread_info = configure_threads(threads)
    t_start = time.perf_counter()
    def steps_per_epoch(train: TrainConfig) -> int:   # per model: the recipe's batch differs by model
        return max(1, math.ceil(len(training_indices(data, train)) / train.batch_size))

    def settings_for(model, n_epochs):
        return TeacherSettings(model, dataclasses.replace(given or recipe_for(data, model, device), epochs=n_epochs),
                               pretrained=bool(pretrained))

    plan_file = None
    if budget_minutes is not None:
        key = {"dataset": data.fingerprint, "models": models, "budget_minutes": budget_minutes,
               "max_epochs": epochs or MAX_EPOCHS, "train": base.key(), "device": device}
        if pretrained:   # only then: plans made before the option keep their keys
            key["pretrained"] = True
        plan_file = _plan_path(data, key)
        plan = _read_plan(plan_file)
        estimates = {}
        if plan is None or set(plan) != set(models):
            for m in models:   # an unplanned budget has nothing cached: stop before timing
                if problem := imagenet_weights_problem(m):
                    raise LabError(problem)
            for m in models:
                emit(progress, stage="prepare", kind="message", message=f"timing a few batches of {m}")
                estimates[m] = estimate_epoch_seconds(m, data, given or recipe_for(data, m, device), device)
            budget = budget_minutes * 60 * (1 - BUDGET_RESERVE) - (time.perf_counter() - t_start)
            plan = plan_epochs({m: e["seconds_per_epoch"] for m, e in estimates.items()}, budget,
                               epochs or MAX_EPOCHS)
            cache.atomic_write_json({"plan": plan, "key": key, "estimates": estimates}, plan_file)
        else:
            estimates = _read_estimates(plan_file)
    else:
        n = epochs or base.epochs
        plan = {m: n for m in models}
        estimates = {}

    jobs = []
    for m in models:
        s = settings_for(m, plan[m])
        found = find_teacher(data, s)
        jobs.append({"model": m, "epochs": plan[m], "steps": steps_per_epoch(s.train), "settings": s,
                     "cached": found is not None,
                     "teacher": found})
    todo = [j for j in jobs if not j["cached"]]
    for j in todo:   # before timing or training anything
        problem = pretrained_problem(data, j["settings"])
        if problem:
            raise LabError(problem)
    for j in todo:  # estimates make the ETA meaningful before the first epoch ends
        est = estimates.get(j["model"])
        if est is None:
            emit(progress, stage="prepare", kind="message", message=f"timing a few batches of {j['model']}")
            est = estimate_epoch_seconds(j["model"], data, j["settings"].train, device)
        j["estimate"] = dict(est, epochs=j["epochs"], total_seconds=est["seconds_per_epoch"] * j["epochs"])
        j["estimate"]["text"] = _text(est["seconds_per_epoch"], j["epochs"])
    tracker = _Tracker(progress, todo)
    emit(progress, stage="prepare", kind="start", step=0, total=tracker.total,
         metrics={"eta_seconds": tracker.eta(todo[0], 0, 0) if todo else 0.0})
    for j in jobs:
        if j["cached"]:
            emit(progress, stage="prepare", kind="message", message=f"{j['model']}: from the cache")
            continue
        tracker.start_job(j)
        t0 = time.perf_counter()
        j["teacher"] = train(data, j["settings"], device, tracker, measure)
        j["seconds"] = time.perf_counter() - t0
        tracker.finish_job(j)
    emit(progress, stage="prepare", kind="done")
    return {"dataset": data.name, "dataset_label": data.label, "device": device, "pretrained": bool(pretrained),
            **thread_info,
            "budget_minutes": budget_minutes, "plan_file": str(plan_file) if plan_file else None,
            "seconds": time.perf_counter() - t_start, "teachers": [_summary(j) for j in jobs]}


def _train_here(data, s: TeacherSettings, device, progress, measure):
    return get_teacher(data, s, device=device, progress=progress, measure=measure)


def train_on_job_layer(address: str | None = None, data_root=None):
    """A `train` for prepare() that runs each teacher in a long-lane Ray worker."""
    def train(data, s: TeacherSettings, device, progress, measure):
        from . import jobs
        from .teachers import load_teacher_file
        out = jobs.run("train", {"dataset": data.name, "data_root": data_root, "model": s.model,
                                 "train": dataclasses.asdict(s.train), "pretrained": s.pretrained,
                                 "device": device, "measure": measure},
                       progress=progress, address=address, label=f"prepare {s.model} on {data.name}")
        return load_teacher_file(Path(out["path"]))
    return train


def _text(seconds_per_epoch, n):
    from .estimate import estimate_text
    return estimate_text(seconds_per_epoch, n)


def _read_plan(path: Path) -> dict | None:
    try:
        plan = json.loads(path.read_text())["plan"]
        return {str(k): int(v) for k, v in plan.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _read_estimates(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()).get("estimates") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _summary(job: dict) -> dict:
    t = job["teacher"]
    hist = t.meta.get("history", [])
    m = t.meta.get("metrics") or {}
    return {"model": job["model"], "title": get_spec(job["model"]).title, "epochs": job["epochs"],
            "cached": job["cached"], "pretrained": job["settings"].pretrained,
            "accuracy": m.get("accuracy"), "eval_images": m.get("eval_images"),
            "val_accuracy": hist[-1]["val_accuracy"] if hist else None,
            "train_seconds": t.meta.get("train_seconds"),
            "seconds_per_epoch": (sum(h["seconds"] for h in hist) / len(hist)) if hist else None,
            "images_per_second": (sum(h["images_per_second"] for h in hist) / len(hist)) if hist else None,
            "estimate": {k: v for k, v in (job.get("estimate") or {}).items()
                         if k in ("seconds_per_epoch", "total_seconds", "text")} or None,
            "epochs_trained_now": (job["epochs"] - (job.get("first_epoch") or 1) + 1) if not job["cached"] else 0,
            "history": hist, "path": str(t.path)}
