"""What runs inside a Ray worker: the job kinds, and the actor that keeps datasets and teachers warm.

A job kind is a function `(payload, warm, progress) -> JSON-able dict`, registered by name; the
actor runs one job at a time in a thread and streams its progress events back as they come.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .errors import LabError
from .progress import Event

KINDS: dict[str, Callable] = {}
EVENT_TICK_S = 0.1   # progress is batched per tick: a training epoch emits hundreds of batch events
MAX_PAUSE_S = 10.0   # a long job waits at most this long per batch: a busy class slows training, never stops it


class Cancelled(Exception):
    """Raised inside a job (at its next progress event) once the job has been cancelled."""


def kind(name: str):
    def register(fn):
        KINDS[name] = fn
        return fn
    return register


class Warm:
    """Datasets and teachers a worker keeps loaded between jobs (a slider moves on the same teacher)."""

    def __init__(self, max_teachers: int = 3):
        self.datasets: dict = {}
        self.teachers: dict = {}
        self.max_teachers = max_teachers

    def data(self, name: str, root: str | None = None):
        from .datasets import load_dataset, with_folder_settings
        key = (os.environ.get("COMPRESSION_LAB_CACHE"), name, root)
        if key not in self.datasets:
            if len(self.datasets) >= 4:
                self.datasets.pop(next(iter(self.datasets)))
            self.datasets[key] = load_dataset(name, root)
        # a folder's lab.json as it is now (its flip setting), not as when this worker first loaded it
        self.datasets[key] = with_folder_settings(self.datasets[key])
        return self.datasets[key]

    def teacher(self, data, model: str):
        """The newest cached teacher of (data, model), loaded once per file; None when none is cached."""
        from .predict import latest_teacher_entry
        from .teachers import load_teacher_file
        entry = latest_teacher_entry(data, model)
        if entry is None:
            return None
        key = (str(entry[0]), entry[1].get("sha256"))
        if key not in self.teachers:
            t = load_teacher_file(entry[0])
            if t is None:
                return None
            if len(self.teachers) >= self.max_teachers:
                self.teachers.pop(next(iter(self.teachers)))
            self.teachers[key] = t
        return self.teachers[key]


@kind("compress")
def compress_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    from .results import ResultStore
    from .runner import ExperimentConfig, run_experiment
    from .training import TrainConfig
    cfg = dict(payload)
    store_path = cfg.pop("store", None)
    store = ResultStore(store_path) if store_path else None   # a sweep's own store
    if cfg.get("teacher_train"):
        cfg["teacher_train"] = TrainConfig(**cfg["teacher_train"])
    cfg = ExperimentConfig(**cfg).validate()
    data = warm.data(cfg.dataset, cfg.data_root)
    teacher = warm.teacher(data, cfg.model) if cfg.teacher_train is None else None
    return run_experiment(cfg, progress=progress, store=store, teacher=teacher, data=data, where=where).to_dict()


@kind("train")
def train_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    from .datasets import with_folder_settings
    from .teachers import TeacherSettings, get_teacher, teacher_summary
    from .training import TrainConfig
    # a folder's lab.json (its flip setting) as it is now, not as when this worker first loaded the folder
    data = with_folder_settings(warm.data(payload["dataset"], payload.get("data_root")))
    s = TeacherSettings(payload["model"], TrainConfig(**payload["train"]), bool(payload.get("pretrained")))
    t = get_teacher(data, s, device=payload.get("device"), progress=progress, measure=payload.get("measure", True))
    return dict(teacher_summary(t), engine=where)


@kind("baseline")
def baseline_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    from .measure import baseline_metrics
    data = warm.data(payload["dataset"], payload.get("data_root"))
    teacher = warm.teacher(data, payload["model"])
    if teacher is None:
        raise LabError(f"no cached {payload['model']} teacher for {data.label}; train one first")
    return baseline_metrics(teacher, data, int(payload.get("eval_size", 1000)), progress,
                            latency=bool(payload.get("latency", True)), target=payload.get("target") or "edge-cpu")


@kind("export")
def export_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    """A stored run or teacher in every format that runs without the lab, with its card, as one zip."""
    import io
    import tempfile
    import zipfile
    from .export import export, find_run
    with tempfile.TemporaryDirectory(prefix="lab-export-") as tmp:
        out = export(find_run(payload["run"]), payload.get("formats", "all"), tmp)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(tmp))
    return {"zip": buf.getvalue(), "files": sorted(out.get("files", {})), "skipped": out.get("skipped", {})}


@kind("estimate")
def estimate_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    """Time a few training batches of these settings (the Teacher page's estimate)."""
    from .estimate import estimate_epoch_seconds
    from .training import TrainConfig
    import torch
    data = warm.data(payload["dataset"], payload.get("data_root"))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)   # timed with the threads a long-lane worker trains with
    try:
        return estimate_epoch_seconds(payload["model"], data, TrainConfig(**payload["train"]),
                                      payload.get("device") or "cpu")
    finally:
        torch.set_num_threads(threads)


