"""Real int8 on the CPU: ONNX export + ONNX Runtime static (QDQ) post-training quantization.

Why ONNX Runtime and not torch.ao FX: measured on the lab's teachers (docs/bench_quantization.md),
ORT int8 is faster at batch 1 (vs its own fp32) and works on every teacher without model
surgery; torch.ao's eager-style quantization is deprecated upstream.

The model is stored as ONNX bytes in a uint8 tensor, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import ProgressFn, emit

RUNTIME = "onnxruntime-cpu"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CALIB_BATCH = 32
# "percentile" combined with ORT's strided collection produced all-zero logit rows on ResNet-34 (CI,
# 2026-11-28), so only min/max is strided; percentile collects every batch (256 images: small).
CALIB_METHOD = "minmax"
CALIB_PERCENTILE = 99.99
# min/max ranges merge batch by batch (bounded memory); the histogram methods collect all batches
STRIDED = {"minmax": {"CalibStridedMinMax": 1}}
# The inputs of matrix ops are quantized, and a ReLU after one is folded into its output's range (ORT's
# quantizer drops it): otherwise each conv -> ReLU -> conv requantized its tensor once more through a
# DequantizeLinear -> QuantizeLinear pair (DenseNet-121, batch 1: 572 -> 488 nodes, 1.39x -> 1.52x).
# Adds, pools and concatenations are quantized only where ORT fuses them between int8 tensors.
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Relu"]
# Layers that may be kept in fp32 (`keep_fp32` rules): "first" - the convolution reading the image;
# "classifier" - the matrix op writing the logits; "1x1" - convolutions whose output maps are 1x1
# (at 32x32 input: DenseNet-121's denseblock4, the ResNets' layer4); "1x1-kxk" - only those of them with a
# k x k kernel on a 1x1 input, which sessions run as 1x1 (`centre_taps`). Their weights are still stored
# as int8 (`store_weights_int8`) and expanded to fp32 when a session is made (`expand_stored_weights`).
# "2x2" - convolutions whose output maps have at most 4 positions (DenseNet-121's denseblock3 and 4,
# transition3); "pooled" - the convolutions of a chain that only feeds an average pooling (DenseNet's
# transitions: batch norm as depthwise convolution, ReLU, 1x1 convolution; they write the features every
# layer of the next dense block reads).
KEEP_FP32_RULES = ("first", "classifier", "1x1", "1x1-kxk", "2x2", "pooled")


def int8_pairs_saturate() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels can saturate on this CPU.

    x86 without VNNI (AVX2, or AVX-512 without VNNI: older Intel, AMD before Zen 4) multiplies with
    vpmaddubsw, which adds two products in 16 bits: 255 x 127 x 2 overflows int16, while 7-bit weights
    (ORT's reduce_range) cannot (255 x 64 x 2 < 32768). VNNI and ARM accumulate in 32 bits. Measured on an
    AVX2 AMD EPYC (docs/bench_quantization.md, session 13): 8-bit weights flipped 0.65% of a ResNet-34's
    predictions against exact int8 arithmetic, 7-bit weights none.
    """
    from ..hardware import int8_vnni
    return int8_vnni() is False


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


class _UpsamplingAdaptivePool(nn.Module):
    """AdaptiveAvgPool2d whose output is a multiple of its input (VGG: 1×1 -> 7×7 at 32×32 input).

    Each output cell then covers exactly one input cell, so nearest upsampling is the same
    computation - and unlike the adaptive pool it exports to ONNX.
    """

    def __init__(self, size):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode="nearest")


