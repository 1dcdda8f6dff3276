"""Per-layer table (core.layers): sums to the model totals a result reports, on real small runs (Shapes,
1-epoch ResNet-34 teacher) for the teacher, structured and unstructured pruning, simulated bits and int8."""
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from core import layers
from core.metrics import count_macs, count_params
from core.models import build_model
from core.results import ResultStore
from core.runner import ExperimentConfig, load_compressed, run_experiment
from core.settings import cache_dir
from core.training import TrainConfig

# the make_teacher fixture's recipe (as tests/test_pruning.py), so run_experiment finds the same cached teacher
RN_SUBSET = 500
TEACHER_CFG = TrainConfig(epochs=1, subset=RN_SUBSET, batch_size=64, lr=0.05)
EVAL = 200
KEYS = {"name", "kind", "params", "macs", "channels", "channels_kept", "sparsity", "bits", "weight_error"}


@pytest.fixture(scope="module")
def store():
    return ResultStore(cache_dir() / "test_layers.sqlite")


@pytest.fixture(scope="module")
def r34(make_teacher):
    return make_teacher("resnet34", subset=RN_SUBSET)


def _run(technique, params, store):
    cfg = ExperimentConfig(dataset="shapes", model="resnet34", technique=technique, params=params,
                           eval_size=EVAL, teacher_train=TEACHER_CFG, device="cpu")
    return run_experiment(cfg, store=store)


