"""The Compare page's Pareto fronts: one per dataset and teacher, never one across them."""
from __future__ import annotations

import pandas as pd

from core import views


def _runs() -> pd.DataFrame:
    # shapes is easy, cifar10 hard: every shapes run is more accurate than every cifar10 run
    return pd.DataFrame({
        "dataset": ["shapes", "shapes", "shapes", "cifar10", "cifar10", "cifar10", "cifar10"],
        "model": ["resnet34", "resnet34", "resnet34", "resnet34", "resnet34", "vgg16_bn", "vgg16_bn"],
        "technique": ["quantize", "prune", "prune", "quantize", "prune", "quantize", "prune"],
        "setting": list("abcdefg"),
        "compressed_size_bytes": [1.0, 2.0, 3.0, 1.5, 4.0, 2.5, 5.0],
        "compressed_accuracy": [0.95, 0.97, 0.96, 0.60, 0.70, 0.65, 0.66],
        "baseline_size_bytes": [10.0, 10.0, 10.0, 10.0, 10.0, 20.0, 20.0],
        "baseline_accuracy": [0.98, 0.98, 0.98, 0.75, 0.75, 0.72, 0.72],
    })


def test_front_is_computed_per_dataset_and_teacher_by_default():
    df = _runs()
    mask = views.pareto_mask(df, "compressed_size_bytes")
    # shapes/resnet34: a, b on the front, c dominated by b; cifar10/resnet34: d and e (e is the best
    # there, though a shapes run is cheaper and better); cifar10/vgg16_bn: f and g
    assert mask.tolist() == [True, True, False, True, True, True, True]


def test_one_front_over_everything_only_when_asked():
    df = _runs()
    assert views.pareto_mask(df, "compressed_size_bytes", by=None).tolist() == \
        [True, True, False, False, False, False, False]
    # a frame without dataset/model columns is one group, as before
    plain = pd.DataFrame({"cost": [1, 2, 3, 4, 2.5], "compressed_accuracy": [0.5, 0.8, 0.7, 0.9, 0.8]})
    assert views.pareto_mask(plain, "cost").tolist() == [True, True, False, True, False]


def test_front_ignores_runs_without_the_cost_and_keeps_the_index():
    df = _runs().set_index(pd.Index([10, 11, 12, 13, 14, 15, 16]))
    df.loc[14, "compressed_size_bytes"] = float("nan")
    mask = views.pareto_mask(df, "compressed_size_bytes")
    assert list(mask.index) == [10, 11, 12, 13, 14, 15, 16]
    assert mask[14] == False and mask[13] == True   # noqa: E712 (numpy booleans)


def test_tradeoff_chart_draws_one_front_line_per_group_and_a_teacher_per_dataset():
    chart = views.tradeoff_chart(_runs(), "compressed_size_bytes", "size")
    line, points = chart.layer[0], chart.layer[1]
    assert points.data["pareto"].tolist() == [True, True, False, True, True, True, True]
    assert set(line.data["front"]) == {"shapes · resnet34", "cifar10 · resnet34", "cifar10 · vgg16_bn"}
    assert line.to_dict()["encoding"]["detail"]["field"] == "front"   # separate lines, not one across groups
    teachers = chart.layer[2].data
    assert sorted(teachers["label"]) == ["teacher resnet34 on cifar10", "teacher resnet34 on shapes",
                                         "teacher vgg16_bn on cifar10"]
    one = views.tradeoff_chart(_runs(), "compressed_size_bytes", "size", by=None)
    assert one.layer[1].data["pareto"].sum() == 2
