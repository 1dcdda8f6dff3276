"""Deep Compression and sensitivity allocation on real teachers (issue 22's targets). Not a test;
docs/sensitivity.md and docs/pipeline.md have the results.

Per teacher, through the CLI (so every run is cached and served again):
  1. pipeline: structured pruning (ratio, fine-tuning epochs) -> 4-bit weights: the file against the
     teacher's fp32 file, and the accuracy on every held-out image;
  2. the same pruning step (served from its cached file) -> real int8: batch-1 latency against the teacher;
  3. allocation uniform vs sensitivity without fine-tuning: structured pruning at the same MACs, and
     weights at an average of 3 bits;
  4. real int8 with its fp32 layers from the architecture's rule (auto) or from the scan (sensitivity).

  nice python benchmarks/bench_deep_compression.py --dataset folder:/tmp/teach_data/cifar10 \
      --models resnet34 vgg16_bn --finetune-epochs 3
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lab(*args: str) -> dict:
    """One CLI call's --json object (its last line); exits with its error otherwise."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "core", *args, "--json", "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["_wall_s"] = round(time.perf_counter() - t, 1)
    print(f"  [{out['_wall_s']:>6.1f} s] {' '.join(args)}", file=sys.stderr, flush=True)
    return out


def acc(m: dict) -> float:
    return round(100 * m["accuracy"], 2)


def ort_side_by_side(dataset: str, model: str, int8_file: str) -> dict:
    """Batch 1 on one thread, interleaved: the teacher in fp32 and the pipeline's int8 file, both in ONNX
    Runtime (the pipeline's own figures time the teacher in PyTorch)."""
    sys.path.insert(0, str(ROOT))
    from core import metrics, packfile
    from core.runner import ExperimentConfig, resolve_teacher
    from core.techniques import onnx_export, ort_session
    teacher = resolve_teacher(ExperimentConfig(dataset, model, device="cpu"))
    fp32 = ort_session.OrtModule(onnx_export.export_onnx(teacher.model.float().eval()), "fp32")
    int8, _ = packfile.load(int8_file)
    a, b, speedup = metrics.compare_latency(fp32, int8, 1, rounds=30, threads=1)
    return {"teacher_fp32_ort_ms": round(a.median_ms, 3), "int8_ms": round(b.median_ms, 3), "speedup": round(speedup, 2)}


def one_teacher(dataset: str, model: str, ratio: float, epochs: int, eval_size: int) -> dict:
    common = ["--dataset", dataset, "--model", model, "--eval-size", str(eval_size)]
    prune = f"prune:method=structured,ratio={ratio},finetune_epochs={epochs}"
    dc = lab("pipeline", *common, "--steps", prune, "quantize:mode=fake,bits=4")
    i8 = lab("pipeline", *common, "--steps", prune, "quantize:mode=int8")
    b = dc["baseline"]
    row = {"model": model, "teacher_accuracy": acc(b), "teacher_bytes": b["size_bytes"],
           "dc_accuracy": acc(dc["compressed"]), "dc_file_bytes": dc["file_bytes"],
           "dc_ratio": round(b["size_bytes"] / dc["file_bytes"], 1),
           "dc_drop": round(acc(b) - acc(dc["compressed"]), 2),
           "dc_steps": [(s["technique"], acc(s["metrics"]), s["metrics"]["size_bytes"], s["cached"]) for s in dc["steps"]],
           "int8_accuracy": acc(i8["compressed"]), "int8_file_bytes": i8["file_bytes"],
           "teacher_ms_b1": i8["baseline"].get("latency_ms_b1"), "int8_ms_b1": i8["compressed"].get("latency_ms_b1"),
           "int8_prune_step_cached": i8["steps"][0]["cached"]}
    if row["teacher_ms_b1"] and row["int8_ms_b1"]:
        row["int8_speedup_b1"] = round(row["teacher_ms_b1"] / row["int8_ms_b1"], 2)
    row["ort_b1"] = ort_side_by_side(dataset, model, i8["file_path"])
    for alloc in ("uniform", "sensitivity"):
        s = lab("compress", *common, "--technique", "prune", "--method", "structured", "--ratio", str(ratio),
                "--finetune-epochs", "0", "--allocation", alloc)
        row[f"prune_{alloc}"] = {"accuracy": acc(s["compressed"]), "macs": s["compressed"]["macs"]}
        search = (s["compressed"].get("extra") or {}).get("allocation_search")
        if search:   # the candidates measured on the scan's training images, and the one kept
            row[f"prune_{alloc}"]["search"] = [(t["source"], t["max_shift"], round(100 * t["accuracy"], 1),
                                                t["chosen"]) for t in search["tried"]]
        q = lab("compress", *common, "--technique", "quantize", "--mode", "fake", "--bits", "3",
                "--allocation", alloc)
        row[f"bits3_{alloc}"] = {"accuracy": acc(q["compressed"]),
                                 "average_bits": (q["compressed"].get("extra") or {}).get("average_bits", 3)}
        r = lab("compress", *common, "--technique", "quantize", "--mode", "int8", "--allocation", alloc)
        ex = r["compressed"].get("extra") or {}
        row[f"int8_{alloc}"] = {"accuracy": acc(r["compressed"]), "ms_b1": r["compressed"].get("latency_ms_b1"),
                                "teacher_ms_b1": r["baseline"].get("latency_ms_b1"),
                                "fp32_layers": ex.get("fp32_layers"), "names": ex.get("fp32_layer_names")}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="folder:/tmp/teach_data/cifar10")
    p.add_argument("--models", nargs="+", default=["resnet34", "vgg16_bn"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--eval-size", type=int, default=0, help="held-out images (0 = all)")
    p.add_argument("--out", default="/tmp/bench_deep_compression.json")
    args = p.parse_args(argv)
    rows = []
    for m in args.models:
        rows.append(one_teacher(args.dataset, m, args.ratio, args.finetune_epochs, args.eval_size))
        Path(args.out).write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