class _RunningConcatDenseBlock(nn.Module):
    """A DenseNet block computed as a running concatenation: each layer reads the one tensor
    cat(input, earlier outputs) and appends its output to it.

    torchvision's block hands every layer the list of earlier outputs and concatenates inside the
    layer; exported, each layer's output then feeds every later concatenation, and ONNX Runtime gives
    each of those reads of an int8 output its own DequantizeLinear (598 per DenseNet-121 image instead
    of 58). The running form computes the same numbers (tested) and is 1.3-1.4x faster in int8 at batch
    1 (docs/bench_quantization.md, session 8).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(block.children())

    def forward(self, x):
        for layer in self.layers:
            # the layer's own forward, minus its concatenation of a one-tensor list (an exported copy);
            # dropout is off in eval mode
            bottleneck = layer.conv1(layer.relu1(layer.norm1(x)))
            x = torch.cat([x, layer.conv2(layer.relu2(layer.norm2(bottleneck)))], 1)
        return x


def _running_concat_blocks(model: nn.Module) -> nn.Module:
    """Replace torchvision DenseNet blocks by `_RunningConcatDenseBlock` (model is a copy)."""
    from torchvision.models.densenet import _DenseBlock
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _DenseBlock):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _RunningConcatDenseBlock(mod))
    return model


def _exportable(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Swap modules that the ONNX exporter rejects, or exports slowly, for equal computations
    (model is a copy)."""
    model = _running_concat_blocks(model)
    seen: dict[str, tuple] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            handles.append(mod.register_forward_pre_hook(
                lambda m, inp, name=name: seen.__setitem__(name, tuple(inp[0].shape[-2:]))))
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    for name, (h, w) in seen.items():
        mod = model.get_submodule(name)
        size = mod.output_size if isinstance(mod.output_size, (tuple, list)) else (mod.output_size,) * 2
        out = (size[0] or h, size[1] or w)  # None keeps the input size
        if (out[0] % h or out[1] % w) or (out[0] == h and out[1] == w):
            continue  # downsampling (or identity) exports fine
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _UpsamplingAdaptivePool(out))
    return model


def export_onnx(model: nn.Module, image_size=(32, 32)) -> bytes:
    """fp32 ONNX bytes of an eval-mode copy (batch dimension dynamic, spatial size fixed)."""
    import copy
    import warnings
    m = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(1, 3, *image_size)
    m = _exportable(m, example)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return buf.getvalue()


class _Reader:
    """Calibration batches for onnxruntime.quantization, reporting progress as they are consumed.

    ORT's strided collection (`CalibStridedMinMax`, used for every method) calls `set_range`
    once per batch: activation statistics are merged batch by batch instead of keeping every
    intermediate tensor of every image in memory (the percentile calibrator does that otherwise,
    and fails on a shorter last batch).
    """

    def __init__(self, images: torch.Tensor, progress: ProgressFn):
        self.images, self.progress = images, progress
        self.total = math.ceil(len(images) / CALIB_BATCH)
        self.start, self.end, self.i = 0, self.total, 0
        self.done = 0

    def __len__(self):
        return self.total

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end, self.i = start_index, min(end_index, self.total), start_index

    def get_next(self):
        if self.i >= self.end:
            return None
        if self.done == 0:
            emit(self.progress, stage="calibrate", kind="start", step=0, total=self.total)
        xb = self.images[self.i * CALIB_BATCH:(self.i + 1) * CALIB_BATCH]
        self.i += 1
        self.done += 1
        emit(self.progress, stage="calibrate", kind="batch", step=self.done, total=self.total)
        if self.done == self.total:
            emit(self.progress, stage="calibrate", kind="done")
        return {INPUT_NAME: xb.float().contiguous().numpy()}

    def rewind(self):
        self.i = self.start


class _QuietQuantizer(logging.Filter):
    """Drops onnxruntime.quantization's per-tensor warnings (logged on the root logger) while it runs."""

    def filter(self, record):
        return "onnxruntime" not in record.pathname.replace("\\", "/") or record.levelno >= logging.ERROR


