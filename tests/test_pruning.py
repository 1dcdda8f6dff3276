"""Pruning: real small runs on the offline shapes data with 1-epoch teachers."""
import copy
import io
import time

import pytest
import torch

from core.errors import InvalidParameter
from core.metrics import count_macs, count_nonzero_params, count_params, size_report
from core.results import ResultStore
from core.runner import ExperimentConfig, load_compressed, run_experiment
from core.settings import cache_dir
from core.techniques import Context, get_technique
from core.techniques import pruning
from core.training import TrainConfig, predict_logits

# tiny teachers: these tests check structure and bookkeeping, not accuracy
RN_SUBSET, DN_SUBSET = 500, 256
# the make_teacher fixture's recipe, so run_experiment finds the very same cached teacher
TEACHER_CFG = TrainConfig(epochs=1, subset=RN_SUBSET, batch_size=64, lr=0.05)
EVAL = 200


def dense_teacher(make_teacher):
    return make_teacher("densenet121", subset=DN_SUBSET)


@pytest.fixture(scope="module")
def spec():
    return get_technique("prune")


@pytest.fixture(scope="module")
def store():
    return ResultStore(cache_dir() / "test_pruning.sqlite")


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _logits(model, shapes, n=64):
    return predict_logits(model, shapes, shapes.test_x[:n])


def _run(model, params, store):
    cfg = ExperimentConfig(dataset="shapes", model=model, technique="prune", params=params,
                           eval_size=EVAL, teacher_train=TEACHER_CFG, device="cpu")
    return run_experiment(cfg, store=store)


@pytest.mark.parametrize("params, name, needle", [
    ({"ratio": 1.2}, "ratio", "0.95"),
    ({"method": "foo"}, "method", "structured"),
    ({"ratio": 0.92, "method": "structured"}, "ratio", "0.9"),
    ({"method": "unstructured", "importance": "bn_scale"}, "importance", "structured"),
    ({"finetune_epochs": -1}, "finetune_epochs", "50"),
])
def test_invalid_params_refused_before_work(fresh_cache, params, name, needle):
    t0 = time.perf_counter()
    cfg = ExperimentConfig(model="resnet34", technique="prune", params=params, eval_size=EVAL)
    with pytest.raises(InvalidParameter) as exc:
        run_experiment(cfg, store=ResultStore(fresh_cache / "r.sqlite"))
    assert exc.value.name == name and needle in str(exc.value)
    assert time.perf_counter() - t0 < 5
    assert not (fresh_cache / "teachers").exists()   # nothing was trained


