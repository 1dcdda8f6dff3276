"""Where heavy work runs: a Ray instance, embedded on this machine or an existing cluster.

Nothing configured: the lab starts its own local Ray instance, sized to the machine, quietly, on
first use. `RAY_ADDRESS` (or `--ray-address`, or the instructor's sidebar setting) attaches to an
existing cluster instead; an address that does not answer is an error, never a silent fallback.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from . import settings
from .errors import LabError

CONNECT_TIMEOUT_S = 10   # a TCP probe first: ray.init itself retries an unreachable address for minutes
# environment the workers need from the process that submits (tests and classes move the cache)
FORWARDED_ENV = ("COMPRESSION_LAB_CACHE", "COMPRESSION_LAB_DATA", "COMPRESSION_LAB_OFFLINE", "OMP_WAIT_POLICY")


class ClusterUnreachable(LabError):
    """RAY_ADDRESS (or --ray-address) names a cluster that does not answer."""


@dataclass
class Engine:
    address: str          # the GCS address, or "embedded" for the lab's own instance
    local: bool           # True: the lab started this instance itself on this machine

    def info(self, node: str | None = None) -> dict:
        return {"kind": "ray", "address": self.address, "node": node or this_node(), "local": self.local}


_LOCK = threading.Lock()
_ENGINE: Engine | None = None


def configured_address(explicit: str | None = None) -> str | None:
    """--ray-address, else RAY_ADDRESS; None (or "") means the embedded default."""
    address = explicit if explicit is not None else os.environ.get("RAY_ADDRESS")
    return (address or "").strip() or None


def probe(address: str) -> None:
    """Fail within seconds with one clear line if nothing listens at host:port."""
    if address == "auto":
        return   # ray.init resolves it from this machine's running cluster, or fails at once
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    how = ("start one with `ray start --head` (docs/cluster.md), or unset RAY_ADDRESS "
           "(and --ray-address) to run on this machine")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address!r}: not a host:port address; {how}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); {how}") from None


def check_reachable(address: str | None = None) -> None:
    """Before slow local work (loading data): a configured cluster that does not answer fails now."""
    address = configured_address(address)
    if address is not None and _ENGINE is None:
        probe(address)


def worker_env() -> dict:
    """The job-level environment: workers import the lab from this checkout."""
    path = os.pathsep.join(p for p in (str(settings.PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def connect(address: str | None = None, num_cpus: int | None = None) -> Engine:
    """The engine of this process: started or attached once, then reused. `num_cpus` sizes an embedded
    instance (default: every core here; benchmarks compare 1 against 2)."""
    global _ENGINE
    address = configured_address(address)
    with _LOCK:
        if _ENGINE is not None:
            wanted = address or "embedded"
            if wanted not in (_ENGINE.address, "auto") and not (_ENGINE.local and wanted == "embedded"):
                raise LabError(f"this process already runs jobs on {_ENGINE.address}; restart it to use {wanted}")
            return _ENGINE
        if address is not None:
            probe(address)
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")   # its retry warnings would bury our one line
        _ENGINE = _in_keeper_thread(lambda: _start(address, num_cpus))
        return _ENGINE


def _start(address: str | None, num_cpus: int | None = None) -> Engine:
    import ray
    runtime_env = {"env_vars": worker_env()}
    if address is None:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR", runtime_env=runtime_env, namespace="compression-lab")
        return Engine("embedded", True)
    try:
        ctx = ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                       runtime_env=runtime_env, namespace="compression-lab")
    except Exception as exc:   # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
        raise ClusterUnreachable(f"cannot attach to the Ray cluster at {address}: {exc}".splitlines()[0]
                                 + " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token, "
                                   "docs/cluster.md); unset RAY_ADDRESS to run on this machine") from None
    return Engine(getattr(ctx, "address_info", {}).get("gcs_address") or address, False)


_KEEPER_STOP = threading.Event()


def _in_keeper_thread(start):
    """Start the engine from a thread that lives as long as the process: Ray's local daemons are killed
    when the thread that started them ends (Linux PDEATHSIG), and a Streamlit script thread ends every run."""
    out: dict = {}
    ready = threading.Event()

    def keeper():
        try:
            out["engine"] = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc
        ready.set()
        _KEEPER_STOP.wait()

    _KEEPER_STOP.clear()
    threading.Thread(target=keeper, name="lab-engine", daemon=True).start()
    ready.wait()
    if "error" in out:
        raise out["error"]
    return out["engine"]


def shutdown() -> None:
    """Stop (embedded) or detach from the engine; the next connect() starts again."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is not None:
            import ray
            ray.shutdown()
            _ENGINE = None
            _KEEPER_STOP.set()


def this_node() -> str:
    """This worker's (or driver's) node: its address and the start of its Ray node id."""
    import ray
    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"


def nodes() -> list[dict]:
    """The engine's live nodes with their CPUs and GPUs (the Class view, classroom-check)."""
    import ray
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        out.append({"node": f"{n.get('NodeManagerAddress')}/{n.get('NodeID', '')[:8]}",
                    "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0)),
                    "memory_gb": round(res.get("memory", 0) / 2 ** 30, 1)})
    return out