def fp32_nodes(onnx_model, rules) -> list[str]:
    """Names of the matrix-op nodes that `rules` (a subset of KEEP_FP32_RULES) keep in fp32."""
    from onnx import shape_inference
    g = shape_inference.infer_shapes(onnx_model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.output) + list(g.input)}
    ops = [n for n in g.node if n.op_type in QUANTIZED_OPS]
    inputs, outputs = {v.name for v in g.input}, {v.name for v in g.output}
    pooled = _pooled_chains(g) if "pooled" in rules else set()
    keep = []
    for n in ops:
        shape = shapes.get(n.output[0], [])
        conv_map = shape[2] * shape[3] if n.op_type == "Conv" and len(shape) == 4 and all(shape[2:]) else None
        if (("first" in rules and n.input[0] in inputs)
                or ("classifier" in rules and n.output[0] in outputs)
                or ("1x1" in rules and conv_map == 1)
                or ("2x2" in rules and conv_map is not None and conv_map <= 4)
                or n.name in pooled
                or ("1x1-kxk" in rules and n.op_type == "Conv" and shapes.get(n.input[0], [])[2:] == [1, 1]
                    and any(a.name == "kernel_shape" and max(a.ints) > 1 for a in n.attribute))):
            keep.append(n.name)
    return keep


def _pooled_chains(g) -> set[str]:
    """Names of the convolutions on single-reader Conv/ReLU chains that end in an AveragePool."""
    _, producers, readers = _graph_index(g)
    found = set()
    for n in g.node:
        if n.op_type != "AveragePool":
            continue
        t = n.input[0]
        while t in producers and producers[t].op_type in ("Conv", "Relu") and len(readers.get(t, [])) == 1:
            p = producers[t]
            if p.op_type == "Conv":
                found.add(p.name)
            t = p.input[0]
    return found


