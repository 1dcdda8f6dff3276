"""classroom-check: a simulated class on the job layer the app uses, and how many students it holds.

Each student is a thread with its own owner id moving the Quantization and Pruning sliders on a
script: at every instructor step most students follow the instructor (the same setting within a
second or two: computed once, the others join that job or read its stored result) and the rest
explore settings of their own. As the app does, a student first asks the result store in-process
(`predict.cached_result`) and submits a job only on a miss. Some students also "upload" an image
(a top-5 prediction on the teacher, in-process, no job). One long job (a short distillation) runs
during the middle third of the run, so interactive waits with and without it can be compared.
docs/classroom.md explains the report and the students_at_3s estimate.
"""
from __future__ import annotations

import math
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import cache, jobs, settings
from .datasets import load_dataset
from .errors import LabError
from .predict import cached_result, latest_teacher_entry, top_k
from .progress import ProgressFn, emit
from .results import ResultStore
from .runner import ExperimentConfig, compressed_path, key_lock
from .teachers import latest_teacher
from .training import recipe_for

TARGET_WAIT_S = 3.0       # the interactive wait a class should see at the 95th percentile
QUANTILE = 0.95
MAX_STUDENTS = 1000       # the estimate's ceiling: a class that only follows the instructor adds no jobs
FOLLOW = 0.75             # share of students following the instructor's move at each step
FOLLOW_JITTER_S = 1.5     # followers move within this many seconds of the instructor
UPLOAD = 0.1              # chance per step that a student also uploads an image
LONG_OWNERS = 3           # the instructor and two students ask for the same long job
LONG_STOP_S = 30.0        # how long a cancelled long job may take to stop

INSTRUCTOR_STEPS = ([("quantize", {"mode": "fake", "bits": b}) for b in (8, 6, 4, 3, 2)]
                    + [("prune", {"method": "structured", "ratio": r}) for r in (0.2, 0.3, 0.4, 0.5, 0.6)]
                    + [("prune", {"method": "unstructured", "ratio": r}) for r in (0.3, 0.5, 0.7, 0.9)])
EXPLORE = ([("quantize", {"mode": "fake", "bits": b}) for b in range(2, 9)]
           + [("prune", {"method": "structured", "ratio": round(0.2 + 0.05 * i, 2)}) for i in range(9)]
           + [("prune", {"method": "unstructured", "ratio": round(0.3 + 0.05 * i, 2)}) for i in range(13)])
LONG_JOB = ("distill", {"student": "resnet8", "epochs": 1, "subset": 2000})


# ----------------------------------------------------------------------------- the estimate
def erlang_c(workers: int, load: float) -> float:
    """Probability that a request queues in an M/M/c queue with `workers` servers and offered `load`
    (arrival rate × mean service time, in Erlangs); 1.0 when the load reaches the servers' capacity."""
    if load <= 0:
        return 0.0
    if load >= workers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, workers):
        term *= load / k
        total += term
    last = term * load / (workers - load)   # (a^c / c!) · c / (c - a)
    return last / (total + last)


def p95_wait(service_p95: float, service_mean: float, workers: int, rate: float, quantile: float = QUANTILE) -> float:
    """Estimated p95 wait (queue + service) at `rate` computed jobs per second: the measured p95
    service time plus the M/M/c queueing delay's quantile, P(queue > t) = C·exp(-(c/s̄ - λ)·t)."""
    load = rate * service_mean
    if load >= workers:
        return math.inf
    c = erlang_c(workers, load)
    tail = 1 - quantile
    queue = 0.0 if c <= tail else math.log(c / tail) / (workers / service_mean - rate)
    return service_p95 + queue


