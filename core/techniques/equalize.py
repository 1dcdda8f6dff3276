"""Function-preserving rescaling of a DenseNet before int8, so that one scale per tensor fits every channel.

int8 gives each activation tensor one scale (ONNX Runtime's QLinearConv), and a DenseNet's tensors are
very uneven: in a Shapes-trained DenseNet-121 the inputs of denseblock4's convolutions reach 950 while
the median channel never passes 0.64, and the transition convolutions write features far from zero that
the batch norms reading them re-centre. Rounded to 256 levels, those channels vanish, and the network
fell to chance (docs/bench_quantization.md, 2026-11-29, Intel Xeon). Two rescalings fix much of it, both exact in fp32:

- inputs (cross-layer equalization, as in data-free quantization, Nagel et al. 2019): every
  batch norm -> ReLU -> convolution divides channel c of the batch norm's output by s_c and
  multiplies the convolution's weights for input channel c by s_c (ReLU commutes with s_c > 0);
  s_c = (activation range / weight range) ** INPUT_POWER, so that the wide channels shrink without
  crushing the per-output-channel int8 weights;
- outputs: every convolution that writes features into a concatenation (growth layers and
  transitions) centres each channel on the middle of its range and scales it to the range of the
  concatenation's widest channel (once batch norms run as int8 convolutions, the concatenation is an
  int8 tensor with one scale); every batch norm that reads the channel undoes both (mean and gamma).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .base import observe

# 0.125 measured best of 0 / 0.125 / 0.25 / 0.5 / 1.0 on the Shapes DenseNet-121 (int8, edges+1x1):
# larger powers move the spread into the weights, whose int8 rows then lose their small columns
INPUT_POWER = 0.125
MIN_SCALE = 1e-3


def is_densenet(model: nn.Module) -> bool:
    from torchvision.models.densenet import _DenseBlock
    return any(isinstance(m, _DenseBlock) for m in model.modules())


def _norm_relu_convs(model: nn.Module) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
    from torchvision.models.densenet import _DenseLayer, _Transition
    pairs = []
    for mod in model.modules():
        if isinstance(mod, _DenseLayer):
            pairs += [(mod.norm1, mod.conv1), (mod.norm2, mod.conv2)]
        elif isinstance(mod, _Transition):
            pairs.append((mod.norm, mod.conv))
    return pairs


def _feature_writers(model: nn.Module) -> list[tuple[list[tuple[nn.Conv2d, int]], list[nn.BatchNorm2d]]]:
    """Per concatenation: the convolutions writing into it (with their first channel) and its readers."""
    from torchvision.models.densenet import _DenseBlock, _Transition
    stages = list(model.features.children())
    groups, writers = [], []
    for i, stage in enumerate(stages):
        if not isinstance(stage, _DenseBlock):
            continue
        layers = list(stage.children())
        offset, readers = layers[0].norm1.num_features, []
        for layer in layers:
            writers.append((layer.conv2, offset))
            readers.append(layer.norm1)
            offset += layer.conv2.out_channels
        after = stages[i + 1] if i + 1 < len(stages) else None
        if isinstance(after, _Transition):
            readers.append(after.norm)
        elif isinstance(after, nn.BatchNorm2d):
            readers.append(after)
        else:
            continue   # something else reads the block: leave its writers alone
        groups.append((writers, readers))
        # a transition's convolution writes the next block's first channels (its pooling is linear)
        writers = [(after.conv, 0)] if isinstance(after, _Transition) else []
    return groups


def _channel_ranges(model: nn.Module, images: torch.Tensor, convs_in, convs_out, batch: int = 64):
    """Per-channel max of each convolution's input and min/max of each output, over `images`."""
    amax, omin, omax = {}, {}, {}

    def keep(store, key, value, op):
        store[key] = value if key not in store else op(store[key], value)

    def hook(mod, inp, out):
        if id(mod) in convs_in:
            keep(amax, id(mod), inp[0].detach().transpose(0, 1).flatten(1).amax(1), torch.maximum)
        if id(mod) in convs_out:
            o = out.detach().transpose(0, 1).flatten(1)
            keep(omin, id(mod), o.amin(1), torch.minimum)
            keep(omax, id(mod), o.amax(1), torch.maximum)
    observe(model, [m for m in model.modules() if id(m) in convs_in | convs_out], images, hook=hook, batch=batch)
    return amax, omin, omax


def equalize_densenet(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, int]:
    """An eval-mode copy of a torchvision DenseNet rescaled as the module says, and how many layers changed.

    `images` are normalized training images (calibration). Any other model comes back unchanged, with 0.
    """
    if not is_densenet(model):
        return model, 0
    model = copy.deepcopy(model).cpu().float().eval()
    pairs, groups = _norm_relu_convs(model), _feature_writers(model)
    amax, omin, omax = _channel_ranges(model, images, {id(c) for _, c in pairs},
                                       {id(c) for writers, _ in groups for c, _ in writers})
    changed = 0
    with torch.no_grad():
        for bn, conv in pairs:
            act = amax[id(conv)].clamp_min(1e-12)
            wr = conv.weight.abs().transpose(0, 1).flatten(1).amax(1).clamp_min(1e-12)
            s = (act / wr).pow(INPUT_POWER)
            s = (s / s.max()).clamp_min(MIN_SCALE)
            bn.weight /= s
            bn.bias /= s
            conv.weight *= s.view(1, -1, 1, 1)
            changed += 1
        # then outputs, measured on the original model (rescaling inputs changed no output)
        for writers, readers in groups:
            # one range for the whole concatenation: int8 gives it one scale (QLinearConcat)
            widest = max(float((omax[id(c)] - omin[id(c)]).max()) / 2 for c, _ in writers)
            for conv, first in writers:
                lo, hi = omin[id(conv)], omax[id(conv)]
                mid, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(1e-12)
                s = (half / max(widest, 1e-12)).clamp_min(MIN_SCALE)
                conv.weight /= s.view(-1, 1, 1, 1)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
                conv.bias = nn.Parameter((bias - mid) / s)
                span = slice(first, first + conv.out_channels)
                for bn in readers:
                    if bn.num_features >= span.stop:
                        bn.running_mean[span] = (bn.running_mean[span] - mid) / s
                        bn.weight[span] *= s
                changed += 1
    return model, changed