def _tp_split(model: nn.Module) -> tuple[int, int]:
    """(conv+linear MACs, MACs of every other module) by torch-pruning's counter, layer by layer."""
    import torch_pruning as tp
    m = model.float().eval()
    _, _, flops, _ = tp.utils.count_ops_and_params(m, torch.zeros(1, 3, 32, 32), layer_wise=True)
    mine = sum(int(flops[x] or 0) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
    other = sum(int(flops[x] or 0) for x in m.modules() if not isinstance(x, (nn.Conv2d, nn.Linear))
                and not list(x.children()))
    return mine, other


def check_totals(rows: list[dict], model: nn.Module, reported: dict) -> None:
    """The rows cover every conv/linear layer of `model` and sum to what the result reports for them:
    parameters (the result adds the batch norms') and MACs (count_macs adds BN/ReLU/pooling work)."""
    convlin = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [r["name"] for r in rows] == [n for n, _ in convlin]
    assert all(set(r) == KEYS for r in rows)
    layer_params = sum(p.numel() for _, m in convlin for p in m.parameters(recurse=False))
    assert sum(r["params"] for r in rows) == layer_params
    assert sum(r["params"] for r in rows) + (count_params(model) - layer_params) == reported["params"]
    mine, other = _tp_split(model)
    assert sum(r["macs"] for r in rows) == mine   # the same counting, layer by layer
    assert sum(r["macs"] for r in rows) + other == reported["macs"] == count_macs(model)
    for r, (_, m) in zip(rows, convlin):
        assert r["kind"] == ("conv" if isinstance(m, nn.Conv2d) else "linear")
        assert r["channels"] == ([m.in_channels, m.out_channels] if isinstance(m, nn.Conv2d)
                                 else [m.in_features, m.out_features])


def test_teacher_table_sums_to_the_model_totals(r34, store):
    r = _run("prune", {"method": "unstructured", "ratio": 0.6}, store)   # its baseline is the teacher's
    rows = layers.layer_table(r34.model, r34.model)
    check_totals(rows, r34.model, r.baseline)
    assert all(r["bits"] == 32 and r["weight_error"] == 0.0 and r["channels_kept"] == 1.0 for r in rows)
    assert rows[0]["name"] == "conv1" and rows[0]["macs"] == 7 * 7 * 3 * 64 * 16 * 16
    assert rows[-1] == dict(rows[-1], name="fc", kind="linear", macs=512 * 10 + 10, params=512 * 10 + 10)
    # cheap enough to run on every result: one shape pass (meta tensors), no images
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        layers.layer_table(r34.model, r34.model)
        best = min(best, time.process_time() - t0)
    assert best < 1.0, f"{best:.2f} s of CPU for a ResNet-34 table"


def test_structured_pruning_rows(r34, store):
    r = _run("prune", {"method": "structured", "ratio": 0.5}, store)
    model = load_compressed(r)
    check_totals(r.layers, model, r.compressed)
    by = {x["name"]: x for x in r.layers}
    assert by["layer1.0.conv1"]["channels_kept"] == pytest.approx(0.5)
    assert sum(x["channels_kept"] < 1 for x in r.layers) >= 20
    assert by["fc"]["channels_kept"] == 1.0 and by["fc"]["channels"] == [model.fc.in_features, 10]
    assert by["fc"]["channels"][0] < 512
    # no fine-tuning: the kept channels are found in the teacher, the removed ones count as zeros
    for x in r.layers:
        before = r34.model.get_submodule(x["name"]).weight.shape
        assert x["bits"] == 32 and x["weight_error"] is not None
        if model.get_submodule(x["name"]).weight.shape != before:
            assert 0 < x["weight_error"] < 1
        else:
            assert x["weight_error"] == 0


def test_kept_channels_found_exactly_or_not_at_all():
    ref = torch.randn(16, 8, 3, 3)
    outs, ins = torch.tensor([0, 3, 4, 9, 15]), torch.tensor([1, 2, 6])
    w = ref[outs][:, ins].clone()
    found = layers.kept_indices(w, ref)
    assert found is not None and torch.equal(found[0], outs) and torch.equal(found[1], ins)
    kept = ref[outs][:, ins].pow(2).sum()
    assert layers._structured_error(w, ref) == pytest.approx(float(((ref.pow(2).sum() - kept) / ref.pow(2).sum()).sqrt()))
    w[2, 1, 0, 0] += 1e-3   # fine-tuned: nothing matches exactly any more
    assert layers.kept_indices(w, ref) is None and layers._structured_error(w, ref) is None
    lin = torch.randn(10, 64)
    assert torch.equal(layers.kept_indices(lin[:, ::2].clone(), lin)[1], torch.arange(0, 64, 2))


def test_unstructured_pruning_rows(r34, store):
    ratio = 0.6
    r = _run("prune", {"method": "unstructured", "ratio": ratio}, store)
    model = load_compressed(r)
    check_totals(r.layers, model, r.compressed)
    for x in r.layers:
        n = r34.model.get_submodule(x["name"]).weight.numel()
        assert x["sparsity"] == pytest.approx(round(ratio * n) / n, abs=1e-9)   # scope "layer": each layer
        assert x["channels_kept"] == 1.0 and x["bits"] == 32
        assert 0 < x["weight_error"] < 1   # the smallest 60% of the weights: well under all of its norm
    extra = r.compressed["extra"]
    zeros = sum(x["sparsity"] * r34.model.get_submodule(x["name"]).weight.numel() for x in r.layers)
    assert zeros / extra["prunable_params"] == pytest.approx(extra["sparsity"])


def test_fake_quantization_rows_bits_and_growing_error(r34, store):
    errors = {}
    for bits in (8, 4, 2):
        r = _run("quantize", {"mode": "fake", "bits": bits}, store)
        check_totals(r.layers, load_compressed(r), r.compressed)
        assert all(x["bits"] == bits and x["channels_kept"] == 1.0 for x in r.layers)
        assert all(x["weight_error"] > 0 for x in r.layers)
        errors[bits] = np.array([x["weight_error"] for x in r.layers])
    assert (errors[2] > errors[4]).all() and (errors[4] > errors[8]).all()
    assert errors[8].max() < 0.05 and errors[2].min() > 0.1


def test_fp16_rows(r34, store):
    r = _run("quantize", {"mode": "fp16"}, store)
    assert all(x["bits"] == 16 and 0 < x["weight_error"] < 1e-3 for x in r.layers)
    check_totals(r.layers, r34.model, r.compressed)   # the same architecture as the teacher


def _onnx_weight_codes(onnx_bytes: bytes) -> list[np.ndarray]:
    """The int8 weight tensors (conv 4-d, gemm 2-d) that DequantizeLinear nodes of the file read."""
    import onnx
    from onnx import TensorProto, numpy_helper
    g = onnx.load_from_string(onnx_bytes).graph
    inits = {t.name: t for t in g.initializer}
    out = []
    for n in g.node:
        t = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if t is not None and t.data_type == TensorProto.INT8 and len(t.dims) in (2, 4):
            out.append(numpy_helper.to_array(t))
    return out


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_int8_rows_from_the_fp32_teacher(r34, store, granularity):
    r = _run("quantize", {"mode": "int8", "calibration_images": 64, "granularity": granularity}, store)
    extra = r.compressed["extra"]
    assert extra["quantized"] and extra["fp32_layers"] == "classifier"
    check_totals(r.layers, r34.model, r.compressed)
    assert [x["bits"] for x in r.layers] == [8] * (len(r.layers) - 1) + [32]   # the classifier stays fp32
    assert all(0 < x["weight_error"] < 0.1 for x in r.layers)
    # the simulation is what ONNX Runtime stored: the same integer codes, layer for layer (the export folds
    # each batch norm into its convolution first; per tensor, the fold changes every code)
    traced = layers.trace(r34.model)
    plan = layers.int8_plan(extra, traced)
    stored = _onnx_weight_codes(load_compressed(r).onnx_bytes)
    assert len(stored) == len(r.layers)
    unmatched = []
    for x in r.layers:
        w = r34.model.get_submodule(x["name"]).weight.detach().float()
        bn = traced["folded"].get(x["name"])
        if bn is not None:
            w = w * layers._fold_scale(r34.model.get_submodule(bn)).reshape(-1, 1, 1, 1)
        fp32 = x["name"] in plan["fp32"]
        codes, _ = layers.ort_fake_quant(w, True if fp32 else plan["per_channel"], 127 if fp32 else plan["qmax"])
        codes = codes.to(torch.int8).numpy()
        if not any(_same_codes(s, codes, 127 if fp32 else plan["qmax"]) for s in stored):
            unmatched.append(x["name"])
    assert not unmatched


def _same_codes(stored: np.ndarray, codes: np.ndarray, qmax: int) -> bool:
    """ONNX Runtime stored the simulated codes, up to rounding, except in output channels whose scale it
    raised so that the int32 bias stays in range (a near-zero batch-norm scale folded into the weights):
    those never reach ±qmax, and there are few of them."""
    if stored.shape != codes.shape:
        return False
    s, c = stored.reshape(len(stored), -1), codes.reshape(len(codes), -1)
    raised = (np.abs(s).max(1) < qmax) & (np.abs(c).max(1) == qmax)
    return raised.mean() <= 0.02 and (s[~raised] != c[~raised]).mean() < 1e-3


def test_int8_fp32_layer_rules_match_the_onnx_graph():
    """int8_plan applies quant_ort's fp32-layer rules to module shapes as fp32_nodes applies them to the graph."""
    import onnx
    from core.techniques import onnx_export, onnx_graph, quant_ort
    from core.techniques.quantization import FP32_LAYERS
    for arch in ("resnet34", "densenet121"):
        model = build_model(arch, 10).eval()
        graph = onnx.load_from_string(onnx_graph.depthwise_batch_norms(onnx_export.export_onnx(model)))
        for i, n in enumerate(graph.graph.node):
            n.name = n.name or f"{n.op_type}_{i}"
        traced = layers.trace(model)
        for kept, rules in FP32_LAYERS.items():
            # batch norms run as depthwise convolutions (`_dw`) are no module of the model
            nodes = [n for n in quant_ort.fp32_nodes(graph, rules) if not n.endswith("_dw")]
            assert len(layers.int8_plan({"fp32_layers": kept}, traced)["fp32"]) == len(nodes), (arch, kept)


def test_result_json_carries_layers(store):
    r = _run("prune", {"method": "unstructured", "ratio": 0.6}, store)
    again = _run("prune", {"method": "unstructured", "ratio": 0.6}, store)
    assert again.cached and again.layers == r.layers   # the table travels with the stored result
    out = json.loads(json.dumps(r.summary()))
    assert out["layers"] == r.layers and len(out["layers"]) == 37
    assert set(out["layers"][0]) == KEYS
    assert store.get(r.key).layers == r.layers
