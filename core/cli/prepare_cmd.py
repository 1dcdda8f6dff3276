"""`prepare`: train (or reuse) every selected teacher, optionally within a time budget, resumably."""
from __future__ import annotations

import sys

from ..estimate import human_duration
from ..models import STUDY_TEACHERS
from ..prepare import MAX_EPOCHS, prepare, train_on_job_layer
from ..progress import Event
from .common import add_data_args, float_range, int_range, print_json


def register(sub):
    p = sub.add_parser("prepare", help="train or reuse all study teachers (resumable, optional time budget)")
    add_data_args(p)
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"teachers to prepare (default: {' '.join(STUDY_TEACHERS)})")
    p.add_argument("--epochs", type=int_range(1, 500), default=None,
                   help=f"epochs per model (default 8, more on small sets: at least 2,800 steps; 5 on generated data); with --budget-minutes the most any model gets "
                        f"(default {MAX_EPOCHS})")
    p.add_argument("--budget-minutes", type=float_range(0, 100_000, lo_open=True), default=None,
                   help="fit all training into about this many minutes (epochs per model from a timing)")
    p.add_argument("--threads", type=int_range(1, 1024), default=None,
                   help="CPU threads (default: physical cores; env COMPRESSION_LAB_THREADS)")
    p.add_argument("--pretrained", action="store_true",
                   help="start every teacher from ImageNet weights, as the seed study did (downloaded once into "
                        "torch's hub cache; offline they must be there already, or it stops before training)")
    p.set_defaults(handler=run)


class OverallBar:
    """One tqdm bar over all models' batches (stderr) with the prepare ETA; epoch rows and messages
    are written above it."""

    def __init__(self, stream=None, disable: bool = False):
        self.stream = stream or sys.stderr
        self.disable = disable
        self.bar = None

    def write(self, text: str) -> None:
        if self.disable:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)

    def __call__(self, ev: Event) -> None:
        from tqdm import tqdm
        if ev.stage == "prepare":
            if ev.kind == "start" and ev.total:
                self.bar = tqdm(total=ev.total, desc="prepare: ", unit="batch", file=self.stream,
                                disable=self.disable, dynamic_ncols=True,
                                bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} batches "
                                           "[{elapsed} elapsed{postfix}]")
                self._eta(ev)
            elif ev.kind == "batch" and self.bar is not None:
                self.bar.set_description(f"prepare {ev.message}", refresh=False)
                self._eta(ev)
                self.bar.update(ev.step - self.bar.n)
            elif ev.kind == "message":
                self.write(f"[prepare] {ev.message}")
            elif ev.kind == "done" and self.bar is not None:
                self.bar.close()
                self.bar = None
        elif ev.kind == "epoch" and ev.metrics:
            m = ev.metrics
            self.write(f"[{ev.stage}] epoch {m.get('epoch')}/{ev.epochs}: val_accuracy={m.get('val_accuracy', 0):.4f} "
                       f"train_loss={m.get('train_loss', 0):.3f} {m.get('seconds', 0):.0f} s "
                       f"({m.get('images_per_second', 0):.0f} images/s)")
        elif ev.kind == "message":
            self.write(f"[{ev.stage}] {ev.message}")

    def _eta(self, ev: Event) -> None:
        eta = ev.metrics.get("eta_seconds")
        self.bar.set_postfix_str(f"ETA {human_duration(eta)}" if eta is not None else "ETA unknown",
                                 refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    bar = OverallBar(disable=args.quiet)
    try:
        out = prepare(args.dataset, args.models, epochs=args.epochs, budget_minutes=args.budget_minutes,
                      device=args.device, progress=bar, data_root=args.data_root, threads=args.threads,
                      train=train_on_job_layer(args.ray_address, args.data_root), pretrained=args.pretrained)
    finally:
        bar.close()
    if args.json:
        print_json(out)
        return 0
    print(f"teachers on {out['dataset_label']} ({out['threads']} threads, {out['device']}"
          f"{', from ImageNet weights' if out['pretrained'] else ''}):")
    for t in out["teachers"]:
        acc = f"{t['accuracy']:.4f}" if t["accuracy"] is not None else "n/a"
        spe = f"{t['seconds_per_epoch']:.0f} s/epoch" if t["seconds_per_epoch"] else ""
        print(f"  {t['model']:<20} {t['epochs']:>3} epochs  accuracy {acc}  {spe}  "
              f"{'from cache' if t['cached'] else 'trained now'}")
    print(f"  total {human_duration(out['seconds'])}")
    return 0
