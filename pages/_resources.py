"""What the server keeps loaded once per process: datasets, teachers, compressed models (st.cache_resource)
and the results store; each page asks for them through these functions.
"""
from __future__ import annotations

import streamlit as st

import core
from core.errors import LabError
from core.models import MODELS
from core.results import ResultStore
from pages._selection import dataset_name


@st.cache_resource(show_spinner="Loading the dataset…", max_entries=4)
def _load_data(name: str):
    return core.load_dataset(name)


def try_data():
    """The selected dataset, or None after showing why it is unavailable (e.g. offline CIFAR-10)."""
    try:
        return _load_data(dataset_name())
    except LabError as exc:
        st.error(f"**Dataset unavailable.** {exc}", icon=":material/cloud_off:")
        return None


def require_data():
    data = try_data()
    if data is None:
        st.info("Pick another dataset in the sidebar (Shapes works offline).")
        st.stop()
    return data


def teacher_entry(data, model: str):
    from core.predict import latest_teacher_entry
    return latest_teacher_entry(data, model)


@st.cache_resource(show_spinner="Loading the teacher…", max_entries=6)
def _load_teacher(path: str, sha: str):
    from pathlib import Path

    from core.teachers import load_teacher_file
    t = load_teacher_file(Path(path))
    if t is None:
        raise LabError(f"the cached teacher {path} is damaged; train it again on the Teacher page")
    return t


def current_teacher(data, model: str | None = None):
    """The teacher the runner will use (newest cached for dataset+model), loaded once per process."""
    model = model or st.session_state.teacher_model
    entry = teacher_entry(data, model)
    if entry is None:
        return None
    return _load_teacher(str(entry[0]), entry[1].get("sha256", ""))


def require_teacher(data):
    t = current_teacher(data)
    if t is None:
        st.info(f"There is no cached **{MODELS[st.session_state.teacher_model].title}** teacher for "
                f"**{data.label}** yet. Train it first (a few epochs are enough on Shapes).", icon=":material/school:")
        st.page_link("pages/teacher.py", label="Go to the Teacher page", icon=":material/school:")
        st.stop()
    return t


@st.cache_resource(show_spinner="Loading the compressed model…", max_entries=8)
def compressed_model(key: str, _result):
    from core.runner import load_compressed
    return load_compressed(_result)


def store() -> ResultStore:
    """The results store: one per process (ResultStore.default), not one per call or rerun."""
    return ResultStore.default()
