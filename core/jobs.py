"""The job layer: every heavy request (training, every technique, sweeps) runs in Ray workers.

Two lanes, each its own pool of Ray actors, so a slider result never waits behind training:
- interactive (no training; seconds): one actor per engine CPU, each keeping the datasets and
  teachers it last used loaded; a job goes to an idle actor that already holds its teacher;
- long (training, fine-tuning, distillation): a few actors that run at low CPU priority.
Identical requests share one job, whoever sends them; progress streams back from the worker; a job
can be cancelled; a worker killed mid-job fails (or, interactive, retries) that job only.
One manager per process (`manager()`): the app, the CLI and the tests all submit through it.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from . import cache, engine
from .errors import LabError
from .progress import Event, ProgressFn

LANES = ("interactive", "long")
KIND_LANES = {"train": "long", "compress": "interactive", "baseline": "interactive", "estimate": "interactive",
              "sleep": "interactive"}
FINISHED_KEPT = 100          # finished jobs the Class view can still show
INTERACTIVE_RETRIES = 1      # a killed interactive worker's job runs once more; long jobs resume by hand
CLUSTER_CHECK_S = 30         # how often the manager looks for CPUs that joined the cluster
LONG_NICE = 10               # long-lane workers' CPU priority (CFS weight ~1/10 of an interactive worker's)


class JobLimit(LabError):
    """A submission over a limit (one long job per browser session, the class's long queue)."""


class JobFailed(LabError):
    """The job ran and failed; `details` holds a traceback for bugs (not for bad input)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class JobCancelled(LabError):
    pass


@dataclass
class Job:
    id: str
    key: str
    kind: str
    lane: str
    payload: dict
    label: str
    owners: list
    env: dict
    warm_key: tuple = ()
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    state: str = "queued"            # queued | running | done | failed | cancelled
    node: str = ""
    pid: int | None = None           # the worker process (the Class view; tests kill it)
    attempts: int = 0
    events: list = field(default_factory=list)
    result: dict | None = None
    error: dict | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _ref: object = field(default=None, repr=False)

    @property
    def wait_s(self) -> float | None:
        """Seconds from submission to the result (the wait a student sees)."""
        return None if self.finished is None else self.finished - self.submitted

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def outcome(self) -> dict:
        """The result, or the job's error raised as a LabError subclass."""
        if self.state == "done":
            return self.result
        if self.state == "cancelled":
            raise JobCancelled(f"{self.label or self.kind}: cancelled")
        err = self.error or {"message": "not finished"}
        if err.get("user"):
            raise LabError(err["message"])
        raise JobFailed(f"{err.get('type', 'error')}: {err['message']}", err.get("trace", ""))

    def follow(self, progress: ProgressFn = None, poll: float = 0.1, timeout: float | None = None,
               on_wait=None) -> dict:
        """Replay this job's progress into `progress` until it ends; then its outcome(). `on_wait()` is
        called after every poll that did not end it (a page redraws there, so a rerun can interrupt)."""
        seen, t0 = 0, time.monotonic()
        while True:
            finished = self.wait(poll)
            n = len(self.events)
            if progress is not None:
                for ev in self.events[seen:n]:
                    progress(Event(**ev))
            seen = n
            if finished and seen == len(self.events):
                return self.outcome()
            if on_wait is not None:
                on_wait()
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise LabError(f"{self.label or self.kind}: no result after {timeout:.0f} s")

    def row(self) -> dict:
        """One line of the Class view."""
        return {"id": self.id, "label": self.label or self.kind, "lane": self.lane, "state": self.state,
                "owners": ", ".join(self.owners), "node": self.node,
                "waited_s": round((self.started or time.time()) - self.submitted, 1),
                "ran_s": round((self.finished or time.time()) - self.started, 1) if self.started else None}


@dataclass
class _Slot:
    actor: object
    lane: str
    job: Job | None = None
    warm_key: tuple = ()
    restarting: bool = False          # its process died: Ray restarts it; wait before the next job


def _await_restart(slot: _Slot, timeout: float = 180) -> None:
    """Block until a restarted worker answers (calls to it fail at once while it restarts)."""
    import ray
    from ray import exceptions as rex
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(slot.actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
            slot.restarting = False
            return
        except (rex.ActorUnavailableError, rex.RayActorError, rex.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def job_env() -> dict:
    return {k: os.environ.get(k) for k in engine.FORWARDED_ENV}


class JobManager:
    def __init__(self, address: str | None = None, interactive: int | None = None, long: int | None = None,
                 long_queue: int | None = None, num_cpus: int | None = None):
        import ray
        self.engine = engine.connect(address, num_cpus)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.sizes = {"interactive": interactive or _env_int("COMPRESSION_LAB_WORKERS", cpus),
                      "long": long or _env_int("COMPRESSION_LAB_LONG_WORKERS", max(1, cpus // 4))}
        self.long_queue = long_queue or max(4, 4 * self.sizes["long"])
        # sizes nobody chose follow the cluster: a node added during class gets workers
        self._auto = interactive is None and "COMPRESSION_LAB_WORKERS" not in os.environ
        self._cpus, self._checked = cpus, time.monotonic()
        self._cv = threading.Condition()
        self._queues = {lane: deque() for lane in LANES}
        self._inflight: dict[str, Job] = {}
        self._jobs: dict[str, Job] = {}
        self._pools = {lane: [] for lane in LANES}
        self._closed = False
        # embedded: this machine's cores, shared among the interactive jobs running at each moment
        self.node_cpus = cpus if self.engine.local else 0
        from .worker import make_gate
        self._gate = make_gate()
        self._grow_pools()
        threading.Thread(target=self._dispatch_loop, name="lab-jobs", daemon=True).start()

    # ------------------------------------------------------------------ pools
    def _grow_pools(self) -> None:
        """Start actors up to the wanted sizes (workers start in parallel, a few seconds each)."""
        import ray
        from .worker import make_actor_class
        actor = make_actor_class()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        node_cpus = self.node_cpus
        for lane in LANES:
            while len(self._pools[lane]) < self.sizes[lane]:
                if lane == "interactive":   # one CPU each: adding CPUs adds interactive workers
                    opts = {"num_cpus": 1}
                    threads = 1
                else:                       # no CPU reserved: niced, they use what interactive work leaves
                    opts = {"num_cpus": 0, "num_gpus": 1 if len(self._pools[lane]) < gpus else 0}
                    threads = node_cpus or 4
                handle = actor.options(max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD",
                                       **opts).remote(lane, threads, LONG_NICE if lane == "long" else 0)
                self._pools[lane].append(_Slot(handle, lane))

    def warm_up(self, timeout: float = 120) -> list[dict]:
        """Wait until every worker has started (imports done); what each reports."""
        import ray
        return ray.get([s.actor.ping.remote() for lane in LANES for s in self._pools[lane]], timeout=timeout)

    def scale_to(self, interactive: int | None = None, long: int | None = None) -> None:
        """More workers (a cluster grew); shrinking waits for the next start."""
        with self._cv:
            if interactive:
                self.sizes["interactive"] = max(self.sizes["interactive"], interactive)
            if long:
                self.sizes["long"] = max(self.sizes["long"], long)
            self._grow_pools()
            self._cv.notify_all()

    # ------------------------------------------------------------------ submit / cancel
    def submit(self, kind: str, payload: dict, owner: str = "cli", label: str = "", lane: str | None = None,
               owner_long_limit: int | None = None) -> Job:
        """Queue a job, or join the identical one already queued or running (computed once)."""
        from .worker import KINDS
        if kind not in KINDS:
            raise LabError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
        lane = lane or KIND_LANES.get(kind, "long")
        if lane not in LANES:
            raise LabError(f"unknown lane {lane!r}; one of {', '.join(LANES)}")
        env = job_env()
        key = cache.stable_hash({"kind": kind, "payload": payload, "env": env}, 16)
        with self._cv:
            if self._closed:
                raise LabError("the job layer is shut down")
            job = self._inflight.get(key)
            if job is not None:
                if owner not in job.owners:
                    job.owners.append(owner)
                return job
            if lane == "long":
                longs = [j for j in self._inflight.values() if j.lane == "long"]
                mine = [j for j in longs if owner in j.owners]
                if owner_long_limit is not None and len(mine) >= owner_long_limit:
                    raise JobLimit(f"you already have a long job ({mine[0].label or mine[0].kind}, {mine[0].state}): "
                                   "wait for it or cancel it first")
                if len(longs) >= self.long_queue:
                    raise JobLimit(f"{len(longs)} long jobs are queued or running, the most this lab takes at "
                                   "once; try again when one finishes")
            job = Job(uuid.uuid4().hex[:8], key, kind, lane, payload, label, [owner], env,
                      warm_key=(payload.get("dataset"), payload.get("model")))
            self._inflight[key] = job
            self._jobs[job.id] = job
            self._queues[lane].append(job)
            self._cv.notify_all()
        return job

    def cancel(self, job_id: str, by: str | None = None, instructor: bool = False) -> bool:
        """Cancel for everyone (the instructor, or the only session waiting), else stop waiting for it."""
        import ray
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or not job.active:
                return False
            if not instructor:
                if by not in job.owners:
                    raise LabError("only the session that started this job, or the instructor, can cancel it")
                if len(job.owners) > 1:   # others still wait for the same result: just leave
                    job.owners.remove(by)
                    return True
            if job.state == "queued":
                self._queues[job.lane].remove(job)
                self._finish(job, "cancelled")
                return True
            ref = job._ref
        if ref is not None:
            ray.cancel(ref)   # the worker stops at the job's next progress event
        return True

    # ------------------------------------------------------------------ views
    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def find(self, kind: str, payload: dict) -> Job | None:
        """The queued or running job for this exact request, if any (a page re-attaching after a rerun)."""
        key = cache.stable_hash({"kind": kind, "payload": payload, "env": job_env()}, 16)
        return self._inflight.get(key)

    def jobs(self, owner: str | None = None, active_only: bool = False) -> list[Job]:
        with self._cv:
            out = [j for j in self._jobs.values() if (owner is None or owner in j.owners)
                   and (j.active or not active_only)]
        return sorted(out, key=lambda j: j.submitted)

    def status(self) -> dict:
        with self._cv:
            busy = {lane: sum(s.job is not None for s in self._pools[lane]) for lane in LANES}
            return {"engine": self.engine.info(), "nodes": engine.nodes(),
                    "workers": {lane: len(self._pools[lane]) for lane in LANES}, "busy": busy,
                    "queued": {lane: len(self._queues[lane]) for lane in LANES}}

    def shutdown(self) -> None:
        import ray
        with self._cv:
            self._closed = True
            for lane in LANES:
                while self._queues[lane]:
                    self._finish(self._queues[lane].popleft(), "cancelled")
            slots = [s for lane in LANES for s in self._pools[lane]]
            self._cv.notify_all()
        for s in slots:
            try:
                ray.kill(s.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ------------------------------------------------------------------ dispatch
    def _dispatch_loop(self) -> None:
        while True:
            with self._cv:
                if self._closed:
                    return
                started = self._assign()
                if not started:
                    self._cv.wait(1.0)
            if self._auto and time.monotonic() - self._checked > CLUSTER_CHECK_S:
                self._follow_cluster()

    def _follow_cluster(self) -> None:
        """Start interactive workers for CPUs that joined the cluster since the last look."""
        import ray
        self._checked = time.monotonic()
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
        except Exception:  # noqa: BLE001 - a cluster briefly unreachable: look again later
            return
        if cpus > self._cpus:
            self._cpus = cpus
            self.scale_to(interactive=cpus, long=max(1, cpus // 4))

    def _assign(self) -> bool:
        """Give queued jobs to idle workers (called under the lock); whether any started."""
        started = False
        for lane in LANES:
            queue = self._queues[lane]
            while queue:
                idle = [s for s in self._pools[lane] if s.job is None]
                if not idle:
                    break
                job = queue.popleft()
                slot = next((s for s in idle if s.warm_key == job.warm_key), idle[0])
                slot.job, job.state, job.started = job, "running", time.time()
                job.attempts += 1
                threads = None
                if lane == "interactive" and self.node_cpus:   # one slider job alone gets every core
                    busy = sum(s.job is not None for s in self._pools[lane])
                    threads = max(1, self.node_cpus // busy)
                threading.Thread(target=self._run, args=(slot, job, threads), name=f"job-{job.id}",
                                 daemon=True).start()
                started = True
        return started

    def _run(self, slot: _Slot, job: Job, threads: int | None) -> None:
        import ray
        from ray import exceptions as rex
        outcome, retry, entered = "failed", False, None
        try:
            if slot.restarting:
                _await_restart(slot)
            base = {"kind": "ray", "address": self.engine.address, "local": self.engine.local}
            gen = slot.actor.run.remote(job.kind, job.payload, job.env, base, threads,
                                        self._gate if job.lane == "long" else None)
            job._ref = gen
            for ref in gen:
                tag, value = ray.get(ref)
                if tag == "events":
                    job.events.extend(value)
                elif tag == "started":
                    job.node, job.pid = value["node"], value["pid"]
                    if job.lane == "interactive":
                        self._gate.enter.remote(job.node)
                        entered = job.node
                elif tag == "result":
                    job.result, outcome = value, "done"
                else:
                    job.error = value
                    outcome = "cancelled" if value.get("type") == "Cancelled" else "failed"
        except rex.TaskCancelledError:
            outcome = "cancelled"
        except (rex.RayActorError, rex.WorkerCrashedError, rex.ActorUnavailableError) as exc:
            slot.restarting = True
            retry = job.lane == "interactive" and job.attempts <= INTERACTIVE_RETRIES
            job.error = {"type": "WorkerDied", "user": True,
                         "message": "the worker running this job stopped (killed, or out of memory); nothing "
                                    "half-written was stored: run it again" + f" ({type(exc).__name__})"}
        except Exception as exc:  # noqa: BLE001 - the job fails, the layer carries on
            job.error = {"type": type(exc).__name__, "message": str(exc)[:500], "user": False}
        if entered:
            self._gate.leave.remote(entered)
        with self._cv:
            slot.job = None
            slot.warm_key = job.warm_key
            if retry and not self._closed:
                job.state, job.error = "queued", None
                self._queues[job.lane].appendleft(job)
            else:
                self._finish(job, outcome)
            self._cv.notify_all()

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished = state, time.time()
        self._inflight.pop(job.key, None)
        job._done.set()
        done = [j for j in self._jobs.values() if not j.active]
        for old in sorted(done, key=lambda j: j.finished or 0)[:-FINISHED_KEPT]:
            self._jobs.pop(old.id, None)


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


_MANAGER: JobManager | None = None
_MANAGER_LOCK = threading.Lock()


_ATTACHED: str | None = None   # set by reattach(): an address that then holds for this whole process


def manager(address: str | None = None) -> JobManager:
    """This process's job manager (the engine is started or attached on first use)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            _MANAGER = JobManager(address or _ATTACHED)
        elif engine.configured_address(address) not in (None, _MANAGER.engine.address):
            engine.connect(address)   # raises: one engine per process
        return _MANAGER


def shutdown() -> None:
    """Stop this process's workers and its engine (tests; a process that attaches elsewhere)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is not None:
            _MANAGER.shutdown()
            _MANAGER = None
    engine.shutdown()


def reattach(address: str) -> JobManager:
    """Move this process's jobs to the cluster at `address` (the instructor's Class page). Running jobs
    stop; a cluster that cannot be reached raises before anything stops, and a failed attach is not
    replaced by a local instance: the lab stays unattached until the address works."""
    global _ATTACHED
    engine.probe(address)
    shutdown()
    _ATTACHED = address
    return manager()


def run(kind: str, payload: dict, progress: ProgressFn = None, owner: str = "cli", label: str = "",
        lane: str | None = None, address: str | None = None) -> dict:
    """Submit and wait (the CLI): progress replayed as it streams; Ctrl-C cancels the job."""
    job = manager(address).submit(kind, payload, owner=owner, label=label, lane=lane)
    try:
        return job.follow(progress)
    except KeyboardInterrupt:
        manager().cancel(job.id, instructor=True)
        raise
