"""Per-layer view of a result: for each conv/linear layer, what it holds and what compressing it did.

`layer_table(reference, model)` gives one row per nn.Conv2d / nn.Linear of the compressed model, by
qualified module name: "name", "kind" ("conv"/"linear"), "params" (weight + bias), "macs" (one image at
3x32x32), "channels" ([in, out] now), "channels_kept" (out channels now / in the reference layer of the
same name), "sparsity" (fraction of zero weights), "bits" (weight bits) and "weight_error".
`result_layers(out, teacher, technique)` is what the runner stores on every result (`layers`).

MACs come from one shape pass of a weightless copy (parameters on the "meta" device, so no arithmetic
and no hook on a model someone else may be running), counted the way torch-pruning's counter
(`metrics.count_macs`) counts these layers: conv k_h·k_w·in·out/groups per output position, linear
in·out, each plus one per output element for a bias. The rows therefore sum to exactly the conv/linear
part of the result's `macs`; `count_macs` adds the element-wise work of the other modules on top
(batch norm 2 per element, ReLU 1 per element, pooling 1 per input element), which no row lists
(ResNet-34: rows 74,765,322, count_macs 75,007,498; DenseNet-121: 57,829,386 of 58,818,314).
Likewise the rows' params sum to the conv/linear parameters of the model; the result's `params` adds
the batch norms'.

weight_error is the relative L2 distance ‖W − W_ref‖ / ‖W_ref‖ from the reference (the teacher) layer
of the same name to what the compressed model computes with:
- unstructured pruning, fp16/bf16, simulated low-bit weights: the weights as they are (pruned weights
  count as zeros, rounding as what it moved), shapes being equal;
- structured pruning: the kept rows and columns are found in the reference by their exact values
  (torch-pruning keeps channels in order and records nothing), the rest count as zeros, so the error is
  the share of the layer's weight removed; after fine-tuning no weight matches exactly any more and the
  kept channels cannot be told from the weights alone: null;
- real int8 (an ONNX Runtime model, not an nn.Module): rows come from the fp32 model it was made from;
  the weights are quantized and dequantized as ONNX Runtime does: after the batch norm that the ONNX
  export folds into a convolution (conv directly followed by batch norm), symmetric int8 per output
  channel or per tensor as the result's `granularity` says, scale max|w|/127 (/64 for 7-bit
  `weight_range`); layers kept in fp32 (bits 32) store their weights as per-channel int8 all the same
  (onnx_graph.store_weights_int8), so their error is that rounding's. With equalization (DenseNets) or
  quantization-aware fine-tuning the fp32 weights ONNX Runtime quantized are not those of the teacher
  and are not kept: null;
- a distilled student is trained from scratch, not made from the teacher's weights: null (and
  channels_kept null).
"""
from __future__ import annotations

import copy
import itertools
import math
import threading

import torch
import torch.nn as nn

INPUT_SIZE = (1, 3, 32, 32)
LAYER_TYPES = (nn.Conv2d, nn.Linear)
# techniques whose model is not made from the teacher's weights
FROM_SCRATCH = ("distill",)


# ----------------------------------------------------------------------------- shape pass
def _meta_copy(model: nn.Module) -> nn.Module:
    """The module tree with every parameter and buffer replaced by a same-shaped tensor on the meta device:
    a forward pass gives shapes without arithmetic and leaves `model` (maybe a shared teacher) untouched."""
    memo = {id(t): torch.empty_like(t, device="meta") for t in itertools.chain(model.parameters(), model.buffers())}
    shadow = copy.deepcopy(model, memo).eval()
    for m in shadow.modules():   # e.g. activation rounding's hooks: traces are shared by every model of this shape
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    shadow.__dict__.pop("_activation_quantizer", None)
    return shadow


def _weight_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _layer_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one call for one image, as torch-pruning's counter counts them."""
    batch = max(1, x.shape[0])
    if isinstance(m, nn.Conv2d):
        positions = y.numel() // batch // y.shape[1]
        out_ch, in_per_group = m.weight.shape[0], m.weight.shape[1]
        macs = math.prod(m.kernel_size) * in_per_group * out_ch * positions
        return macs + (out_ch * positions if m.bias is not None else 0)
    rows = x.numel() // batch // x.shape[-1]
    out = m.weight.shape[0]
    return rows * m.weight.shape[1] * out + (out if m.bias is not None else 0)


