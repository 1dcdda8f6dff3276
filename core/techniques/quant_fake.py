"""Simulated ("fake") quantization: any bit width 1-16, on any architecture.

Weights of every conv and linear layer are rounded to a symmetric integer grid (per output
channel by default) and stored bit-packed; the model computes with the dequantized values,
so accuracy shows what the bit width costs while latency stays that of fp32. Optionally the
inputs of those layers (activations) are fake-quantized too, with ranges calibrated on
training images through forward pre-hooks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..progress import ProgressFn, emit

_CHUNK = 1 << 22       # elements per step when packing or searching, to bound temporary memory
_SEARCH_COLS = 2048    # weights per channel (x64 per layer when per-tensor) used to pick the clipping


# ----------------------------------------------------------------------------- weights
def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv (any dimension, incl. transposed) and linear layers with a weight."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and getattr(m, "weight", None) is not None]


def channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def _clip_candidates(bits: int) -> list[float]:
    """Fractions of max|w| tried as the clipping range: low bit widths gain most from clipping outliers.

    From 7 bits up the max-abs grid is already fine (the search would cost time for nothing).
    """
    if bits <= 4:
        return [round(1 - 0.05 * i, 2) for i in range(19)]      # 1.0 .. 0.1
    if bits <= 6:
        return [round(1 - 0.05 * i, 2) for i in range(11)]      # 1.0 .. 0.5
    return [1.0]


def quantize_tensor(w: torch.Tensor, bits: int, per_channel: bool = True, axis: int = 0):
    """Symmetric quantization: (integer codes, fp32 scales) with w ≈ codes * scale.

    1 bit: codes are ±1 and the scale is mean|w| (the L2-optimal binary scale).
    2+ bits: codes in [-(2^(b-1)-1), 2^(b-1)-1]; the scale is max|w| / qmax, shrunk to the
    clipping fraction that gives the smallest squared error (searched per channel).
    """
    w2 = w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1) if per_channel \
        else w.detach().float().reshape(1, -1)
    if bits == 1:
        scale = w2.abs().mean(1).clamp_min(1e-12)
        codes = torch.where(w2 >= 0, 1, -1).to(torch.int8)
        return _restore(codes, w, axis, per_channel), scale
    qmax = 2 ** (bits - 1) - 1
    amax = w2.abs().amax(1).clamp_min(1e-12)
    best_scale = amax / qmax
    candidates = _clip_candidates(bits)
    if len(candidates) > 1:
        # the clipping fraction is chosen on at most _SEARCH_COLS evenly spaced weights of each row
        cols = _SEARCH_COLS if per_channel else 64 * _SEARCH_COLS
        sample = w2[:, ::max(1, math.ceil(w2.shape[1] / cols))]
        best_err = torch.full_like(amax, float("inf"))
        rows = max(1, _CHUNK // max(1, sample.shape[1]))
        for r in candidates:
            scale = amax * r / qmax
            err = torch.empty_like(amax)
            for i in range(0, sample.shape[0], rows):
                blk, s = sample[i:i + rows], scale[i:i + rows, None]
                err[i:i + rows] = ((torch.clamp(torch.round(blk / s), -qmax, qmax) * s - blk) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(w2 / best_scale[:, None]), -qmax, qmax)
    codes = codes.to(torch.int8 if bits <= 8 else torch.int16)
    return _restore(codes, w, axis, per_channel), best_scale


def _restore(codes2d: torch.Tensor, w: torch.Tensor, axis: int, per_channel: bool) -> torch.Tensor:
    if not per_channel:
        return codes2d.reshape(w.shape)
    shape = list(w.shape)
    moved = [shape[axis]] + shape[:axis] + shape[axis + 1:]
    return codes2d.reshape(moved).movedim(0, axis)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int, per_channel: bool) -> torch.Tensor:
    if not per_channel:
        return codes.float() * scale.reshape(())
    view = [1] * codes.ndim
    view[axis] = -1
    return codes.float() * scale.reshape(view)


# ----------------------------------------------------------------------------- bit packing
def _offset(bits: int) -> int:
    return 2 ** (bits - 1) - 1 if bits > 1 else 0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes -> a uint8 stream of exactly ceil(n*bits/8) bytes (values stored offset to >= 0)."""
    flat = codes.reshape(-1).to(torch.int64)
    u = (flat > 0).to(torch.int64) if bits == 1 else flat + _offset(bits)
    return _pack_unsigned(u, bits)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    n = math.prod(shape)
    u = _unpack_unsigned(packed, bits, n)
    codes = (u * 2 - 1) if bits == 1 else u - _offset(bits)
    return codes.to(torch.int8 if bits <= 8 else torch.int16).reshape(shape)


