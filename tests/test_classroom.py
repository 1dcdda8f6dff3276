import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import settings
from core.classroom import p95_wait, students_at_wait
from core.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOP = {"students", "seconds", "engine", "lost", "failures", "duplicates_computed", "lanes", "students_at_3s"}
INTERACTIVE = {"requests", "computed", "cached", "p50_s", "p95_s", "max_s", "p95_cached_s", "p95_with_long_job_s",
               "p95_without_long_job_s"}
LONG = {"requests", "computed", "p95_s"}


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", epochs=1, subset=1500)


def test_classroom_check_small_class_computes_each_request_once(teacher, capsys):
    t0 = time.perf_counter()
    code = main(["classroom-check", "--students", "4", "--minutes", "0.25", "--step-seconds", "5",
                 "--eval-size", "200", "--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    print(f"classroom-check: {time.perf_counter() - t0:.1f} s; {report['lanes']}")
    assert code == 0
    assert TOP <= set(report) and INTERACTIVE <= set(report["lanes"]["interactive"])
    assert LONG <= set(report["lanes"]["long"]) and set(report["lanes"]) == {"interactive", "long"}
    assert report["students"] == 4 and report["engine"]["kind"] == "ray" and report["engine"]["local"] is True
    assert report["lost"] == 0 and report["failures"] == 0 and report["duplicates_computed"] == 0
    lane = report["lanes"]["interactive"]
    # the instructor and the students who follow ask for the same settings: computed once, the rest
    # joined that job (shared) or read its stored result (cached)
    assert lane["requests"] > lane["computed"] >= 1 and lane["shared"] >= 1
    assert lane["requests"] >= lane["computed"] + lane["shared"] + lane["cached"]
    assert 0 < lane["p50_s"] <= lane["p95_s"] <= lane["max_s"]
    assert report["lanes"]["long"]["requests"] == 3            # the instructor and two students: one job
    assert isinstance(report["students_at_3s"], int) and report["students_at_3s"] >= 0
    assert report["teacher"]["trained"] is False              # the newest cached teacher was used
    assert "this machine holds about" in "\n".join(out[:-1])
    # the check's own result store is gone afterwards
    assert not list((settings.cache_dir() / "classroom").glob("check-*"))


def test_students_at_3s_estimate():
    # one worker, every run 1.0 s: an M/M/1 queue, P(queue > t) = ρ·exp(-(1 - λ)·t) with ρ = λ, and
    # 2 s of the 3 s budget left for queueing. ρ = 0.23: 0.23·e^-1.54 = 0.049 ≤ 0.05;
    # ρ = 0.24: 0.24·e^-1.52 = 0.0525 > 0.05. At 0.01 jobs/s per student: 23 students.
    service = [1.0] * 20
    assert students_at_wait(service, 1, 0.0, 0.01) == 23
    assert students_at_wait(service, 1, 0.10, 0.01) == 13          # the instructor's shared jobs take ρ = 0.1
    assert students_at_wait(service, 2, 0.0, 0.01) > 2 * 23        # two workers hold more than twice as many
    assert students_at_wait([3.5] * 20, 8, 0.0, 0.001) == 0        # a run alone is over 3 s: none
    assert students_at_wait([], 2, 0.0, 0.01) == 0                 # nothing measured: no claim
    assert p95_wait(1.0, 1.0, 1, 1.0) == math.inf                  # at capacity the queue grows without bound


def test_classroom_check_unreachable_cluster_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "core", "classroom-check", "--students", "2",
                           "--ray-address", "127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot reach the Ray cluster" in lines[0], proc.stderr
