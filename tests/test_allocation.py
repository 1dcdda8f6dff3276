"""allocation=sensitivity (core/allocation.py): per-layer pruning ratios and bit widths chosen from the
sensitivity scan meet the same global target as uniform; uniform keeps every existing cache key; bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from core import allocation, metrics, sensitivity
from core.cli import main
from core.errors import InvalidParameter
from core.techniques import Context, get_technique
from core.techniques import pruning, quant_fake
from core.training import evaluate_accuracy

EVAL = 200


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher()


@pytest.fixture(autouse=True)
def small_scans(monkeypatch):
    """The allocation's scan on 100 training images and fewer settings: the same code, a few seconds."""
    monkeypatch.setattr(allocation, "ALLOCATION_SCAN", {"eval_size": 100, "split": "train"})
    monkeypatch.setitem(sensitivity.DEFAULT_SETTINGS, "prune", (0.3, 0.6, 0.9))
    monkeypatch.setitem(sensitivity.DEFAULT_SETTINGS, "quantize", (8, 4, 3, 2))


def _apply(teacher, data, technique: str, progress=None, **params):
    spec = get_technique(technique)
    p = spec.validate(params)
    out = spec.apply(Context(teacher=teacher, data=data, params=p, eval_size=EVAL, progress=progress))
    return p, out


def _accuracy(model, data) -> float:
    return evaluate_accuracy(model, data, *data.eval_split(EVAL))


def test_uniform_keeps_the_parameters_and_so_every_existing_cache_key():
    for technique in ("prune", "quantize"):
        spec = get_technique(technique)
        assert "allocation" not in spec.validate({})
        assert "allocation" not in spec.validate({"allocation": "uniform"})
        assert spec.validate({"allocation": "sensitivity"})["allocation"] == "sensitivity"


def test_structured_allocation_meets_the_macs_target(teacher, shapes, capsys, monkeypatch):
    monkeypatch.setattr(pruning, "SEARCH", (("scan", None),))   # the scan's own allocation, unbounded
    _, uniform = _apply(teacher, shapes, "prune", method="structured", ratio=0.3)
    p, alloc = _apply(teacher, shapes, "prune", method="structured", ratio=0.3, allocation="sensitivity")
    assert p["allocation"] == "sensitivity"
    macs_u, macs_s = metrics.count_macs(uniform.model), metrics.count_macs(alloc.model)
    assert abs(macs_s / macs_u - 1) <= allocation.ALLOCATION_TOLERANCE, (macs_s, macs_u)
    ratios = alloc.extra["allocation"]
    assert set(ratios) == {n for n, _ in pruning.prunable_layers(teacher.model)}
    assert len(set(ratios.values())) > 2   # not uniform
    # each layer kept what the allocation says (its output channels)
    pruned = dict(alloc.model.named_modules())
    for name, module in pruning.prunable_layers(teacher.model):
        if isinstance(module, torch.nn.Conv2d):
            kept = pruned[name].out_channels / module.out_channels
            assert kept == pytest.approx(1 - ratios[name], abs=1e-3), name
    acc_t, acc_u, acc_s = (_accuracy(m, shapes) for m in (teacher.model, uniform.model, alloc.model))
    with capsys.disabled():
        print(f"\n[allocation] tiny ResNet-34 ({acc_t:.3f}), structured 0.3: MACs uniform {macs_u:,} "
              f"sensitivity {macs_s:,} ({macs_s / macs_u - 1:+.1%}); accuracy uniform {acc_u:.3f} "
              f"sensitivity {acc_s:.3f}")


