import json
import os
import time

import pytest

from core import hardware
from core.cli import main
from core.results import ResultStore
from core.sweep import SweepPlan, best_per_dataset, report_markdown, run_sweep, write_report
from core.results import results_frame


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", epochs=1, subset=1500)


def test_sweep_is_resumable_and_reports_best_technique(teacher, tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    plan = SweepPlan(datasets=["shapes"], models=["resnet34"], techniques=["quantize", "prune"],
                     grid={"quantize": [{"mode": "fake", "bits": 8}, {"mode": "fake", "bits": 2}],
                           "prune": [{"method": "unstructured", "ratio": 0.9}]}, eval_size=200)
    seen = []
    first = run_sweep(plan, store=store, on_result=lambda i, n, r: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and not any(r.cached for r in first)
    t0 = time.perf_counter()
    again = run_sweep(plan, store=store)                 # resumed: everything from the cache
    assert all(r.cached for r in again) and time.perf_counter() - t0 < 10
    assert store.count() == 3
    frame = results_frame(first)
    best = best_per_dataset(frame, max_drop=0.01)
    assert list(best["dataset"]) == ["shapes"] and best["best_technique"][0] in {"quantize", "prune"}
    csv_path, md_path = write_report(first, tmp_path / "report")
    text = md_path.read_text()
    assert "Best technique per dataset" in text and "Criterion" in text and "resnet34" in text
    assert f"timed on {hardware.cpu_id()}." in text
    assert len(csv_path.read_text().strip().splitlines()) == 4


def test_best_technique_criterion_prefers_smallest_within_tolerance():
    import pandas as pd
    frame = pd.DataFrame([
        # quantize: 4x smaller within 1 point; prune: 10x smaller but 5 points worse
        {"dataset": "d", "model": "m", "technique": "quantize", "setting": "q", "accuracy_drop": 0.005,
         "size_ratio": 4.0, "compressed_size_bytes": 25},
        {"dataset": "d", "model": "m", "technique": "prune", "setting": "p", "accuracy_drop": 0.05,
         "size_ratio": 10.0, "compressed_size_bytes": 10},
    ])
    best = best_per_dataset(frame, max_drop=0.01)
    assert best["best_technique"][0] == "quantize" and best["score"][0] == 4.0
    assert best_per_dataset(frame, max_drop=0.1)["best_technique"][0] == "prune"


def test_sweep_refuses_missing_data_before_any_work(tmp_path, capsys):
    code = main(["sweep", "--datasets", "shapes", "cifar10", "--models", "resnet34", "--techniques", "quantize",
                 "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "rep"), "--quiet"])
    assert code == 2 and "CIFAR-10" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_compress_cli_json_shape(teacher, capsys):
    code = main(["compress", "--technique", "quantize", "--mode", "fake", "--bits", "6", "--eval-size", "200",
                 "--json", "--quiet"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert {"dataset", "model", "technique", "params", "baseline", "compressed", "eval_images", "seconds",
            "cached"} <= set(out)
    keys = {"accuracy", "size_bytes", "params", "nonzero_params", "macs", "latency_ms_b1", "latency_ms_b64"}
    assert keys <= set(out["baseline"]) and keys <= set(out["compressed"])
    assert out["params"]["bits"] == 6 and out["eval_images"] == 200 and 0 <= out["compressed"]["accuracy"] <= 1
    assert out["compressed"]["size_bytes"] < out["baseline"]["size_bytes"] / 4
    assert out["cpu"] == hardware.cpu_id() and out["cpu"].startswith(hardware.cpu_summary()["name"])
    # timed in an interactive worker, side by side: batch 1 on one thread, batch 64 on the cores it was given
    for side in ("baseline", "compressed"):
        assert out[side]["threads_b1"] == 1 and 1 <= out[side]["threads"] <= os.cpu_count()
    assert out["engine"]["kind"] == "ray" and out["engine"]["local"] is True and out["engine"]["node"]


def test_report_shows_every_score_and_what_distillation_adds():
    import pandas as pd
    row = {"dataset": "d", "model": "m", "baseline_accuracy": 0.9, "latency_speedup_b1": 1.0, "macs_ratio": 1.0,
           "compressed_threads": 2, "compressed_threads_b1": 1, "eval_images": 1000}
    frame = pd.DataFrame([
        dict(row, technique="quantize", setting="q", accuracy_drop=0.005, size_ratio=4.0, compressed_size_bytes=25,
             compressed_accuracy=0.895, scratch_accuracy=float("nan")),
        dict(row, technique="distill", setting="kd", accuracy_drop=0.1, size_ratio=50.0, compressed_size_bytes=2,
             compressed_accuracy=0.8, scratch_accuracy=0.75),
    ])
    text = report_markdown(frame, max_drop=0.01)
    assert "quantize 4.00×, distill 1.00×" in text
    assert "(batch 1 on 1 thread(s), batch 64 on 2)" in text
    kd_line = next(line for line in text.splitlines() if line.startswith("| d | m | kd |"))
    # s.e. of 0.80 and 0.75 on 1,000 images: 1.265 and 1.369 points; of their difference 1.86
    assert kd_line.endswith("| 0.800 | 0.750 | +5.0 | 1.86 |")
    assert "- d: 1,000 test images per run; one standard error of an accuracy near the teachers' 90% is 0.9 points" in text