def _weight_axis(node) -> int | None:
    """The output-channel axis of a Conv's or Gemm's weight (input 1), None for other layouts."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return 0 if attrs.get("transB", 0) else 1
    return None


def _graph_index(g):
    """Initializers by name, the node making each tensor, and the nodes reading each tensor."""
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    return {t.name: t for t in g.initializer}, {o: n for n in g.node for o in n.output}, readers


def store_weights_int8(model, node_names: set[str]) -> int:
    """Store the fp32 weights of `node_names` as per-channel symmetric int8 + DequantizeLinear.

    Layers kept in fp32 would otherwise keep their fp32 weights in the file (DenseNet-121's
    denseblock4: 6 MB, file ratio 3.8x -> 2.0x). ONNX Runtime never constant-folds DequantizeLinear,
    so `expand_stored_weights` does it before a session is made. Returns how many weights.
    """
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    inits, _, readers = _graph_index(g)
    new_nodes = []
    for n in g.node:
        axis = _weight_axis(n)
        if (n.name not in node_names or axis is None or len(n.input) < 2 or n.input[1] not in inits
                or len(readers[n.input[1]]) != 1 or inits[n.input[1]].data_type != TensorProto.FLOAT):
            continue
        name = n.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        g.initializer.append(numpy_helper.from_array(scale, name + "_scale"))
        # no zero point: DequantizeLinear's default is 0 of the weight's type
        new_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale"], [name + "_fp32"], axis=axis))
        n.input[1] = name + "_fp32"
    if new_nodes:
        nodes = new_nodes + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    return len(new_nodes)


def _rewritten(onnx_bytes: bytes, needs: bytes, rewrite) -> bytes:
    """The bytes after an in-place graph `rewrite` (returning whether it changed anything); skipped
    without parsing when the serialized model does not even contain `needs`."""
    import onnx
    if needs not in onnx_bytes:
        return onnx_bytes
    model = onnx.load_from_string(onnx_bytes)
    return model.SerializeToString() if rewrite(model) else onnx_bytes


def depthwise_batch_norms(onnx_bytes: bytes) -> bytes:
    """Each batch norm that the exporter could not fold into a convolution, as the equal depthwise 1x1
    convolution (weight gamma / sqrt(var + eps), bias beta - mean * weight).

    DenseNet's batch norms come before their ReLU and convolution. ONNX Runtime has no int8 batch
    norm, so each one ran in fp32 between a DequantizeLinear and a QuantizeLinear, with layout
    transposes around it; as a convolution it is quantized (its per-channel int8 weight is exact),
    its ReLU folds into it, and the concatenations between int8 tensors fuse into QLinearConcat.
    DenseNet-121, batch 1, trained on CIFAR-10: 488 -> 264 nodes with every layer in int8.
    """
    return _rewritten(onnx_bytes, b"BatchNormalization", _batch_norms_as_depthwise)


def _batch_norms_as_depthwise(model) -> bool:
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, _ = _graph_index(g)

    def const(name):
        while name not in inits and name in made_by and made_by[name].op_type == "Identity":
            name = made_by[name].input[0]   # the exporter shares equal tensors through Identity nodes
        return numpy_helper.to_array(inits[name]).astype(np.float64) if name in inits else None

    done = 0
    for i, n in enumerate(g.node):
        params = [const(x) for x in n.input[1:]] if n.op_type == "BatchNormalization" else []
        if len(params) != 4 or any(p is None for p in params) or len(n.output) != 1:
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = params
        a = scale / np.sqrt(var + eps)
        w, b = f"bn_dw_{done}_w", f"bn_dw_{done}_b"
        g.initializer.extend([numpy_helper.from_array(a.reshape(-1, 1, 1, 1).astype(np.float32), w),
                              numpy_helper.from_array((bias - mean * a).astype(np.float32), b)])
        g.node[i].CopyFrom(helper.make_node("Conv", [n.input[0], w, b], list(n.output), name=n.name + "_dw",
                                            group=len(a), kernel_shape=[1, 1]))
        done += 1
    if done:
        used = {x for n in g.node for x in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return done > 0


def expand_stored_weights(onnx_bytes: bytes) -> bytes:
    """Fold each DequantizeLinear of a constant int8 weight whose layer reads a float activation
    (written by `store_weights_int8`) into an fp32 initializer. Weights of int8 layers (their
    activation comes from a DequantizeLinear too) are left to ONNX Runtime's int8 kernels."""
    return _rewritten(onnx_bytes, b"DequantizeLinear", _expand_stored)