def students_at_wait(service_s: list[float], workers: int, shared_rate: float, per_student_rate: float,
                     target_s: float = TARGET_WAIT_S, quantile: float = QUANTILE) -> int:
    """How many students keep the interactive p95 wait ≤ target_s: the largest N with
    p95_wait(λ = shared_rate + N · per_student_rate) ≤ target_s (0 when one request alone takes longer).

    service_s: measured run times of computed interactive jobs; shared_rate: computed jobs per second
    that do not grow with the class (the instructor's settings, however many follow); per_student_rate:
    computed jobs per second each exploring student adds."""
    if not service_s or workers < 1:
        return 0
    s95, mean = quantile_of(service_s, quantile), sum(service_s) / len(service_s)
    if p95_wait(s95, mean, workers, shared_rate, quantile) > target_s:
        return 0
    if per_student_rate <= 0:
        return MAX_STUDENTS
    n = 0
    while n < MAX_STUDENTS and p95_wait(s95, mean, workers, shared_rate + (n + 1) * per_student_rate,
                                        quantile) <= target_s:
        n += 1
    return n


def quantile_of(values, q: float) -> float | None:
    """Nearest-rank quantile (for a handful of samples the p95 is the maximum: no interpolated optimism)."""
    v = sorted(values)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


# ----------------------------------------------------------------------------- the simulation
@dataclass
class Request:
    owner: str
    lane: str
    label: str
    follow: bool
    t0: float
    t1: float | None = None
    outcome: str = ""          # cached | done | failed | cancelled | lost
    job: jobs.Job | None = None
    key: str = ""              # the result's key, once there is one
    error: str = ""

    @property
    def wait_s(self) -> float | None:
        return None if self.t1 is None else self.t1 - self.t0


class _Class:
    """One run's shared state: the students' requests, uploads and the long job."""

    def __init__(self, lab, data, teacher, store, cfg: ExperimentConfig, step_s: float, t_start: float,
                 deadline: float, drain_until: float):
        self.lab, self.data, self.teacher, self.store, self.cfg = lab, data, teacher, store, cfg
        self.step_s, self.t_start, self.deadline, self.drain_until = step_s, t_start, deadline, drain_until
        self.requests: list[Request] = []
        self.uploads: list[float] = []
        self.crashes: list[str] = []
        self.lock = threading.Lock()

    def guarded(self, fn, *args) -> None:
        """A thread's body: an unexpected error ends that student, recorded (its open request counts as lost)."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported, the other students carry on
            with self.lock:
                self.crashes.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}"[:200])

    def config(self, technique: str, params: dict) -> ExperimentConfig:
        return replace(self.cfg, technique=technique, params=dict(params)).validate()

    def move(self, owner: str, technique: str, params: dict, follow: bool) -> None:
        """A slider move, as the app serves it: the store in-process, else a job (joined if one is in flight)."""
        cfg = self.config(technique, params)
        r = Request(owner, "interactive", f"{technique} {params}", follow, time.time())
        with self.lock:
            self.requests.append(r)
        hit = cached_result(cfg, self.teacher, self.data, self.store)
        if hit is not None:
            r.t1, r.outcome, r.key = time.time(), "cached", hit.key
            return
        if self.submit(r, dict(asdict(cfg), store=str(self.store.path))):
            self.settle(r)

    def settle(self, r: Request) -> None:
        """Wait for the request's job (until the drain deadline); a job still unfinished then is lost."""
        job = r.job
        if not job.wait(max(0.0, self.drain_until - time.time())):
            r.outcome = "lost"
            return
        r.t1, r.outcome = job.finished, job.state
        if job.state == "done":
            r.key = job.result.get("key", "")
        elif job.error:
            r.error = str(job.error.get("message", ""))[:200]

    def upload(self, rng: random.Random) -> None:
        """An uploaded 32×32 image's top-5 on the teacher, in-process as the app predicts."""
        import numpy as np
        image = np.random.default_rng(rng.randrange(2 ** 32)).integers(0, 256, (3, 32, 32), dtype=np.uint8)
        t0 = time.perf_counter()
        top_k(self.teacher.model, self.data, image, 5)
        with self.lock:
            self.uploads.append(time.perf_counter() - t0)

    def student(self, owner: str, rng: random.Random, progress: ProgressFn = None) -> None:
        instructor = owner == "instructor"
        step = 0
        while True:
            start = self.t_start + step * self.step_s
            if start >= self.deadline:
                return
            if instructor:
                technique, params = INSTRUCTOR_STEPS[step % len(INSTRUCTOR_STEPS)]
                emit(progress, stage="classroom", kind="message",
                     message=f"step {step + 1}: the instructor moves to {technique} {params}")
                plan = [(0.0, "move", True)]
            elif rng.random() < FOLLOW:
                plan = [(rng.uniform(0, FOLLOW_JITTER_S), "move", True)]
            else:
                plan = [(rng.uniform(0, self.step_s / 2), "move", False)]
            if not instructor and rng.random() < UPLOAD:
                plan.append((rng.uniform(0, self.step_s), "upload", False))
            for offset, action, follow in sorted(plan):
                at = start + offset
                if at >= self.deadline:
                    break
                time.sleep(max(0.0, at - time.time()))
                if action == "upload":
                    self.upload(rng)
                else:
                    technique, params = (INSTRUCTOR_STEPS[step % len(INSTRUCTOR_STEPS)] if follow
                                         else rng.choice(EXPLORE))
                    self.move(owner, technique, params, follow)
            # a slow result made this student late: carry on from where the instructor is now
            step = max(step + 1, int((time.time() - self.t_start) / self.step_s))

    def long_job(self, owners: list[str], stop_at: float, progress: ProgressFn = None) -> jobs.Job | None:
        """The long job (the same request from several owners: one job), cancelled at stop_at if still running."""
        technique, params = LONG_JOB
        cfg = self.config(technique, params)
        payload = dict(asdict(cfg), store=str(self.store.path))
        mine = []
        for owner in owners:
            r = Request(owner, "long", f"{technique} {params}", owner == "instructor", time.time())
            with self.lock:
                self.requests.append(r)
            if self.submit(r, payload, lane="long", owner_long_limit=1):
                mine.append(r)
        emit(progress, stage="classroom", kind="message", message=f"long job submitted ({technique} {params})")
        running = list({id(r.job): r.job for r in mine}.values())   # one, unless the layer failed to join them
        for job in running:
            if not job.wait(max(0.0, stop_at - time.time())):
                emit(progress, stage="classroom", kind="message",
                     message="long job cancelled (its part of the run is over)")
                self.lab.cancel(job.id, instructor=True)
                job.wait(LONG_STOP_S)
        for r in mine:
            self.settle(r)
        return running[0] if running else None

    def submit(self, r: Request, payload: dict, **kw) -> bool:
        """Submit r's job; a refusal (a limit, a stopped layer) is recorded as such, not lost."""
        try:
            r.job = self.lab.submit("compress", payload, owner=r.owner, label=f"classroom {r.label}", **kw)
        except LabError as exc:
            r.t1, r.outcome, r.error = time.time(), "refused", str(exc)[:200]
            return False
        return True


