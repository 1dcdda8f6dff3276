"""Model registry: teachers (torchvision architectures) and small students, by name.

Teachers keep torchvision's architecture unchanged (as the seed study did) apart from a head
sized for the dataset; 32×32 input works because every one ends in adaptive pooling.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from .errors import LabError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    role: str                 # "teacher" | "student"
    build: Callable[[int], nn.Module]
    torchvision_name: str | None = None
    description: str = ""
    # what the lab knows about this architecture (measurements in docs/teachers.md, docs/bench_quantization.md)
    study: bool = False                  # one of the seed study's four teachers (prepare and sweep's default)
    large_set_batch: bool = False        # trains at batch 256, peak lr 0.2 on large sets (training.LARGE_SET)
    grad_clip: float | None = None       # gradient-norm clipping in the default recipe
    int8_calibration: str = "minmax"     # int8 "auto" calibration
    int8_fp32_layers: tuple = ("classifier",)   # int8 "auto" layers kept in fp32: candidates in order


def _tv(name: str, head: Callable[[nn.Module, int], None], **options):
    def build(num_classes: int) -> nn.Module:
        model = getattr(torchvision.models, name)(weights=None, **options)
        head(model, num_classes)
        return model
    return build


def _fc_head(model, n):
    model.fc = nn.Linear(model.fc.in_features, n)


def _classifier_head(model, n):
    model.classifier = nn.Linear(model.classifier.in_features, n)


def _vgg_head(model, n):
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, n)


class SmallCNN(nn.Module):
    """The seed study's student: three conv blocks and a linear head (~0.1M parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style residual student (3×3 stem, no max-pool): ResNet-8 with widths 16/32/64 by default."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# ResNets start every residual block as the identity (torchvision's zero_init_residual: the block's
# last batch norm starts at 0). Measured on Shapes v2, ResNet-34, 5 epochs: 60.4% -> 74.7%.
MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("resnet34", "ResNet-34", "teacher", _tv("resnet34", _fc_head, zero_init_residual=True), "resnet34",
              "torchvision ResNet-34, 10-class head", study=True, large_set_batch=True),
    ModelSpec("resnet50", "ResNet-50", "teacher", _tv("resnet50", _fc_head, zero_init_residual=True), "resnet50",
              "torchvision ResNet-50, 10-class head", study=True, large_set_batch=True),
    # concatenated features carry rare large activations: percentile calibration, and the layers whose errors
    # every later one reads (stem and classifier, then the 1x1 and 2x2 maps) kept in fp32 until int8 agrees
    ModelSpec("densenet121", "DenseNet-121", "teacher", _tv("densenet121", _classifier_head), "densenet121",
              "torchvision DenseNet-121, 10-class head", study=True, int8_calibration="p99.9",
              int8_fp32_layers=("edges", "edges+1x1", "edges+2x2+pooled")),
    # no residual paths and 4096-wide linear layers: went to NaN in the first epoch without clipping
    ModelSpec("vgg16", "VGG16", "teacher", _tv("vgg16", _vgg_head), "vgg16",
              "torchvision VGG16 without batch norm (as in the seed study; slow to train from scratch)", grad_clip=2.0),
    ModelSpec("vgg16_bn", "VGG16-BN", "teacher", _tv("vgg16_bn", _vgg_head), "vgg16_bn",
              "torchvision VGG16 with batch norm (trains from scratch reliably)", study=True, grad_clip=2.0),
    ModelSpec("cnn_small", "Small CNN", "student", lambda n: SmallCNN(n),
              description="3 conv blocks + linear head, ~0.1M parameters (the seed's student)"),
    ModelSpec("resnet8", "ResNet-8", "student", lambda n: ResNetSmall(n),
              description="CIFAR-style residual net, widths 16/32/64, ~0.08M parameters"),
    ModelSpec("resnet14_wide", "ResNet-14 (wide)", "student",
              lambda n: ResNetSmall(n, widths=(32, 64, 128), blocks=2),
              description="CIFAR-style residual net, widths 32/64/128 × 2 blocks, ~0.7M parameters"),
]}

TEACHERS = [n for n, s in MODELS.items() if s.role == "teacher"]
STUDENTS = [n for n, s in MODELS.items() if s.role == "student"]
# The seed study's four teachers (VGG16 with batch norm: see docs/teachers.md for why).
STUDY_TEACHERS = [n for n, s in MODELS.items() if s.study]
DEFAULT_TEACHER = "resnet34"
DEFAULT_STUDENT = "resnet8"


def get_spec(name: str, role: str | None = None) -> ModelSpec:
    spec = MODELS.get(name)
    if spec is None or (role and spec.role != role):
        names = TEACHERS if role == "teacher" else STUDENTS if role == "student" else list(MODELS)
        kind = role or "model"
        raise LabError(f"unknown {kind} {name!r}; choose one of: {', '.join(names)}")
    return spec


def build_model(name: str, num_classes: int = 10, pretrained: bool = False,
                notices: list | None = None) -> nn.Module:
    """Build a registered model; with pretrained, ImageNet weights are used when torchvision can load them."""
    spec = get_spec(name)
    model = spec.build(num_classes)
    if pretrained:
        if not spec.torchvision_name:
            raise LabError(f"{name} has no pretrained weights (students are trained here)")
        _load_imagenet(model, spec.torchvision_name, notices)
    return model


def _load_imagenet(model: nn.Module, tv_name: str, notices: list | None) -> bool:
    """Copy ImageNet weights (all but the head); on any failure keep the random init and say so."""
    import socket
    try:
        weights = torchvision.models.get_model_weights(tv_name).DEFAULT
        if os.environ.get("COMPRESSION_LAB_OFFLINE"):
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.exists():
                raise FileNotFoundError(f"{cached} (downloads are off: COMPRESSION_LAB_OFFLINE)")
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        finally:
            socket.setdefaulttimeout(old)
    except Exception as exc:
        msg = (f"ImageNet weights for {tv_name} could not be loaded ({type(exc).__name__}); "
               f"using random initialisation instead")
        warnings.warn(msg, stacklevel=2)
        if notices is not None:
            notices.append(msg)
        return False
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    return True


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
