"""DenseNet equalization before int8 (core.techniques.equalize): same function, even channels."""
import copy

import torch
import torch.nn as nn

from core.models import build_model
from core.techniques import equalize


def _uneven_densenet():
    """A DenseNet-121 whose batch norms make channel ranges differ by orders of magnitude, as a trained one's do."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():           # the same weights whatever ran before (the suite's order)
        torch.manual_seed(0)
        model = build_model("densenet121", 10).eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=g))
                bn.running_var.copy_(torch.rand(n, generator=g) * 4 + 1)
                bn.weight.copy_(10 ** (1.5 * torch.rand(n, generator=g) - 1))   # 0.1 to 3
                bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def _writer_ranges(model, images, group=None):
    """(min, max) per channel of every convolution writing into a concatenation (the `group`-th only)."""
    groups = equalize._feature_writers(model)
    writers = [c for i, (ws, _) in enumerate(groups) for c, _ in ws if group in (None, i)]
    seen = {}
    hooks = [c.register_forward_hook(lambda m, i, o, c=c: seen.__setitem__(
        c, (o.transpose(0, 1).flatten(1).amin(1), o.transpose(0, 1).flatten(1).amax(1)))) for c in writers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return [seen[c] for c in writers]


def test_equalization_keeps_the_function_and_evens_out_the_channels():
    model = _uneven_densenet()
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eq, changed = equalize.equalize_densenet(model, images)
    # 58 dense layers x 2 batch norm -> convolution pairs + 3 transitions; 58 growth + 3 transition writers
    assert changed == 119 + 61
    with torch.no_grad():
        ref, out = model(images), eq(images)
    assert torch.isfinite(ref).all() and ref.std() > 0
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # the input model is untouched
    spread_before = [((hi - lo).max() / (hi - lo).clamp_min(1e-9).median()).item()
                     for lo, hi in _writer_ranges(model, images)]
    assert max(spread_before) > 2   # the test model is uneven to begin with
    for group in range(len(equalize._feature_writers(eq))):
        ranges, original = _writer_ranges(eq, images, group), _writer_ranges(model, images, group)
        widest = max(float(hi.sub(lo).max()) / 2 for lo, hi in ranges)
        for (lo, hi), (lo0, hi0) in zip(ranges, original):
            half, mid = (hi - lo) / 2, (hi + lo) / 2
            # every channel of a concatenation now spans its widest one's range, centred on zero; one
            # nearly constant (under MIN_SCALE of the widest) is amplified by 1 / MIN_SCALE only
            want = torch.minimum(torch.full_like(half, widest), (hi0 - lo0) / 2 / equalize.MIN_SCALE)
            assert torch.allclose(half, want, rtol=1e-3)
            assert mid.abs().max() <= 1e-3 * widest
    # batch norm -> ReLU -> convolution inputs are closer in range than they were
    conv = eq.features.denseblock3.denselayer10.conv1
    orig = model.features.denseblock3.denselayer10.conv1
    got = {}
    for name, m in (("eq", conv), ("orig", orig)):
        h = m.register_forward_pre_hook(lambda mod, i, name=name: got.__setitem__(
            name, i[0].transpose(0, 1).flatten(1).amax(1).clamp_min(1e-9)))
        with torch.no_grad():
            (eq if name == "eq" else model)(images)
        h.remove()
    ratio = {k: (v.max() / v.median()).item() for k, v in got.items()}
    assert ratio["eq"] < ratio["orig"]


def test_other_architectures_are_left_alone():
    model = build_model("resnet14_wide", 10).eval()
    same, changed = equalize.equalize_densenet(model, torch.randn(4, 3, 32, 32))
    assert same is model and changed == 0