def _ensure_teacher(lab, data, model: str, data_root, device, progress: ProgressFn) -> tuple:
    """The newest cached teacher; without one, a small one trained first through the job layer."""
    trained_s = None
    if latest_teacher_entry(data, model) is None:
        cfg = replace(recipe_for(data, model, device), epochs=1, subset=2000)
        emit(progress, stage="classroom", kind="message",
             message=f"no cached {model} teacher for {data.label}: training a small one first "
                     "(1 epoch on 2,000 images)")
        t0 = time.time()
        lab.submit("train", {"dataset": data.name, "data_root": data_root, "model": model, "train": asdict(cfg),
                             "pretrained": False, "device": device, "measure": False},
                   owner="classroom-check", label=f"train {model} on {data.name}").follow(progress)
        trained_s = round(time.time() - t0, 1)
    teacher = latest_teacher(data, model)
    if teacher is None:
        raise LabError(f"no usable {model} teacher for {data.label}; train one with `python -m core train`")
    return teacher, {"model": model, "path": str(teacher.path), "trained": trained_s is not None,
                     "train_s": trained_s}


def _warm(lab, cfg: ExperimentConfig, data, teacher, store) -> None:
    """Every worker started, each interactive one holding the dataset and teacher, and the in-process
    paths' first-call costs paid, as in a class that has been running for a minute."""
    import numpy as np
    lab.warm_up()
    n = lab.sizes["interactive"]
    # distinct payloads (the extra "warm" key), so each idle worker takes one
    warm = [lab.submit("baseline", {"dataset": cfg.dataset, "data_root": cfg.data_root, "model": cfg.model,
                                    "eval_size": cfg.eval_size, "warm": i}, owner="classroom-check",
                       label="classroom warm-up") for i in range(n)]
    for job in warm:
        job.follow()
    cached_result(replace(cfg, technique="quantize", params={}), teacher, data, store)
    top_k(teacher.model, data, np.zeros((3, 32, 32), np.uint8), 5)


