import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from core import cache
from core.teachers import TeacherSettings, find_teacher, get_teacher, latest_teacher, weights_path
from core.training import TrainConfig, augment_batch, decay_groups, fit, make_sgd, one_cycle_lr
from core.models import build_model


def test_short_training_beats_chance_on_offline_default(shapes):
    model = build_model("resnet8")
    events = []
    hist = fit(model, shapes, TrainConfig(epochs=2, subset=3000, batch_size=64, lr=0.05),
               progress=events.append, eval_size=500)
    assert len(hist) == 2 and set(hist[0]) >= {"train_loss", "train_accuracy", "val_accuracy", "seconds"}
    assert hist[-1]["val_accuracy"] > 0.25          # chance is 0.10
    kinds = {e.kind for e in events}
    assert {"start", "batch", "epoch", "done"} <= kinds
    assert [e.metrics["epoch"] for e in events if e.kind == "epoch"] == [1, 2]


def test_augment_batch_crops_and_flips_only_where_allowed():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, flip=False, gen=g, pad=0)
    assert torch.equal(out, x)                       # no padding, no flip: identity
    out = augment_batch(x, flip=True, gen=torch.Generator().manual_seed(3), pad=4)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_one_cycle_schedule_warms_up_then_anneals():
    lrs = [one_cycle_lr(s, 100, 0.1, 0.25) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[0] < 0.01 and lrs[-1] < 0.005
    assert lrs.index(max(lrs)) in range(20, 30)


def _teacher_settings(epochs=1, subset=128):
    # two batches: these tests are about the cache, not the teacher (600 images cost 10 s more each)
    return TeacherSettings("resnet34", TrainConfig(epochs=epochs, subset=subset, batch_size=64, lr=0.05))


def test_fused_sgd_takes_the_same_steps_as_the_reference_sgd():
    """The fused kernel is a speed-up only: cached teachers' keys assume the same update rule."""
    torch.manual_seed(0)
    a = build_model("resnet8", 10)
    b = build_model("resnet8", 10)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    fast = make_sgd(decay_groups(a, 5e-4), 0.1)
    ref = torch.optim.SGD(decay_groups(b, 5e-4), lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    assert fast.defaults["fused"], "CPU has a fused SGD kernel; make_sgd should use it"
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        for m, opt in ((a, fast), (b, ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    assert max((pa - p0).abs().max().item() for pa, p0 in zip(a.parameters(), start)) > 1e-3
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_cache_round_trip_and_sidecar(fresh_cache, shapes):
    s = _teacher_settings()
    t1 = get_teacher(shapes, s, device="cpu", measure=False)
    assert not t1.cached and t1.path.exists()
    meta = json.loads(t1.path.with_suffix(".json").read_text())
    assert meta["status"] == "complete" and meta["sha256"] == cache.file_sha256(t1.path)
    assert meta["history"] and meta["versions"]["torch"] == torch.__version__ and meta["created"]
    t2 = get_teacher(shapes, s, device="cpu", measure=False)
    assert t2.cached
    for a, b in zip(t1.model.state_dict().values(), t2.model.state_dict().values()):
        assert torch.equal(a, b)
    assert latest_teacher(shapes, "resnet34").path == t1.path


def test_corrupt_cache_entry_is_reported_and_treated_as_missing(fresh_cache, shapes):
    s = _teacher_settings()
    t = get_teacher(shapes, s, device="cpu", measure=False)
    # an unrelated entry must survive untouched
    other = fresh_cache / "teachers" / "keep.txt"
    other.write_text("keep me")
    data = t.path.read_bytes()
    i = len(data) // 2
    damages = {"truncate": data[:i], "garbage": b"not a checkpoint at all",
               "flip_byte": data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]}
    for damage, bad in damages.items():   # one teacher for every damage: training it is the slow part
        t.path.write_bytes(bad)
        with pytest.warns(UserWarning, match=str(t.path)):
            assert find_teacher(shapes, s) is None, damage
        assert other.read_text() == "keep me"
        t.path.write_bytes(data)
        assert find_teacher(shapes, s) is not None, damage   # the intact file is found again
    t.path.write_bytes(damages["flip_byte"])
    with pytest.warns(UserWarning, match=str(t.path)):
        again = get_teacher(shapes, s, device="cpu", measure=False)       # retrains and replaces it
    assert not again.cached and find_teacher(shapes, s) is not None


def test_malicious_pickle_is_never_executed(fresh_cache, shapes, tmp_path):
    s = _teacher_settings()
    t = get_teacher(shapes, s, device="cpu", measure=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"x": Evil()}, t.path)
    meta = json.loads(t.path.with_suffix(".json").read_text())
    meta["sha256"] = cache.file_sha256(t.path)       # even with a matching checksum
    t.path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning):
        assert find_teacher(shapes, s) is None
    assert not marker.exists()


def _train_in_child(cache_dir):
    os.environ["COMPRESSION_LAB_CACHE"] = cache_dir
    from core.datasets import load_dataset as ld
    from core.teachers import get_teacher as gt
    gt(ld("shapes"), _teacher_settings(epochs=2, subset=128), device="cpu", measure=False)


def test_interrupted_training_leaves_no_finished_teacher_and_resumes(fresh_cache, shapes):
    """Kill a training process mid-run: nothing half-trained is served; a rerun resumes."""
    s = _teacher_settings(epochs=2, subset=128)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_train_in_child, args=(str(fresh_cache),))
    p.start()
    partial = weights_path(shapes, s).with_suffix(".partial.pt")
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline and p.is_alive():
        time.sleep(0.2)
    assert partial.exists(), "no epoch checkpoint was written"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert find_teacher(shapes, s) is None                          # not served as finished
    ck = torch.load(partial, weights_only=True)
    done = ck["epoch"]
    events = []
    t = get_teacher(shapes, s, device="cpu", measure=False, progress=events.append)
    assert not t.cached and len(t.meta["history"]) == 2
    trained_epochs = sorted({e.epoch for e in events if e.kind == "epoch"})
    assert trained_epochs == list(range(done + 1, 3))                # finished epochs not redone
    assert not partial.exists()


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path):
    target = tmp_path / "w.pt"
    cache.atomic_torch_save({"a": torch.ones(3)}, target)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cache.atomic_torch_save({"a": Boom()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_recipe_per_dataset_and_model_and_stable_keys(shapes):
    from core.training import TrainConfig, recipe_for
    r = recipe_for(shapes, "resnet34")
    assert (r.epochs, r.batch_size, r.grad_clip) == (5, 64, 0.0)          # generated data: the short recipe
    assert recipe_for(shapes, "vgg16_bn").grad_clip > 0                    # VGG clips (NaN without, measured)
    assert "grad_clip" not in TrainConfig().key()                          # off: keys of older teachers hold
    assert TrainConfig(grad_clip=2.0).key()["grad_clip"] == 2.0


def test_real_data_recipe_gives_small_sets_enough_steps(shapes):
    import dataclasses
    from core.training import (LARGE_SET, LARGE_SET_BATCH, LARGE_SET_LR, MAX_DEFAULT_EPOCHS, MIN_DEFAULT_STEPS,
                               recipe_for)
    big = dataclasses.replace(shapes, generated=False, train_x=shapes.train_x.repeat(5, 1, 1, 1),
                              train_y=shapes.train_y.repeat(5), mean=shapes.mean, std=shapes.std)
    small = dataclasses.replace(shapes, generated=False, train_x=shapes.train_x[:7200],
                                train_y=shapes.train_y[:7200], mean=shapes.mean, std=shapes.std)
    tiny = dataclasses.replace(small, train_x=shapes.train_x[:300], train_y=shapes.train_y[:300])
    r_big, r_small, r_tiny = (recipe_for(d, "resnet34") for d in (big, small, tiny))
    assert r_big.epochs == TrainConfig().epochs                 # 50,000 images: 8 epochs are 3,128 steps
    # ...of batch 128; large sets train at batch 256 (more images/s on a CPU), small ones need the steps
    assert (r_big.batch_size, r_big.lr) == (LARGE_SET_BATCH, LARGE_SET_LR) and len(big.train_y) >= LARGE_SET
    assert r_small.batch_size == r_tiny.batch_size == TrainConfig().batch_size
    assert recipe_for(big, "vgg16_bn").batch_size == TrainConfig().batch_size   # measured worse at 256
    assert recipe_for(big).batch_size == TrainConfig().batch_size                # no model: the plain recipe
    steps = lambda r, d: r.epochs * -(-len(d.train_y) // r.batch_size)
    assert r_small.epochs > r_big.epochs and steps(r_small, small) >= MIN_DEFAULT_STEPS
    assert r_tiny.epochs == MAX_DEFAULT_EPOCHS


def test_gradient_clipping_bounds_every_step(shapes):
    import torch
    from core.models import build_model
    from core.training import TrainConfig, fit
    torch.manual_seed(0)
    model = build_model("cnn_small", shapes.num_classes)
    before = [p.detach().clone() for p in model.parameters()]
    # one step at a huge learning rate: clipped, the update is at most lr * 1.9 (Nesterov's first step)
    # * 1e-3; unclipped this small CNN's gradient norm is ~1, a step hundreds of times larger
    fit(model, shapes, TrainConfig(epochs=1, subset=64, batch_size=64, lr=10.0, grad_clip=1e-3,
                                   weight_decay=0.0, warmup_fraction=0.0), eval_size=10)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < float(step) <= 10.0 * 1.9 * 1e-3


def test_bf16_precision_runs_layers_in_bf16_keeps_fp32_weights_and_learns(shapes):
    from core.errors import InvalidParameter
    from core.training import bf16_training_supported, recipe_for
    seen = {}
    # fp32 only needs its dtypes seen (test_short_training_beats_chance... shows it learns); bf16 must learn.
    # 1,000 images: bf16 autocast is emulated (slow) on CPUs without AVX-512 BF16 (AVX2 EPYC: 57 -> 29 s)
    for precision, subset in (("fp32", 64), ("bf16", 1000)):
        torch.manual_seed(0)
        model = build_model("resnet8", shapes.num_classes)
        dtypes = set()
        hook = model.stem[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        hist = fit(model, shapes, TrainConfig(epochs=2, subset=subset, batch_size=64, lr=0.05,
                                              precision=precision), eval_size=500)
        hook.remove()
        seen[precision] = dtypes
        assert {p.dtype for p in model.parameters()} == {torch.float32}   # master weights stay fp32
    assert hist[-1]["val_accuracy"] > 0.18                                 # bf16; chance is 0.10 (seen: 0.24)
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert "precision" not in TrainConfig().key()                          # fp32: older teachers' keys hold
    assert TrainConfig(precision="bf16").key()["precision"] == "bf16"
    assert recipe_for(shapes, "resnet34", "cpu").precision == ("bf16" if bf16_training_supported("cpu") else "fp32")
    assert recipe_for(shapes, "resnet34", "mps").precision == "fp32"
    with pytest.raises(InvalidParameter, match="precision"):
        TrainConfig(precision="fp8").validate()


def test_only_the_newest_checkpoints_of_stopped_runs_are_kept(fresh_cache):
    import os
    folder = fresh_cache / "checkpoints" / "shapes"
    folder.mkdir(parents=True)
    for i in range(cache.MAX_CHECKPOINTS + 3):
        f = folder / f"finetune-{i}.partial.pt"
        f.write_bytes(b"x")
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    (folder / "keep.txt").write_text("not a checkpoint")
    cache.trim_checkpoints()
    left = sorted(int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("*.partial.pt"))
    assert left == list(range(3, cache.MAX_CHECKPOINTS + 3)) and (folder / "keep.txt").exists()
