"""The lab attached to a real two-node Ray cluster on this machine (docs/cluster.md).

A head and a second node, 1 CPU each, run in a helper process of their own, all on 127.0.0.1:
nothing here uses the test session's embedded Ray instance or any other Ray on the machine, and
teardown stops only the helper and the processes it started (never `ray stop`, which stops every
Ray instance on the machine). The lab runs attached in a subprocess, as a class would run it.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# The helper: a head and more nodes (ray.cluster_utils, Ray's own multi-node-on-one-machine tool),
# their ids on one line of stdout, then it waits; closing its stdin (or SIGTERM) shuts them down.
HELPER = """
import json, signal, sys
from ray.cluster_utils import Cluster
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
cpus = [int(x) for x in sys.argv[1:]]
c = Cluster(initialize_head=True, shutdown_at_exit=True,
            head_node_args={"num_cpus": cpus[0], "node_ip_address": "127.0.0.1", "include_dashboard": False})
try:
    nodes = [c.head_node] + [c.add_node(num_cpus=n, node_ip_address="127.0.0.1") for n in cpus[1:]]
    c.wait_for_nodes()
    print(json.dumps({"address": c.address, "nodes": [n.node_id for n in nodes]}), flush=True)
    sys.stdin.read()
finally:
    c.shutdown()
"""
START_TIMEOUT_S = 90
LAB_TIMEOUT_S = 300     # a generous ceiling: a loaded 2-core machine runs this several times slower

needs_cluster = pytest.mark.skipif(
    not sys.platform.startswith("linux") or importlib.util.find_spec("ray") is None
    or (not Path(sys.executable).with_name("ray").exists() and shutil.which("ray") is None),
    reason="needs Linux and Ray with its `ray` executable (multi-node Ray on one machine)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(ray_tmp: str, token: str, **extra) -> dict:
    """Environment for the cluster and the attached lab: this test's Ray only, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_TMPDIR": ray_tmp,                        # sessions, sockets, the address file: all in here
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",     # single-machine mode: node addresses stay 127.0.0.1
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,   # as a real class cluster: token auth on
        "RAY_USAGE_STATS_ENABLED": "0",
        "COMPRESSION_LAB_OFFLINE": "1",
    })
    env.update(extra)
    return env


def _marked_pids(ray_tmp: str) -> list[int]:
    """Processes whose environment holds this test's RAY_TMPDIR: the helper's nodes and workers."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _stop(helper: subprocess.Popen, ray_tmp: str) -> None:
    if helper.poll() is None:
        try:
            helper.stdin.close()          # the helper shuts its nodes down (a few seconds) and exits
        except OSError:
            pass
        try:
            helper.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(helper.pid, signal.SIGKILL)   # its own session (start_new_session): only ours
            helper.wait(10)
    for pid in _marked_pids(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _read_line(proc: subprocess.Popen, timeout: float, log: Path) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
        if proc.poll() is not None:
            break
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"the test cluster did not start within {timeout:.0f} s:\n{tail}")


def _seed_teacher(cache: Path, shapes) -> None:
    """An untrained ResNet-34 teacher in the test's cache (seconds; the cells only need one to exist)
    and the generated Shapes data, so that neither is computed again on the cluster."""
    from core import settings
    from core.teachers import TeacherSettings, get_teacher
    from core.training import TrainConfig
    shutil.copytree(settings.cache_dir() / "datasets", cache / "datasets")
    before = os.environ.get("COMPRESSION_LAB_CACHE")
    os.environ["COMPRESSION_LAB_CACHE"] = str(cache)
    try:
        get_teacher(shapes, TeacherSettings("resnet34", TrainConfig(epochs=0, subset=256, batch_size=64)),
                    device="cpu", measure=False)
    finally:
        if before is None:
            os.environ.pop("COMPRESSION_LAB_CACHE", None)
        else:
            os.environ["COMPRESSION_LAB_CACHE"] = before


@pytest.fixture(scope="module")
def cluster(shapes):
    # short and fresh: Ray's socket paths must stay under ~107 bytes; removed afterwards
    ray_tmp = tempfile.mkdtemp(prefix="labrc-", dir="/tmp")
    token = secrets.token_hex(32)
    log = Path(ray_tmp) / "helper.log"
    with open(log, "w") as err:
        helper = subprocess.Popen([sys.executable, "-c", HELPER, "1", "1"], env=ray_env(ray_tmp, token),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                  start_new_session=True)
    try:
        cache = Path(ray_tmp) / "cache"
        _seed_teacher(cache, shapes)                  # while the nodes start
        info = json.loads(_read_line(helper, START_TIMEOUT_S, log))
        yield dict(info, ray_tmp=ray_tmp, token=token, cache=cache)
    finally:
        _stop(helper, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@needs_cluster
def test_a_sweep_attached_to_a_two_node_cluster_runs_on_both_nodes(cluster):
    from core.results import ResultStore
    env = ray_env(cluster["ray_tmp"], cluster["token"], RAY_ADDRESS=cluster["address"],
                  COMPRESSION_LAB_CACHE=str(cluster["cache"]))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "core", "sweep", "--datasets", "shapes", "--models", "resnet34",
                          "--techniques", "quantize", "--eval-size", "64", "--out", str(cluster["cache"] / "report"),
                          "--json", "--quiet"], env=env, capture_output=True, text=True, timeout=LAB_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    cluster_nodes = {f"127.0.0.1/{node_id[:8]}" for node_id in cluster["nodes"]}
    assert len(cluster_nodes) == 2
    # four cells, two workers (one CPU each, one per node): both nodes ran cells, and the output says so
    assert out["runs"] == 4 and out["cached"] == 0
    assert set(out["nodes"]) == cluster_nodes and sum(out["nodes"].values()) == 4, out["nodes"]
    results = ResultStore(cluster["cache"] / "results.sqlite").all()
    assert len(results) == 4
    for r in results:
        assert r.engine["kind"] == "ray" and r.engine["local"] is False, r.engine
        assert r.engine["address"] == cluster["address"], r.engine
    assert collections.Counter(r.engine["node"] for r in results) == out["nodes"]
    print(f"attached sweep: {time.monotonic() - t0:.1f} s, cells per node {out['nodes']}")


def test_an_unreachable_cluster_is_exit_2_in_one_line(shapes, tmp_path):
    address = f"127.0.0.1:{free_port()}"     # bound and released: nothing listens there
    env = ray_env(str(tmp_path / "ray"), "unused", RAY_ADDRESS=address)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "core", "sweep", "--datasets", "shapes", "--models", "resnet34",
                          "--techniques", "quantize", "--out", str(tmp_path / "report"), "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and time.monotonic() - t0 < 60
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr        # no Ray retry noise, no traceback, no silent local run
    assert f"cannot reach the Ray cluster at {address}" in lines[0]
    assert "unset RAY_ADDRESS" in lines[0] and "run on this machine" in lines[0]
    assert run.stdout == "" and not (tmp_path / "report").exists()