_TRACES: dict = {}   # the last few traces by architecture (a slider's runs share the teacher's)
_TRACES_LOCK = threading.Lock()


def trace(model: nn.Module, input_size=INPUT_SIZE) -> dict:
    """One forward pass of a weightless copy of `model`, recording per conv/linear layer (by name):
    "macs" (per image), "in_hw"/"out_hw" (spatial size), "kernel" (largest side), "first" (reads the
    image), "classifier" (writes the output); "folded": conv -> the batch norm reading its output
    directly (what the ONNX export folds); "pooled": convs whose output reaches an AvgPool2d through
    batch norm / ReLU only; "order": the layers in the order they run. Remembered by the module tree's repr
    (every layer's shape and settings)."""
    key = (type(model).__qualname__, repr(model), tuple(input_size), _weight_dtype(model))
    hit = _TRACES.get(key)
    if hit is None:
        hit = _trace(model, input_size)
        with _TRACES_LOCK:
            while len(_TRACES) >= 8:
                _TRACES.pop(next(iter(_TRACES)))
            _TRACES[key] = hit
    return copy.deepcopy(hit)


def _trace(model: nn.Module, input_size) -> dict:
    shadow = _meta_copy(model)
    names = {id(m): n for n, m in shadow.named_modules()}
    rows: dict[str, dict] = {n: {"macs": 0, "in_hw": None, "out_hw": None, "kernel": None, "first": False,
                                 "classifier": False}
                             for n, m in shadow.named_modules() if isinstance(m, LAYER_TYPES)}
    source: dict[int, tuple[str, bool]] = {}   # id(tensor) -> (conv/linear it came from, directly?)
    alive = []                                  # the tensors whose ids are in `source`: ids stay unique
    folded: dict[str, str] = {}
    pooled: set[str] = set()
    order: list[str] = []
    x = torch.zeros(input_size, device="meta", dtype=_weight_dtype(model))

    def layer_hook(m, inp, out):
        name, xin = names[id(m)], inp[0]
        row = rows[name]
        if name not in order:
            order.append(name)
        row["macs"] += _layer_macs(m, xin, out)
        row["in_hw"], row["out_hw"] = list(xin.shape[2:]), list(out.shape[2:])
        row["first"] |= xin is x
        row["kernel"] = max(m.kernel_size) if isinstance(m, nn.Conv2d) else 1
        source[id(out)] = (name, True)
        alive.append(out)

    def through_hook(m, inp, out):   # batch norm, ReLU: the chain goes on
        came = source.get(id(inp[0]))
        if came is None:
            return
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and came[1] and came[0] not in folded:
            folded[came[0]] = names[id(m)]
        if id(out) not in source:
            source[id(out)] = (came[0], False)
            alive.append(out)

    def pool_hook(m, inp):
        came = source.get(id(inp[0]))
        if came is not None:
            pooled.add(came[0])

    handles = []
    for m in shadow.modules():
        if isinstance(m, LAYER_TYPES):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.ReLU)):
            handles.append(m.register_forward_hook(through_hook))
        elif isinstance(m, nn.AvgPool2d):
            handles.append(m.register_forward_pre_hook(pool_hook))
    try:
        with torch.no_grad():
            y = shadow(x)
    finally:
        for h in handles:
            h.remove()
    came = source.get(id(y))
    if came is not None and came[1]:
        rows[came[0]]["classifier"] = True
    return {"layers": rows, "folded": folded, "pooled": pooled, "order": order}


# ----------------------------------------------------------------------------- weights
def _relative(w: torch.Tensor, ref: torch.Tensor) -> float | None:
    """‖w − ref‖ / ‖ref‖ (None for an all-zero reference)."""
    norm = float(torch.linalg.vector_norm(ref))
    if norm == 0:
        return None
    return float(torch.dist(w, ref)) / norm


def _sparsity(w: torch.Tensor) -> float:
    return 1 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0


