"""Knowledge distillation: the KD loss, the teacher-logit cache, the cached from-scratch twin, the runner."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from core.errors import InvalidParameter
from core.runner import ExperimentConfig, load_compressed, run_experiment
from core.techniques import distillation as kd
from core.techniques import get_technique
from core.training import TrainConfig, predict_logits

# the conftest teacher's recipe, so run_experiment serves the same cached teacher
TEACHER_CFG = TrainConfig(epochs=1, subset=1500, batch_size=64, lr=0.05)


def _hand_kd(s, t, y, temp, alpha):
    """Hinton's loss by explicit sums over a batch of python lists."""
    total = 0.0
    for srow, trow, label in zip(s, t, y):
        zs = sum(math.exp(v / temp) for v in srow)
        zt = sum(math.exp(v / temp) for v in trow)
        p_t = [math.exp(v / temp) / zt for v in trow]
        p_s = [math.exp(v / temp) / zs for v in srow]
        kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        z = sum(math.exp(v) for v in srow)
        ce = -(srow[label] - math.log(z))
        total += alpha * temp * temp * kl + (1 - alpha) * ce
    return total / len(y)


@pytest.mark.parametrize("temp,alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3), (2.5, 0.0), (3.0, 1.0)])
def test_kd_loss_matches_hand_computation(temp, alpha):
    g = torch.Generator().manual_seed(int(temp * 10 + alpha * 100))
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    got = float(kd.kd_loss(s, t, y, temp, alpha))
    want = _hand_kd(s.tolist(), t.tolist(), y.tolist(), temp, alpha)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_kd_loss_limits():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    # alpha = 0: the teacher is ignored, plain cross-entropy remains
    assert float(kd.kd_loss(s, t, y, 4.0, 0.0)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    assert float(kd.kd_loss(s, t * 7, y, 4.0, 0.0)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    # alpha = 1: labels are ignored, and a student equal to its teacher has zero loss
    assert float(kd.kd_loss(s, t, y, 4.0, 1.0)) == pytest.approx(float(kd.kd_loss(s, t, (y + 1) % 10, 4.0, 1.0)))
    assert float(kd.kd_loss(t, t, y, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    # it is differentiable in the student only
    s.requires_grad_(True)
    kd.kd_loss(s, t, y, 2.0, 0.7).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("params,name", [({"temperature": -1}, "temperature"), ({"alpha": 1.5}, "alpha"),
                                         ({"student": "nope"}, "student"), ({"epochs": 0}, "epochs"),
                                         ({"subset": -5}, "subset")])
def test_invalid_params_refused(params, name):
    with pytest.raises(InvalidParameter) as err:
        ExperimentConfig(technique="distill", params=params).validate()
    assert err.value.name == name and name in str(err.value)


def test_defaults():
    p = get_technique("distill").validate({})
    assert p == {"student": "resnet8", "temperature": 4.0, "alpha": 0.9, "epochs": 5, "subset": 0,
                 "lr": 0.05, "batch_size": 128}


def test_teacher_logits_computed_once(make_teacher, shapes, monkeypatch):
    teacher = make_teacher()
    calls = []
    real = kd.predict_logits

    def counting(model, data, x, device="cpu", **kw):
        calls.append(len(x))
        return real(model, data, x, device, **kw)
    monkeypatch.setattr(kd, "predict_logits", counting)

    kd.logits_path(teacher, shapes).unlink(missing_ok=True)   # other tests may have filled it in
    idx = torch.arange(0, 96, 2)
    logits, computed = kd.teacher_logits(teacher, shapes, idx)
    path = kd.logits_path(teacher, shapes)
    assert computed == 48 and sum(calls) == 48 and path.exists()
    assert teacher.meta["sha256"][:16] in path.name
    expected = real(teacher.model, shapes, shapes.train_x[idx])
    assert torch.allclose(logits[idx], expected, atol=1e-4)
    mtime = path.stat().st_mtime_ns

    again, computed = kd.teacher_logits(teacher, shapes, idx)
    assert computed == 0 and sum(calls) == 48 and path.stat().st_mtime_ns == mtime
    assert torch.equal(again[idx], logits[idx])

    # a wider request computes only the images not cached yet
    _, computed = kd.teacher_logits(teacher, shapes, torch.arange(0, 112))
    assert computed == 64 and sum(calls) == 112

    # a damaged cache file is reported and rebuilt, never trusted
    path.write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="logits"):
        rebuilt, computed = kd.teacher_logits(teacher, shapes, idx)
    assert computed == 48 and torch.allclose(rebuilt[idx], expected, atol=1e-4)


def test_distill_experiment_scratch_cache_and_repeat(make_teacher, shapes, monkeypatch):
    teacher = make_teacher()
    fits = []
    real_fit = kd.resumable_fit

    def counting_fit(*a, **kw):
        fits.append(kw.get("stage"))
        return real_fit(*a, **kw)
    monkeypatch.setattr(kd, "resumable_fit", counting_fit)

    params = {"student": "resnet8", "epochs": 2, "subset": 256, "batch_size": 64, "temperature": 4.0, "alpha": 0.9}
    cfg = ExperimentConfig("shapes", "resnet34", "distill", params, eval_size=200, teacher_train=TEACHER_CFG)
    students_dir = kd.settings.cache_dir() / "students"
    before = set(students_dir.rglob("*.pt")) if students_dir.exists() else set()   # other tests' students
    r1 = run_experiment(cfg)
    assert sorted(fits) == ["distill", "scratch"]
    assert r1.teacher_path == str(teacher.path)
    assert [h["epoch"] for h in r1.history] == [1, 2] and [h["epoch"] for h in r1.scratch_history] == [1, 2]
    assert all(0 <= h["val_accuracy"] <= 1 for h in r1.history + r1.scratch_history)
    assert r1.compressed["accuracy"] == pytest.approx(r1.history[-1]["val_accuracy"])
    assert r1.scratch["accuracy"] == pytest.approx(r1.scratch_history[-1]["val_accuracy"])
    assert r1.scratch["eval_images"] == r1.compressed["eval_images"] == 200
    assert r1.scratch["params"] == r1.compressed["params"] < r1.baseline["params"] / 100
    assert r1.compressed["macs"] < r1.baseline["macs"]
    assert r1.compressed["extra"]["scratch_cached"] is False
    # the two students start from the same weights but learn from different targets
    assert r1.history[0]["train_loss"] != pytest.approx(r1.scratch_history[0]["train_loss"])

    # another temperature: the from-scratch twin and the teacher logits come from the cache
    students = list(set(students_dir.rglob("*.pt")) - before)
    assert len(students) == 1
    mtime = students[0].stat().st_mtime_ns
    fits.clear()
    r2 = run_experiment(ExperimentConfig("shapes", "resnet34", "distill", dict(params, temperature=2.0),
                                         eval_size=200, teacher_train=TEACHER_CFG))
    assert fits == ["distill"]
    assert r2.compressed["extra"]["scratch_cached"] is True
    assert r2.compressed["extra"]["teacher_logits_computed"] == 0
    assert r2.scratch == r1.scratch and r2.scratch_history == r1.scratch_history
    assert students[0].stat().st_mtime_ns == mtime
    assert r2.history != r1.history

    # the same request again is served from the result cache, without training
    fits.clear()
    t0 = time.process_time()          # CPU time: the 2 test cores are shared with other jobs
    r3 = run_experiment(cfg)
    assert r3.cached and fits == [] and r3.compressed == r1.compressed and r3.scratch == r1.scratch
    assert time.process_time() - t0 < 1.0                     # the target for a repeated request

    # the saved student reloads (weights_only) and reproduces the measured accuracy
    model = load_compressed(r1)
    x, y = shapes.eval_split(200)
    acc = float((predict_logits(model, shapes, x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(r1.compressed["accuracy"])
    assert type(model).__name__ == "ResNetSmall"


def test_students_train_in_the_recipe_precision_and_are_cached_by_it(monkeypatch, shapes):
    import core.training as training
    p = get_technique("distill").validate({"epochs": 1})
    monkeypatch.setattr(training, "bf16_training_supported", lambda device: device == "cpu")
    bf16 = kd._train_config(p, device="cpu")
    assert bf16.precision == "bf16" and kd._train_config(p, device="mps").precision == "fp32"
    monkeypatch.setattr(training, "bf16_training_supported", lambda device: False)
    fp32 = kd._train_config(p, device="cpu")
    assert fp32.precision == "fp32"
    # a from-scratch twin trained in one precision is never served for the other
    assert kd.scratch_path(shapes, "resnet8", bf16) != kd.scratch_path(shapes, "resnet8", fp32)


def test_an_interrupted_distillation_resumes_after_its_last_finished_epoch(make_teacher, shapes):
    """Stopped mid-run (a slider moved in the app, Ctrl-C in the CLI), the same request later trains only the
    unfinished epochs, and ends with the very student an uninterrupted run makes."""
    teacher = make_teacher()
    params = kd.SPEC.validate({"student": "resnet8", "epochs": 3, "subset": 256, "batch_size": 64,
                               "temperature": 3.0})
    partial = kd._kd_checkpoint(teacher, shapes, params, kd._train_config(params, kd.KD_AUGMENT, "cpu"))

    def stop_after_epoch_1(ev):
        if ev.stage == "distill" and ev.kind == "epoch" and ev.epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        kd.distill_student(teacher, shapes, params, progress=stop_after_epoch_1, eval_size=100)
    assert partial.exists()
    events = []
    resumed, hist, _ = kd.distill_student(teacher, shapes, params, progress=events.append, eval_size=100)
    assert [e.epoch for e in events if e.kind == "epoch"] == [2, 3]           # epoch 1 not trained again
    assert any("resuming the distilled resnet8 from epoch 1 of 3" in e.message for e in events if e.message)
    assert [h["epoch"] for h in hist] == [1, 2, 3] and not partial.exists()
    whole, hist_whole, _ = kd.distill_student(teacher, shapes, params, eval_size=100)   # no checkpoint left
    assert [h["val_accuracy"] for h in hist] == [h["val_accuracy"] for h in hist_whole]
    for (k, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), k
