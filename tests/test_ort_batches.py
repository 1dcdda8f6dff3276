"""How OrtModule runs a batch of several images on several threads (ort_session.BATCH_PLANS)."""
import pickle
import time

import pytest
import torch

from core.models import build_model
from core.techniques import onnx_export, ort_session


@pytest.fixture(scope="module")
def onnx_bytes():
    torch.manual_seed(0)
    return onnx_export.export_onnx(build_model("resnet14_wide", 10).eval())


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _images(n):
    # channels-last, as the latency inputs are
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)


def test_a_split_batch_gives_the_same_logits_as_one_run(onnx_bytes, two_threads):
    x = _images(7)   # odd: the parts differ in size
    whole = ort_session.OrtModule(onnx_bytes, batch_plan="whole")
    split = ort_session.OrtModule(onnx_bytes, batch_plan="split")
    a, b = whole(x), split(x)
    assert a.shape == (7, 10) and torch.allclose(a, b, atol=1e-5)
    assert whole.plans == {2: "whole"} and split.plans == {2: "split"}
    # a split batch runs on the one-thread session only
    assert set(split._sessions) == {1} and set(whole._sessions) == {2}
    # one image is one run, on the session already there
    assert torch.allclose(split(x[:1]), a[:1], atol=1e-5) and set(split._sessions) == {1}
    with pytest.raises(ValueError, match="batch_plan"):
        ort_session.OrtModule(onnx_bytes, batch_plan="halves")


@pytest.mark.parametrize("slow", ["whole", "split"])
def test_auto_keeps_the_faster_plan_and_forgets_it_when_moved(onnx_bytes, two_threads, slow):
    model = ort_session.OrtModule(onnx_bytes)
    run = getattr(model, f"_run_{slow}")

    def slowed(arr, threads):
        time.sleep(0.05)
        return run(arr, threads)
    setattr(model, f"_run_{slow}", slowed)
    x = _images(8)
    ref = ort_session.OrtModule(onnx_bytes, batch_plan="whole")(x)
    assert torch.allclose(model(x), ref, atol=1e-5)
    faster = "split" if slow == "whole" else "whole"
    assert model.plans == {2: faster}
    # the choice is timed on this machine: a pickled copy times it again
    delattr(model, f"_run_{slow}")
    assert pickle.loads(pickle.dumps(model)).plans == {}
