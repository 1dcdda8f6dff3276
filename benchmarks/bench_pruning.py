"""Pruning benchmark (CPU): does channel pruning really make models smaller and faster, and
how much accuracy does a short fine-tuning win back? Not a test; docs/bench_pruning.md has results.

Per teacher, on the offline default dataset ("shapes"), in one run:
  1. structured, ratio 0.5 (layer-wise, L1): MACs and params teacher vs pruned, batch-64 and
     batch-1 CPU latency timed interleaved (core.metrics.compare_latency), accuracy without fine-tuning;
  2. structured, ratio 0.3 with 0, 1 and 2 epochs of fine-tuning: accuracy vs the teacher.
--forms also times ratio 0.5 as NCHW, channels-last, BN-folded eager PyTorch and in ONNX Runtime.
Targets (issue): ratio 0.5 -> MACs >= 2.5x lower and batch-64 speedup >= 0.7 x the MAC reduction;
ratio 0.3 + 1 fine-tuning epoch -> within 3 points of the teacher.

Teachers come from the shared cache (cached_models/, or COMPRESSION_LAB_CACHE) and are trained
there once if missing: the default recipe unless --teacher-epochs/--teacher-subset say otherwise.

  nice -n 10 python benchmarks/bench_pruning.py --teacher-epochs 3 --teacher-subset 1000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("COMPRESSION_LAB_OFFLINE", "1")

from core.datasets import load_dataset  # noqa: E402
from core.metrics import compare_latency, count_macs, count_params, latency_input  # noqa: E402
from core.progress import TqdmProgress  # noqa: E402
from core.runner import ExperimentConfig, resolve_teacher  # noqa: E402
from core.techniques import Context, get_technique  # noqa: E402
from core.training import TrainConfig, evaluate_accuracy, recipe_for  # noqa: E402


class Clock:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1)}


def deploy_forms(teacher_model, pruned_model, rounds: int) -> dict:
    """Batch-64 latency of teacher and pruned model in the forms a deployment might run them,
    each pair timed interleaved: the MAC reduction only shows where the work left is convolutions.
    Eager PyTorch runs each batch norm and ReLU as its own pass over memory, which shrinks only
    linearly with the channels; folding them into the convolutions (torch.fx) or running the
    ONNX Runtime graph (Conv+BN+ReLU fused) leaves mostly convolution time."""
    import copy
    import torch
    from torch.fx.experimental.optimization import fuse
    from core.techniques.onnx_export import export_onnx
    from core.techniques.ort_session import OrtModule
    cl, nchw = torch.channels_last, torch.contiguous_format

    def as_format(m, fmt):
        return copy.deepcopy(m).cpu().eval().to(memory_format=fmt)

    x_cl, x_nchw = latency_input(64), latency_input(64, channels_last=False)
    forms = {
        "eager, NCHW": (as_format(teacher_model, nchw), as_format(pruned_model, nchw), x_nchw),
        "eager, channels-last": (as_format(teacher_model, cl), as_format(pruned_model, cl), x_cl),
        "eager, BN folded, channels-last": (fuse(as_format(teacher_model, nchw)).to(memory_format=cl),
                                            fuse(as_format(pruned_model, nchw)).to(memory_format=cl), x_cl),
        "ONNX Runtime fp32": (OrtModule(export_onnx(teacher_model)), OrtModule(export_onnx(pruned_model)), x_nchw),
    }
    result = {}
    for label, (a, b, x) in forms.items():
        la, lb, speed = compare_latency(a, b, batch_size=64, rounds=rounds, warmup=2, x_a=x, x_b=x)
        result[label] = {"ms": [round(la.median_ms, 1), round(lb.median_ms, 1)], "speedup": round(speed, 2)}
    return result


def bench_model(name: str, data, teacher_cfg: TrainConfig | None, args, progress) -> dict:
    clock = Clock()
    # teacher_cfg None: the newest cached teacher (what `compress` uses), else the default recipe
    teacher = resolve_teacher(ExperimentConfig(data.name, name, device="cpu", teacher_train=teacher_cfg),
                              progress, data)
    row = {"model": name, "dataset": data.name, "teacher_cached": teacher.cached, "teacher_path": str(teacher.path),
           "teacher_train": teacher.meta["settings"]["train"], "teacher_step": clock.lap()}
    x, y = data.eval_split(args.eval_size)
    spec = get_technique("prune")

    def prune(**params):
        return spec.apply(Context(teacher, data, spec.validate(params), device="cpu", progress=progress,
                                  eval_size=args.eval_size))

    def acc(model) -> float:
        return round(evaluate_accuracy(model, data, x, y), 4)

    row["teacher_accuracy"] = acc(teacher.model)
    macs_t, params_t = count_macs(teacher.model), count_params(teacher.model)

    # 1. ratio 0.5: size, MACs, interleaved latency
    clock = Clock()
    out = prune(ratio=0.5)
    macs_p, params_p = count_macs(out.model), count_params(out.model)
    lt64, lp64, speed64 = compare_latency(teacher.model, out.model, batch_size=64, rounds=args.rounds64, warmup=2)
    lt1, lp1, speed1 = compare_latency(teacher.model, out.model, batch_size=1, rounds=args.rounds1, warmup=3)
    mac_reduction = macs_t / macs_p
    forms = deploy_forms(teacher.model, out.model, args.rounds64) if args.forms else {}
    row["ratio_0.5"] = {
        "macs_teacher": macs_t, "macs_pruned": macs_p, "mac_reduction": round(mac_reduction, 2),
        "params_teacher": params_t, "params_pruned": params_p, "param_reduction": round(params_t / params_p, 2),
        "latency_b64_ms": [round(lt64.median_ms, 1), round(lp64.median_ms, 1)],
        "speedup_b64": round(speed64, 2), "speedup_b64_over_mac_reduction": round(speed64 / mac_reduction, 2),
        "latency_b1_ms": [round(lt1.median_ms, 2), round(lp1.median_ms, 2)], "speedup_b1": round(speed1, 2),
        "threads": lt64.threads, "accuracy_no_finetune": acc(out.model),
        "speedup_b64_by_form": forms,
        "target_macs_2.5x": mac_reduction >= 2.5, "target_speedup_0.7x": speed64 >= 0.7 * mac_reduction,
        "step": clock.lap()}

    # 2. ratio 0.3: accuracy after 0, 1, 2 fine-tuning epochs (each a separate run of its own schedule)
    curve = []
    for epochs in args.curve:
        clock = Clock()
        out = prune(ratio=0.3, finetune_epochs=epochs, finetune_subset=args.ft_subset)
        curve.append({"finetune_epochs": epochs, "accuracy": acc(out.model),
                      "history": [{k: round(v, 4) for k, v in h.items()} for h in out.history], "step": clock.lap()})
    row["ratio_0.3"] = {"macs_pruned": count_macs(out.model), "curve": curve}
    one = [c for c in curve if c["finetune_epochs"] == 1]
    if one:
        row["ratio_0.3"]["gap_points_after_1_epoch"] = round(100 * (row["teacher_accuracy"] - one[0]["accuracy"]), 1)
        row["ratio_0.3"]["target_within_3_points"] = row["ratio_0.3"]["gap_points_after_1_epoch"] <= 3.0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet34", "densenet121"])
    ap.add_argument("--dataset", default="shapes",
                    help="e.g. folder:/tmp/teach_data/cifar10; real data uses the newest cached teacher "
                         "(what `prepare` trained), else trains the default recipe")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default: the default recipe's")
    ap.add_argument("--teacher-subset", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--ft-subset", type=int, default=0, help="fine-tuning images (0 = all)")
    ap.add_argument("--curve", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning epochs at ratio 0.3")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--rounds64", type=int, default=10)
    ap.add_argument("--rounds1", type=int, default=30)
    ap.add_argument("--forms", action="store_true",
                    help="also time ratio 0.5 in other deployment forms (NCHW, BN folded, ONNX Runtime)")
    ap.add_argument("--out", default="/tmp/bench_pruning.jsonl")
    args = ap.parse_args(argv)
    data = load_dataset(args.dataset)
    progress = TqdmProgress()
    start = Clock()
    for name in args.models:
        base = recipe_for(data, name)   # the teacher the app and CLI would train (cached: reused)
        teacher_cfg = dataclasses.replace(
            base, epochs=args.teacher_epochs if args.teacher_epochs is not None else base.epochs,
            subset=args.teacher_subset if args.teacher_subset is not None else base.subset)
        if not data.generated and args.teacher_epochs is None and args.teacher_subset is None:
            teacher_cfg = None   # the newest cached teacher, as `compress` uses
        row = bench_model(name, data, teacher_cfg, args, progress)
        row["loadavg"] = os.getloadavg()
        line = json.dumps(row)
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(json.dumps({"total": start.lap(), "argv": sys.argv[1:]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