def _expand_stored(model) -> bool:
    """`expand_stored_weights` on a loaded model, in place; whether anything changed."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    inits, made_by, readers = _graph_index(g)
    graph_inputs = {v.name for v in g.input}
    fold = []
    for n in g.node:
        if (n.op_type != "DequantizeLinear" or not all(x in inits for x in n.input)
                or inits[n.input[0]].data_type != onnx.TensorProto.INT8):
            continue
        users = readers.get(n.output[0], [])
        if users and all(u.input[0] in graph_inputs or (u.input[0] in made_by and
                                                        made_by[u.input[0]].op_type != "DequantizeLinear")
                         for u in users):
            fold.append(n)
    if not fold:
        return False
    for n in fold:
        q, scale = (numpy_helper.to_array(inits[x]) for x in n.input[:2])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        zero = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros_like(scale)
        w = (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)
        g.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
    dead = {x for n in fold for x in n.input}
    folded = {id(n) for n in fold}
    keep = [n for n in g.node if id(n) not in folded]
    del g.node[:]
    g.node.extend(keep)
    still_used = {x for n in g.node for x in n.input}
    kept = [t for t in g.initializer if t.name not in dead or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return True


def runtime_graph(onnx_bytes: bytes) -> bytes:
    """The graph a session runs: int8-stored fp32 weights expanded, and convolutions that only ever see
    a 1x1 map cut to their centre tap. The stored file (and the size the lab reports) is unchanged."""
    import onnx
    if b"Conv" not in onnx_bytes and b"DequantizeLinear" not in onnx_bytes:
        return onnx_bytes
    model = onnx.load_from_string(onnx_bytes)   # parsed once: a VGG16 file is 0.5 GB
    changed = _expand_stored(model) if b"DequantizeLinear" in onnx_bytes else False
    changed = _cut_centre_taps(model) or changed
    return model.SerializeToString() if changed else onnx_bytes


def _spatial_shapes(model) -> dict[str, list[int]]:
    """Tensor shapes by ONNX shape inference, without copying large weights into the inference."""
    from onnx import shape_inference
    held = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > 4096:   # shapes come from dims; small constants (shape tensors) keep their data
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        g = shape_inference.infer_shapes(model).graph
    finally:
        for t in model.graph.initializer:
            if t.name in held:
                t.raw_data = held[t.name]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.value_info) + list(g.input) + list(g.output)}


def centre_taps(onnx_bytes: bytes) -> bytes:
    """Cut each k x k convolution whose input map is 1x1 (padding k//2, no dilation) to a 1x1 one.

    At the lab's 32x32 input, ResNets reach 1x1 maps in layer4 and DenseNet-121 in denseblock4: there
    a padded 3x3 convolution only ever multiplies its centre weight by data, the other eight by the
    zero padding (five of ResNet-34's layer4 convolutions: 10.5 M of the model's 21.3 M weights).
    Same outputs; the int8 ResNet-34 then fits the CPU cache (docs/bench_quantization.md, session 9).
    """
    return _rewritten(onnx_bytes, b"Conv", _cut_centre_taps)


def _cut_centre_taps(model) -> bool:
    """`centre_taps` on a loaded model, in place; whether anything changed."""
    import onnx
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, readers = _graph_index(g)

    def attrs(n):
        return {a.name: list(a.ints) for a in n.attribute if a.type == onnx.AttributeProto.INTS}

    candidates = [n for n in g.node if n.op_type == "Conv"
                  and any(k > 1 for k in attrs(n).get("kernel_shape", []))]
    if not candidates:
        return False
    shapes = _spatial_shapes(model)
    done = 0
    for n in candidates:
        a = attrs(n)
        k = a["kernel_shape"]
        if (len(k) != 2 or any(v % 2 == 0 for v in k)
                or shapes.get(n.input[0], [])[2:] != [1, 1]
                or a.get("pads", [0] * 4) != [k[0] // 2, k[1] // 2] * 2
                or any(d != 1 for d in a.get("dilations", [1, 1]))):
            continue
        weight = n.input[1]
        if len(readers.get(weight, [])) != 1:
            continue   # a weight shared by several convolutions (the exporter merges equal ones, e.g. zeros)
        if weight not in inits and weight in made_by and made_by[weight].op_type == "DequantizeLinear":
            weight = made_by[weight].input[0]    # an int8 weight: its per-output-channel scales still apply
        if weight not in inits or len(readers.get(weight, [])) != 1:
            continue
        w = numpy_helper.to_array(inits[weight])
        c0, c1 = k[0] // 2, k[1] // 2
        inits[weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, :, c0:c0 + 1, c1:c1 + 1]), weight))
        for attr in list(n.attribute):
            if attr.name in ("kernel_shape", "pads", "auto_pad"):
                n.attribute.remove(attr)
        n.attribute.extend([helper.make_attribute("kernel_shape", [1, 1]),
                            helper.make_attribute("pads", [0, 0, 0, 0])])
        done += 1
    return done > 0


def _named(path: str):
    """The model at `path`, its unnamed nodes given a name there too (quantize_static excludes by name)."""
    import onnx
    model = onnx.load(path)
    if not all(n.name for n in model.graph.node):
        for i, n in enumerate(model.graph.node):
            n.name = n.name or f"{n.op_type}_{i}"
        onnx.save(model, path)
    return model


def quantize_int8(fp32_onnx: bytes, calib_images: torch.Tensor, per_channel: bool = True,
                  progress: ProgressFn = None, method: str = CALIB_METHOD,
                  percentile: float | None = None, keep_fp32=(), calibration_cache: str | None = None,
                  reduce_range: bool = False) -> bytes:
    """Static int8 QDQ model: int8 weights (symmetric), uint8 activations with calibrated ranges.

    method "percentile" clips each activation range at the CALIB_PERCENTILE-th percentile of
    |x| (outliers would otherwise stretch the 256 levels); "minmax" keeps the full range.
    keep_fp32: KEEP_FP32_RULES naming layers left in fp32.
    calibration_cache: a file for the activation ranges, written by the first call and read by the next
    ones on the same model, images and method (ONNX Runtime calibrates every tensor of QUANTIZED_OPS
    whatever keep_fp32 leaves out, so trying several fp32-layer choices calibrates once).
    reduce_range: 7-bit weights, for CPUs whose int8 kernels saturate (`int8_pairs_saturate`).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    class Reader(_Reader, CalibrationDataReader):
        pass

    if method != "minmax" and len(calib_images) > CALIB_BATCH:
        # the histogram calibrators stack batches and fail on a shorter last one
        calib_images = calib_images[:len(calib_images) - len(calib_images) % CALIB_BATCH]

    quiet = _QuietQuantizer()
    logging.getLogger().addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="lab-int8-") as tmp:
            src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            with open(src, "wb") as f:
                f.write(depthwise_batch_norms(fp32_onnx))
            try:
                # shape inference + constant folding first, as ORT recommends before static quantization
                quant_pre_process(src, pre, skip_symbolic_shape=True)
            except Exception:
                pre = src
            import onnx
            excluded = fp32_nodes(_named(pre), keep_fp32) if keep_fp32 else []
            calib = {"minmax": (CalibrationMethod.MinMax, {}),
                     "percentile": (CalibrationMethod.Percentile,
                                    {"CalibPercentile": percentile or CALIB_PERCENTILE})}[method]
            with contextlib.redirect_stdout(io.StringIO()):   # the histogram calibrators print
                quantize_static(pre, dst, Reader(calib_images, progress), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=calib[0],
                                op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded,
                                extra_options={**STRIDED.get(method, {}), **calib[1]},
                                calibration_cache_path=calibration_cache, reduce_range=reduce_range)
            model = onnx.load(dst)
            store_weights_int8(model, set(excluded))
            return compact(model.SerializeToString())
    finally:
        logging.getLogger().removeFilter(quiet)


