"""Quantization benchmark on the offline default dataset (not a test): results go in docs/bench_quantization.md.

For each teacher (from the shared cache; trained with the default recipe if missing): int8
file ratio, batch-1 latency speedup (int8 vs fp32, both in ONNX Runtime, timed interleaved),
accuracy drop on the full test set; fake 8-bit and 4-bit per-channel drops; a bit-width curve
16 -> 1 for resnet34; and, for the int8 backend choice, torch.ao FX int8 vs eager fp32 on resnet34.
--profile adds ONNX Runtime's per-operator share of batch-1 time for the fp32 and int8 sessions.

    nice -n 10 python -m benchmarks.bench_quantization --threads 2 --json /tmp/bench_quant.json
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# PyTorch's OpenMP threads busy-wait between ops by default; on a CPU shared with other jobs that
# inflates eager timings many times over, while the ONNX Runtime sessions here never spin.
# Both sides sleep instead (must be set before torch starts its thread pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from core import metrics  # noqa: E402
from core.datasets import load_dataset  # noqa: E402
from core.models import build_model  # noqa: E402
from core.progress import TqdmProgress  # noqa: E402
from core.runner import ExperimentConfig, resolve_teacher  # noqa: E402
from core.techniques import Context, get_technique  # noqa: E402
from core.training import TrainConfig, predict_logits  # noqa: E402


def accuracy(model, data, dtype=torch.float32) -> float:
    x, y = data.test_x, data.test_y
    if dtype == torch.float32:
        return metrics.accuracy(predict_logits(model, data, x), y)
    with torch.inference_mode():
        logits = torch.cat([model(data.normalize(x[i:i + 256]).to(dtype)).float() for i in range(0, len(x), 256)])
    return metrics.accuracy(logits, y)


def file_bytes(state) -> int:
    return len(metrics.serialized_bytes(state))


def bench_int8(spec, teacher, data, threads, rounds, acc_fp32, profile=False):
    t0 = time.perf_counter()
    out = spec.apply(Context(teacher, data, {"mode": "int8"}))
    seconds = time.perf_counter() - t0
    row = {"convert_s": round(seconds, 1), "quantized": out.extra.get("quantized"), "notes": out.notes,
           "fp32_file_mb": out.extra["fp32_file_bytes"] / 1e6, "int8_file_mb": file_bytes(out.state) / 1e6,
           "float_params_left": out.extra.get("float_params_left"),
           "int8_ops": f"{out.extra.get('int8_compute_ops')}/{out.extra.get('compute_ops')}"}
    row["file_ratio"] = row["fp32_file_mb"] / row["int8_file_mb"]
    row["acc_int8"] = accuracy(out.model, data)
    row["drop_pt"] = 100 * (acc_fp32 - row["acc_int8"])
    if out.baseline_model is not None:
        # batch 1 as the lab times it (metrics.BATCH1_THREADS), and on every thread for the record
        fp32, int8, speed = metrics.compare_latency(out.baseline_model, out.model, 1, rounds=rounds)
        row.update(ort_fp32_ms=fp32.median_ms, int8_ms=int8.median_ms, speedup_b1=speed, threads_b1=fp32.threads)
        fp32, int8, speed = metrics.compare_latency(out.baseline_model, out.model, 1, rounds=rounds, threads=threads)
        row.update(ort_fp32_ms_all=fp32.median_ms, int8_ms_all=int8.median_ms, speedup_b1_all=speed)
        eager, _, speed_e = metrics.compare_latency(teacher.model, out.model, 1, rounds=rounds)
        row.update(eager_fp32_ms=eager.median_ms, speedup_vs_eager_b1=speed_e)
        fp32, int8, speed = metrics.compare_latency(out.baseline_model, out.model, 64, rounds=max(3, rounds // 4),
                                                    warmup=1, threads=threads)
        row.update(ort_fp32_ms_b64=fp32.median_ms, int8_ms_b64=int8.median_ms, speedup_b64=speed)
        if profile:
            row["profile_b1"] = {m.label: op_profile(m.onnx_bytes, threads) for m in (out.baseline_model, out.model)}
    return row


def op_profile(onnx_bytes: bytes, threads: int, runs: int = 100) -> dict:
    """Share of batch-1 kernel time per operator type (ONNX Runtime's profiler), and nodes per run."""
    import collections
    from core.techniques.onnx_export import INPUT_NAME
    from core.techniques.ort_session import new_session, session_options
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lab-ort-profile")
    sess = new_session(onnx_bytes, so)
    x = metrics.latency_input(1, channels_last=False).numpy()
    for _ in range(runs):
        sess.run(None, {INPUT_NAME: x})
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    time_by_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(time_by_op.values()) or 1
    return {op: {"share": round(t / total, 3), "nodes": nodes[op] // runs} for op, t in time_by_op.most_common()}


def bench_fake(spec, teacher, data, bits, acc_fp32, granularity="per_channel"):
    out = spec.apply(Context(teacher, data, {"mode": "fake", "bits": bits, "granularity": granularity}))
    acc = accuracy(out.model, data)
    return {"bits": bits, "acc": acc, "drop_pt": 100 * (acc_fp32 - acc), "packed_mb": out.size_bytes / 1e6,
            "ratio": out.extra["packed_ratio"]}


def bench_fx(teacher, data, threads, rounds, acc_fp32):
    """torch.ao FX static int8 (x86 backend) vs the fp32 eager model: the alternative backend."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    from core.techniques.quantization import calibration_images
    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(teacher.model).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(torch.zeros(1, 3, 32, 32),))
        images = calibration_images(data, 256)
        with torch.inference_mode():
            for i in range(0, len(images), 32):
                prepared(images[i:i + 32])
        q = convert_fx(prepared)
    convert_s = time.perf_counter() - t0
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    acc = accuracy(q, data)
    eager, int8, speed = metrics.compare_latency(teacher.model, q, 1, rounds=rounds)   # batch 1: the lab's thread count
    return {"convert_s": round(convert_s, 1), "file_ratio": os.path.getsize(teacher.path) / len(buf.getvalue()),
            "acc_int8": acc, "drop_pt": 100 * (acc_fp32 - acc), "eager_fp32_ms": eager.median_ms,
            "int8_ms": int8.median_ms, "speedup_b1": speed}


def bench_vgg16_untrained(spec, data, threads, rounds):
    """vgg16 (no batch norm) conversion check on a random-init model when no trained one is cached."""
    from core.teachers import Teacher
    model = build_model("vgg16", data.num_classes).eval()
    teacher = Teacher(model, {"model": "vgg16", "num_classes": data.num_classes}, Path("/nonexistent"), False)
    return bench_int8(spec, teacher, data, threads, rounds, acc_fp32=float("nan"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", nargs="+", default=["resnet34", "resnet50", "vgg16_bn", "densenet121"])
    ap.add_argument("--dataset", default="shapes", help="e.g. folder:/tmp/teach_data/cifar10 (held-out test split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved batch-1 timing rounds")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train missing teachers with TrainConfig(epochs=N) instead of the default recipe")
    ap.add_argument("--curve", default="resnet34", help="teacher for the 16 -> 1 bit curve ('' to skip)")
    ap.add_argument("--vgg16", action="store_true", help="also convert vgg16 (no BN) to int8")
    ap.add_argument("--no-fx", action="store_true", help="skip the torch.ao FX comparison")
    ap.add_argument("--profile", action="store_true",
                    help="also profile batch-1 fp32 and int8 sessions: share of kernel time per operator")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--calibrations", nargs="*", default=[],
                    help="also convert each teacher with these int8 calibrations (minmax p99.9 p99.5) and report drops")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    spec = get_technique("quantize")
    progress = TqdmProgress()
    results = {"dataset": data.label, "test_images": len(data.test_y), "threads": args.threads, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
               "teachers": {}, "curve": [], "fx": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_start = time.perf_counter()
    for name in args.teachers:
        cfg = ExperimentConfig(dataset=args.dataset, model=name, teacher_train=TrainConfig(epochs=args.epochs) if args.epochs else None)
        teacher = resolve_teacher(cfg, progress, data)
        t0 = time.perf_counter()
        acc = accuracy(teacher.model, data)
        row = {"teacher_file": str(teacher.path), "teacher_settings": teacher.meta.get("settings", {}).get("train"),
               "acc_fp32": acc}
        row["int8"] = bench_int8(spec, teacher, data, args.threads, args.rounds, acc, args.profile)
        row["fake8"] = bench_fake(spec, teacher, data, 8, acc)
        row["fake4"] = bench_fake(spec, teacher, data, 4, acc)
        row["calibrations"] = {}
        for c in args.calibrations:
            acc_c = accuracy(spec.apply(Context(teacher, data, spec.validate({"mode": "int8", "calibration": c}))).model,
                             data)
            row["calibrations"][c] = {"acc": acc_c, "drop_pt": 100 * (acc - acc_c)}
            print("calibration", name, c, row["calibrations"][c], flush=True)
        row["seconds"] = time.perf_counter() - t0
        results["teachers"][name] = row
        print(name, json.dumps(row, default=str), flush=True)
        if name == args.curve:
            for bits in range(16, 0, -1):
                results["curve"].append(bench_fake(spec, teacher, data, bits, acc))
                print("curve", results["curve"][-1], flush=True)
            if not args.no_fx:
                results["fx"] = bench_fx(teacher, data, args.threads, args.rounds, acc)
                print("fx", results["fx"], flush=True)
    if args.vgg16:
        results["vgg16_untrained"] = bench_vgg16_untrained(spec, data, args.threads, args.rounds)
        print("vgg16", results["vgg16_untrained"], flush=True)
    results["total_s"] = time.perf_counter() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [f"{r['dataset']} ({r['test_images']} test images), threads={r['threads']} (batch 1: "
             f"{metrics.BATCH1_THREADS}), torch {r['torch']}, CPU capability {r['cpu']}, total {r['total_s']:.0f} s", "",
             "| teacher | fp32 acc | int8 acc | drop (pt) | file ratio | ORT fp32 b1 ms | int8 b1 ms | speedup b1 "
             f"| b1 on {r['threads']} threads: fp32 / int8 ms, speedup | vs eager b1 | speedup b64 | fake8 drop | fake4 drop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in r["teachers"].items():
        i = t["int8"]
        lines.append(f"| {name} | {t['acc_fp32']:.4f} | {i['acc_int8']:.4f} | {i['drop_pt']:.2f} | "
                     f"{i['file_ratio']:.2f}× | {i.get('ort_fp32_ms', float('nan')):.2f} | "
                     f"{i.get('int8_ms', float('nan')):.2f} | {i.get('speedup_b1', float('nan')):.2f}× | "
                     f"{i.get('ort_fp32_ms_all', float('nan')):.2f} / {i.get('int8_ms_all', float('nan')):.2f}, "
                     f"{i.get('speedup_b1_all', float('nan')):.2f}× | "
                     f"{i.get('speedup_vs_eager_b1', float('nan')):.2f}× | {i.get('speedup_b64', float('nan')):.2f}× | "
                     f"{t['fake8']['drop_pt']:.2f} | {t['fake4']['drop_pt']:.2f} |")
    if r["curve"]:
        lines += ["", "| bits | accuracy | drop (pt) | packed MB | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {c['bits']} | {c['acc']:.4f} | {c['drop_pt']:.2f} | {c['packed_mb']:.2f} | {c['ratio']:.1f}× |"
                  for c in r["curve"]]
    if r.get("fx"):
        f = r["fx"]
        lines += ["", f"torch.ao FX int8 (resnet34): file {f['file_ratio']:.2f}×, drop {f['drop_pt']:.2f} pt, "
                      f"eager fp32 {f['eager_fp32_ms']:.2f} ms, int8 {f['int8_ms']:.2f} ms, speedup {f['speedup_b1']:.2f}×, "
                      f"convert {f['convert_s']} s"]
    if r.get("vgg16_untrained"):
        v = r["vgg16_untrained"]
        lines += ["", f"vgg16 (random init, conversion check): file {v['file_ratio']:.2f}×, "
                      f"ORT fp32 {v.get('ort_fp32_ms', float('nan')):.2f} ms, int8 {v.get('int8_ms', float('nan')):.2f} ms, "
                      f"speedup {v.get('speedup_b1', float('nan')):.2f}×, notes {v['notes']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
