"""The job layer on a real local Ray instance: lanes, identical requests once, cancel, killed workers."""
from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import time

import pytest

from core import jobs
from core.results import ResultStore
from core.runner import ExperimentConfig


@pytest.fixture(scope="module")
def lab():
    m = jobs.manager()
    m.warm_up()
    return m


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", epochs=1, subset=1500)


def compress_payload(bits: int, eval_size: int = 200) -> dict:
    cfg = ExperimentConfig(technique="quantize", params={"mode": "fake", "bits": bits}, eval_size=eval_size)
    return dataclasses.asdict(cfg.validate())


def test_identical_requests_from_many_sessions_are_one_job(lab, teacher):
    payload = compress_payload(5)
    first = lab.submit("compress", payload, owner="alice")
    others = [lab.submit("compress", dict(payload), owner=f"student{i}") for i in range(5)]
    assert all(j is first for j in others) and len(first.owners) == 6
    result = first.follow()
    assert result["cached"] is False and result["engine"]["kind"] == "ray" and result["engine"]["node"]
    assert result["engine"]["node"] == first.node and first.node.split("/")[1]
    store = ResultStore()
    assert store.get(result["key"]) is not None
    # once finished, the same request again is served from the store by a worker, not recomputed
    again = lab.submit("compress", payload, owner="bob").follow()
    assert again["cached"] is True and again["key"] == result["key"]


def test_progress_streams_back_while_the_job_runs(lab):
    job = lab.submit("sleep", {"seconds": 1.5, "steps": 6, "tag": "stream"})
    seen = []
    job.follow(lambda ev: seen.append((time.monotonic(), ev.step)))
    assert [s for _, s in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1][0] - seen[0][0] > 0.8   # events arrived as they happened, not all at the end


def test_interactive_work_never_waits_behind_long_jobs(lab):
    longs = [lab.submit("sleep", {"seconds": 6, "steps": 30, "tag": f"long{i}"}, lane="long", owner=f"t{i}")
             for i in range(lab.sizes["long"] + 2)]   # the long lane is full and has a queue
    time.sleep(0.5)
    quick = lab.submit("sleep", {"seconds": 0.2, "steps": 2, "tag": "quick"}, owner="s")
    quick.follow(timeout=30)
    assert quick.started - quick.submitted < 1.0, "an interactive job queued behind long ones"
    assert any(j.state == "queued" for j in longs)
    for j in longs:
        lab.cancel(j.id, instructor=True)
    for j in longs:
        assert j.wait(20) and j.state == "cancelled"


def test_one_long_job_per_session_and_cancel_by_its_owner_only(lab):
    job = lab.submit("sleep", {"seconds": 20, "steps": 100, "tag": "mine"}, lane="long", owner="ann",
                     owner_long_limit=1)
    with pytest.raises(jobs.JobLimit, match="already have a long job"):
        lab.submit("sleep", {"seconds": 5, "tag": "second"}, lane="long", owner="ann", owner_long_limit=1)
    with pytest.raises(Exception, match="only the session that started"):
        lab.cancel(job.id, by="mallory")
    deadline = time.time() + 20
    while job.state != "running" and time.time() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    assert lab.cancel(job.id, by="ann")
    assert job.wait(10) and job.state == "cancelled" and time.time() - t0 < 5
    with pytest.raises(jobs.JobCancelled):
        job.outcome()
    # a second session waiting for the same job only stops waiting; the job goes on for the first
    shared = lab.submit("sleep", {"seconds": 1, "steps": 4, "tag": "shared"}, owner="a")
    lab.submit("sleep", {"seconds": 1, "steps": 4, "tag": "shared"}, owner="b")
    lab.cancel(shared.id, by="b")
    assert shared.follow()["slept"] == 1 and shared.owners == ["a"]


def test_bad_input_inside_a_worker_is_one_clear_message(lab):
    job = lab.submit("compress", dict(compress_payload(4), dataset="folder:/definitely/not/here"))
    with pytest.raises(Exception, match="does not exist") as info:
        job.follow()
    assert type(info.value).__name__ == "LabError" and job.state == "failed"
    with pytest.raises(jobs.LabError, match="unknown job kind"):
        lab.submit("format_disk", {})


def test_a_killed_interactive_worker_retries_and_the_store_stays_consistent(lab, teacher):
    job = lab.submit("compress", compress_payload(3, eval_size=1000), owner="k")
    deadline = time.time() + 60
    while job.pid is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGKILL)   # mid-job: the worker process dies
    result = job.follow(timeout=240)   # retried once on a restarted worker
    assert job.attempts == 2 and result["params"]["bits"] == 3
    store = ResultStore()
    with sqlite3.connect(store.path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.get(result["key"]) is not None
    from core import cache
    for entry in (store.path.parent / "compressed").glob("*.pt"):   # every entry whole (writes are atomic)
        assert cache.read_sidecar(entry) is not None and cache.load_state(entry) is not None


def test_a_killed_long_worker_fails_the_job_with_a_clear_message(lab):
    job = lab.submit("sleep", {"seconds": 30, "steps": 300, "tag": "killme"}, lane="long", owner="z")
    deadline = time.time() + 60
    while job.pid is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    with pytest.raises(jobs.LabError, match="worker running this job stopped"):
        job.follow(timeout=60)
    assert job.state == "failed"
    # the restarted worker takes the next job
    assert lab.submit("sleep", {"seconds": 0.1, "steps": 1, "tag": "after"}, lane="long").follow(timeout=120)


def test_long_jobs_pause_while_a_slider_job_runs_on_their_node(lab):
    long = lab.submit("sleep", {"seconds": 8, "steps": 80, "tag": "trainer"}, lane="long", owner="t")
    while len(long.events) < 5:
        time.sleep(0.05)
    quick = lab.submit("sleep", {"seconds": 1.5, "steps": 3, "tag": "slider"}, owner="s")
    while quick.node == "":
        time.sleep(0.02)
    time.sleep(0.3)                         # the gate hears of the slider job; the long job's batch ends
    before = len(long.events)
    quick.follow(timeout=30)
    during = len(long.events) - before      # unpaused, ~10 batches would have passed in the second and more
    assert during <= 2, f"the long job ran {during} batches beside a slider job"
    long.follow(timeout=60)                 # and it resumes afterwards
    assert long.state == "done"


def test_workers_follow_cpus_that_join_the_cluster(lab, monkeypatch):
    import ray
    real = ray.cluster_resources
    monkeypatch.delenv("COMPRESSION_LAB_WORKERS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(real(), CPU=1.0))   # one CPU when it starts
    grown = jobs.JobManager(long=1)
    try:
        assert len(grown._pools["interactive"]) == 1
        monkeypatch.setattr(ray, "cluster_resources", real)                       # then a node's CPUs join
        grown._follow_cluster()
        assert len(grown._pools["interactive"]) == grown.sizes["interactive"] == int(real()["CPU"]) >= 2
        grown._follow_cluster()                                                   # nothing new: nothing started
        assert len(grown._pools["interactive"]) == int(real()["CPU"])
    finally:
        grown.shutdown()