@kind("sensitivity")
def sensitivity_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    """The per-layer sensitivity scan of the cached teacher (core.sensitivity), served from its cache when made."""
    from .sensitivity import DEFAULT_EVAL_SIZE, scan
    data = warm.data(payload["dataset"], payload.get("data_root"))
    teacher = warm.teacher(data, payload["model"])
    if teacher is None:
        raise LabError(f"no cached {payload['model']} teacher for {data.label}; train one first")
    return scan(teacher, data, payload["technique"], payload.get("method"), payload.get("settings"),
                int(payload.get("eval_size", DEFAULT_EVAL_SIZE)), progress)


@kind("sleep")
def sleep_job(payload: dict, warm: Warm, progress, where: dict) -> dict:
    """A job that only waits, emitting progress: the job layer's own tests and classroom-check's probes."""
    steps = int(payload.get("steps", 10))
    for i in range(steps):
        time.sleep(float(payload.get("seconds", 1.0)) / max(steps, 1))
        progress(Event(stage="sleep", kind="batch", step=i + 1, total=steps))
    if payload.get("fail"):
        raise LabError(str(payload["fail"]))
    return {"slept": payload.get("seconds", 1.0), "pid": os.getpid()}


def run_streaming(kind_name: str, payload: dict, env: dict, warm: Warm, where: dict, is_cancelled, pause=None):
    """Run one job in a thread; yield ("events", [event dicts]) as they come, then ("result", value) or
    ("error", {"type", "message", "user"}). `is_cancelled()` is polled; the job stops at its next event.
    `pause()`, when given, is called at every batch (a long job waits there while slider jobs run)."""
    if kind_name not in KINDS:
        yield "error", {"type": "LabError", "message": f"unknown job kind {kind_name!r}", "user": True}
        return
    os.environ.update({k: v for k, v in env.items() if v is not None})
    events: queue.Queue = queue.Queue()
    done = threading.Event()
    flag = {"cancel": False}
    outcome: dict = {}

    def progress(ev: Event) -> None:
        if flag["cancel"]:
            raise Cancelled("cancelled")
        events.put(asdict(ev))
        if pause is not None and ev.kind == "batch":
            pause()

    def body():
        try:
            outcome["result"] = KINDS[kind_name](payload, warm, progress, where)
        except Cancelled:
            outcome["error"] = {"type": "Cancelled", "message": "cancelled", "user": True}
        except LabError as exc:
            outcome["error"] = {"type": type(exc).__name__, "message": str(exc), "user": True}
        except Exception as exc:  # noqa: BLE001 - reported to the page that asked, with details
            outcome["error"] = {"type": type(exc).__name__, "message": str(exc), "user": False,
                                "trace": "".join(traceback.format_exception(exc))[-4000:]}
        finally:
            done.set()

    threading.Thread(target=body, name=f"job-{kind_name}", daemon=True).start()
    while True:
        finished = done.wait(EVENT_TICK_S)
        if is_cancelled():
            flag["cancel"] = True
        batch = []
        while not events.empty():
            batch.append(events.get_nowait())
        if batch:
            yield "events", batch
        if finished:
            break
    if "result" in outcome:
        yield "result", outcome["result"]
    else:
        yield "error", outcome["error"]


def make_actor_class():
    """The Ray actor class (built lazily: importing this module must not need Ray running)."""
    import ray

    class LabWorker:
        def __init__(self, lane: str, threads: int, nice: int = 0):
            import torch
            if nice:
                os.nice(nice)   # long jobs yield the CPU to interactive ones on the same node
            torch.set_num_threads(max(1, threads))
            self.lane, self.warm = lane, Warm()

        def where(self) -> str:
            from .engine import this_node
            return this_node()

        def ping(self) -> dict:
            import torch
            return {"node": self.where(), "pid": os.getpid(), "threads": torch.get_num_threads(), "lane": self.lane}

        @ray.method(num_returns="streaming")
        def run(self, kind_name: str, payload: dict, env: dict, engine: dict, threads: int | None = None,
                gate=None):
            import torch
            if threads:
                torch.set_num_threads(threads)
            ctx = ray.get_runtime_context()
            where = dict(engine, node=self.where())
            yield "started", {"node": where["node"], "pid": os.getpid()}
            pause = None if gate is None else _gate_pause(gate, where["node"])
            yield from run_streaming(kind_name, payload, env, self.warm, where, ctx.is_canceled, pause)

    return ray.remote(LabWorker)


def _gate_pause(gate, node: str):
    """A long job's pause: wait while an interactive job runs on this node (niceness alone left slider
    jobs ~1.4x slower beside training: docs/classroom.md)."""
    import ray

    def pause() -> None:
        deadline = time.monotonic() + MAX_PAUSE_S
        while ray.get(gate.count.remote(node)) and time.monotonic() < deadline:
            time.sleep(0.05)
    return pause


def make_gate():
    """A tiny actor counting the interactive jobs running on each node; long jobs there pause at their
    next batch while any runs, so a slider result does not share its cores with training."""
    import ray

    class Gate:
        def __init__(self):
            self.running: dict[str, int] = {}

        def enter(self, node: str) -> None:
            self.running[node] = self.running.get(node, 0) + 1

        def leave(self, node: str) -> None:
            self.running[node] = max(0, self.running.get(node, 0) - 1)

        def count(self, node: str) -> int:
            return self.running.get(node, 0)

    return ray.remote(num_cpus=0, max_restarts=-1)(Gate).remote()
