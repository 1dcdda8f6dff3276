"""Real int8 on the CPU: ONNX Runtime static (QDQ) post-training quantization of an exported fp32 graph
(`onnx_export`), with calibration on training images; sessions run it (`ort_session`).

Why ONNX Runtime and not torch.ao FX: measured on the lab's teachers (docs/bench_quantization.md),
ORT int8 is faster at batch 1 (vs its own fp32) and works on every teacher without model
surgery; torch.ao's eager-style quantization is deprecated upstream.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile

import torch

from ..progress import ProgressFn, emit
from .onnx_export import INPUT_NAME
from .onnx_graph import graph_index, compact, depthwise_batch_norms, store_weights_int8

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
    AVX2 AMD EPYC (docs/bench_quantization.md, 2026-12-06): 8-bit weights flipped 0.65% of a ResNet-34's
    predictions against exact int8 arithmetic, 7-bit weights none.
    """
    from ..hardware import int8_vnni
    return int8_vnni() is False


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


MATRIX_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_nodes(onnx_model, order: list[str]) -> dict[str, str]:
    """{conv/linear module name: its ONNX node's name}, given the modules in the order they run (layers.trace's
    "order"). The exporter names each node after its module's scopes (`/layer1/layer1.0/conv1/Conv`), which
    spell the module's name; where they do not (DenseNet's layers are called from a function:
    `/features/denseblock4/conv2_15/Conv`), the nodes are taken in the order they were written, which is the
    order the modules ran, each checked by the module's own name. ValueError where the graph does not line up."""
    nodes = [n.name for n in onnx_model.graph.node
             if n.op_type in MATRIX_OPS and not n.name.endswith("_dw")]   # _dw: batch norms run as convolutions
    if len(nodes) != len(order):
        raise ValueError(f"the ONNX graph has {len(nodes)} conv/linear nodes, the model {len(order)} layers")
    by_scope = {_scope_name(n): n for n in nodes}
    if set(by_scope) == set(order):
        return {m: by_scope[m] for m in order}

    def leaf(name: str) -> str:
        return re.sub(r"_\d+$", "", name.rsplit(".", 1)[-1])
    for module, node in zip(order, nodes):
        scope = node.strip("/").split("/")
        if len(scope) < 2 or leaf(scope[-2]) != leaf(module):
            raise ValueError(f"ONNX node {node} does not line up with layer {module}")
    return dict(zip(order, nodes))


def _scope_name(node: str) -> str:
    """The module name a node's scopes spell: /layer2/layer2.0/downsample/downsample.0/Conv ->
    layer2.0.downsample.0 (a Sequential's child scope repeats the Sequential's own)."""
    parts: list[str] = []
    for part in node.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    return ".".join(parts)


def _pooled_chains(g) -> set[str]:
    """Names of the convolutions on single-reader Conv/ReLU chains that end in an AveragePool."""
    _, producers, readers = graph_index(g)
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
                  reduce_range: bool = False, keep_layers=(), layer_order: list[str] | None = None) -> bytes:
    """Static int8 QDQ model: int8 weights (symmetric), uint8 activations with calibrated ranges.

    method "percentile" clips each activation range at the CALIB_PERCENTILE-th percentile of
    |x| (outliers would otherwise stretch the 256 levels); "minmax" keeps the full range.
    keep_fp32: KEEP_FP32_RULES naming layers left in fp32.
    calibration_cache: a file for the activation ranges, written by the first call and read by the next
    ones on the same model, images and method (ONNX Runtime calibrates every tensor of QUANTIZED_OPS
    whatever keep_fp32 leaves out, so trying several fp32-layer choices calibrates once).
    reduce_range: 7-bit weights, for CPUs whose int8 kernels saturate (`int8_pairs_saturate`).
    keep_layers: conv/linear modules left in fp32 by name, with `layer_order` (see `layer_nodes`).
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
            graph = _named(pre)
            excluded = fp32_nodes(graph, keep_fp32) if keep_fp32 else []
            if keep_layers:
                by_layer = layer_nodes(graph, layer_order or [])
                excluded += [by_layer[n] for n in keep_layers if by_layer[n] not in excluded]
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
