"""ONNX Runtime on the CPU: the session options the lab times with, and `OrtModule`, a session behind
nn.Module's interface. Used by int8 quantization and by every deployed-runtime timing (pruning too).

An ONNX model is stored as its bytes in a uint8 tensor, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import torch
import torch.nn as nn

from .onnx_export import INPUT_NAME, OUTPUT_NAME
from .onnx_graph import runtime_graph

RUNTIME = "onnxruntime-cpu"


def session_options(threads: int):
    """CPU session options the lab times with: `threads` intra-op threads, no busy-waiting."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no busy-waiting: two sessions timed alternately (and other users of the CPU)
    # must not steal cycles from each other
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


# ORT's QDQ propagation moves a QuantizeLinear up through a max pooling, whose uint8 NHWC kernel is
# then slower than the float one: 0.15 of DenseNet-121's 1.15 ms at batch 1 (its pool0)
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]


def new_session(onnx_bytes: bytes, so):
    """A CPU session on the graph the lab runs (`runtime_graph`), with the lab's optimizer choices."""
    import onnxruntime as ort
    return ort.InferenceSession(runtime_graph(onnx_bytes), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


# How a batch of several images runs on several threads: "whole" - one run, each operator split
# across the threads; "split" - the batch cut into one part per thread, each run on a one-thread
# session at the same time. Every operator of a narrow network (a pruned DenseNet-121's 16-channel
# convolutions) is too small to share well, so splitting the batch wins for it (batch 64, 2 threads:
# 15.8 -> 11.4 ms, its unpruned teacher 38.3 -> 33.2); VGG16's 400 MB of weights would be streamed
# once per part (206 -> 221 ms). "auto" times both once on the first such batch and keeps the faster.
BATCH_PLANS = ("auto", "whole", "split")
PLAN_PROBE_IMAGES = 32   # images the auto plan is timed on (at most): its one-off cost stays small
PLAN_PROBE_ROUNDS = 3


_POOLS: dict[int, object] = {}


def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ort-split")
    return pool


class OrtModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's interface (CPU, float32 in, float32 logits out).

    Sessions are built lazily for the current torch thread count, so torch.utils.benchmark's
    `num_threads` applies to ORT the same way it does to eager PyTorch; a batch of several images
    on several threads runs by `batch_plan` (see BATCH_PLANS), and `plans` records what auto chose.
    """

    def __init__(self, onnx_bytes: bytes, label: str = "onnx", batch_plan: str = "auto"):
        super().__init__()
        if batch_plan not in BATCH_PLANS:
            raise ValueError(f"batch_plan must be one of {BATCH_PLANS}, not {batch_plan!r}")
        self.onnx_bytes = bytes(onnx_bytes)
        self.label = label
        self.batch_plan = batch_plan
        self.plans: dict[int, str] = {}   # threads -> the plan used for batches of several images
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()

    def session(self, threads: int | None = None):
        threads = threads or max(1, torch.get_num_threads())
        with self._lock:
            sess = self._sessions.get(threads)
            if sess is None:
                sess = new_session(self.onnx_bytes, session_options(threads))
                # sessions hold the weights in memory: keep this one and the one-thread session
                # (batch 1 and split batches) at most
                self._sessions = {n: s for n, s in self._sessions.items() if n == 1}
                self._sessions[threads] = sess
            return sess

    def _drop_session(self, threads: int) -> None:
        with self._lock:
            self._sessions.pop(threads, None)

    def _run_whole(self, arr: np.ndarray, threads: int) -> np.ndarray:
        return self.session(threads).run([OUTPUT_NAME], {INPUT_NAME: arr})[0]

    def _run_split(self, arr: np.ndarray, threads: int) -> np.ndarray:
        sess = self.session(1)
        parts = [p for p in np.array_split(arr, threads) if len(p)]
        outs = _pool(threads).map(lambda p: sess.run([OUTPUT_NAME], {INPUT_NAME: p})[0], parts)
        return np.concatenate(list(outs))

    def plan(self, threads: int, arr: np.ndarray | None = None) -> str:
        """The plan for batches of several images on `threads` threads (auto: timed on `arr` once)."""
        if threads == 1:
            return "whole"
        chosen = self.plans.get(threads) or (None if self.batch_plan == "auto" else self.batch_plan)
        if chosen is None:
            if arr is None:
                arr = np.zeros((PLAN_PROBE_IMAGES, 3, 32, 32), np.float32)
            probe = arr[:max(threads, PLAN_PROBE_IMAGES)]
            best = {"whole": math.inf, "split": math.inf}
            for _ in range(PLAN_PROBE_ROUNDS):   # the first round also warms each session up
                for name, run in (("whole", self._run_whole), ("split", self._run_split)):
                    t0 = time.perf_counter()
                    run(probe, threads)
                    best[name] = min(best[name], time.perf_counter() - t0)
            chosen = min(best, key=best.get)
            if chosen == "split":
                self._drop_session(threads)   # only the one-thread session is used from now on
        self.plans[threads] = chosen
        return chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # numpy makes the layout copy (latency inputs are channels-last): a torch copy would wake
        # torch's OpenMP threads, which then spin on the cores ONNX Runtime's threads need
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        threads = max(1, torch.get_num_threads())
        if threads > 1 and len(arr) > 1 and self.plan(threads, arr) == "split":
            out = self._run_split(arr, threads)
        elif threads > 1 and self.plans.get(threads) == "split":
            out = self._run_whole(arr, 1)   # one image: the one-thread session, not a second copy
        else:
            out = self._run_whole(arr, threads)
        return torch.from_numpy(out)

    def __getstate__(self):
        state = self.__dict__.copy()
        # sessions and timed plans belong to this process and machine
        state["_sessions"], state["_lock"], state["plans"] = {}, None, {}
        return state

    def __setstate__(self, state):
        state.setdefault("batch_plan", "auto")
        state.setdefault("plans", {})
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        new = OrtModule(self.onnx_bytes, self.label, self.batch_plan)
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"{self.label}, {len(self.onnx_bytes) / 1e6:.2f} MB"


def bytes_to_tensor(b: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy())


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.uint8).contiguous().numpy().tobytes()
