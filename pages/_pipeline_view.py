"""The Pipeline page: steps added one at a time, run as one job, and a waterfall of every step."""
from __future__ import annotations

import streamlit as st

from core import views
from core.errors import LabError
from core.predict import cached_result
from core.runner import ExperimentConfig
from core.techniques import get_technique, technique_names
from core.techniques.pipeline import SEPARATOR, step_text
from pages import _resources, _selection, _technique, _widgets

STEPS = "pipeline.steps"


def _step_builder(steps: list[str]) -> None:
    st.subheader("Steps")
    if not steps:
        st.caption("No steps yet: add the first one below.")
    for i, text in enumerate(list(steps)):
        c1, c2 = st.columns([6, 1])
        c1.code(f"{i + 1}. {text}", language=None)
        if c2.button("", key=f"pipeline.remove.{i}", icon=":material/close:", help="remove this step"):
            steps.pop(i)
            st.rerun()
    choices = [n for n in technique_names() if get_technique(n).pipeline_stage is not None]
    with st.expander("Add a step", expanded=not steps):
        kind = st.selectbox("Technique", choices, key="pipeline.add.kind", format_func=lambda n: get_technique(n).title)
        spec = get_technique(kind)
        params = _widgets.param_widgets(spec.params, f"pipeline.add.{kind}")
        if st.button("Add this step", key="pipeline.add", icon=":material/add:"):
            try:
                steps.append(step_text(kind, spec.validate(params)))
            except LabError as exc:
                st.error(str(exc), icon=":material/warning:")
            else:
                st.rerun()


def render(name: str) -> None:
    spec, data, teacher = _technique.header(name)
    ss = st.session_state
    steps = ss.setdefault(STEPS, ["prune:ratio=0.5", "quantize:bits=4"])

    left, right = st.columns([1, 2], gap="large")
    with left:
        _step_builder(steps)
        clicked = st.button("Run", type="primary", key="pipeline.run", icon=":material/play_arrow:",
                            disabled=not steps)
        st.caption("Each step starts from the previous step's model and is stored on its own: change the last "
                   "step and the earlier ones come back from the cache.")
    with right:
        if not steps:
            st.info("Add a step to start.", icon=":material/info:")
            return
        try:
            cfg = ExperimentConfig(dataset=_selection.dataset_name(), model=ss.teacher_model, technique=name,
                                   params={"steps": f"{SEPARATOR} ".join(steps)}, eval_size=int(ss.eval_size),
                                   device=ss.device, target=ss.get("target") or "edge-cpu").validate()
            result = cached_result(cfg, teacher, data, _resources.store())
        except LabError as exc:
            st.error(str(exc), icon=":material/warning:")
            return
        if result is None:
            result = _technique._run(spec, cfg, teacher, data, start=clicked)
        if result is None:
            st.info("Press **Run** to run these steps.", icon=":material/info:")
            return
        show_result(result)


def show_result(result) -> None:
    extra = result.compressed.get("extra") or {}
    rows = extra.get("steps") or []
    st.subheader("After each step")
    st.altair_chart(views.pipeline_chart(result.baseline, rows))
    cached = sum(bool(r.get("cached")) for r in rows)
    st.caption(f"{len(rows)} steps, {cached} served from the cache · {result.eval_images:,} test images · "
               f"file {extra.get('file_bytes', 0):,} bytes: the model is measured as loaded back from it.")
    st.subheader("Before → after")
    _widgets.metric_row(result.baseline, result.compressed)
    for note in result.notes or []:
        st.warning(note, icon=":material/sticky_note_2:")
    path = extra.get("file_path")
    try:
        blob = open(path, "rb").read() if path else None
    except OSError:
        blob = None
    if blob is not None:
        st.download_button("Download the compressed file", blob, file_name=f"{result.model}-pipeline.lab",
                           mime="application/octet-stream", key=f"pipeline.dl.{result.key}",
                           icon=":material/download:",
                           help="load it with `python -m core evaluate --file` (no pickle inside)")