def _increasing_match(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | None:
    """For each row of `rows` [n, k], the index of a row of `candidates` [m, k] with the same first value,
    increasing (torch-pruning keeps channels in order); None when some row has none. The caller checks
    the whole weights afterwards."""
    eq = rows[:, None, 0] == candidates[None, :, 0]   # [n, m]
    if not bool(eq.any(1).all()):
        return None
    first = eq.int().argmax(1)   # the first match of each row: usually the only one
    if len(first) < 2 or bool((first[1:] > first[:-1]).all()):
        return first
    out, last = [], -1
    for hits in eq:
        later = hits.nonzero().flatten()
        later = later[later > last]
        if not len(later):
            return None
        last = int(later[0])
        out.append(last)
    return torch.tensor(out, dtype=torch.long)


def kept_indices(w: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out indices, in indices) of the reference weight `ref` that the smaller weight `w` keeps, when `w`
    is exactly `ref` with rows/columns removed (structured pruning without fine-tuning); else None."""
    if w.ndim != ref.ndim or w.shape[2:] != ref.shape[2:] or w.shape[0] > ref.shape[0] or w.shape[1] > ref.shape[1]:
        return None
    w3 = w.reshape(w.shape[0], w.shape[1], -1)
    r3 = ref.reshape(ref.shape[0], ref.shape[1], -1)
    if not w3.numel():
        return None
    first = (r3[:, :, 0] == w3[0, 0, 0]).nonzero()[:64]   # where the first kept weight may come from
    starts = [(o, i) for o, i in first.tolist() if torch.equal(r3[o, i], w3[0, 0])][:8]
    for o0, i0 in starts:
        outs = _increasing_match(w3[:, 0], r3[:, i0])
        ins = _increasing_match(w3[0], r3[o0])
        if outs is None or ins is None:
            continue
        if torch.equal(r3[outs][:, ins], w3):
            return outs, ins
    return None


def _structured_error(w: torch.Tensor, ref: torch.Tensor) -> float | None:
    found = kept_indices(w, ref)
    if found is None:
        return None
    outs, ins = found
    embedded = torch.zeros_like(ref)
    embedded[outs[:, None], ins[None, :]] = w
    return _relative(embedded, ref)


def ort_fake_quant(w: torch.Tensor, per_channel: bool, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of `w` as ONNX Runtime's symmetric weight quantization makes them (scale = max|w| / qmax
    per output channel or per tensor, round half to even, clipped to ±qmax); the scale is returned too.
    ONNX Runtime also raises the scale of a channel whose int32 bias would overflow (a near-zero batch-norm
    scale folded in): such a channel's weights are near zero, so the layer's error barely moves."""
    w2 = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    amax = w2.abs().amax(1).double()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()
    codes = torch.clamp(torch.round(w2 / scale[:, None]), -qmax, qmax)
    return codes.reshape(w.shape), (scale if per_channel else scale.reshape(()))


def _dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes * (scale.reshape([-1] + [1] * (codes.ndim - 1)) if scale.ndim else scale)


def _fold_scale(bn: nn.Module) -> torch.Tensor:
    """The per-channel factor the ONNX export multiplies a convolution's weight by when folding `bn`."""
    var = bn.running_var.detach().float().cpu()
    gamma = bn.weight.detach().float().cpu() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def int8_plan(extra: dict, traced: dict) -> dict:
    """What a real int8 result did per layer, from its `extra`: which layers stayed fp32 (the rules of
    quantization.FP32_LAYERS applied to the traced shapes, as quant_ort.fp32_nodes applies them to the
    ONNX graph), the weight grid, and whether the teacher's weights are what was quantized."""
    from .techniques.quantization import FP32_LAYERS
    rules = set(FP32_LAYERS.get(extra.get("fp32_layers") or "none", ()))
    fp32 = set(extra.get("fp32_layer_names") or ())   # chosen from the sensitivity scan
    for name, row in traced["layers"].items():
        out_hw, in_hw = row["out_hw"] or [], row["in_hw"] or []
        conv_map = math.prod(out_hw) if len(out_hw) == 2 else None
        if (("first" in rules and row["first"]) or ("classifier" in rules and row["classifier"])
                or ("1x1" in rules and conv_map == 1) or ("2x2" in rules and conv_map is not None and conv_map <= 4)
                or ("pooled" in rules and name in traced["pooled"])
                or ("1x1-kxk" in rules and in_hw == [1, 1] and (row["kernel"] or 1) > 1)):
            fp32.add(name)
    return {"quantized": bool(extra.get("quantized", True)), "fp32": fp32,
            "per_channel": extra.get("granularity", "per_channel") == "per_channel",
            "qmax": 64 if extra.get("weight_range") == "7bit" else 127,
            "teacher_weights": not extra.get("equalized_layers") and not extra.get("qat_epochs")}


# ----------------------------------------------------------------------------- the table
def layer_table(reference: nn.Module | None, model: nn.Module, *, bits: int | None = None,
                int8: dict | None = None, input_size=INPUT_SIZE) -> list[dict]:
    """One row per conv/linear layer of `model` (see the module docstring for the keys).

    reference: the model `model` was made from (the teacher), or None when it was not made from its weights.
    bits: simulated weight bits (fake quantization); default: the bits of the weights' dtype.
    int8: a real int8 result's `extra`; `model` is then the fp32 model the int8 model was made from.
    """
    traced = trace(model, input_size)
    plan = int8_plan(int8, traced) if int8 is not None else None
    ref_modules = dict(reference.named_modules()) if reference is not None else {}
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, LAYER_TYPES):
            continue
        conv = isinstance(m, nn.Conv2d)
        w = m.weight.detach().cpu()
        groups = m.groups if conv else 1
        channels = [int(w.shape[1]) * groups, int(w.shape[0])]
        ref = ref_modules.get(name)
        ref_w = ref.weight.detach().float().cpu() if isinstance(ref, type(m)) else None
        kept = channels[1] / ref_w.shape[0] if ref_w is not None and ref_w.shape[0] else None
        wf = w.float()
        if plan is not None:
            row_bits, error, sparsity = _int8_row(name, wf, plan, traced, model)
        else:
            row_bits = bits if bits is not None else torch.finfo(w.dtype).bits
            sparsity = _sparsity(wf)
            if ref_w is None:
                error = None
            elif ref is m:   # the reference itself (a table of the teacher)
                error = 0.0
            elif ref_w.shape == wf.shape:
                error = _relative(wf, ref_w)
            else:
                error = _structured_error(wf, ref_w)
        rows.append({"name": name, "kind": "conv" if conv else "linear",
                     "params": int(w.numel() + (m.bias.numel() if m.bias is not None else 0)),
                     "macs": int(traced["layers"][name]["macs"]), "channels": channels,
                     "channels_kept": kept, "sparsity": sparsity, "bits": int(row_bits), "weight_error": error})
    return rows


