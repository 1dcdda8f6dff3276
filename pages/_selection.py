"""What the user picked in the sidebar (dataset, teacher, device, evaluation size), kept in
st.session_state so every page sees the same selection. The sidebar itself is pages/_sidebar.py.
"""
from __future__ import annotations

import os

import streamlit as st

import core
from core.settings import default_device
from core.targets import DEFAULT_TARGET
from pages._roles import can

EVAL_CHOICES = [200, 500, 1000, 2000, 0]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init_state() -> None:
    """Defaults for the sidebar selection (shared by all pages through st.session_state)."""
    ss = st.session_state
    ss.setdefault("dataset", core.DEFAULT_DATASET)
    ss.setdefault("teacher_model", core.DEFAULT_TEACHER)
    ss.setdefault("device", default_device())
    ss.setdefault("eval_size", _env_int("COMPRESSION_LAB_APP_EVAL", 1000))
    ss.setdefault("folder_path", "")
    ss.setdefault("target", DEFAULT_TARGET)


def eval_label(n: int) -> str:
    return "full test set" if n == 0 else f"{n:,} test images"


def dataset_name() -> str:
    init_state()
    name = st.session_state.dataset
    if name == "folder" and not can("data_folder"):   # checked here too: this is where the folder is read
        return core.DEFAULT_DATASET
    if name == "folder":
        path = (st.session_state.get("folder_path") or "").strip()
        return f"folder:{path}" if path else "folder:"
    return name