def _pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    if bits > 8:   # low byte as is, the remaining high bits packed on their own
        return torch.cat([(u & 255).to(torch.uint8), _pack_unsigned(u >> 8, bits - 8)])
    if bits == 8:
        return u.to(torch.uint8)
    n = u.numel()
    out = []
    for i in range(0, n, _CHUNK):      # _CHUNK is a multiple of 8: every chunk is byte-aligned
        blk = u[i:i + _CHUNK]
        groups = math.ceil(len(blk) / 8)
        blk = torch.nn.functional.pad(blk, (0, groups * 8 - len(blk))).view(groups, 8)
        acc = (blk << (torch.arange(8) * bits)).sum(1)          # 8 values -> `bits` bytes
        out.append(((acc[:, None] >> (torch.arange(bits) * 8)) & 255).to(torch.uint8).reshape(-1))
    stream = torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)
    return stream[:math.ceil(n * bits / 8)]


def _unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits > 8:
        low = packed[:n].to(torch.int64)
        return low | (_unpack_unsigned(packed[n:], bits - 8, n) << 8)
    if bits == 8:
        return packed[:n].to(torch.int64)
    groups = math.ceil(n / 8)
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.numel()))
    out = []
    step = _CHUNK // 8
    mask = (1 << bits) - 1
    for g in range(0, groups, step):
        blk = p[g * bits:(g + step) * bits].view(-1, bits)
        acc = (blk << (torch.arange(bits) * 8)).sum(1)          # `bits` bytes -> 8 values
        out.append(((acc[:, None] >> (torch.arange(8) * bits)) & mask).reshape(-1))
    return torch.cat(out)[:n]


# ----------------------------------------------------------------------------- activations
class ActivationQuantizer:
    """Fake-quantizes the input of every conv/linear layer (per tensor, affine, unsigned grid).

    `observe` phase: torch.ao observers record the range (histogram search up to 8 bits, min/max
    above); `quantize` phase: inputs are rounded to that grid. One set of hooks does both.
    """

    def __init__(self, model: nn.Module, bits: int):
        self.bits = bits
        self.qmax = 2 ** bits - 1
        self.layers = quantizable_layers(model)
        self.observers: dict[str, nn.Module] = {}
        self.qparams: dict[str, tuple[float, int]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers]

    def _hook(self, name):
        def hook(_module, inputs):
            x = inputs[0]
            if name in self.qparams:
                scale, zp = self.qparams[name]
                q = torch.clamp(torch.round(x / scale) + zp, 0, self.qmax)
                return ((q - zp) * scale).to(x.dtype), *inputs[1:]
            if name in self.observers:
                self.observers[name](x.detach().float())
            return None
        return hook

    def start_observing(self):
        from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver
        for n, _ in self.layers:
            if self.bits <= 8:
                self.observers[n] = HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=self.qmax)
            else:
                self.observers[n] = MinMaxObserver(dtype=torch.qint32, quant_min=0, quant_max=self.qmax)

    def finish_observing(self):
        for n, obs in self.observers.items():
            if getattr(obs, "min_val", torch.tensor(float("inf"))).numel() == 0 or \
                    not torch.isfinite(obs.min_val).all():
                continue  # layer never ran (unused branch): leave its input unquantized
            scale, zp = obs.calculate_qparams()
            self.qparams[n] = (float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))
        self.observers = {}

    def state(self) -> dict:
        names = list(self.qparams)
        return {"bits": self.bits, "names": names,
                "scale": torch.tensor([self.qparams[n][0] for n in names], dtype=torch.float64),
                "zero_point": torch.tensor([self.qparams[n][1] for n in names], dtype=torch.int64)}

    def load(self, state: dict):
        self.qparams = {n: (float(s), int(z)) for n, s, z in
                        zip(state["names"], state["scale"].tolist(), state["zero_point"].tolist())}


