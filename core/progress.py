"""Progress events shared by the CLI (tqdm) and the app (st.progress).

Long work calls `progress(Event)`; the callback may be None. Events are plain data so
the app can render them in any thread-safe way it likes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Event:
    stage: str            # e.g. "train", "finetune", "distill", "evaluate", "calibrate"
    kind: str             # "start" | "batch" | "epoch" | "done" | "message"
    step: int = 0         # batches done in this stage
    total: int = 0        # batches in this stage
    epoch: int = 0
    epochs: int = 0
    message: str = ""
    metrics: dict = field(default_factory=dict)   # per-epoch history row on "epoch"

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressFn = Optional[Callable[[Event], None]]


def emit(progress: ProgressFn, **kwargs) -> None:
    if progress is not None:
        progress(Event(**kwargs))


class TqdmProgress:
    """Renders events as tqdm bars on stderr (the CLI's progress)."""

    def __init__(self, stream=None, disable: bool = False):
        self.stream = stream or sys.stderr
        self.disable = disable
        self.bar = None

    def __call__(self, ev: Event) -> None:
        from tqdm import tqdm

        if ev.kind == "start":
            self.close()
            desc = ev.stage if not ev.epochs else f"{ev.stage} {ev.epoch}/{ev.epochs}"
            self.bar = tqdm(total=ev.total or None, desc=desc, file=self.stream,
                            disable=self.disable, leave=False, dynamic_ncols=True)
        elif ev.kind == "batch" and self.bar is not None:
            self.bar.update(ev.step - self.bar.n)
        elif ev.kind == "epoch":
            if self.bar is not None:
                self.bar.set_postfix({k: round(v, 4) for k, v in ev.metrics.items()
                                      if isinstance(v, float)})
            self.close()
            if ev.metrics and not self.disable:
                row = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in ev.metrics.items())
                print(f"[{ev.stage}] {row}", file=self.stream)
        elif ev.kind == "message" and not self.disable:
            self.close()
            print(f"[{ev.stage}] {ev.message}", file=self.stream)
        elif ev.kind == "done":
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