def _clean_up(store: ResultStore, keys: set[str]) -> None:
    """Drop the check's own store, and the compressed models no result in the app's store refers to."""
    main = ResultStore.default()
    for key in keys:
        with key_lock(key):
            if main.get(key) is None:
                path = compressed_path(key)
                path.unlink(missing_ok=True)
                cache.sidecar_path(path).unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)


def classroom_check(students: int = 30, minutes: float = 3.0, *, dataset: str = "shapes", model: str = "resnet34",
                    eval_size: int = 1000, data_root: str | None = None, device: str | None = None,
                    address: str | None = None, step_s: float = 10.0, seed: int = 0, drain_s: float = 120.0,
                    long_job: bool = True, lab: jobs.JobManager | None = None, progress: ProgressFn = None) -> dict:
    """Simulate `students` (plus the instructor) for `minutes` on the job layer; the report (docs/classroom.md).

    Submitting stops after `minutes`; requests still running then get `drain_s` more seconds to end.
    `lab`: the job manager to run on (default: this process's, `jobs.manager(address)`)."""
    if students < 1:
        raise LabError("--students must be at least 1")
    if not minutes > 0 or not step_s > 0:
        raise LabError("--minutes and the step length must be positive")
    base = ExperimentConfig(dataset, model, "quantize", {}, eval_size, data_root, device).validate()
    data = load_dataset(dataset, data_root)               # missing data fails here, before any worker starts
    lab = lab or jobs.manager(address)
    teacher, teacher_info = _ensure_teacher(lab, data, model, data_root, device, progress)
    # its own store: every setting is computed once per check (a class nobody has run yet), and the
    # app's results table stays clean
    folder = settings.cache_dir() / "classroom"
    folder.mkdir(parents=True, exist_ok=True)
    store = ResultStore(folder / f"check-{uuid.uuid4().hex[:8]}.sqlite")
    box: dict = {}   # the class, for the clean-up even when the run stops half-way
    try:
        emit(progress, stage="classroom", kind="message", message="starting and warming the workers")
        _warm(lab, base, data, teacher, store)
        report = _simulate(box, lab, data, teacher, store, base, students, minutes, step_s, seed, drain_s,
                           long_job, progress)
    finally:
        done = box["sim"].requests if "sim" in box else []
        _clean_up(store, {r.key for r in done if r.key and r.outcome != "cached"})
    report.update(engine=dict(lab.engine.info(), nodes=_nodes()), teacher=teacher_info,
                  settings={"dataset": dataset, "model": model, "eval_size": eval_size, "step_s": step_s,
                            "minutes": minutes, "follow": FOLLOW, "seed": seed})
    return report


def _simulate(box, lab, data, teacher, store, base, students, minutes, step_s, seed, drain_s, long_job, progress):
    """Run the students' threads (and the long job's) to the end; the summary."""
    workers = dict(lab.status()["workers"])
    window = minutes * 60
    t_start = time.time()
    sim = box["sim"] = _Class(lab, data, teacher, store, base, step_s, t_start, t_start + window,
                              t_start + window + drain_s)
    emit(progress, stage="classroom", kind="message",
         message=f"{students} students for {minutes:g} min on {workers['interactive']} interactive workers")
    owners = ["instructor"] + [f"student-{i + 1:02d}" for i in range(students)]
    threads = [threading.Thread(target=sim.guarded, args=(sim.student, o, random.Random(f"{seed}-{o}"),
                                                          progress if o == "instructor" else None),
                                name=f"classroom-{o}", daemon=True) for o in owners]
    long_box: dict = {}
    if long_job:
        def run_long():
            time.sleep(max(0.0, t_start + window / 3 - time.time()))
            long_box["job"] = sim.long_job(owners[:LONG_OWNERS], t_start + 2 * window / 3, progress)
        threads.append(threading.Thread(target=sim.guarded, args=(run_long,), name="classroom-long", daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, sim.drain_until + LONG_STOP_S + 5 - time.time()))
    t_end = time.time()
    emit(progress, stage="classroom", kind="message", message="done; cleaning up the check's results")
    report = summarize(sim.requests, sim.uploads, long_box.get("job"), students=students, workers=workers,
                       window_s=window, seconds=t_end - t_start, step_s=step_s)
    report["errors"] = sim.crashes + report["errors"]
    return report


