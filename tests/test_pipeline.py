"""Pipelines: steps chained in order, cached per prefix, and a real file whose size is the reported size."""
import json
import os

import pytest

from core.cli import main
from core.errors import LabError
from core.results import ResultStore
from core.runner import ExperimentConfig, run_experiment
from core.settings import cache_dir
from core.techniques import get_technique
from core.techniques.pipeline import canonical, parse_steps, pipeline_dir
from core.training import TrainConfig

TEACHER_CFG = TrainConfig(epochs=1, subset=500, batch_size=64, lr=0.05)   # test_pruning's tiny teacher


@pytest.fixture(scope="module")
def store():
    return ResultStore(cache_dir() / "test_pipeline.sqlite")


def _run(steps, store, eval_size=200):
    cfg = ExperimentConfig(dataset="shapes", model="resnet34", technique="pipeline", params={"steps": steps},
                           eval_size=eval_size, teacher_train=TEACHER_CFG, device="cpu")
    return run_experiment(cfg, store=store)


@pytest.mark.parametrize("steps, needle", [
    ("quantize:bits=4; prune:ratio=0.5", "cannot come after quantize"),
    ("prune:ratio=0.3; prune:ratio=0.5", "cannot come after prune"),
    ("sharpen:amount=2", "unknown pipeline step 'sharpen'"),
    ("prune:ratio=half", "ratio"),
    ("quantize:bits", "is not name=value"),
    ("quantize:mode=fake,activations=true", "weights only"),
])
def test_bad_steps_are_one_clear_error(steps, needle):
    with pytest.raises(LabError, match=needle):
        parse_steps(steps)


def test_bad_steps_on_the_command_line_exit_2_and_write_nothing(capsys, fresh_cache):
    code = main(["pipeline", "--steps", "quantize:bits=4", "prune:ratio=0.5", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot come after quantize" in err[0]
    assert not [p for p in fresh_cache.rglob("*") if p.is_file()]


def test_equal_pipelines_share_one_spelling():
    a = canonical(["prune:method=structured,ratio=0.5,finetune_epochs=0", "quantize:mode=fake,bits=4"])
    assert a == canonical("prune:ratio=0.5;quantize:bits=4") == "prune; quantize:bits=4"


def test_a_changed_last_step_reuses_the_first_and_the_file_is_the_reported_size(make_teacher, store, monkeypatch):
    make_teacher("resnet34", subset=500)
    first = _run("prune:ratio=0.3; quantize:bits=4", store)
    steps = first.compressed["extra"]["steps"]
    assert [s["technique"] for s in steps] == ["prune", "quantize"] and not any(s["cached"] for s in steps)
    path = first.compressed["extra"]["file_path"]
    assert first.compressed["size_bytes"] == first.compressed["extra"]["file_bytes"] == os.path.getsize(path)
    assert steps[1]["metrics"]["size_bytes"] == os.path.getsize(path) < steps[0]["metrics"]["size_bytes"] / 4
    assert steps[0]["metrics"]["macs"] < first.baseline["macs"]          # pruning removed channels

    prune = get_technique("prune")

    def no_pruning(ctx):
        raise AssertionError("the cached pruning step ran again")
    monkeypatch.setattr(prune, "apply", no_pruning)
    second = _run("prune:ratio=0.3; quantize:bits=3", store)
    s2 = second.compressed["extra"]["steps"]
    assert s2[0]["cached"] and not s2[1]["cached"] and s2[0]["metrics"] == steps[0]["metrics"]
    assert os.path.getsize(second.compressed["extra"]["file_path"]) < os.path.getsize(path)


def test_the_file_loads_back_to_the_reported_accuracy(make_teacher, store, capsys):
    make_teacher("resnet34", subset=500)
    r = _run("prune:ratio=0.3; quantize:bits=4", store)
    path = r.compressed["extra"]["file_path"]
    assert main(["evaluate", "--file", path, "--dataset", "shapes", "--eval-size", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["accuracy"] == r.compressed["accuracy"] and out["eval_images"] == 200


def test_the_pipeline_command_prints_the_contract(make_teacher, capsys):
    make_teacher("resnet34", subset=500)
    code = main(["pipeline", "--steps", "prune:ratio=0.3", "quantize:bits=4", "--eval-size", "200", "--json",
                 "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"dataset", "model", "steps", "baseline", "compressed", "file_path", "file_bytes", "eval_images",
            "seconds"} <= set(out)
    assert [set(s) for s in out["steps"]] == [{"technique", "params", "metrics", "cached"}] * 2
    assert out["compressed"]["size_bytes"] == out["file_bytes"] == os.path.getsize(out["file_path"])
    assert pipeline_dir() in __import__("pathlib").Path(out["file_path"]).parents


def test_a_pipeline_can_end_in_real_int8(make_teacher, store):
    make_teacher("resnet34", subset=500)
    r = _run("prune:ratio=0.3; quantize:mode=int8,calibration_images=32", store)
    assert r.runtime == "onnxruntime-cpu" and r.compressed["extra"]["steps"][1]["technique"] == "quantize"
    assert r.compressed["size_bytes"] == os.path.getsize(r.compressed["extra"]["file_path"])