def calibrate(model: nn.Module, images: torch.Tensor, quantizer: ActivationQuantizer,
              progress: ProgressFn = None, batch_size: int = 64):
    """Run normalized calibration images through the model while the observers record ranges."""
    quantizer.start_observing()
    total = math.ceil(len(images) / batch_size)
    emit(progress, stage="calibrate", kind="start", step=0, total=total)
    with torch.inference_mode():
        for i in range(total):
            model(images[i * batch_size:(i + 1) * batch_size])
            emit(progress, stage="calibrate", kind="batch", step=i + 1, total=total)
    quantizer.finish_observing()
    emit(progress, stage="calibrate", kind="done")


# ----------------------------------------------------------------------------- whole model
def fake_quantize_weights(model: nn.Module, bits: int, per_channel: bool, layer_bits: dict | None = None) -> dict:
    """Replace conv/linear weights in place by their quantized values; return the packed record.
    `layer_bits` ({layer: bits}, mixed precision) gives listed layers their own width, recorded as "bits"."""
    names, shapes, axes, packed, scales, widths = [], [], [], [], [], []
    for name, mod in quantizable_layers(model):
        axis = channel_axis(mod)
        b = (layer_bits or {}).get(name, bits)
        codes, scale = quantize_tensor(mod.weight, b, per_channel, axis)
        with torch.no_grad():
            mod.weight.copy_(dequantize(codes, scale, axis, per_channel).to(mod.weight.dtype))
        names.append(name)
        shapes.append(list(codes.shape))
        axes.append(axis)
        packed.append(pack_codes(codes, b))
        scales.append(scale.float())
        widths.append(b)
    record = {} if layer_bits is None else {"bits": widths}
    return {**record, "names": names, "shapes": shapes, "axes": axes,
            "packed_lengths": [int(p.numel()) for p in packed],
            "codes": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8),
            "scale_lengths": [int(s.numel()) for s in scales],
            "scales": torch.cat(scales) if scales else torch.zeros(0)}


def restore_weights(model: nn.Module, record: dict, bits: int, per_channel: bool) -> None:
    """Write the dequantized weights of a packed record into a model of the same architecture."""
    codes_all = record["codes"].split(record["packed_lengths"])
    scales_all = record["scales"].split(record["scale_lengths"])
    widths = record.get("bits") or [bits] * len(record["names"])   # per layer when mixed precision
    for name, shape, axis, packed, scale, b in zip(record["names"], record["shapes"], record["axes"],
                                                   codes_all, scales_all, widths):
        mod = model.get_submodule(name)
        codes = unpack_codes(packed, int(b), shape)
        with torch.no_grad():
            mod.weight.copy_(dequantize(codes, scale, axis, per_channel).to(mod.weight.dtype))


def packed_size(model: nn.Module, bits: int, record: dict, act_layers: int = 0) -> dict:
    """Shipped size: bits per quantized weight + fp32 scales + every other float tensor at 32 bits."""
    quantized = {f"{n}.weight" for n in record["names"]}
    n_q = sum(math.prod(s) for s in record["shapes"])
    n_scales = int(record["scales"].numel())
    n_other = sum(v.numel() for k, v in model.state_dict().items()
                  if k not in quantized and v.is_floating_point())
    weight_bytes = (math.ceil(n_q * bits / 8) if "bits" not in record   # mixed precision: each layer packed alone
                    else sum(math.ceil(math.prod(s) * b / 8) for s, b in zip(record["shapes"], record["bits"])))
    packed = weight_bytes + 4 * (n_scales + n_other) + 8 * act_layers
    return {"packed_bytes": packed, "packed_weight_bytes": weight_bytes, "quantized_params": n_q,
            "scales": n_scales, "fp32_other_params": n_other}