def test_structured_resnet34_shrinks_finetunes_reloads_and_caches(make_teacher, shapes, spec, store):
    teacher = make_teacher("resnet34", subset=RN_SUBSET)
    before = copy.deepcopy(teacher.model.state_dict())
    params = {"ratio": 0.5, "finetune_epochs": 1, "finetune_subset": 256}
    r = _run("resnet34", params, store)
    assert not r.cached
    assert r.compressed["params"] < 0.4 * r.baseline["params"]
    assert r.compressed["macs"] < 0.4 * r.baseline["macs"]
    assert r.compressed["size_bytes"] < 0.4 * r.baseline["size_bytes"]
    assert len(r.history) == 1 and 0 <= r.history[0]["val_accuracy"] <= 1
    assert r.compressed["extra"]["kept_channel_fraction"] == pytest.approx(0.5, abs=0.02)
    # also timed in ONNX Runtime, whose fused graph turns the MAC cut into time (3.9x measured)
    dep = r.compressed["extra"]["deployed"]
    assert dep["runtime"] == "onnxruntime-cpu" and "error" not in dep
    assert dep["speedup_b64"] == pytest.approx(dep["baseline_ms_b64"] / dep["compressed_ms_b64"])
    assert dep["speedup_b64"] > 1.5
    if r.baseline["threads"] > 1:
        assert set(dep["batch_plan_b64"].values()) <= {"whole", "split"} and len(dep["batch_plan_b64"]) == 2
    # the teacher is untouched
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())
    # the saved file (weights_only) rebuilds a model that predicts what was measured
    reloaded = load_compressed(r)
    x, y = shapes.eval_split(EVAL)
    acc = float((predict_logits(reloaded, shapes, x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(r.compressed["accuracy"], abs=1e-9)
    assert count_params(reloaded) == r.compressed["params"]
    # the same request again comes from the cache
    # (CPU time, not wall time: the 2 test cores are shared with other jobs)
    t0 = time.process_time()
    again = _run("resnet34", params, store)
    assert again.cached and time.process_time() - t0 < 1.0
    assert again.compressed["accuracy"] == r.compressed["accuracy"]


def test_structured_densenet121_concatenations(make_teacher, shapes, spec):
    teacher = dense_teacher(make_teacher)
    p = spec.validate({"ratio": 0.5})
    out = spec.apply(Context(teacher, shapes, p, eval_size=EVAL))
    assert count_params(out.model) < 0.4 * count_params(teacher.model)
    assert count_macs(out.model) < 0.4 * count_macs(teacher.model)
    logits = _logits(out.model, shapes)
    assert logits.shape == (64, shapes.num_classes) and torch.isfinite(logits).all()
    reloaded = spec.load(_roundtrip(out.state), None)
    assert torch.equal(_logits(reloaded, shapes), logits)
    # every batch norm, including those of the concatenations, was matched to its kept channels
    bns = [m for m in out.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert out.extra["corrected_batch_norms"] == len(bns) == 121


def _assert_normalized_like_the_teacher(model, teacher_model, shapes, kept=None) -> int:
    """Each batch norm of `model` normalizes its input on the correction images to the per-channel mean
    and variance the teacher's (kept) channels have; returns how many were checked."""
    from core.techniques import bn_correction
    from core.techniques.base import calibration_images
    x = calibration_images(shapes, bn_correction.IMAGES)
    got, want = (bn_correction.batch_norm_inputs(m, x) for m in (model, teacher_model))
    t_mods, checked = dict(teacher_model.named_modules()), 0
    for name, bn in model.named_modules():
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        ref = t_mods[name]
        idx = kept[name] if kept is not None else torch.arange(len(bn.running_mean))
        z_got = (got[name][0] - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
        z_want = ((want[name][0] - ref.running_mean) / (ref.running_var + ref.eps).sqrt())[idx]
        assert torch.allclose(z_got, z_want, atol=1e-3), name
        v_got = got[name][1] / (bn.running_var + bn.eps)
        v_want = (want[name][1] / (ref.running_var + ref.eps))[idx]
        assert torch.allclose(v_got, v_want, rtol=1e-2, atol=1e-4), name
        checked += 1
    return checked


def test_bn_correction_after_unstructured_pruning(make_teacher, shapes, spec):
    teacher = make_teacher("resnet34")
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    ref = _logits(teacher.model, shapes, 128)
    outs = {flag: spec.apply(Context(teacher, shapes, spec.validate(
        {"method": "unstructured", "ratio": 0.7, "bn_correction": flag}), eval_size=EVAL)) for flag in (True, False)}
    assert outs[True].extra["corrected_batch_norms"] == 36 and outs[False].extra["corrected_batch_norms"] == 0
    assert _assert_normalized_like_the_teacher(outs[True].model, teacher.model, shapes) == 36
    # closer to the teacher's logits (on this 1-epoch teacher, measured 0.74-0.87 of the uncorrected error)
    err = {flag: float((_logits(o.model, shapes, 128) - ref).norm() / (ref - ref.mean(0)).norm())
           for flag, o in outs.items()}
    assert err[True] < 0.95 * err[False]
    # the same weights were removed either way: only the statistics differ
    on, off = outs[True].model.state_dict(), outs[False].model.state_dict()
    assert all(torch.equal(on[k], off[k]) for k in on if not k.endswith(("running_mean", "running_var")))
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())   # teacher untouched


def test_bn_correction_after_structured_pruning_matches_each_kept_channel_to_the_teacher(
        make_teacher, shapes, spec, monkeypatch):
    from core.techniques import pruning
    teacher = make_teacher("resnet34")
    kept = {}
    real = pruning._kept_channels_per_bn
    monkeypatch.setattr(pruning, "_kept_channels_per_bn", lambda m, saved: kept.update(real(m, saved)) or kept)
    out = spec.apply(Context(teacher, shapes, spec.validate({"ratio": 0.5}), eval_size=EVAL))
    t_mods = dict(teacher.model.named_modules())
    for name, bn in out.model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            # the recovered channels are the ones kept (pruning copies the affine parameters unchanged)
            ref, idx = t_mods[name], kept[name]
            assert torch.equal(bn.weight, ref.weight[idx]) and torch.equal(bn.bias, ref.bias[idx])
    checked = _assert_normalized_like_the_teacher(out.model, teacher.model, shapes, kept)
    assert checked == len(kept) == out.extra["corrected_batch_norms"] == 36


def test_finetuning_uses_the_recipe_precision(make_teacher, shapes, spec, monkeypatch):
    import core.training as training
    teacher = make_teacher("resnet34", subset=RN_SUBSET)
    seen, real_fit = [], pruning.resumable_fit

    def spy(model, data, cfg, checkpoint, **kw):
        seen.append(cfg.precision)
        return real_fit(model, data, cfg, checkpoint, **kw)

    monkeypatch.setattr(pruning, "resumable_fit", spy)
    p = spec.validate({"ratio": 0.3, "finetune_epochs": 1, "finetune_subset": 64})
    for supported in (True, False):
        monkeypatch.setattr(training, "bf16_training_supported", lambda device, s=supported: s)
        out = spec.apply(Context(teacher, shapes, p, eval_size=50))
        assert len(out.history) == 1
    assert seen == ["bf16", "fp32"]


def test_structured_global_differs_from_layerwise(make_teacher):
    teacher = make_teacher("resnet34", subset=RN_SUBSET)

    def widths(scope):
        m = copy.deepcopy(teacher.model)
        pruning.structured_prune(m, 0.5, scope)
        return [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]

    layer, glob = widths("layer"), widths("global")
    full = [c.out_channels for c in teacher.model.modules() if isinstance(c, torch.nn.Conv2d)]
    assert all(w == f // 2 for w, f in zip(layer, full))   # every layer loses exactly half
    assert layer != glob and sum(glob) == pytest.approx(sum(layer), rel=0.15)


def test_structured_layers_keep_a_multiple_of_channel_multiple(make_teacher, spec):
    teacher = make_teacher("resnet34", subset=RN_SUBSET)
    full = [c.out_channels for c in teacher.model.modules() if isinstance(c, torch.nn.Conv2d)]

    def widths(multiple):
        m = copy.deepcopy(teacher.model)
        pruning.structured_prune(m, 0.3, channel_multiple=multiple)
        return [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]

    exact, rounded = widths(1), widths(8)
    assert all(abs(w - 0.7 * f) <= 1 for w, f in zip(exact, full)) and any(w % 8 for w in exact)   # 64 -> 44
    assert all(w % 8 == 0 and abs(w - e) <= 4 for w, e in zip(rounded, exact))   # the nearest multiple
    assert 48 in rounded   # 44 of 64 rounds up (torch-pruning itself rounds down, to 40)
    assert spec.validate({"method": "structured", "ratio": 0.3})["channel_multiple"] == 8   # the default
    # unstructured removes no channel, so the setting does not split its cache entries
    assert spec.validate({"method": "unstructured", "channel_multiple": 1})["channel_multiple"] == 8


def test_unstructured_finetune_keeps_zeros_dense_size_unchanged_gzip_smaller(make_teacher, shapes, spec):
    teacher = dense_teacher(make_teacher)
    ratio = 0.6
    p = spec.validate({"method": "unstructured", "ratio": ratio, "finetune_epochs": 1, "finetune_subset": 256})
    out = spec.apply(Context(teacher, shapes, p, eval_size=EVAL))
    assert len(out.history) == 1 and not out.time_deployed   # zeros run as fast anywhere: not re-timed
    layers = pruning.prunable_layers
    tuned, moved = dict(layers(out.model)), 0
    for name, mod in layers(teacher.model):   # every layer keeps its zeros through fine-tuning
        w = tuned[name].weight
        assert float((w == 0).float().mean()) == pytest.approx(ratio, abs=1e-3)
        moved += int(((w != mod.weight) & (w != 0)).sum())
    assert moved > 0                           # ...while the kept weights were trained
    ex = out.extra
    assert ex["sparsity"] == pytest.approx(ratio, abs=1e-3)
    other = count_params(out.model) - ex["prunable_params"]
    assert count_nonzero_params(out.model) == pytest.approx((1 - ratio) * ex["prunable_params"] + other, rel=0.01)
    assert count_macs(out.model) == count_macs(teacher.model)
    dense = size_report(teacher.model)
    assert ex["dense_bytes"] == pytest.approx(dense["size_bytes"], rel=0.01)   # dense does not shrink
    assert ex["gzip_bytes"] < 0.8 * dense["gzip_bytes"]                        # compressible zeros
    assert ex["sparse_bitmask_bytes"] < 0.5 * ex["dense_bytes"]
    reloaded = spec.load(_roundtrip(out.state), None)
    assert torch.equal(_logits(reloaded, shapes), _logits(out.model, shapes))


def test_unstructured_global_differs_from_layerwise(make_teacher):
    teacher = make_teacher("resnet34", subset=RN_SUBSET)

    def sparsities(scope):
        m = copy.deepcopy(teacher.model)
        pruning._unstructured_masks(m, 0.5, scope, "magnitude")
        pruning._remove_masks(m)
        zeros = [int((mod.weight == 0).sum()) for _, mod in pruning.prunable_layers(m)]
        sizes = [mod.weight.numel() for _, mod in pruning.prunable_layers(m)]
        return [z / n for z, n in zip(zeros, sizes)], sum(zeros) / sum(sizes)

    (layer, _), (glob, total_g) = sparsities("layer"), sparsities("global")
    assert all(s == pytest.approx(0.5, abs=1e-3) for s in layer)
    assert total_g == pytest.approx(0.5, abs=1e-4)
    assert max(glob) - min(glob) > 0.1        # one threshold: layers end up with different sparsity


def test_interrupted_finetuning_resumes_with_its_pruned_weights_and_masks(make_teacher, shapes, spec):
    """A stopped fine-tuning run, asked for again, trains only its unfinished epochs, and the weights the
    interrupted run zeroed stay zero (the masks come back from the checkpoint with the weights)."""
    teacher = make_teacher("resnet34", subset=RN_SUBSET)
    p = spec.validate({"ratio": 0.5, "method": "unstructured", "importance": "random", "finetune_epochs": 2,
                       "finetune_subset": 128})

    def stop_after_epoch_1(ev):
        if ev.stage == "finetune" and ev.kind == "epoch" and ev.epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        spec.apply(Context(teacher, shapes, p, progress=stop_after_epoch_1, eval_size=64))
    partials = list((cache_dir() / "checkpoints").rglob("finetune-resnet34-*.partial.pt"))
    assert len(partials) == 1
    first_masks = {k: v for k, v in torch.load(partials[0], weights_only=True)["model"].items() if k.endswith("_mask")}
    events = []
    out = spec.apply(Context(teacher, shapes, p, progress=events.append, eval_size=64))
    assert [e.epoch for e in events if e.kind == "epoch"] == [2] and [h["epoch"] for h in out.history] == [1, 2]
    assert any("resuming fine-tuning from epoch 1 of 2" in e.message for e in events if e.message)
    assert not partials[0].exists()
    # the zeros are the ones of the interrupted run; a kept weight may itself be exactly 0 (normal
    # initialization draws a few exact zeros in a 512x512x3x3 layer, and some never move)
    weights = dict(out.model.named_parameters())
    for k, mask in first_masks.items():
        w = weights[k[:-len("_mask")]]
        assert (w[mask == 0] == 0).all(), k
        assert int(((w == 0) & (mask != 0)).sum()) <= max(8, 1e-5 * w.numel()), k
    assert sum(int((m == 0).sum()) for m in first_masks.values()) >= 0.45 * sum(m.numel() for m in first_masks.values())
