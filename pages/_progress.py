"""A job's progress as a page draws it while it waits (pages._jobs.follow)."""
from __future__ import annotations

import time

import streamlit as st

from core import views


class LiveProgress:
    """A core progress callback drawing a progress bar, a status log and growing accuracy charts."""

    def __init__(self, title: str, reference: float | None = None, reference_label: str = "teacher",
                 chart: bool = True):
        self.status = st.status(title, expanded=True)
        with self.status:
            self.bar = st.progress(0.0, text="starting…")
            self.chart_slot = st.empty() if chart else None
            self.log = st.empty()
        self.reference, self.reference_label = reference, reference_label
        self.series: dict[str, list[dict]] = {}
        self.messages: list[str] = []
        self._last = 0.0
        self.fraction, self.text = 0.0, ""

    def draw_bar(self, fraction: float, text: str) -> None:
        self.fraction, self.text = fraction, text
        self.bar.progress(fraction, text=text)

    def __call__(self, ev) -> None:
        now = time.monotonic()
        if ev.kind == "batch":
            if now - self._last < 0.2 and ev.step < ev.total:
                return
            self._last = now
            ep = f" epoch {ev.epoch}/{ev.epochs} ·" if ev.epochs else ""
            self.draw_bar(min(1.0, ev.fraction), f"{views.SERIES_TITLES.get(ev.stage, ev.stage)}:"
                          f"{ep} batch {ev.step}/{ev.total}")
        elif ev.kind == "start":
            ep = f" epoch {ev.epoch}/{ev.epochs}" if ev.epochs else ""
            self.draw_bar(0.0, f"{views.SERIES_TITLES.get(ev.stage, ev.stage)}:{ep}")
        elif ev.kind == "epoch" and ev.metrics:
            self.series.setdefault(ev.stage, []).append(ev.metrics)
            self.redraw()
            m = ev.metrics
            self.note(f"{views.SERIES_TITLES.get(ev.stage, ev.stage)} epoch {ev.epoch}/{ev.epochs}: "
                      f"train {m.get('train_accuracy', float('nan')):.1%}, "
                      f"validation {m.get('val_accuracy', float('nan')):.1%}")
        elif ev.kind == "message" and ev.message:
            self.note(ev.message)
            self.status.update(label=ev.message[:1].upper() + ev.message[1:] + "…")

    def note(self, text: str) -> None:
        self.messages.append(text)
        self.log.caption("  \n".join(self.messages[-6:]))

    def redraw(self) -> None:
        if self.chart_slot is None or not self.series:
            return
        frame = views.history_frame(self.series)
        self.chart_slot.altair_chart(views.history_chart(frame, self.reference, self.reference_label),
                                     width="stretch")

    def done(self, label: str, ok: bool = True) -> None:
        self.bar.progress(1.0, text="done" if ok else "stopped")
        self.status.update(label=label, state="complete" if ok else "error", expanded=False)
