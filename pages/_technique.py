"""One page layout for every compression technique, driven by its registry entry (ParamSpecs)."""
from __future__ import annotations

import dataclasses
import math

import streamlit as st

from core import hardware, views
from core.errors import LabError
from core.models import MODELS
from core.predict import cached_result
from core.results import results_frame
from core.results import ExperimentResult
from core.runner import ExperimentConfig, lane
from core.techniques import get_technique
from pages import _jobs, _resources, _selection, _widgets


def teacher_reference(teacher) -> float | None:
    hist = teacher.meta.get("history") or []
    return hist[-1].get("val_accuracy") if hist else None


def header(name: str):
    """A technique page's title and summary; (spec, data, teacher), or the page stops where either is missing."""
    spec = get_technique(name)
    st.title(spec.title)
    st.caption(spec.summary)
    data = _resources.require_data()
    return spec, data, _resources.require_teacher(data)


def render(name: str) -> None:
    spec, data, teacher = header(name)
    ss = st.session_state

    left, right = st.columns([1, 2], gap="large")
    with left:
        st.subheader("Settings")
        params = _widgets.param_widgets(spec.params, name)
        full = st.checkbox("Evaluate on the full test set (slower)", key=f"{name}.full",
                           help=f"Otherwise the fixed subset chosen in the sidebar ({_selection.eval_label(ss.eval_size)}).")
    cfg = ExperimentConfig(dataset=_selection.dataset_name(), model=ss.teacher_model, technique=name, params=params,
                           eval_size=0 if full else int(ss.eval_size), device=ss.device,
                           target=ss.get("target") or "edge-cpu")
    slow = spec.trains(params)
    with left:
        auto = st.toggle("Run when a setting changes", key=f"{name}.auto", value=True, disabled=slow,
                         help="Settings that train (epochs > 0) always wait for the Run button.")
        clicked = st.button("Run", type="primary", key=f"{name}.run", icon=":material/play_arrow:")
        if slow:
            st.caption("These settings train a network: the run takes a while. Changing a setting while it "
                       "runs stops it.")

    with right:
        try:
            result = cached_result(cfg, teacher, data, _resources.store())
        except LabError as exc:
            st.error(str(exc), icon=":material/warning:")
            return
        if result is None:
            result = _run(spec, cfg, teacher, data, start=clicked or (auto and not slow))
        if result is None:
            last = ss.get(f"{name}.last")
            if last is not None:
                st.info("These settings have not been run yet — press **Run**. Below: your previous run "
                        f"({last.label()}).", icon=":material/info:")
                result = last
            else:
                st.info("Choose settings and press **Run**.", icon=":material/info:")
        if result is not None:
            ss[f"{name}.last"] = result
            ss["last_result_key"] = result.key
            show_result(result, spec, teacher)
    if result is not None or _resources.store().count():
        sweep(spec, data, name)


def _run(spec, cfg, teacher, data, start: bool):
    """This request's job, on the job layer: joined if any session already started it (a rerun, a
    classmate), started if asked; its result once done, else None."""
    payload = dataclasses.asdict(cfg.validate())
    job = _jobs.lab().find("compress", payload)
    if job is None and not start:
        return None
    if job is None:
        job = _jobs.submit("compress", payload, label=f"{spec.title} {cfg.params} · {MODELS[cfg.model].title}",
                        lane=lane(cfg))
        if job is None:
            return None
    out = _jobs.follow(job, f"Running {spec.title.lower()}…", reference=teacher_reference(teacher))
    return None if out is None else ExperimentResult.from_dict(out)


def show_result(result, spec, teacher) -> None:
    st.subheader("Before → after")
    how = "stored result (instant)" if result.cached else f"computed in {result.seconds:.1f} s"
    st.caption(f"{result.label()} · {MODELS[result.model].title} on {result.dataset_label} · "
               f"{result.eval_images:,} test images · latency runtime {result.runtime} · {how}."
               + views.batch_plan_words((result.compressed.get("extra") or {}).get("batch_plan_b64")))
    _widgets.metric_row(result.baseline, result.compressed)
    for note in result.notes or []:
        st.warning(note, icon=":material/sticky_note_2:")
    elsewhere = views.timed_elsewhere_line(result.cpu, hardware.cpu_id())
    if elsewhere:
        st.warning(elsewhere, icon=":material/computer:")
    deployed = views.deployed_latency_line(result.baseline, result.compressed)
    if deployed:
        st.info(deployed, icon=":material/rocket_launch:")
    if result.scratch:
        acc = result.scratch.get("accuracy")
        diff = result.compressed.get("accuracy", math.nan) - (acc if acc is not None else math.nan)
        st.metric("Same student trained from scratch (no teacher)", views.fmt_pct(acc),
                  f"distillation {100 * diff:+.1f} pts" if not math.isnan(diff) else None,
                  delta_color="green" if diff > 0 else "red" if diff < 0 else "gray",
                  delta_arrow="off", border=True)
    series = {}
    if result.history:
        series[spec.history_series] = result.history
    if result.scratch_history:
        series["scratch"] = result.scratch_history
    if series:
        st.altair_chart(views.history_chart(views.history_frame(series), teacher_reference(teacher)),
                        width="stretch")
    extra = result.compressed.get("extra") or {}
    if extra:
        with st.expander("Technique details"):
            st.json(extra, expanded=False)
    if result.layers:
        with st.expander("Layers"):
            st.caption("Every conv/linear layer: parameters, MACs per image, channels kept, zero weights, weight "
                       "bits and the relative L2 error of its weights against the teacher's (empty: not measurable).")
            st.altair_chart(views.layers_chart(result.layers))
            st.dataframe(views.layers_frame(result.layers), hide_index=True, width="stretch")
    _widgets.download_model(result, key=f"dl.{spec.name}.{result.key}")


def sweep(spec, data, name: str) -> None:
    frame = results_frame(_resources.store().all(dataset=data.name, technique=name))
    if frame.empty:
        return
    frame = frame[frame["model"] == st.session_state.teacher_model]
    if frame.empty:
        return
    st.divider()
    st.subheader(f"Your {spec.title.lower()} runs so far ({len(frame)})")
    param = views.main_param(spec.params)
    c1, c2 = st.columns(2)
    with c1:
        st.caption(f"Accuracy vs {param}")
        st.altair_chart(views.sweep_chart(frame, param), width="stretch")
    with c2:
        st.caption("Accuracy vs size (Pareto front dashed; ✚ = teacher)")
        st.altair_chart(views.tradeoff_chart(frame, "compressed_size_bytes", "size (MB, log)", divide=2 ** 20,
                                             height=260), width="stretch")