def compact(onnx_bytes: bytes) -> bytes:
    """Short tensor names, no node names or doc strings, no quantization parameter a session can compute
    (`slim_quant_params`): the same computation, a smaller file.

    A QDQ graph names every scale, zero point and intermediate tensor after its layer, which
    adds ~0.5 MB to a DenseNet-121 (ratio 3.56× -> 3.76×). Graph inputs/outputs keep their names.
    """
    import onnx
    model = onnx.load_from_string(onnx_bytes)
    slim_quant_params(model)
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return onnx_bytes   # subgraphs would need recursive renaming
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for n in g.node:
        n.name, n.doc_string = "", ""
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
    for t in g.initializer:
        t.name = short(t.name)
    del g.value_info[:]
    model.doc_string = ""
    return model.SerializeToString()


def slim_quant_params(model) -> int:
    """Store no quantization parameter that a session can compute when it loads: per-channel zero points
    that are all zero become ConstantOfShape nodes, and each int32 bias's scale, which ORT's quantizer
    sets to input scale x weight scale, becomes a Mul of the two (both folded when the session loads).

    With DenseNet-121's batch norms as depthwise convolutions, these were 5% of its int8 file
    (0.38 MB: file ratio 3.66x -> 3.87x). Only exact matches are replaced; returns how many tensors.
    """
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, readers = _graph_index(g)
    new_nodes, dead, made = [], set(), {}

    def only_dq_reads(name):
        return all(r.op_type == "DequantizeLinear" for r in readers.get(name, []))

    def zeros(dtype, n):
        key = (dtype, n)
        if key not in made:
            shape = f"qp_shape_{n}"
            if shape not in inits:
                inits[shape] = numpy_helper.from_array(np.array([n], dtype=np.int64), shape)
                g.initializer.append(inits[shape])
            made[key] = f"qp_zeros_{n}_{dtype}"
            new_nodes.append(helper.make_node("ConstantOfShape", [shape], [made[key]], value=helper.make_tensor(
                "value", dtype, [1], [0])))
        return made[key]

    done = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3:
            continue
        zp = n.input[2]
        if zp in inits and only_dq_reads(zp) and math.prod(inits[zp].dims) > 1:
            z = numpy_helper.to_array(inits[zp])
            if z.ndim == 1 and not z.any():
                dead.add(zp)
                n.input[2] = zeros(inits[zp].data_type, len(z))
                done += 1
        scale = _bias_scale_product(n, inits, made_by, readers)
        if scale is not None:
            dead.add(n.input[1])
            name = n.input[1] + "_product"
            new_nodes.append(helper.make_node("Mul", list(scale), [name]))
            n.input[1] = name
            done += 1
    if done:
        still = {x for m in list(g.node) + new_nodes for x in m.input}
        keep = [t for t in g.initializer if t.name not in dead or t.name in still]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = new_nodes + list(g.node)   # the constants first: nodes stay topologically sorted
        del g.node[:]
        g.node.extend(nodes)
    return done