def test_structured_allocation_keeps_the_best_measured_candidate(teacher, shapes):
    """The scan's losses are added up as if layers were independent; each candidate of pruning.SEARCH
    (uniform itself last) is pruned and corrected as the result is, measured on the scan's training images,
    and the most accurate kept: never worse than uniform on those images."""
    _, uniform = _apply(teacher, shapes, "prune", method="structured", ratio=0.5)
    events = []
    p, alloc = _apply(teacher, shapes, "prune", events.append, method="structured", ratio=0.5,
                      allocation="sensitivity")
    measuring = [e.message for e in events if e.message.startswith("measuring allocation")]
    assert 1 <= len(measuring) <= len(pruning.SEARCH)   # the same allocation is measured once
    search = alloc.extra["allocation_search"]
    tried = search["tried"]
    assert [(t["source"], t["max_shift"]) for t in tried] == list(pruning.SEARCH)
    assert pruning.SEARCH[-1] == ("uniform", 0.0)
    images, labels = sensitivity.scan_images(shapes, allocation.ALLOCATION_SCAN)
    assert search["images"] == len(labels)
    one = 1 / len(labels) + 1e-9
    # the uniform candidate is the uniform result, measured the same way
    assert tried[-1]["macs"] == alloc.extra["allocation_target"]["macs_uniform"]
    assert tried[-1]["accuracy"] == pytest.approx(sensitivity.accuracy_on(uniform.model, images, labels), abs=one)
    best = max(t["accuracy"] for t in tried)
    assert sensitivity.accuracy_on(alloc.model, images, labels) == pytest.approx(best, abs=one)
    chosen = [t for t in tried if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["accuracy"] == best
    assert alloc.extra["allocation_target"]["macs"] == chosen[0]["macs"]
    assert any(n.startswith(f"allocations measured on {len(labels)} training images") for n in alloc.notes)
    for t in tried:
        assert abs(t["macs"] / tried[-1]["macs"] - 1) <= allocation.ALLOCATION_TOLERANCE, t
    # a changed rule of the search changes the key of these results only
    spec = get_technique("prune")
    assert spec.key_parts(p) == {"rules": {"structured_allocation": 5}}
    assert spec.key_parts(spec.validate({"method": "structured"})) == {}
    assert spec.key_parts(spec.validate({"method": "unstructured", "allocation": "sensitivity"})) == {}


@pytest.mark.parametrize("arch", ["resnet34", "densenet121", "vgg16_bn"])
def test_the_plan_counts_the_macs_of_the_pruned_model(arch):
    """StructuredPlan.macs, which the allocation meets its target with, is the conv/linear MACs of the model
    torch-pruning makes, also where a layer's input concatenates many groups (DenseNet)."""
    from core.models import build_model
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    plan = allocation.StructuredPlan(model)
    gen = torch.Generator().manual_seed(1)
    kept = {}
    for g in plan.groups:   # a different ratio per group, 0.1 to 0.8, kept a multiple of 8 as the lab prunes
        r = 0.1 + 0.7 * float(torch.rand(1, generator=gen))
        kept[g] = allocation.kept_channels(plan.channels[g], r, 8)
    mods = dict(model.named_modules())
    pruning.structured_prune(model, 0.5, channel_multiple=8,
                             ratios={mods[g]: allocation.ratio_for_kept(plan.channels[g], k) for g, k in kept.items()})
    real = sum(c["macs"] for c in sensitivity.layer_counts(model).values())
    assert plan.macs(kept) == pytest.approx(real, rel=0.01), (plan.macs(kept), real)


@pytest.mark.parametrize("bn_correction", [False, True])
def test_context_scan_moves_one_group_away_from_uniform_pruning(teacher, shapes, bn_correction):
    """allocation.context_scan: the base is the uniformly pruned model, each row one group moved to another
    ratio with every other group still pruned, as torch-pruning would prune them (and batch-norm correction
    would correct them, on the images measured); the weights come back and no hook stays."""
    from core.techniques import bn_correction as bnc
    model = copy.deepcopy(teacher.model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = allocation.StructuredPlan(model)
    images, labels = sensitivity.scan_images(shapes, {"eval_size": 100, "split": "train"})
    ctx = allocation.context_scan(model, images, labels, plan, 0.5, 8, settings=(0.25, 0.75),
                                  bn_correction=bn_correction)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    assert ctx["settings"] == [0.25, 0.5, 0.75] and [r["name"] for r in ctx["layers"]] == plan.groups
    assert all(r["accuracy"]["0.5"] == ctx["baseline_accuracy"] for r in ctx["layers"])

    def real(moved=None):
        m = copy.deepcopy(teacher.model)
        mods = dict(m.named_modules())
        saved = pruning._tag_channels(m)
        pruning.structured_prune(m, 0.5, channel_multiple=8, ratios={mods[g]: r for g, r in (moved or {}).items()})
        kept = pruning._kept_channels_per_bn(m, saved)
        if bn_correction:
            assert bnc.correct_batch_norms(m, teacher.model, images, kept) > 0
        with torch.inference_mode():
            return m(images.contiguous()).argmax(1)

    base = real()
    assert ctx["baseline_accuracy"] == pytest.approx(float((base == labels).float().mean()), abs=1e-9)
    moved = 0
    for row in ctx["layers"][:: max(1, len(ctx["layers"]) // 4)]:
        for x in (0.25, 0.75):
            pred = real({row["name"]: x})
            assert row["accuracy"][sensitivity.setting_label(x)] == pytest.approx(float((pred == labels).float().mean()),
                                                                                   abs=1e-9), (row["name"], x)
            moved += not torch.equal(pred, base)
    assert moved


def test_unstructured_allocation_zeroes_as_many_weights(teacher, shapes):
    _, uniform = _apply(teacher, shapes, "prune", method="unstructured", ratio=0.7, bn_correction=False)
    _, alloc = _apply(teacher, shapes, "prune", method="unstructured", ratio=0.7, allocation="sensitivity",
                      bn_correction=False)
    zu, zs = uniform.extra["pruned_params"], alloc.extra["pruned_params"]
    assert zu <= zs <= zu * (1 + 0.01)
    assert len(set(alloc.extra["allocation"].values())) > 2
    assert alloc.extra["allocation_target"]["zeroed"] == zs


def test_mixed_precision_meets_the_average_bits_and_loads_back(teacher, shapes):
    p, out = _apply(teacher, shapes, "quantize", mode="fake", bits=3, allocation="sensitivity")
    bits = out.extra["allocation"]
    assert set(bits.values()) <= set(range(2, 9)) and len(set(bits.values())) > 1
    sizes = {n: m.weight.numel() for n, m in quant_fake.quantizable_layers(teacher.model)}
    avg = sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert 3 * (1 - allocation.ALLOCATION_TOLERANCE) <= avg <= 3 and out.extra["average_bits"] == pytest.approx(avg)
    record = out.state["weights"]
    assert out.extra["packed_weight_bytes"] == sum(math.ceil(sizes[n] * bits[n] / 8) for n in sizes)
    assert record["bits"] == [bits[n] for n in record["names"]]
    for name, module in quant_fake.quantizable_layers(out.model):   # each layer on its own grid
        w = module.weight.detach()
        levels = max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1))
        assert levels <= 2 ** bits[name] - 1, name
    spec = get_technique("quantize")
    loaded = spec.load(out.state, Context(teacher=teacher, data=shapes, params=p))
    for (name, a), (_, b) in zip(quant_fake.quantizable_layers(out.model), quant_fake.quantizable_layers(loaded)):
        assert torch.equal(a.weight, b.weight), name


@pytest.mark.parametrize("args,words", [
    (["--technique", "quantize", "--mode", "fp16", "--allocation", "sensitivity"], "allocation"),
    (["--technique", "quantize", "--mode", "int8", "--allocation", "sensitivity", "--fp32-layers", "edges"],
     "fp32_layers"),
    (["--technique", "quantize", "--bits", "1", "--allocation", "sensitivity"], "bits"),
    (["--technique", "prune", "--scope", "global", "--allocation", "sensitivity"], "scope"),
    (["--technique", "prune", "--method", "unstructured", "--ratio", "0.95", "--allocation", "sensitivity"], "ratio"),
    (["--technique", "prune", "--allocation", "greedy"], "invalid choice"),
])
def test_bad_allocation_is_one_line_exit_2_and_nothing_cached(fresh_cache, capsys, args, words):
    try:
        code = main(["compress", *args, "--json"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (fresh_cache / "sensitivity").exists() and not (fresh_cache / "compressed").exists()


def test_allocation_checks_in_the_library():
    with pytest.raises(InvalidParameter):
        get_technique("quantize").validate({"mode": "fp16", "allocation": "sensitivity"})
    with pytest.raises(InvalidParameter):
        allocation.allocate_unstructured({"settings": [0.3, 0.9], "layers": []}, 0.95, {})


@pytest.mark.parametrize("arch", ["resnet34", "densenet121", "vgg16_bn"])
def test_every_layer_finds_its_onnx_node(arch):
    """int8's fp32 layers by name: the exporter's nodes line up with the layers in the order they run."""
    import onnx
    from core import layers
    from core.models import build_model
    from core.techniques import onnx_export, onnx_graph, quant_ort
    model = build_model(arch, 10).eval()
    graph = onnx.load_from_string(onnx_graph.depthwise_batch_norms(onnx_export.export_onnx(model)))
    order = layers.trace(model)["order"]
    found = quant_ort.layer_nodes(graph, order)
    assert list(found) == order and sorted(order) == sorted(layers.trace(model)["layers"])
    assert len(set(found.values())) == len(order)
    for module, node in list(found.items())[:3] + list(found.items())[-2:]:
        assert module.rsplit(".", 1)[-1] in node, (module, node)
    with pytest.raises(ValueError):
        quant_ort.layer_nodes(graph, order[:-1])
    rotated = order[1:] + order[:1]
    if arch == "densenet121":   # matched by order there: the names check it
        with pytest.raises(ValueError):
            quant_ort.layer_nodes(graph, rotated)
    else:                       # the scopes spell every name: any order (ONNX Runtime reorders the graph)
        assert quant_ort.layer_nodes(graph, rotated) == found


def test_int8_keeps_the_most_fragile_layers_in_fp32(teacher, shapes, monkeypatch):
    """allocation=sensitivity in int8 mode: the classifier and the layers the quantize scan ranks most fragile
    stay in fp32 (ONNX Runtime does not quantize their outputs), the fewest that agree with fp32, at most the
    largest count."""
    from core import layers
    from core.techniques import quant_ort, quantization
    monkeypatch.setattr(quantization, "SENSITIVE_FP32_COUNTS", (2,))   # exactly two, whatever they agree
    monkeypatch.setattr(quantization, "AUTO_MIN_AGREEMENT", 0.0)
    written = []   # the graph ONNX Runtime quantized, before it is stored without node names
    store = quant_ort.store_weights_int8
    monkeypatch.setattr(quant_ort, "store_weights_int8", lambda model, kept: (written.append(copy.deepcopy(model)),
                                                                              store(model, kept))[1])
    p, out = _apply(teacher, shapes, "quantize", mode="int8", allocation="sensitivity", calibration_images=64)
    assert p["allocation"] == p["fp32_layers"] == "sensitivity"
    assert get_technique("quantize").validate({"mode": "int8", "fp32_layers": "sensitivity", "calibration_images": 64}) == p
    scan = allocation.allocation_scan(teacher, shapes, "quantize", "per_channel")
    kept = out.extra["fp32_layer_names"]
    assert out.extra["fp32_layers"] == "sensitivity" and kept == [n for n in scan["fragile"] if n != "fc"][:2]
    readers = {}
    for n in written[-1].graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    nodes = quant_ort.layer_nodes(written[-1], layers.trace(teacher.model)["order"])
    by_name = {n.name: n for n in written[-1].graph.node}
    in_int8 = {m for m, n in nodes.items() if "QuantizeLinear" in readers.get(by_name[n].output[0], ())}
    assert set(nodes) - in_int8 == set(kept) | {"fc"}   # an int8 layer's output is quantized for the next one
    rows = layers.layer_table(None, teacher.model, int8=out.extra)
    assert {r["name"] for r in rows if r["bits"] == 32} == set(kept) | {"fc"}


def test_int8_falls_back_to_the_architectures_fp32_layers_after_the_scans(teacher, shapes, monkeypatch):
    """When none of the scan's choices agrees with fp32 well enough, the architecture's own candidates
    (ModelSpec.int8_fp32_layers) are tried too and the most faithful of all is kept."""
    from core.models import get_spec
    from core.techniques import quantization
    monkeypatch.setattr(quantization, "SENSITIVE_FP32_COUNTS", (1,))
    monkeypatch.setattr(quantization, "AUTO_MIN_AGREEMENT", 1.01)   # nothing is good enough: every one is tried
    _, out = _apply(teacher, shapes, "quantize", mode="int8", allocation="sensitivity", calibration_images=64)
    tried = out.extra["fp32_layers_agreement"]
    assert list(tried) == ["classifier+1 most fragile", *get_spec("resnet34").int8_fp32_layers]
    best = max(reversed(list(tried)), key=tried.get)
    assert out.extra["calibration_argmax_agreement"] == tried[best]
    if best in get_spec("resnet34").int8_fp32_layers:
        assert out.extra["fp32_layers"] == best and "fp32_layer_names" not in out.extra
    else:
        assert out.extra["fp32_layers"] == "sensitivity" and len(out.extra["fp32_layer_names"]) == 1
