"""Image folders: horizontal flips are the folder's own setting (`<folder>/lab.json`), off by default.

Digits and text must not be trained mirrored; the setting reaches training and is part of the
folder's fingerprint, so a changed setting trains (and caches) another teacher.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import training
from core.datasets import load_dataset
from core.errors import LabError


def _digits_folder(root, n=8):
    """Two classes of small asymmetric images (a bar on the left or on the right), 32×32 PNGs."""
    for split in ("train", "test"):
        for ci, c in enumerate(["left", "right"]):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.zeros((32, 32, 3), np.uint8)
                cols = slice(2, 10) if ci == 0 else slice(22, 30)
                arr[:, cols] = 200 + i
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _record_flips(monkeypatch) -> list:
    seen = []
    real = training.augment_batch

    def spy(x, flip, gen, pad=4):
        seen.append(bool(flip))
        return real(x, flip, gen, pad)
    monkeypatch.setattr(training, "augment_batch", spy)
    return seen


def _fit_one_epoch(data):
    from core.models import build_model
    cfg = training.TrainConfig(epochs=1, batch_size=8, lr=0.05, precision="fp32")
    training.fit(build_model("cnn_small", data.num_classes), data, cfg, device="cpu", eval_size=8)


def test_a_folder_trains_without_flips_unless_its_lab_json_asks(tmp_path, monkeypatch):
    root = _digits_folder(tmp_path / "digits")
    seen = _record_flips(monkeypatch)
    plain = load_dataset(f"folder:{root}")
    assert plain.flip is False
    _fit_one_epoch(plain)
    assert seen and not any(seen)                       # never mirrored

    (root / "lab.json").write_text(json.dumps({"flip": True}))
    flipped = load_dataset(f"folder:{root}")            # the same process sees the new setting at once
    assert flipped.flip is True
    assert flipped.fingerprint != plain.fingerprint     # another cache key: another teacher
    assert torch.equal(flipped.train_x, plain.train_x)  # the images themselves are not reloaded
    seen.clear()
    _fit_one_epoch(flipped)
    assert seen and all(seen)

    (root / "lab.json").write_text(json.dumps({"flip": False}))
    assert load_dataset(f"folder:{root}").fingerprint == plain.fingerprint


def test_the_flip_setting_is_part_of_the_teacher_cache_key(tmp_path):
    from core.teachers import TeacherSettings, weights_path
    root = _digits_folder(tmp_path / "digits")
    s = TeacherSettings("resnet34", training.TrainConfig(epochs=1))
    before = weights_path(load_dataset(f"folder:{root}"), s)
    (root / "lab.json").write_text('{"flip": true}')
    after = weights_path(load_dataset(f"folder:{root}"), s)
    assert before != after and before.name != after.name


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('["flip"]', "JSON object"),
    ('{"flips": true}', "unknown setting 'flips'"),
    ('{"flip": "yes"}', "must be true or false"),
])
def test_a_damaged_or_misspelt_lab_json_is_a_clear_error(tmp_path, text, message):
    root = _digits_folder(tmp_path / "digits", n=2)
    (root / "lab.json").write_text(text)
    with pytest.raises(LabError, match=message):
        load_dataset(f"folder:{root}")


def test_writing_the_setting_round_trips(tmp_path):
    from core.datasets import folder_settings, write_folder_settings
    root = _digits_folder(tmp_path / "digits", n=2)
    assert folder_settings(root) == {"flip": False}
    assert write_folder_settings(root, flip=True) == {"flip": True}
    assert json.loads((root / "lab.json").read_text()) == {"flip": True}
    with pytest.raises(LabError, match="unknown folder setting"):
        write_folder_settings(root, rotate=True)


def test_the_train_job_trains_a_new_teacher_when_the_folder_setting_changes(tmp_path, monkeypatch, fresh_cache):
    """The worker keeps the folder loaded between jobs: its train kind still sees a changed lab.json.
    And a folder teacher cached before the setting existed (always flipped, no flip in its sidecar)
    shares the no-flip default's fingerprint: it is not served as a teacher trained without flips."""
    import dataclasses

    from core.teachers import TeacherSettings, find_teacher
    from core.worker import KINDS, Warm
    root = _digits_folder(tmp_path / "digits", n=4)
    seen = _record_flips(monkeypatch)
    warm = Warm()
    train = training.TrainConfig(epochs=1, batch_size=8, lr=0.05, precision="fp32")
    payload = {"dataset": f"folder:{root}", "data_root": None, "model": "resnet34",
               "train": dataclasses.asdict(train), "pretrained": False, "device": "cpu", "measure": False}
    first = KINDS["train"](payload, warm, None, {})
    assert not first["cached"] and seen and not any(seen)
    (root / "lab.json").write_text('{"flip": true}')
    seen.clear()
    second = KINDS["train"](payload, warm, None, {})
    assert not second["cached"] and second["path"] != first["path"] and seen and all(seen)
    assert json.loads(Path(second["path"]).with_suffix(".json").read_text())["flip"] is True
    assert KINDS["train"](payload, warm, None, {})["cached"]

    (root / "lab.json").unlink()
    data = load_dataset(f"folder:{root}")
    s = TeacherSettings("resnet34", train)
    assert find_teacher(data, s) is not None
    side = Path(first["path"]).with_suffix(".json")
    meta = json.loads(side.read_text())
    del meta["flip"]                                   # as teachers were cached before the setting
    side.write_text(json.dumps(meta))
    assert find_teacher(data, s) is None               # asked again, it is trained again, without flips


def test_the_teacher_page_switches_flips_for_the_selected_folder(tmp_path, monkeypatch):
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest
    original = PagesManager.__init__

    def init(self, *args, **kwargs):   # as in test_app: st.navigation wins over the pages/ folder
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", init)
    root = _digits_folder(tmp_path / "digits", n=2)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    at.session_state["eval_size"] = 200
    at.session_state["dataset"] = "folder"
    at.session_state["folder_path"] = str(root)
    at.run()
    at.switch_page("pages/teacher.py").run()
    assert not at.exception, [e.value for e in at.exception]
    switch = at.toggle(key=f"teacher.flip.{root.resolve()}")
    assert switch.value is False and not (root / "lab.json").exists()
    switch.set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert json.loads((root / "lab.json").read_text()) == {"flip": True}
    assert at.toggle(key=f"teacher.flip.{root.resolve()}").value is True
    assert load_dataset(f"folder:{root}").flip is True
