"""Slider benchmark: how long the app takes from a changed setting to a shown result.

The app keeps the dataset and teacher in memory and calls `core.runner.run_experiment` with
them; this script does the same for a walk along each slider (new settings each step, so nothing
is served from the result cache), then repeats one setting to show the cached path.
Not a test; results are in docs/app.md ("Slider response time").

  python benchmarks/bench_slider.py                  # ResNet-34 on shapes (trained once if missing)
  python benchmarks/bench_slider.py --model vgg16_bn --eval-size 1000
  python benchmarks/bench_slider.py --engine both     # in this process and through the job layer (Ray workers)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("COMPRESSION_LAB_OFFLINE", "1")

from core.datasets import load_dataset  # noqa: E402
from core.predict import cached_result  # noqa: E402
from core.results import ExperimentResult, ResultStore  # noqa: E402
from core.runner import ExperimentConfig, run_experiment  # noqa: E402
from core.teachers import TeacherSettings, get_teacher, latest_teacher  # noqa: E402
from core.training import TrainConfig  # noqa: E402

WALKS = {
    "quantize: weight bits (fake)": ("quantize", [{"mode": "fake", "bits": b} for b in (8, 6, 5, 4, 3, 2)]),
    "prune: structured ratio": ("prune", [{"method": "structured", "ratio": r} for r in (0.2, 0.3, 0.4, 0.5, 0.6)]),
    "prune: unstructured ratio": ("prune", [{"method": "unstructured", "ratio": r} for r in (0.3, 0.5, 0.7, 0.9)]),
    "quantize: int8 (mode switch)": ("quantize", [{"mode": "int8"}]),
    "quantize: fp16 (mode switch)": ("quantize", [{"mode": "fp16"}]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--long-job", action="store_true",
                    help="with --engine ray: walk once with no long job, then again while a teacher trains in "
                         "the long lane (the classroom target: p95 with it ≤ 1.5× without)")
    ap.add_argument("--engine", choices=["inprocess", "ray", "both"], default="inprocess",
                    help="where each step runs: here (as the app did), in the job layer's warm Ray workers "
                         "(as the app does now), or both side by side")
    args = ap.parse_args()
    for engine in (["inprocess", "ray"] if args.engine == "both" else [args.engine]):
        walk(args, engine)
    if args.long_job and args.engine != "inprocess":
        walk(args, "ray", long_job=True)


def walk(args, engine: str, long_job: bool = False) -> None:
    data = load_dataset(args.dataset)
    teacher = latest_teacher(data, args.model) or get_teacher(
        data, TeacherSettings(args.model, TrainConfig(epochs=1, subset=1000)))
    # a fresh result store: every step below is computed, as after a real slider move
    store = ResultStore(Path(tempfile.mkdtemp()) / "results.sqlite")
    warm = ExperimentConfig(args.dataset, args.model, "quantize", {"mode": "fake", "bits": 7}, args.eval_size)

    def run(cfg):
        if engine == "inprocess":
            return run_experiment(cfg, store=store, teacher=teacher, data=data)
        from core import jobs   # what a page does: one job, waited for; the worker keeps the teacher loaded
        out = jobs.manager().submit("compress", dict(dataclasses.asdict(cfg.validate()), store=str(store.path)))
        return ExperimentResult.from_dict(out.follow())

    if engine == "ray":
        from core import jobs
        jobs.manager().warm_up()
    run(warm)   # first-call costs, as a running app has paid

    where = "teacher in memory (as the app did)" if engine == "inprocess" else "in the job layer's Ray workers"
    training = None
    if long_job:   # a teacher trains in the long lane during the whole walk (cancelled after it)
        from core import jobs
        train = TrainConfig(epochs=20, subset=2000, batch_size=64, seed=int(time.time()))
        training = jobs.manager().submit("train", {"dataset": args.dataset, "data_root": None, "model": args.model,
                                                   "train": dataclasses.asdict(train), "pretrained": False,
                                                   "device": "cpu", "measure": False}, label="long job")
        while not training.events:
            time.sleep(0.2)
        where += ", while a teacher trains in the long lane"
    print(f"\n{args.model} on {data.label}, eval {args.eval_size} images, {where}")
    print("| slider | steps | median s | max s | steps under 3 s |\n| --- | --- | --- | --- | --- |")
    every = []
    for label, (technique, steps) in WALKS.items():
        secs = []
        for params in steps:
            cfg = ExperimentConfig(args.dataset, args.model, technique, params, args.eval_size)
            t0 = time.perf_counter()
            r = run(cfg)
            assert not r.cached
            secs.append(time.perf_counter() - t0)
        every += secs
        print(f"| {label} | {len(secs)} | {statistics.median(secs):.2f} | {max(secs):.2f} | "
              f"{sum(s < 3 for s in secs)}/{len(secs)} |", flush=True)
    print(f"| all steps, p95 | {len(every)} | {statistics.median(every):.2f} | "
          f"{statistics.quantiles(every, n=20)[-1]:.2f} (p95) | {sum(s < 3 for s in every)}/{len(every)} |")
    if training is not None:
        from core import jobs
        assert training.state == "running", training.state
        jobs.manager().cancel(training.id, instructor=True)
    t0 = time.perf_counter()
    r = cached_result(warm, teacher, data, store)   # the page's look-up before it submits anything
    print(f"\nsame settings again: served from the store in {time.perf_counter() - t0:.3f} s (cached={r.cached})")


if __name__ == "__main__":
    main()
