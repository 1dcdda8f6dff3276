"""The sidebar every page shares: the selection's widgets, whether a teacher is cached, the class-mode login."""
from __future__ import annotations

import streamlit as st

import core
from core.datasets import DATASETS
from core.models import MODELS, TEACHERS
from core.settings import available_devices
from core.targets import DEFAULT_TARGET, TARGETS, available_targets
from pages._resources import teacher_entry, try_data
from pages._roles import can, login_box
from pages._selection import EVAL_CHOICES, eval_label, init_state


def sidebar() -> None:
    init_state()
    with st.sidebar:
        names = list(DATASETS) + (["folder"] if can("data_folder") else [])
        if st.session_state.dataset not in names:   # e.g. the instructor logged out while on a folder
            st.session_state.dataset = core.DEFAULT_DATASET
        st.selectbox("Dataset", names, key="dataset",
                     format_func=lambda n: "Image folder…" if n == "folder" else
                     f"{DATASETS[n].title}" + (" (generated, offline)" if not DATASETS[n].needs_download else ""),
                     help="Shapes is generated on the spot (no download); CIFAR-10 and SVHN need their files.")
        if st.session_state.dataset == "folder":
            st.text_input("Folder with train/<class>/ images", key="folder_path",
                          placeholder="/path/to/images")
        st.selectbox("Teacher", TEACHERS, key="teacher_model", format_func=lambda n: MODELS[n].title)
        devices = available_devices()
        if st.session_state.device not in devices:
            st.session_state.device = devices[0]
        st.selectbox("Training device", devices, key="device")
        targets = available_targets()   # a GPU target only where its hardware is present
        if st.session_state.target not in targets:
            st.session_state.target = DEFAULT_TARGET
        st.selectbox("Deployment target", targets, key="target", format_func=lambda n: TARGETS[n].title,
                     help="Where latency is timed: " + "; ".join(f"{t.title}: {t.description}" for n, t in TARGETS.items()
                                                                 if n in targets) + ".")
        st.selectbox("Evaluate on", EVAL_CHOICES, key="eval_size", format_func=eval_label,
                     help="Every comparison uses the same fixed, class-balanced subset of the test set.")
        data = try_data()
        if data is not None:
            entry = teacher_entry(data, st.session_state.teacher_model)
            if entry is None:
                st.warning(f"No cached {MODELS[st.session_state.teacher_model].title} teacher for "
                           f"{data.label} yet — train one on the Teacher page.", icon=":material/school:")
            else:
                hist = entry[1].get("history") or [{}]
                acc = hist[-1].get("val_accuracy")
                st.success(f"Teacher cached ({len(hist)} epochs"
                           + (f", validation {acc:.1%}" if acc is not None else "") + ")", icon=":material/check_circle:")
        login_box()
