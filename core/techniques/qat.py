"""Quantization-aware fine-tuning before int8 (`qat_epochs`): the model learns to live with 8-bit activations.

Post-training int8 gives every activation tensor one scale. A network whose channels differ by orders of
magnitude (the Shapes DenseNet-121 of docs/bench_quantization.md, 2026-11-29: 7.6 points lost even
after equalization) needs its weights to adapt to that rounding. A few epochs of the shared training loop
do it, with every activation that ONNX Runtime quantizes rounded to its 8-bit grid on the way forward and
passed straight through on the way back (straight-through estimator). Batch norms keep their running
statistics (eval mode), so the ranges measured before training stay true. The fine-tuned fp32 model is then
converted as usual (its ranges calibrated again).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..training import TrainConfig, fit, training_precision
from .base import observe
from .quant_fake import quantizable_layers

RANGE_QUANTILE = 0.9995     # clip 0.05% on each side, as ONNX Runtime's p99.9 calibration does
SAMPLES_PER_BATCH = 65_536  # values per layer and batch the quantiles are taken from
LEVELS = 255                # uint8, as ONNX Runtime's activations


def quantized_inputs(model: nn.Module) -> list[nn.Module]:
    """The modules whose input int8 rounds: every conv/linear layer but the last (the logits layer, which
    every `fp32_layers` setting but "none" keeps in fp32), and in a DenseNet the batch norms reading a
    concatenation (int8 tensors once batch norms run as int8 convolutions)."""
    from torchvision.models.densenet import _DenseLayer, _Transition
    mods = [m for _, m in quantizable_layers(model)][:-1]
    for mod in model.modules():
        if isinstance(mod, _DenseLayer):
            mods.append(mod.norm1)
        elif isinstance(mod, _Transition):
            mods.append(mod.norm)
    norm5 = getattr(getattr(model, "features", None), "norm5", None)
    if isinstance(norm5, nn.BatchNorm2d):
        mods.append(norm5)
    return mods


def input_ranges(model: nn.Module, modules: list[nn.Module], images: torch.Tensor,
                 batch: int = 64) -> dict[int, tuple[float, float]]:
    """(low, high) of each module's input over `images`, clipped at RANGE_QUANTILE, zero included."""
    samples: dict[int, list[torch.Tensor]] = {id(m): [] for m in modules}
    gen = torch.Generator().manual_seed(0)

    def hook(mod, inputs):
        x = inputs[0].detach().float().flatten()
        pick = torch.randint(len(x), (min(len(x), SAMPLES_PER_BATCH),), generator=gen)
        samples[id(mod)].append(x[pick])
    observe(model.eval(), modules, images, pre_hook=hook, batch=batch)
    ranges = {}
    for key, parts in samples.items():
        if parts:
            x = torch.cat(parts)
            lo, hi = torch.quantile(x, torch.tensor([1 - RANGE_QUANTILE, RANGE_QUANTILE])).tolist()
            ranges[key] = (min(lo, 0.0), max(hi, 0.0))
    return ranges


def fake_round(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """x rounded to the uint8 grid on [low, high]; gradient 1 inside the range, 0 where it clips."""
    scale = max(high - low, 1e-8) / LEVELS
    zero = round(-low / scale)
    clipped = x.clamp(low, high)
    q = (torch.round(clipped / scale) + zero).clamp(0, LEVELS)
    return clipped + ((q - zero) * scale - clipped).detach()


class _FrozenNorms:
    """Batch norms in eval mode while the rest of the model trains (fit() calls model.train())."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        for m in self.norms:
            m.train = lambda mode=True, m=m: m   # an instance attribute shadows Module.train
            m.training = False
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            del m.train


def finetune(model: nn.Module, ctx, images: torch.Tensor, epochs: int, lr: float, subset: int = 0) -> list[dict]:
    """Fine-tune `model` (a copy; in place) for `epochs` (of `subset` training images, 0 = all) with
    int8-rounded activations, ranges measured on `images`; its history rows."""
    modules = quantized_inputs(model)
    ranges = input_ranges(model, modules, images)
    handles = [m.register_forward_pre_hook(
        lambda mod, inputs, r=ranges[id(m)]: (fake_round(inputs[0], *r), *inputs[1:]))
        for m in modules if id(m) in ranges]
    cfg = TrainConfig(epochs=epochs, lr=lr, subset=subset, precision=training_precision(ctx.device))
    try:
        with _FrozenNorms(model):
            history = fit(model, ctx.data, cfg, device=ctx.device, progress=ctx.progress, stage="finetune",
                          eval_size=ctx.eval_size)
    finally:
        for h in handles:
            h.remove()
    model.cpu().to(memory_format=torch.contiguous_format).eval()
    return history
