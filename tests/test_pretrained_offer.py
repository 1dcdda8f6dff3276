"""ImageNet-pretrained teachers (the seed study's) beyond `train --pretrained`: prepare, sweep, the
Teacher page and the train job's payload; offline without the weights, one clear message and no
teacher from random weights cached under the pretrained key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.errors import LabError
from core.teachers import TeacherSettings, weights_path
from core.training import TrainConfig

TINY = TrainConfig(epochs=1, batch_size=8, lr=0.05, precision="fp32")
APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    """torch's hub cache without any ImageNet weights, whatever this machine has downloaded before."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("COMPRESSION_LAB_OFFLINE", "1")
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "tiny"
    for split in ("train", "test"):
        for ci, c in enumerate(["a", "b"]):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32, 3), 40 + 120 * ci + i, np.uint8)).save(root / split / c / f"{i}.png")
    return f"folder:{root}"


def _problem(model: str):
    from core.teachers import imagenet_weights_problem
    return imagenet_weights_problem(model)


def _offline_message(msg: str, model_title: str = "ResNet-34"):
    assert f"ImageNet weights for {model_title} cannot be fetched" in msg
    assert "COMPRESSION_LAB_OFFLINE" in msg and "resnet34-" in msg and "--pretrained" in msg


def test_the_offline_check_needs_no_network_and_names_the_file_and_the_fix(empty_hub):
    _offline_message(_problem("resnet34"))
    assert "no ImageNet weights" in _problem("resnet8")           # a student
    empty_hub.mkdir(parents=True)
    name = _problem("resnet34").split("has no ")[1].split(" ")[0]
    (empty_hub / name).write_bytes(b"x")
    assert _problem("resnet34") is None                        # in the hub cache: offered


def test_get_teacher_offline_stops_with_the_message_and_caches_nothing(tiny, fresh_cache):
    from core.datasets import load_dataset
    from core.teachers import get_teacher
    data = load_dataset(tiny)
    s = TeacherSettings("resnet34", TINY, pretrained=True)
    with pytest.raises(LabError) as exc:
        get_teacher(data, s, device="cpu", measure=False)
    _offline_message(str(exc.value))
    assert not weights_path(data, s).exists() and not weights_path(data, s).with_suffix(".partial.pt").exists()


def test_damaged_hub_weights_stop_training_instead_of_caching_random_weights_as_pretrained(tiny, fresh_cache,
                                                                                          empty_hub):
    from core.datasets import load_dataset
    from core.teachers import get_teacher
    empty_hub.mkdir(parents=True)
    name = _problem("resnet34").split("has no ")[1].split(" ")[0]
    (empty_hub / name).write_bytes(b"not a checkpoint")     # found, so no download is tried; it fails to load
    data = load_dataset(tiny)
    s = TeacherSettings("resnet34", TINY, pretrained=True)
    with pytest.raises(LabError, match="could not be loaded.*no ImageNet-pretrained resnet34 was trained"):
        get_teacher(data, s, device="cpu", measure=False)
    assert not weights_path(data, s).exists()


def test_the_train_job_payload_carries_the_flag(tiny, fresh_cache):
    from core.worker import KINDS, Warm
    payload = {"dataset": tiny, "data_root": None, "model": "resnet34", "train": dataclasses.asdict(TINY),
               "pretrained": True, "device": "cpu", "measure": False}
    with pytest.raises(LabError) as exc:
        KINDS["train"](payload, Warm(), None, {})
    _offline_message(str(exc.value))


def test_prepare_offers_pretrained_and_stops_before_any_training(tiny, fresh_cache):
    from core.prepare import prepare
    events = []
    with pytest.raises(LabError) as exc:
        prepare(tiny, ["resnet34"], epochs=1, base=TINY, device="cpu", progress=events.append, pretrained=True,
                threads=2, train=lambda *a: pytest.fail("trained although the weights are missing"))
    _offline_message(str(exc.value))
    assert not [e for e in events if e.stage == "train"]


def test_prepare_serves_a_cached_pretrained_teacher_offline(tiny, fresh_cache):
    """Once the teacher is cached, the missing weights do not matter."""
    from core.datasets import load_dataset
    from core.prepare import prepare
    from core.teachers import get_teacher, pretrained_problem
    data = load_dataset(tiny)
    s = TeacherSettings("resnet34", TINY, pretrained=True)
    from core.models import build_model

    def as_if_downloaded(name, n, pretrained=False, notices=None):
        return build_model(name, n)
    with pytest.MonkeyPatch.context() as mp:   # as if it had been trained online: the weights were there
        mp.setattr("core.teachers.imagenet_weights_problem", lambda model: None)
        mp.setattr("core.teachers.build_model", as_if_downloaded)
        get_teacher(data, s, device="cpu", measure=False)
    assert pretrained_problem(data, s) is None
    out = prepare(tiny, ["resnet34"], epochs=1, base=TINY, device="cpu", pretrained=True, threads=2,
                  train=lambda *a: pytest.fail("trained although cached"))
    assert out["pretrained"] and out["teachers"][0]["cached"] and out["teachers"][0]["pretrained"]


@pytest.mark.parametrize("argv", [
    ["prepare", "--models", "resnet34", "--epochs", "1", "--pretrained"],
    ["sweep", "--models", "resnet34", "--techniques", "quantize", "--pretrained", "--quiet"],
    ["train", "--model", "resnet34", "--epochs", "1", "--pretrained"],
])
def test_cli_offers_pretrained_and_says_clearly_why_not_offline(argv, tiny, fresh_cache, capsys):
    argv = argv + (["--datasets", tiny] if argv[0] == "sweep" else ["--dataset", tiny])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    _offline_message(err)


def test_sweep_plan_trains_pretrained_teachers_where_the_newest_is_not(tiny, fresh_cache, monkeypatch):
    """A cached teacher from random weights is not what a pretrained sweep compresses."""
    from core import sweep
    from core.datasets import load_dataset
    from core.teachers import get_teacher
    get_teacher(load_dataset(tiny), TeacherSettings("resnet34", TINY), device="cpu", measure=False)
    plan = sweep.SweepPlan(datasets=[tiny], models=["resnet34"], techniques=["quantize"], pretrained=True)
    with pytest.raises(LabError) as exc:    # it wants to train one, and offline it cannot
        sweep.run_sweep(plan)
    _offline_message(str(exc.value))


def test_teacher_page_offers_imagenet_weights_and_says_why_not_offline(monkeypatch):
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest
    original = PagesManager.__init__

    def init(self, *args, **kwargs):   # as in test_app: st.navigation wins over the pages/ folder
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", init)
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["eval_size"] = 200
    at.run()
    at.switch_page("pages/teacher.py").run()
    assert not at.exception
    assert not at.toggle(key="teacher.pretrained").value
    assert not at.button(key="teacher.train").disabled
    at.toggle(key="teacher.pretrained").set_value(True).run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("ImageNet weights for" in w and "COMPRESSION_LAB_OFFLINE" in w for w in warnings), warnings
    assert at.button(key="teacher.train").disabled
