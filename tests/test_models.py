import pytest
import torch

from core.errors import LabError
from core.models import MODELS, STUDENTS, TEACHERS, build_model, count_params

EXPECTED_TEACHER_PARAMS = {   # torchvision architectures with a 10-class head
    "resnet34": 21_289_802, "resnet50": 23_528_522, "densenet121": 6_964_106, "vgg16": 134_301_514,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_pass_gives_class_logits(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, n", EXPECTED_TEACHER_PARAMS.items())
def test_teacher_parameter_counts_match_torchvision(name, n):
    assert count_params(build_model(name)) == n


def test_students_are_under_ten_percent_of_resnet34():
    limit = 0.1 * count_params(build_model("resnet34"))
    assert len(STUDENTS) >= 2
    for s in STUDENTS:
        assert count_params(build_model(s)) < limit


def test_unknown_model_and_pretrained_offline():
    with pytest.raises(LabError, match="unknown model 'resnet9000'"):
        build_model("resnet9000")
    notices = []
    with pytest.warns(UserWarning, match="random initialisation"):
        model = build_model("resnet34", pretrained=True, notices=notices)   # no network here
    assert notices and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert set(TEACHERS) >= {"densenet121", "resnet50", "resnet34", "vgg16"}
