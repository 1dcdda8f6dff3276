"""Quantization: simulated low-bit weights (any width 1-16), real int8 on the CPU, fp16/bf16.

Modes
- fake: conv/linear weights rounded to a symmetric `bits`-bit grid (per output channel by default;
  1 bit = sign × per-channel scale); optional activation fake-quantization with `act_bits`,
  calibrated on training images; batch-norm statistics corrected for the rounded weights
  (bn_correction). Size is the bit-packed size; latency stays fp32 (simulation).
- int8: ONNX export + ONNX Runtime static post-training quantization (int8 weights, uint8
  activations, calibrated); the fp32 baseline is re-timed as an fp32 ONNX Runtime session.
- fp16 / bf16: a half-precision copy run by PyTorch on the CPU.

Parameters that do not apply to the chosen mode are reset to their defaults (so the cache
key does not depend on them): bits/bn_correction/activations/act_bits only matter in fake mode,
granularity in fake and int8 mode, calibration_images when something is calibrated.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
import torch.nn as nn

from .. import layers as layers_mod
from .. import metrics
from ..errors import InvalidParameter, LabError
from ..models import build_model, get_spec
from ..progress import emit
from ..training import bf16_training_supported, evaluate_accuracy
from . import bn_correction, equalize, onnx_export, onnx_graph, ort_session, qat, quant_fake, quant_ort
from . import register
from .base import Context, ParamSpec, TechniqueOutput, TechniqueSpec, calibration_images

MODES = ("fake", "int8", "fp16", "bf16")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# int8 layers left in fp32, as quant_ort.KEEP_FP32_RULES
FP32_LAYERS = {"none": (), "classifier": ("classifier",), "edges": ("first", "classifier"),
               "edges+1x1-kxk": ("first", "classifier", "1x1-kxk"), "edges+1x1": ("first", "classifier", "1x1"),
               "edges+2x2+pooled": ("first", "classifier", "2x2", "pooled"),
               "sensitivity": ("classifier",)}   # and the layers the scan found most fragile (SENSITIVE_FP32_COUNTS)
# fp32_layers=sensitivity: how many of the most fragile layers (sensitivity scan of the weights at 8-2 bits) to
# keep in fp32 besides the classifier, tried in this order until int8 agrees with fp32 (AUTO_MIN_AGREEMENT)
SENSITIVE_FP32_COUNTS = (0, 1, 2, 4, 8)

PARAMS = [
    ParamSpec("mode", "choice", "fake", choices=MODES,
              help="fake: simulated low-bit weights (any bit width); int8: real int8 model run by "
                   "ONNX Runtime on the CPU; fp16/bf16: half-precision copy"),
    ParamSpec("bits", "int", 8, 1, 16, step=1,
              help="weight bit width in fake mode (1 = binary: sign × per-channel scale)"),
    ParamSpec("granularity", "choice", "per_channel", choices=("per_channel", "per_tensor"),
              help="one symmetric weight scale per output channel, or one per layer (fake and int8)"),
    ParamSpec("bn_correction", "bool", True,
              help="fake mode: move each batch norm's statistics by as much as the rounded weights moved its "
                   f"input, measured on {bn_correction.IMAGES} training images (4-bit ResNet-50 on CIFAR-10: "
                   "3.0 -> 0.5 points lost)"),
    ParamSpec("activations", "bool", False,
              help="fake mode: also fake-quantize layer inputs with act_bits, calibrated on training images"),
    ParamSpec("act_bits", "int", 8, 2, 16, step=1,
              help="activation bit width when activations is on (fake mode; int8 mode always uses 8)"),
    ParamSpec("calibration_images", "int", 256, 16, 5000, step=16,
              help="training images used to calibrate activation ranges (int8, or fake with activations)"),
    ParamSpec("calibration", "choice", "auto", choices=("auto", "minmax", "p99.9", "p99.5"),
              help="int8 activation ranges: min/max of the calibration images, or clipped at the 99.9th / "
                   "99.5th percentile (outliers then cost less resolution); auto: p99.9 for DenseNet, "
                   "min/max otherwise (measured, docs/bench_quantization.md)"),
    ParamSpec("equalize", "bool", True,
              help="int8 mode, DenseNets: before quantizing, rescale channels (the same model in fp32) so that one "
                   "int8 scale per tensor fits them all: equalize batch norm -> convolution pairs and centre and "
                   "scale the features written into concatenations (docs/bench_quantization.md)"),
    ParamSpec("qat_epochs", "int", 0, 0, 20, step=1,
              help="int8 mode: epochs of quantization-aware fine-tuning before converting (activations rounded "
                   "to 8 bits in training, core/techniques/qat.py): for models that lose too much in int8 "
                   "(a fragile Shapes DenseNet-121 with edges+1x1 in fp32: 7.6 points lost, 1.45 after 2 epochs, 10.9 "
                   "after 4: docs/bench_quantization.md); costs training time"),
    ParamSpec("qat_lr", "float", 0.001, 1e-5, 1.0, step=0.001,
              help="int8 mode: peak learning rate of quantization-aware fine-tuning"),
    ParamSpec("qat_subset", "int", 0, 0, 1_000_000, step=500,
              help="int8 mode: training images per epoch of quantization-aware fine-tuning (0 = all)"),
    ParamSpec("fp32_layers", "choice", "auto", choices=tuple(FP32_LAYERS) + ("auto",),
              help="int8 mode: layers left in fp32 (their weights are still stored as int8): classifier = the "
                   "logits layer; edges = also the first convolution; +1x1-kxk also the 3×3 convolutions on 1×1 "
                   "maps; +1x1 every convolution on 1×1 maps (more accurate, slower); +2x2+pooled every convolution on maps "
                   "of 2×2 or less and every layer between a concatenation and an average pooling (DenseNet's "
                   "transitions; most accurate, slowest); auto: classifier, and for DenseNet-121 the first of edges, edges+1x1, "
                   "edges+2x2+pooled whose int8 model agrees with fp32 on at least 90% of the calibration "
                   "images (else the one that agrees most; measured, docs/bench_quantization.md); sensitivity: "
                   "the classifier and the 0, 1, 2, 4 or 8 layers the sensitivity scan finds most fragile, the "
                   "fewest that agree as well, then auto's candidates (docs/sensitivity.md)"),
    ParamSpec("weight_range", "choice", "auto", choices=("auto", "8bit", "7bit"),
              help="int8 mode: weights on the full int8 grid (8bit) or on 7 bits (ONNX Runtime's reduce_range). "
                   "CPUs without VNNI (AVX2, or AVX-512 without VNNI) add int8 products in pairs in 16 bits, "
                   "which saturate with 8-bit weights and cannot with 7; auto: 7bit on such a CPU, 8bit "
                   "elsewhere (measured, docs/bench_quantization.md)"),
    ParamSpec("allocation", "choice", "uniform", choices=("uniform", "sensitivity"),
              help="fake mode: uniform: every layer at `bits`; sensitivity: mixed precision, each layer's weights at "
                   "2-8 bits chosen from the sensitivity scan (core/sensitivity.py, 500 training images) so that the "
                   "average weighted by parameters is at most `bits` (2-8); int8 mode: sensitivity = fp32_layers "
                   "sensitivity; docs/sensitivity.md"),
]
# "auto" calibration and fp32 layers are per architecture, on its ModelSpec (int8_calibration,
# int8_fp32_layers; measured in docs/bench_quantization.md). Of the fp32-layer candidates, the first whose int8
# model agrees with fp32 on at least AUTO_MIN_AGREEMENT of the calibration images is kept, else the one that
# agrees most.
AUTO_MIN_AGREEMENT = 0.9
# Shown with every int8 result made on a CPU without VNNI (2026-12-06, AVX2 AMD EPYC, Shapes ResNet-34:
# batch 1 1.55x faster than fp32, against 3.2x on the AVX-512 VNNI Intel Xeon on 2026-11-29)
NO_VNNI_NOTE = ("This CPU has no VNNI (8-bit dot-product instructions): ONNX Runtime multiplies int8 through "
                "16-bit intermediate sums, so int8 gains less speed here than on newer CPUs (about 1.5x at batch "
                "1 for a ResNet-34 on an AVX2 CPU, 3x and more with VNNI), and ")
NO_VNNI_WEIGHTS = {"7bit": "its weights use 7 bits so that those sums cannot overflow.",
                   "8bit": "with 8-bit weights those sums can saturate (weight_range 7bit avoids it)."}
_DEFAULTS = {p.name: p.default for p in PARAMS}


def _normalise(p: dict) -> None:
    """Reset parameters that the chosen mode ignores, so equal work shares one cache entry."""
    mode = p["mode"]
    ignored = set()
    if mode != "fake":
        ignored |= {"bits", "activations", "act_bits", "bn_correction"}
    if mode != "int8":
        ignored |= {"calibration", "fp32_layers", "equalize", "qat_epochs", "qat_lr", "qat_subset",
                    "weight_range"}
    if mode == "int8" and p["qat_epochs"] == 0:
        ignored |= {"qat_lr", "qat_subset"}
    if mode in ("fp16", "bf16"):
        ignored |= {"granularity", "calibration_images"}
    if mode == "fake" and not p["activations"]:
        ignored |= {"act_bits", "calibration_images"}
    for k in ignored:
        p[k] = _DEFAULTS[k]
    if mode == "int8" and "sensitivity" in (p.get("allocation"), p["fp32_layers"]):
        # real int8 allocates by the scan the one thing it can: which layers stay in fp32 (one cache key for both
        # spellings)
        if p["fp32_layers"] not in ("auto", "sensitivity"):
            raise InvalidParameter("fp32_layers", p["fp32_layers"], "auto or sensitivity with allocation=sensitivity "
                                   "(int8 chooses its fp32 layers from the scan)")
        p["allocation"] = p["fp32_layers"] = "sensitivity"
    if p.get("allocation", "uniform") == "uniform":
        p.pop("allocation", None)   # absent when uniform: every result key made before allocation existed holds
    elif mode not in ("fake", "int8"):
        raise InvalidParameter("allocation", p["allocation"], "uniform in mode " + mode +
                               " (per-layer bit widths are simulated: mode=fake; int8 keeps its most fragile layers in fp32)")
    elif mode == "fake" and not 2 <= p["bits"] <= 8:
        raise InvalidParameter("bits", p["bits"], "from 2 to 8 with allocation=sensitivity (the average of "
                                                  "per-layer widths from 2 to 8)")


# ----------------------------------------------------------------------------- helpers
def _teacher_copy(ctx: Context) -> nn.Module:
    return copy.deepcopy(ctx.teacher.model).cpu().float().eval()


def _fp32_file_bytes(ctx: Context) -> int:
    path = getattr(ctx.teacher, "path", None)
    if path and os.path.exists(path):
        return os.path.getsize(path)
    return len(metrics.serialized_bytes(ctx.teacher.model))


_COUNTS: dict = {}   # fp32 architecture counts by teacher checksum: counting MACs traces the model


def _counts(ctx: Context, model: nn.Module) -> dict:
    """MACs and parameter counts of the fp32 architecture (the teacher's record when it has one)."""
    key = ctx.teacher.meta.get("sha256")
    if key and key in _COUNTS:
        return dict(_COUNTS[key])
    known = ctx.teacher.meta.get("metrics") or {}
    counts = {"macs": int(known.get("macs") or metrics.count_macs(model)),
              "params": metrics.count_params(model), "nonzero_params": metrics.count_nonzero_params(model)}
    if key:
        _COUNTS[key] = counts
    return dict(counts)


def _arch(ctx: Context) -> tuple[str, int]:
    meta = ctx.teacher.meta
    return meta["model"], int(meta.get("num_classes", ctx.data.num_classes))


# ----------------------------------------------------------------------------- fake
def _apply_fake(ctx: Context, p: dict) -> TechniqueOutput:
    bits, per_channel = p["bits"], p["granularity"] == "per_channel"
    model = _teacher_copy(ctx)
    counts = _counts(ctx, model)
    layer_bits = _sensitivity_bits(ctx, p, model) if p.get("allocation") == "sensitivity" else None
    emit(ctx.progress, stage="quantize", kind="message",
         message=f"rounding conv/linear weights to {bits} bits ({p['granularity'].replace('_', ' ')})"
         if layer_bits is None else f"rounding conv/linear weights to 2-8 bits per layer, {bits} on average")
    record = quant_fake.fake_quantize_weights(model, bits, per_channel, layer_bits)
    corrected = 0
    if p["bn_correction"]:
        corrected = bn_correction.correct_against_teacher(model, ctx)
    state = {"format": "fake-quant", "bits": bits, "per_channel": per_channel, "weights": record,
             "other": {k: v for k, v in model.state_dict().items()
                       if k not in {f"{n}.weight" for n in record["names"]}}}
    act_layers, n_calib = 0, None
    if p["activations"]:
        quantizer = quant_fake.ActivationQuantizer(model, p["act_bits"])
        images = calibration_images(ctx.data, p["calibration_images"])
        emit(ctx.progress, stage="calibrate", kind="message",
             message=f"calibrating {p['act_bits']}-bit activation ranges on {len(images)} training images")
        quant_fake.calibrate(model, images, quantizer, ctx.progress)
        n_calib = len(images)
        state["activations"] = quantizer.state()
        act_layers = len(quantizer.qparams)
        model._activation_quantizer = quantizer  # keeps the hooks' owner alive with the model
    size = quant_fake.packed_size(model, bits, record, act_layers)
    fp32_bytes = _fp32_file_bytes(ctx)
    extra = dict(size, mode="fake", bits=bits, granularity=p["granularity"],
                 activation_bits=p["act_bits"] if p["activations"] else None, calibration_images=n_calib,
                 fp32_file_bytes=fp32_bytes, packed_ratio=fp32_bytes / max(1, size["packed_bytes"]),
                 quantized_layers=len(record["names"]), corrected_batch_norms=corrected)
    unit = "bit" if bits == 1 else "bits"
    notes = [f"Simulated quantization: weights take {bits} {unit} each in the packed size, but the model "
             "still computes in fp32, so its latency is that of the original."]
    if layer_bits is not None:   # {layer: bits} chosen from the sensitivity scan
        sizes = {n: math.prod(s) for n, s in zip(record["names"], record["shapes"])}
        extra.update(allocation=dict(layer_bits),
                     average_bits=sum(layer_bits[n] * sizes[n] for n in sizes) / max(1, sum(sizes.values())))
        notes[0] = (f"Mixed precision: each layer's weights take 2-8 bits, chosen from the sensitivity scan (500 "
                    f"training images), {extra['average_bits']:.2f} on average (target {bits}; extra.allocation "
                    "lists them); the model still computes in fp32, so its latency is that of the original.")
    return TechniqueOutput(model=model, state=state, size_bytes=size["packed_bytes"], extra=extra,
                           notes=notes, **counts)


def _sensitivity_bits(ctx: Context, p: dict, model: nn.Module) -> dict[str, int]:
    """allocation=sensitivity: {layer: bits} with an average weighted by parameters of at most p["bits"]."""
    from .. import allocation
    scan = allocation.allocation_scan(ctx.teacher, ctx.data, "quantize", p["granularity"], ctx.progress)
    scanned = {r["name"] for r in scan["layers"]}
    sizes = {n: m.weight.numel() for n, m in quant_fake.quantizable_layers(model) if n in scanned}
    return allocation.allocate_bits(scan, p["bits"], sizes)


def _load_fake(state: dict, ctx: Context) -> nn.Module:
    name, num_classes = _arch(ctx)
    model = build_model(name, num_classes).eval()
    missing, unexpected = model.load_state_dict(state["other"], strict=False)
    weights = {f"{n}.weight" for n in state["weights"]["names"]}
    if unexpected or set(missing) - weights:
        raise LabError(f"saved quantized model does not fit {name}")
    quant_fake.restore_weights(model, state["weights"], state["bits"], state["per_channel"])
    if "activations" in state:
        quantizer = quant_fake.ActivationQuantizer(model, int(state["activations"]["bits"]))
        quantizer.load(state["activations"])
        model._activation_quantizer = quantizer
    return model


# ----------------------------------------------------------------------------- int8 (ONNX Runtime)
def _apply_int8(ctx: Context, p: dict) -> TechniqueOutput:
    model = _teacher_copy(ctx)
    counts = _counts(ctx, model)   # the counters cannot read an ONNX model; the architecture is the same
    fp32_bytes = _fp32_file_bytes(ctx)
    extra = {"mode": "int8", "granularity": p["granularity"], "fp32_file_bytes": fp32_bytes,
             "calibration_images": p["calibration_images"]}
    emit(ctx.progress, stage="quantize", kind="message", message="exporting to ONNX")
    try:
        fp32_onnx = onnx_export.export_onnx(model)
    except Exception as exc:
        note = (f"int8: {_arch(ctx)[0]} could not be exported to ONNX ({type(exc).__name__}: "
                f"{str(exc)[:160]}); kept the fp32 PyTorch model, nothing was quantized")
        return TechniqueOutput(model=model, state={"format": "torch-fp32", "state_dict": model.state_dict()},
                               extra=dict(extra, quantized=False), notes=[note], **counts)
    baseline = ort_session.OrtModule(fp32_onnx, "fp32")
    images = calibration_images(ctx.data, p["calibration_images"])
    extra["calibration_images"] = len(images)
    emit(ctx.progress, stage="calibrate", kind="message",
         message=f"calibrating int8 activation ranges on {len(images)} training images")
    source, history = _int8_source(ctx, p, model, images, extra)
    notes = []
    try:
        calib = extra["calibration"] = resolve_calibration(p["calibration"], _arch(ctx)[0])
        method, pct = ("minmax", None) if calib == "minmax" else ("percentile", float(calib[1:]))
        source_onnx = onnx_export.export_onnx(source) if source is not model or history else fp32_onnx
        # after fine-tuning, int8 is to be faithful to the fine-tuned fp32 model, not to the teacher
        reference = ort_session.OrtModule(source_onnx, "fp32") if history else baseline
        if history:   # what fine-tuning alone did, on the images the result is measured on
            extra["qat_fp32_accuracy"] = evaluate_accuracy(reference, ctx.data, *ctx.data.eval_split(ctx.eval_size))
        int8_onnx, qmodel, agree = _convert_choosing_fp32_layers(ctx, p, source_onnx, images, reference,
                                                                 (method, pct), extra, notes)
        extra.update(quantized=True, calibration_argmax_agreement=agree, **onnx_graph.onnx_summary(int8_onnx))
        if quant_ort.int8_pairs_saturate():
            notes.append(NO_VNNI_NOTE + NO_VNNI_WEIGHTS[extra["weight_range"]])
        if agree < 0.9:
            notes.append(f"int8 predictions agree with fp32 on only {agree:.0%} of the calibration images")
        state = {"format": "onnx", "precision": "int8", "onnx": ort_session.bytes_to_tensor(int8_onnx)}
    except InvalidParameter:
        raise
    except Exception as exc:
        notes.append(f"int8: quantizing {_arch(ctx)[0]} failed ({type(exc).__name__}: {str(exc)[:160]}); "
                     "kept the fp32 ONNX model, nothing was quantized")
        qmodel = baseline
        extra.update(quantized=False)
        state = {"format": "onnx", "precision": "fp32", "onnx": ort_session.bytes_to_tensor(fp32_onnx)}
    extra["fp32_onnx_bytes"] = len(fp32_onnx)
    return TechniqueOutput(model=qmodel, state=state, eval_device="cpu", runtime=ort_session.RUNTIME,
                           baseline_model=baseline, extra=extra, notes=notes, history=history, **counts)


def _int8_source(ctx: Context, p: dict, model: nn.Module, images: torch.Tensor, extra: dict):
    """The fp32 model int8 is made from: `model` equalized (DenseNets) and, with qat_epochs, fine-tuned
    with rounded activations (in place: `model` is the teacher's copy); and the fine-tuning history."""
    source, extra["equalized_layers"] = equalize.equalize_densenet(model, images) if p["equalize"] else (model, 0)
    if extra["equalized_layers"]:
        emit(ctx.progress, stage="quantize", kind="message",
             message=f"equalized {extra['equalized_layers']} layers for one int8 scale per tensor")
    history = []
    if p["qat_epochs"]:
        emit(ctx.progress, stage="quantize", kind="message",
             message=f"fine-tuning {p['qat_epochs']} epochs with activations rounded to 8 bits")
        history = qat.finetune(source, ctx, images, p["qat_epochs"], p["qat_lr"], p["qat_subset"])
        extra["qat_epochs"] = p["qat_epochs"]
    return source, history


def _convert_choosing_fp32_layers(ctx: Context, p: dict, source_onnx: bytes, images: torch.Tensor,
                                  reference: nn.Module, calibration: tuple, extra: dict, notes: list):
    """(int8 bytes, its module, its calibration agreement with `reference`) for the first fp32-layer
    candidate that agrees well enough (ModelSpec.int8_fp32_layers), else the most faithful one tried.
    fp32_layers=sensitivity tries the scan's layers first, then the architecture's own candidates: on the
    CIFAR-10 DenseNet-121 no scan choice reached the agreement and its most faithful lost 3.4 points to
    "auto" (docs/sensitivity.md)."""
    method, pct = calibration
    named = {}   # candidate -> layers kept in fp32 by name
    if p["fp32_layers"] == "sensitivity":
        fragile, order = _fragile_layers(ctx, p, source_onnx)
        named = {("classifier" if not k else f"classifier+{k} most fragile"): fragile[:k]
                 for k in SENSITIVE_FP32_COUNTS if k <= len(fragile)}
        candidates = tuple(named) + tuple(c for c in resolve_fp32_layers("auto", _arch(ctx)[0]) if c not in named)
    else:
        candidates, order = resolve_fp32_layers(p["fp32_layers"], _arch(ctx)[0]), None
    weights = extra["weight_range"] = resolve_weight_range(p["weight_range"])
    tried, made = {}, {}
    with tempfile.TemporaryDirectory(prefix="lab-ranges-") as tmp:   # one calibration for every candidate
        for kept in candidates:
            int8_onnx = quant_ort.quantize_int8(source_onnx, images, p["granularity"] == "per_channel",
                                                ctx.progress, method=method, percentile=pct,
                                                keep_fp32=FP32_LAYERS["sensitivity" if kept in named else kept],
                                                calibration_cache=os.path.join(tmp, "ranges.json"),
                                                reduce_range=weights == "7bit",
                                                keep_layers=named.get(kept, ()), layer_order=order)
            made[kept] = int8_onnx, ort_session.OrtModule(int8_onnx, "int8")
            tried[kept] = _agreement(made[kept][1], reference, images[:256])
            if tried[kept] >= AUTO_MIN_AGREEMENT or kept == candidates[-1]:
                break
            emit(ctx.progress, stage="quantize", kind="message",
                 message=f"int8 with {kept} layers in fp32 agrees with fp32 on {tried[kept]:.0%} of the "
                         "calibration images: keeping more layers in fp32")
    if tried[kept] < AUTO_MIN_AGREEMENT:   # none good enough: the most faithful (ties: more in fp32)
        kept = max(reversed(list(tried)), key=tried.get)
    extra["fp32_layers"] = "sensitivity" if kept in named else kept
    if kept in named:
        extra["fp32_layer_names"] = list(named[kept])
    if len(candidates) > 1:
        extra["fp32_layers_agreement"] = tried
    if kept != candidates[0]:
        notes.append(f"fp32 layers {p['fp32_layers']}: with {candidates[0]} in fp32 the int8 model agreed with fp32 "
                     f"on only {tried[candidates[0]]:.0%} of the calibration images, so {kept} stayed in fp32 "
                     f"({tried[kept]:.0%}; more accurate, slower)")
    if named.get(kept):
        notes.append("kept in fp32 from the sensitivity scan: the classifier and " + ", ".join(named[kept]))
    return *made[kept], tried[kept]


def _fragile_layers(ctx: Context, p: dict, source_onnx: bytes) -> tuple[list[str], list[str]]:
    """fp32_layers=sensitivity: (the model's layers, most fragile first by the quantize scan, the classifier
    left out; every layer in the order it runs). Raises InvalidParameter where the ONNX graph's nodes
    cannot be told apart by layer."""
    import onnx
    from .. import allocation
    traced = layers_mod.trace(ctx.teacher.model)
    try:
        quant_ort.layer_nodes(onnx.load_from_string(source_onnx), traced["order"])
    except ValueError as exc:
        raise InvalidParameter("fp32_layers", "sensitivity", f"this model's ONNX graph cannot be matched to its "
                               f"layers ({exc}); choose another fp32_layers") from None
    scan = allocation.allocation_scan(ctx.teacher, ctx.data, "quantize", p["granularity"], ctx.progress)
    fragile = [n for n in scan["fragile"] if n in traced["layers"] and not traced["layers"][n]["classifier"]]
    return fragile, traced["order"]


def resolve_calibration(choice: str, arch: str) -> str:
    """The calibration an int8 run uses: the choice, or for "auto" the one measured best for `arch`."""
    return get_spec(arch).int8_calibration if choice == "auto" else choice


def resolve_fp32_layers(choice: str, arch: str) -> tuple[str, ...]:
    """The int8 layers kept in fp32 to try, in order: the choice, or for "auto" those measured best for
    `arch` (its ModelSpec's int8_fp32_layers)."""
    return tuple(get_spec(arch).int8_fp32_layers) if choice == "auto" else (choice,)


def resolve_weight_range(choice: str) -> str:
    """The int8 weight grid a run uses: the choice, or for "auto" 7 bits where this CPU's int8 kernels
    can saturate (quant_ort.int8_pairs_saturate), else 8."""
    if choice != "auto":
        return choice
    return "7bit" if quant_ort.int8_pairs_saturate() else "8bit"


def _machine_params(p: dict) -> dict:
    """int8 with weight_range "auto": the grid this CPU takes (part of the result's cache key)."""
    if p.get("mode") == "int8" and p.get("weight_range") == "auto":
        return {"weight_range": resolve_weight_range("auto")}
    return {}


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def _load_int8(state: dict, ctx: Context) -> nn.Module:
    if state["format"] == "torch-fp32":
        name, num_classes = _arch(ctx)
        model = build_model(name, num_classes)
        model.load_state_dict(state["state_dict"])
        return model.eval()
    return ort_session.OrtModule(ort_session.tensor_to_bytes(state["onnx"]), state.get("precision", "int8"))


# ----------------------------------------------------------------------------- fp16 / bf16
def half_support(mode: str) -> tuple[bool, str]:
    """Whether this CPU can run convolutions in `mode`, and a line about how well."""
    dtype = HALF_DTYPES[mode]
    try:
        conv = nn.Conv2d(3, 4, 3).to(dtype).eval()
        with torch.inference_mode():
            conv(torch.zeros(1, 3, 8, 8, dtype=dtype))
    except Exception as exc:
        return False, f"this PyTorch build cannot run {mode} convolutions on the CPU ({type(exc).__name__})"
    cap = torch.backends.cpu.get_cpu_capability()
    mkldnn = torch.backends.mkldnn.is_available()
    if mode == "bf16":
        if not bf16_training_supported("cpu"):
            return False, (f"this CPU ({cap}) has no bfloat16 support in oneDNN (needs AVX-512 BF16/AMX or "
                           "similar); use fp16 or int8")
        return True, f"bf16 runs through oneDNN on this CPU ({cap})"
    native = mkldnn and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if native:
        return True, f"fp16 runs natively through oneDNN on this CPU ({cap})"
    return True, (f"this CPU ({cap}) has no native fp16 arithmetic: fp16 halves the size but is computed "
                  "by slower fallback kernels, so expect it to be no faster (often slower) than fp32")


def _apply_half(ctx: Context, p: dict) -> TechniqueOutput:
    mode = p["mode"]
    ok, line = half_support(mode)
    if not ok:
        raise LabError(f"mode={mode} is not available here: {line}")
    dtype = HALF_DTYPES[mode]
    model = _teacher_copy(ctx)
    counts = _counts(ctx, model)
    model = model.to(dtype).to(memory_format=torch.channels_last).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return TechniqueOutput(model=model, state=state, input_dtype=dtype, eval_device="cpu",
                           extra={"mode": mode, "dtype": str(dtype).replace("torch.", "")},
                           notes=[line], **counts)


def _load_half(state: dict, ctx: Context, mode: str) -> nn.Module:
    name, num_classes = _arch(ctx)
    model = build_model(name, num_classes).to(HALF_DTYPES[mode])
    model.load_state_dict(state)
    return model.eval().to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- spec
def apply(ctx: Context) -> TechniqueOutput:
    p = SPEC.validate(ctx.params)
    mode = p["mode"]
    if mode == "fake":
        return _apply_fake(ctx, p)
    if mode == "int8":
        return _apply_int8(ctx, p)
    return _apply_half(ctx, p)


def load(state: dict, ctx: Context) -> nn.Module:
    mode = SPEC.validate(ctx.params)["mode"]
    if mode == "fake":
        return _load_fake(state, ctx)
    if mode == "int8":
        return _load_int8(state, ctx)
    return _load_half(state, ctx, mode)


def input_dtype(params: dict) -> torch.dtype:
    """What a loaded model of these parameters takes as input."""
    return HALF_DTYPES.get(SPEC.validate(params)["mode"], torch.float32)


SPEC = register(TechniqueSpec(
    name="quantize",
    title="Quantization",
    summary=("Stores weights (and optionally activations) with fewer bits: simulate any bit width from 16 "
             "down to 1, or build a real int8 model that ONNX Runtime runs faster on the CPU. "
             "See how much smaller and faster the model gets, and what it costs in accuracy."),
    params=PARAMS,
    apply=apply,
    load=load,
    check=_normalise,
    machine_params=_machine_params,
    # int8 fp32 layers from the scan 2: the architecture's own candidates follow the scan's
    rule_versions=lambda p: {"int8_fp32_sensitivity": 2} if p.get("mode") == "int8" and p.get("fp32_layers") == "sensitivity" else {},
    url="quantization", icon=":material/filter_9_plus:", color="#4c78a8", pipeline_stage=2,
    sweep_grid=({"mode": "int8"}, {"mode": "fake", "bits": 8}, {"mode": "fake", "bits": 4}, {"mode": "fp16"}),
    # 2: int8 files store batch norms as scale and shift (since 9: as int8 depthwise convolutions);
    # 3: DenseNets exported as a running concatenation (onnx_export._RunningConcatDenseBlock);
    # 4: fake mode corrects batch-norm statistics (bn_correction);
    # 5: int8 keeps the classifier (DenseNet: also the first convolution) in fp32;
    # 6: DenseNet also its 1x1-map block (cheap once sessions cut 1x1-map convolutions to their centre tap)
    # 7: DenseNets equalized before int8 (equalize.equalize_densenet); 8: DenseNet's auto calibration p99.9
    # 9: ReLUs folded into int8 outputs, batch norms as int8 depthwise convolutions, DenseNet's auto fp32
    # layers chosen by calibration agreement, quantization-aware fine-tuning (qat_epochs)
    # 10: DenseNet's auto fp32 layers may fall back to edges+2x2+pooled
    # 11: int8 weights on 7 bits where the CPU has no VNNI (weight_range auto)
    version=11,
))
