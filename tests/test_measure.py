"""Measurement: the teacher's latency, trained models reused across evaluation sizes, deployment targets."""
import math

import pytest
import torch

from core import measure
from core.cli import main
from core.results import ResultStore
from core.runner import ExperimentConfig, compressed_path, model_key, result_key, run_experiment
from core.settings import cache_dir
from core.targets import TARGETS, available_targets, get_target, require_target
from core.techniques import get_technique
from core.errors import LabError
from core.training import TrainConfig

TEACHER_CFG = TrainConfig(epochs=1, subset=500, batch_size=64, lr=0.05)   # test_pruning's tiny teacher


@pytest.fixture(scope="module")
def store():
    return ResultStore(cache_dir() / "test_measure.sqlite")


def _cfg(technique, params, eval_size=200, target="edge-cpu"):
    return ExperimentConfig(dataset="shapes", model="resnet34", technique=technique, params=params,
                            eval_size=eval_size, teacher_train=TEACHER_CFG, device="cpu", target=target)


def test_the_teacher_is_timed_when_asked_and_the_timing_is_stored(make_teacher, shapes):
    teacher = make_teacher("resnet34", subset=500)
    plain = measure.baseline_metrics(teacher, shapes, 150)          # what a compress run stores: no latency
    assert not measure.has_latency(plain)
    timed = measure.baseline_metrics(teacher, shapes, 150, latency=True)   # the Teacher page's job
    assert timed["latency_ms_b1"] > 0 and timed["latency_ms_b64"] > 0 and timed["threads_b1"] == 1
    assert timed["latency_p95_ms_b1"] >= timed["latency_ms_b1"] * 0.5 and timed["target"] == "edge-cpu"
    assert timed["accuracy"] == plain["accuracy"]
    assert measure.has_latency(measure.stored_baseline(teacher.meta, 150))   # served from the file next time


def test_a_trained_model_is_measured_again_not_trained_again_on_another_eval_size(make_teacher, store, monkeypatch):
    make_teacher("resnet34", subset=500)
    params = {"method": "structured", "ratio": 0.3, "finetune_epochs": 1, "finetune_subset": 256}
    first = run_experiment(_cfg("prune", params, 200), store=store)
    assert first.compressed["eval_images"] == 200 and first.history

    spec = get_technique("prune")

    def no_training(ctx):
        raise AssertionError("the fine-tuned model was trained again")
    monkeypatch.setattr(spec, "apply", no_training)
    second = run_experiment(_cfg("prune", params, 300), store=store)
    assert second.key != first.key and not second.cached
    assert second.compressed["eval_images"] == 300
    assert second.model_path == first.model_path                     # one stored model for both
    assert second.history == first.history and second.compressed["params"] == first.compressed["params"]
    assert any("served from the cache" in n for n in second.notes)


def test_the_model_key_leaves_out_only_what_changes_the_measurement(make_teacher, shapes):
    teacher = make_teacher("resnet34", subset=500)
    a = _cfg("quantize", {"mode": "fake", "bits": 4}).validate()
    b = _cfg("quantize", {"mode": "fake", "bits": 4}, eval_size=500, target="cpu-server").validate()
    c = _cfg("quantize", {"mode": "fake", "bits": 3}).validate()
    assert result_key(a, teacher, shapes) != result_key(b, teacher, shapes)
    assert model_key(a, teacher, shapes) == model_key(b, teacher, shapes) != model_key(c, teacher, shapes)
    assert compressed_path(model_key(a, teacher, shapes)).name.startswith("m")


def test_cpu_server_target_is_recorded_and_times_batch1_on_every_core(make_teacher, store):
    make_teacher("resnet34", subset=500)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = run_experiment(_cfg("quantize", {"mode": "fake", "bits": 4}, target="cpu-server"), store=store)
    finally:
        torch.set_num_threads(before)
    assert r.target == "cpu-server" and r.summary()["target"] == "cpu-server"
    assert r.compressed["target"] == "cpu-server" and r.baseline["target"] == "cpu-server"
    assert r.compressed["threads_b1"] == 2 and r.baseline["threads_b1"] == 2
    assert r.compressed["latency_p95_ms_b1"] > 0 and r.compressed["latency_p95_ms_b64"] is None
    assert r.compressed["latency_max_ms_b64"] >= r.compressed["latency_ms_b64"]
    edge = run_experiment(_cfg("quantize", {"mode": "fake", "bits": 4}), store=store)
    assert edge.target == "edge-cpu" and edge.compressed["threads_b1"] == 1 and edge.key != r.key


def test_unknown_and_absent_targets_are_one_line_exit_2(capsys, fresh_cache):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--technique", "quantize", "--target", "tpu"])
    assert exit_.value.code == 2 and "--target" in capsys.readouterr().err
    with pytest.raises(LabError, match="unknown target"):
        get_target("tpu")
    absent = [n for n in TARGETS if n not in available_targets()]
    if not absent:
        pytest.skip("every target's hardware is present here")
    code = main(["compress", "--technique", "quantize", "--target", absent[0], "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has none" in err[0]
    assert not list(fresh_cache.glob("**/*.pt"))                   # nothing computed, nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_target_times_on_the_gpu_and_says_int8_stays_on_the_cpu(make_teacher, store):
    make_teacher("resnet34", subset=500)
    require_target("cuda")
    r = run_experiment(_cfg("prune", {"method": "structured", "ratio": 0.3}, target="cuda"), store=store)
    assert r.compressed["target"] == "cuda" and math.isfinite(r.compressed["latency_ms_b64"])
    q = run_experiment(_cfg("quantize", {"mode": "int8"}, target="cuda"), store=store)
    assert q.compressed["target"] == "cpu-server" and any("CPU only" in n for n in q.notes)


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available(),
                    reason="no Apple GPU here")
def test_mps_target_times_on_the_apple_gpu(make_teacher, store):
    make_teacher("resnet34", subset=500)
    r = run_experiment(_cfg("prune", {"method": "structured", "ratio": 0.3}, target="mps"), store=store)
    assert r.compressed["target"] == "mps" and math.isfinite(r.compressed["latency_ms_b64"])
