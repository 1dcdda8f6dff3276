"""PyTorch -> ONNX: an fp32 graph of any lab model, with the modules the exporter rejects (or exports
slowly) swapped for equal computations."""
from __future__ import annotations

import io

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_NAME, OUTPUT_NAME = "input", "logits"


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
    1 (docs/bench_quantization.md, 2026-11-29).
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