def _int8_row(name: str, w: torch.Tensor, plan: dict, traced: dict, model: nn.Module):
    """(bits, weight_error, sparsity) of one layer of a real int8 result (see `int8_plan`)."""
    if not plan["quantized"]:   # the conversion failed: the fp32 model was kept
        return 32, 0.0, _sparsity(w)
    fp32 = name in plan["fp32"]
    bits = 32 if fp32 else 8
    if not plan["teacher_weights"]:
        return bits, None, _sparsity(w)
    bn = traced["folded"].get(name)
    if bn is not None:
        w = w * _fold_scale(model.get_submodule(bn)).reshape([-1] + [1] * (w.ndim - 1))
    per_channel, qmax = (True, 127) if fp32 else (plan["per_channel"], plan["qmax"])
    codes, scale = ort_fake_quant(w, per_channel, qmax)
    return bits, _relative(_dequantized(codes, scale), w), _sparsity(codes)


def result_layers(out, teacher: nn.Module, technique: str) -> list[dict]:
    """The `layers` of a technique's output: its model against the teacher; a real int8 model (ONNX
    Runtime) through the fp32 teacher it was made from; simulated bits from `extra`. A failure costs
    the table, not the result: it leaves a note and gives []."""
    extra = out.extra or {}
    try:
        if extra.get("mode") == "int8" and out.runtime != "pytorch-eager":
            return layer_table(teacher, teacher, int8=extra)
        reference = None if technique in FROM_SCRATCH else teacher
        bits = extra.get("bits") if extra.get("mode") == "fake" else None
        return layer_table(reference, out.model, bits=bits)
    except Exception as exc:   # a model the shape pass cannot run (meta device) must not lose the run
        out.notes = list(out.notes) + [f"no per-layer table: {type(exc).__name__}: {str(exc)[:160]}"]
        return []