def _nodes() -> list[dict]:
    from . import engine
    try:
        return engine.nodes()
    except Exception:  # noqa: BLE001 - the node list is informative only
        return []


def summarize(requests: list[Request], uploads: list[float], long: jobs.Job | None, *, students: int,
              workers: dict, window_s: float, seconds: float, step_s: float) -> dict:
    """The report's numbers from the recorded requests (see docs/classroom.md for each key)."""
    def rnd(v, n=3):
        return None if v is None else round(v, n)

    inter = [r for r in requests if r.lane == "interactive"]
    longs = [r for r in requests if r.lane == "long"]
    all_jobs = {r.job.id: r.job for r in requests if r.job is not None}
    computed = [j for j in all_jobs.values() if j.state == "done" and not j.result.get("cached")]
    by_key: dict[str, int] = {}
    for j in computed:
        by_key[j.result.get("key", j.key)] = by_key.get(j.result.get("key", j.key), 0) + 1
    answered = [r for r in inter if r.job is not None and r.outcome in ("done", "failed")]
    waits = [r.wait_s for r in answered]
    long_span = None
    if long is not None and long.started is not None:
        long_span = (long.started, long.finished or math.inf)

    def overlaps(r):
        return long_span is not None and r.t0 < long_span[1] and r.t1 > long_span[0]

    inter_computed = [j for j in computed if j.lane == "interactive"]
    service = [j.finished - j.started for j in inter_computed]
    follow_jobs = {r.job.id for r in inter if r.job is not None and r.follow}
    shared_n = sum(j.id in follow_jobs for j in inter_computed)
    # the load model: instructor settings are one job each however many follow; explorers add their own
    shared_rate = shared_n / window_s
    per_student_rate = (len(inter_computed) - shared_n) / (students * window_s)
    estimate = students_at_wait(service, workers.get("interactive", 1), shared_rate, per_student_rate)
    failed_jobs = [j for j in all_jobs.values() if j.state == "failed"]
    long_done = [r for r in longs if r.outcome == "done"]
    minutes = max(seconds, 1e-9) / 60
    return {
        "students": students,
        "seconds": rnd(seconds, 1),
        "lost": sum(r.outcome in ("lost", "") for r in requests),   # "": its thread never came back
        "failures": len(failed_jobs),
        "duplicates_computed": sum(n > 1 for n in by_key.values()),
        "lanes": {
            "interactive": {
                "requests": len(inter),
                "computed": len(inter_computed),
                "cached": sum(r.outcome == "cached" for r in inter),
                "shared": sum(r.job is not None and r.job.owners and r.job.owners[0] != r.owner for r in inter),
                "p50_s": rnd(quantile_of(waits, 0.5)),
                "p95_s": rnd(quantile_of(waits, QUANTILE)),
                "max_s": rnd(max(waits) if waits else None),
                "p95_cached_s": rnd(quantile_of([r.wait_s for r in inter if r.outcome == "cached"], QUANTILE), 4),
                "p95_all_s": rnd(quantile_of(waits + [r.wait_s for r in inter if r.outcome == "cached"], QUANTILE)),
                "p95_with_long_job_s": rnd(quantile_of([r.wait_s for r in answered if overlaps(r)], QUANTILE)),
                "p95_without_long_job_s": rnd(quantile_of([r.wait_s for r in answered if not overlaps(r)], QUANTILE)),
                "service_p95_s": rnd(quantile_of(service, QUANTILE)),
                "service_mean_s": rnd(sum(service) / len(service) if service else None),
                "throughput_per_min": rnd(len(inter_computed) / minutes, 2),
                "refused": sum(r.outcome == "refused" for r in inter),
            },
            "long": {
                "requests": len(longs),
                "computed": sum(j.lane == "long" for j in computed),
                "shared": sum(r.job is not None and r.job.owners and r.job.owners[0] != r.owner for r in longs),
                "p95_s": rnd(quantile_of([r.wait_s for r in long_done], QUANTILE), 1),
                "state": long.state if long is not None else None,
                "ran_s": rnd((long.finished or time.time()) - long.started, 1) if long and long.started else None,
                "throughput_per_min": rnd(sum(j.lane == "long" for j in computed) / minutes, 2),
                "refused": sum(r.outcome == "refused" for r in longs),
            },
        },
        "students_at_3s": estimate,
        "estimate": {"workers": workers.get("interactive", 1), "shared_jobs_per_min": rnd(shared_rate * 60),
                     "jobs_per_student_per_min": rnd(per_student_rate * 60, 4), "target_s": TARGET_WAIT_S,
                     "model": "M/M/c (Erlang C) queue: measured p95 service time + the queueing delay's p95"},
        "workers": workers,
        "uploads": {"count": len(uploads), "p95_s": rnd(quantile_of(uploads, QUANTILE), 4)},
        "errors": sorted({r.error for r in requests if r.error})[:3],
        "step_s": step_s,
    }


