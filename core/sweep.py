"""Sweeps: the seed study (datasets × teachers × technique settings) run headless and resumably.

Every cell goes through `run_experiment`, so a re-run after an interruption serves finished
cells from the cache and only computes what is missing.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LabError
from .models import STUDY_TEACHERS
from .progress import ProgressFn, emit
from .results import ExperimentResult, ResultStore, cpu_counts, results_frame
from .runner import ExperimentConfig, lane
from .techniques import get_technique, technique_names
from .training import recipe_for

SEED_DATASETS = ["cifar10", "svhn"]

# a few settings per technique (each spec's sweep_grid): the knobs the seed study turned, plus the lab's additions
DEFAULT_GRID: dict[str, list[dict]] = {n: list(get_technique(n).sweep_grid) for n in technique_names()
                                       if get_technique(n).sweep_grid}


@dataclass
class SweepPlan:
    datasets: list[str] = field(default_factory=lambda: list(SEED_DATASETS))
    models: list[str] = field(default_factory=lambda: list(STUDY_TEACHERS))
    techniques: list[str] = field(default_factory=lambda: list(DEFAULT_GRID))
    grid: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_GRID.items()})
    eval_size: int = 1000
    pretrained: bool = False   # teachers from ImageNet weights (the seed study's); see run_sweep

    def configs(self, data_root=None, device=None) -> list[ExperimentConfig]:
        unknown = [t for t in self.techniques if t not in self.grid]
        if unknown:
            raise LabError(f"unknown technique {unknown[0]!r} in sweep; choose from {', '.join(self.grid)}")
        out = []
        for ds, model, tech in itertools.product(self.datasets, self.models, self.techniques):
            for params in self.grid[tech]:
                out.append(ExperimentConfig(ds, model, tech, dict(params), self.eval_size, data_root, device))
        return out


def run_sweep(plan: SweepPlan, progress: ProgressFn = None, store: ResultStore | None = None,
              data_root=None, device=None, on_result=None, address: str | None = None) -> list[ExperimentResult]:
    """Run every cell (validated up front, so a typo fails before hours of work) on the job layer:
    missing teachers are trained first (once each), then all cells run in parallel across the
    engine's workers; results come back in the plan's order.

    Cells compress the newest cached teacher of their dataset and model. With `plan.pretrained`
    a teacher is trained from ImageNet weights wherever that newest one is not ImageNet-pretrained;
    where the weights cannot be fetched (offline, not in torch's hub cache) it stops before any work."""
    from . import jobs
    from .datasets import load_dataset
    from .engine import check_reachable
    from .predict import latest_teacher_entry
    from .teachers import TeacherSettings, pretrained_problem
    configs = [c.validate() for c in plan.configs(data_root, device)]
    check_reachable(address)
    datas = {ds: load_dataset(ds, data_root) for ds in plan.datasets}   # missing data fails now
    missing = []
    for ds, model in dict.fromkeys((c.dataset, c.model) for c in configs):
        entry = latest_teacher_entry(datas[ds], model)
        if entry is None or (plan.pretrained and not (entry[1].get("settings") or {}).get("pretrained")):
            s = TeacherSettings(model, recipe_for(datas[ds], model, device), pretrained=plan.pretrained)
            problem = pretrained_problem(datas[ds], s)
            if problem:   # before any teacher trains: not after hours of the others
                raise LabError(problem)
            missing.append((ds, s))
    lab = jobs.manager(address)
    teachers = []
    for ds, s in missing:
        kind = "ImageNet-pretrained " if s.pretrained else ""
        emit(progress, stage="sweep", kind="message", message=f"training the {kind}{s.model} teacher on {ds} first")
        teachers.append(lab.submit("train", {"dataset": ds, "data_root": data_root, "model": s.model,
                                             "train": asdict(s.train), "pretrained": s.pretrained, "device": device},
                                   label=f"train {s.model} on {ds}"))
    for job in teachers:
        job.follow(progress)
    submitted = []
    for cfg in configs:
        payload = dict(asdict(cfg), store=str(store.path) if store else None)
        submitted.append(lab.submit("compress", payload, lane=lane(cfg),
                                    label=f"{cfg.dataset} {cfg.model} {cfg.technique} {cfg.params}"))
    emit(progress, stage="sweep", kind="message", message=f"{len(submitted)} cells on {lab.status()['workers']} workers")
    results = []
    for i, job in enumerate(submitted):
        r = ExperimentResult.from_dict(job.follow())
        r.cached = r.cached or bool(job.result and job.result.get("cached"))
        results.append(r)
        if on_result:
            on_result(i + 1, len(submitted), r)
    return results


def best_per_dataset(frame, max_drop: float = 0.01):
    """Criterion: per dataset and teacher, the smallest model within `max_drop` of the teacher's
    accuracy; a technique's score is the geometric mean over teachers of its best size reduction
    (1.0 where none of its runs qualifies). The best technique has the highest score."""
    import numpy as np
    import pandas as pd
    rows = []
    for ds, g in frame.groupby("dataset"):
        scores = {}
        for tech, gt in g.groupby("technique"):
            per_model = []
            for _model, gm in g.groupby("model"):
                ok = gt[(gt["model"] == _model) & (gt["accuracy_drop"] <= max_drop)]
                per_model.append(float(ok["size_ratio"].max()) if len(ok) else 1.0)
            scores[tech] = float(np.exp(np.mean(np.log(per_model))))
        best = max(scores, key=scores.get)
        ok = g[g["accuracy_drop"] <= max_drop].sort_values("compressed_size_bytes")
        top = ok.iloc[0] if len(ok) else None
        rows.append({"dataset": ds, "best_technique": best, "score": scores[best],
                     **{f"score_{t}": s for t, s in scores.items()},
                     "smallest_run": None if top is None else f"{top['model']} {top['setting']}",
                     "smallest_run_size_ratio": None if top is None else top["size_ratio"]})
    return pd.DataFrame(rows)


def write_report(results: list[ExperimentResult], out_dir: Path, max_drop: float = 0.01) -> tuple[Path, Path]:
    """CSV of every run plus a Markdown report answering: which technique is best per dataset."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = results_frame(results)
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    frame.to_csv(csv_path, index=False)
    md_path.write_text(report_markdown(frame, max_drop))
    return csv_path, md_path


def _first(frame, column: str):
    return frame[column].iloc[0] if len(frame) and column in frame else "?"


def _cpu_words(frame) -> str:
    """ ", timed on <CPU>", or the CPUs with their run counts when a copied cache mixes machines."""
    counts = cpu_counts(frame)
    if len(counts) == 0 or list(counts.index) == ["not recorded"]:
        return ""
    if len(counts) == 1:
        return f", timed on {counts.index[0]}"
    return ", timed on several CPUs: " + "; ".join(f"{cpu} ({n} runs)" for cpu, n in counts.items())


def report_markdown(frame, max_drop: float = 0.01) -> str:
    """The report for a results frame (results_frame's columns): best technique, distillation, every run."""
    lines = ["# Compression sweep", "",
             f"{len(frame)} runs. Accuracy on each dataset's fixed evaluation subset; latency on the CPU "
             f"(batch 1 on {_first(frame, 'compressed_threads_b1')} thread(s), batch 64 on "
             f"{_first(frame, 'compressed_threads')}){_cpu_words(frame)}.", "",
             f"**Criterion**: the smallest model within {max_drop * 100:.1f} accuracy points of its teacher. "
             "A technique's score is the geometric mean, over teachers, of its best size reduction among "
             "runs meeting the criterion (1.0× where none does).", ""]
    if not len(frame):
        return "\n".join(lines)
    lines += _noise_lines(frame)
    best = best_per_dataset(frame, max_drop)
    lines += ["## Best technique per dataset", "",
              "| dataset | best technique | score | every technique's score | smallest qualifying run |",
              "|---|---|---|---|---|"]
    for _, b in best.iterrows():
        sr = f" ({b['smallest_run_size_ratio']:.1f}× smaller)" if b["smallest_run"] else ""
        scores = {c[len("score_"):]: b[c] for c in best.columns if c.startswith("score_") and b[c] == b[c]}
        all_scores = ", ".join(f"{t} {v:.2f}×" for t, v in sorted(scores.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {b['dataset']} | **{b['best_technique']}** | {b['score']:.2f}× | {all_scores} | "
                     f"{b['smallest_run'] or '-'}{sr} |")
    lines.append("")
    lines += _distillation_lines(frame)
    for ds, g in frame.groupby("dataset"):
        lines += [f"## {ds}", "", "| teacher | setting | teacher acc | compressed acc | drop (pts) | size × | "
                  "latency b1 × | MACs × |", "|---|---|---|---|---|---|---|---|"]
        for _, r in g.sort_values(["model", "technique"]).iterrows():
            lines.append(f"| {r['model']} | {r['setting']} | {r['baseline_accuracy']:.3f} | "
                         f"{r['compressed_accuracy']:.3f} | {r['accuracy_drop'] * 100:+.1f} | "
                         f"{_x(r['size_ratio'])} | {_x(r['latency_speedup_b1'])} | {_x(r['macs_ratio'])} |")
        lines.append("")
    return "\n".join(lines)


def _distillation_lines(frame) -> list[str]:
    """What distillation adds: each KD student beside the same student trained from scratch."""
    if "scratch_accuracy" not in frame:
        return []
    kd = frame[(frame["technique"] == "distill") & frame["scratch_accuracy"].notna()]
    if not len(kd):
        return []
    lines = ["## Distillation: what the teacher adds", "",
             "The KD student against the same student trained from scratch with the same budget.", "",
             "| dataset | teacher | setting | teacher acc | KD student | from scratch | KD − scratch (pts) "
             "| 1 s.e. of the difference (pts, unpaired: an upper bound) |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in kd.sort_values(["dataset", "model"]).iterrows():
        gain = (r["compressed_accuracy"] - r["scratch_accuracy"]) * 100
        se = math.hypot(_se(r["compressed_accuracy"], r.get("eval_images")),
                        _se(r["scratch_accuracy"], r.get("eval_images")))
        lines.append(f"| {r['dataset']} | {r['model']} | {r['setting']} | {r['baseline_accuracy']:.3f} | "
                     f"{r['compressed_accuracy']:.3f} | {r['scratch_accuracy']:.3f} | {gain:+.1f} | {_x(se)} |")
    return lines + [""]


def _se(accuracy: float, images) -> float:
    """Standard error of an accuracy on `images` test images, in points (nan when unknown)."""
    if not images or images != images:
        return float("nan")
    return 100 * math.sqrt(accuracy * (1 - accuracy) / images)


def _noise_lines(frame) -> list[str]:
    # a 1,000-image evaluation cannot separate runs a point apart; say so next to the numbers
    if "eval_images" not in frame:
        return []
    out = []
    for ds, g in frame.groupby("dataset"):
        n, acc = int(g["eval_images"].min()), g["baseline_accuracy"].median()
        out.append(f"- {ds}: {n:,} test images per run; one standard error of an accuracy near the teachers' "
                   f"{acc:.0%} is {_se(acc, n):.1f} "
                   f"points, so differences under about twice that can be noise (`--eval-size 0` scores "
                   f"the whole test split).")
    return out + [""]


def _x(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}"
