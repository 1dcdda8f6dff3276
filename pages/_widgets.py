"""Widgets and cards the pages share: parameter widgets from a technique's ParamSpecs, metric cards,
the model download, picking a stored run (or the hint to make one).
"""
from __future__ import annotations

import functools

import streamlit as st

from core import views
from core.models import MODELS
from pages._resources import store


def log_grid(low: float, high: float, default: float) -> list[float]:
    """1-2-5 steps per decade within [low, high], plus the default: a usable slider for learning rates."""
    import math
    values = {float(default)}
    for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for m in (1, 2, 5):
            v = float(f"{m}e{e}")
            if low <= v <= high:
                values.add(v)
    return sorted(values)


def param_widgets(params, prefix: str, container=None) -> dict:
    """One widget per ParamSpec: numbers become sliders (a 1-2-5 log scale for ranges over three
    decades, a number box for huge integer ranges), choices radios or select boxes, booleans checkboxes."""
    c = container or st
    values = {}
    for p in params:
        key = f"{prefix}.{p.name}"
        label = p.name.replace("_", " ")
        if p.kind == "float" and p.low > 0 and p.high / p.low >= 1000:
            st.session_state.setdefault(key, float(p.default))
            values[p.name] = c.select_slider(label, log_grid(p.low, p.high, p.default), key=key, help=p.help,
                                             format_func=lambda v: f"{v:g}")
        elif p.kind in ("int", "float"):
            is_int = p.kind == "int"
            low, high = (int(p.low), int(p.high)) if is_int else (float(p.low), float(p.high))
            step = p.step if p.step is not None else (1 if is_int else (high - low) / 100)
            step = int(step) if is_int else float(step)
            default = int(p.default) if is_int else float(p.default)
            st.session_state.setdefault(key, default)
            if (high - low) / max(step, 1e-12) <= 400:
                values[p.name] = c.slider(label, low, high, step=step, key=key, help=p.help)
            else:
                values[p.name] = c.number_input(label, low, high, step=step, key=key, help=p.help)
        elif p.kind == "choice":
            st.session_state.setdefault(key, p.default)
            opts = list(p.choices)
            if len(opts) <= 4 and all(len(str(o)) <= 14 for o in opts):
                values[p.name] = c.radio(label, opts, key=key, help=p.help, horizontal=True)
            else:
                values[p.name] = c.selectbox(label, opts, key=key, help=p.help)
        elif p.kind == "bool":
            st.session_state.setdefault(key, bool(p.default))
            values[p.name] = c.checkbox(label, key=key, help=p.help)
        else:
            st.session_state.setdefault(key, str(p.default))
            values[p.name] = c.text_input(label, key=key, help=p.help)
    return values


def metric_row(baseline: dict, compressed: dict, per_row: int = 3) -> None:
    cards = views.metric_cards(baseline, compressed)
    cols = []
    for start in range(0, len(cards), per_row):
        cols += st.columns(per_row)
    for col, card in zip(cols, cards):
        col.metric(card["label"], card["value"], card["delta"], delta_color=card["delta_color"],
                   delta_arrow=card["delta_arrow"], help=f"teacher: {card['before']}", border=True)


def teacher_metric_row(m: dict) -> None:
    cols = st.columns(5)
    cols[0].metric("Accuracy", views.fmt_pct(m.get("accuracy")), border=True,
                   help=f"on {m.get('eval_images', '?')} test images")
    cols[1].metric("Size", views.fmt_bytes(m.get("size_bytes")), border=True)
    cols[2].metric("Parameters", views.fmt_count(m.get("params")), border=True)
    cols[3].metric("MACs", views.fmt_count(m.get("macs")), border=True, help="multiply-accumulates per image")
    cols[4].metric("Latency (batch 1, CPU)", views.fmt_ms(m.get("latency_ms_b1")), border=True,
                   help=f"one image at a time on {m.get('threads_b1', m.get('threads', '?'))} CPU thread(s), "
                        f"target {m.get('target', 'edge-cpu')}")


def download_model(result, key: str) -> None:
    """The compressed model file exactly as core saved it (a state dict; load with weights_only=True).

    The bytes are read only when the button is clicked (models are tens of MB)."""
    from pathlib import Path
    path = Path(result.model_path)
    if not path.exists():
        st.caption("The compressed model file is no longer in the cache.")
        return
    name = f"{result.dataset.replace(':', '_').replace('/', '_')}-{result.model}-{result.technique}-{result.key[:8]}.pt"
    st.download_button(f"Download the compressed model ({views.fmt_bytes(path.stat().st_size)})",
                       data=functools.partial(path.read_bytes), file_name=name, mime="application/octet-stream", key=key,
                       icon=":material/download:", on_click="ignore")
    st.download_button("Download for deployment (ONNX, torch.export, state dict and model card; zip)",
                       data=functools.partial(_export_zip, result.key), file_name=name[:-3] + "-export.zip",
                       mime="application/zip", key=f"{key}.export", icon=":material/deployed_code:",
                       on_click="ignore", help="files that run without the lab, the normalization inside; "
                                               "see docs/export.md")
    if result.technique == "quantize" and (result.params or {}).get("mode") == "int8":
        from core.predict import stored_onnx
        st.download_button("Download as ONNX (int8, runs in ONNX Runtime)",
                           data=functools.partial(lambda r: stored_onnx(r) or b"", result),
                           file_name=name[:-3] + ".onnx", mime="application/octet-stream", key=f"{key}.onnx",
                           icon=":material/download:", on_click="ignore")


def _export_zip(run_key: str) -> bytes:
    """Made in a worker when the button is clicked (an export takes seconds: not in the server process)."""
    from pages._jobs import lab, owner
    job = lab().submit("export", {"run": run_key}, owner=owner(), label=f"export {run_key[:8]}")
    return job.follow(timeout=300)["zip"]


def pick_result(data, key: str, label: str = "Compressed model"):
    """Choose one stored run for this dataset and teacher (default: this session's latest run)."""
    runs = [r for r in store().all(dataset=data.name) if r.model == st.session_state.teacher_model]
    if not runs:
        return None
    runs = runs[::-1]
    last = st.session_state.get("last_result_key")
    keys = [r.key for r in runs]
    by_key = {r.key: r for r in runs}
    if st.session_state.get(key) not in by_key:
        st.session_state[key] = last if last in by_key else keys[0]
    chosen = st.selectbox(label, keys, key=key, format_func=lambda k: (
        f"{by_key[k].label()} · accuracy {views.fmt_pct(by_key[k].compressed.get('accuracy'))} · "
        f"{views.fmt_bytes(by_key[k].compressed.get('size_bytes'))}"))
    return by_key[chosen]


def no_runs_hint(data) -> None:
    st.info(f"No compressed model for {MODELS[st.session_state.teacher_model].title} on {data.label} yet: "
            "run one first.", icon=":material/info:")
    from pages import _nav
    _nav.technique_links()