# ----------------------------------------------------------------------------- 1 vs 2 workers
def compare_workers(counts=(1, 2), requests: int = 12, *, dataset: str = "shapes", model: str = "resnet34",
                    eval_size: int = 1000, data_root: str | None = None, address: str | None = None,
                    progress: ProgressFn = None) -> dict:
    """Throughput of the same interactive load (`requests` distinct slider settings submitted at once)
    on each count of interactive workers, each on a fresh job manager and store; ratio = last / first.

    Stops this process's job manager first (one engine per process) and leaves none running."""
    base = ExperimentConfig(dataset, model, "quantize", {}, eval_size, data_root).validate()
    data = load_dataset(dataset, data_root)
    if not 1 <= requests <= len(EXPLORE):
        raise LabError(f"requests: 1 to {len(EXPLORE)} distinct settings")
    settings_list = EXPLORE[::max(1, len(EXPLORE) // requests)][:requests]
    runs = []
    jobs.shutdown()
    for n in counts:
        # an embedded engine of n CPUs: n workers, and a lone job gets n threads, never more
        lab = jobs.JobManager(address, interactive=n, long=1, num_cpus=None if address else n)
        folder = settings.cache_dir() / "classroom"
        folder.mkdir(parents=True, exist_ok=True)
        store = ResultStore(folder / f"compare-{uuid.uuid4().hex[:8]}.sqlite")
        keys: set[str] = set()
        try:
            teacher, _ = _ensure_teacher(lab, data, model, data_root, None, progress)
            _warm(lab, base, data, teacher, store)
            emit(progress, stage="classroom", kind="message", message=f"{len(settings_list)} requests on {n} worker(s)")
            t0 = time.time()
            submitted = [lab.submit("compress", dict(asdict(replace(base, technique=t, params=dict(p)).validate()),
                                                     store=str(store.path)), owner=f"load-{i}",
                                    label=f"compare {t} {p}") for i, (t, p) in enumerate(settings_list)]
            results = [job.follow() for job in submitted]
            seconds = max(j.finished for j in submitted) - t0
            keys = {r["key"] for r in results}
            runs.append({"workers": n, "jobs": len(results), "computed": sum(not r.get("cached") for r in results),
                         "seconds": round(seconds, 2), "per_min": round(len(results) / seconds * 60, 2)})
        finally:
            _clean_up(store, keys)
            lab.shutdown()
            jobs.shutdown()
    ratio = runs[-1]["per_min"] / runs[0]["per_min"] if runs and runs[0]["per_min"] else None
    return {"runs": runs, "ratio": None if ratio is None else round(ratio, 2), "eval_size": eval_size,
            "dataset": dataset, "model": model}