def _bias_scale_product(dq, inits, made_by, readers):
    """(input scale, weight scale) names when `dq` dequantizes a Conv/Gemm int32 bias whose stored scale is
    exactly their float32 product, else None."""
    from onnx import TensorProto, numpy_helper
    bias, scale = dq.input[0], dq.input[1]
    users = readers.get(dq.output[0], [])
    if (bias not in inits or inits[bias].data_type != TensorProto.INT32 or scale not in inits
            or len(readers.get(scale, [])) != 1 or len(users) != 1 or users[0].op_type not in ("Conv", "Gemm")
            or len(users[0].input) < 3 or users[0].input[2] != dq.output[0]):
        return None
    sources = [made_by.get(x) for x in users[0].input[:2]]
    if any(s is None or s.op_type != "DequantizeLinear" or s.input[1] not in inits for s in sources):
        return None
    x_scale, w_scale = (numpy_helper.to_array(inits[s.input[1]]) for s in sources)
    if x_scale.size != 1 or x_scale.dtype != np.float32 or w_scale.dtype != np.float32:
        return None
    stored = numpy_helper.to_array(inits[scale])
    product = x_scale * w_scale
    if product.shape != stored.shape or not np.array_equal(product, stored):
        return None
    return sources[0].input[1], sources[1].input[1]


def bytes_to_tensor(b: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy())


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.uint8).contiguous().numpy().tobytes()


def onnx_summary(onnx_bytes: bytes) -> dict:
    """What got quantized: int8 weights vs float tensors left, and conv/matmul nodes reading int8 weights."""
    import onnx
    from onnx import TensorProto
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    int8_params = sum(math.prod(t.dims) for t in g.initializer
                      if t.data_type in (TensorProto.INT8, TensorProto.UINT8))
    float_params = sum(math.prod(t.dims) for t in g.initializer
                       if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE))
    int8_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8}
    compute = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    return {"int8_params": int(int8_params), "float_params_left": int(float_params),
            "compute_ops": len(compute),
            # int8 kernels: int8 weights and a quantized input (layers kept in fp32 only store int8 weights)
            "int8_compute_ops": sum(1 for n in compute if len(n.input) > 1 and n.input[1] in int8_dq
                                    and n.input[0] in dq_out)}
