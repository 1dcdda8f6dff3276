import streamlit as st

from core import sensitivity, views
from core.models import MODELS
from pages import _errors, _jobs, _resources, _selection

ss = st.session_state
st.title("Layers")
st.caption("Which layers can be cut, and which break the model? Each conv/linear layer of the teacher is "
           "compressed **alone** at each setting and the teacher's accuracy measured again; every other layer keeps "
           "its weights. The scan runs once per teacher and setting list, then comes from the cache.")
data = _resources.require_data()
teacher = _resources.require_teacher(data)
model = ss.teacher_model

c1, c2, c3 = st.columns(3)
technique = c1.segmented_control("Technique", list(sensitivity.TECHNIQUES), default="prune", key="layers.technique",
                                 format_func={"prune": "Pruning", "quantize": "Quantization"}.get) or "prune"
methods = sensitivity.METHODS[technique]
method = c2.segmented_control("Method", list(methods), default=methods[0], key=f"layers.method.{technique}",
                              format_func=lambda m: m.replace("_", " ")) or methods[0]
eval_size = c3.selectbox("Evaluation images", [200, 500, 1000, 2000], index=1, key="layers.eval",
                         help="Test images each setting is measured on (the scan evaluates once per layer and "
                              "setting: 500 keeps a ResNet-34 scan near a minute on two cores).")
text = st.text_input("Settings (comma-separated)", key=f"layers.settings.{technique}",
                     value=",".join(sensitivity.setting_label(s) for s in sensitivity.DEFAULT_SETTINGS[technique]),
                     help="Fractions removed (pruning, 0.05-0.95) or weight bit widths (quantization, 1-16).")
try:
    technique, method, settings, eval_size, _ = sensitivity.validate(technique, method, text, int(eval_size))
except Exception as exc:  # noqa: BLE001 - a settings list that does not parse: one readable line
    _errors.show_error(exc)
    st.stop()

payload = {"dataset": _selection.dataset_name(), "data_root": None, "model": model, "technique": technique,
           "method": method, "settings": settings, "eval_size": int(eval_size)}
result = sensitivity.cached_scan(teacher, data, technique, method, settings, int(eval_size))
if result is None:
    running = _jobs.lab().get(ss.get("layers.job", "")) or _jobs.lab().find("sensitivity", payload)
    if running is None and st.button("Run the scan", type="primary", icon=":material/layers:", key="layers.run"):
        running = _jobs.submit("sensitivity", payload, label=f"layers {technique} {MODELS[model].title}", lane="long")
    if running is not None:
        ss["layers.job"] = running.id
        result = _jobs.follow(running, f"Compressing one layer at a time ({technique}, {method})…", chart=False)
        ss.pop("layers.job", None)
    if result is None:
        st.info("Press **Run the scan** to measure every layer at every setting.", icon=":material/info:")
        st.stop()

unit = "bits" if technique == "quantize" else "of the layer removed"
st.caption(f"{len(result['layers'])} layers × {len(result['settings'])} settings on {result['eval_images']} test images; "
           f"teacher accuracy {views.fmt_pct(result['baseline_accuracy'])}; "
           f"{'from the cache' if result.get('cached') else '%.0f s' % result['seconds']}.")
left, right = st.columns([3, 2])
with left:
    with _errors.guarded("Could not draw the heat map: "):
        st.altair_chart(views.sensitivity_heatmap(result), width="content")
    if technique == "prune" and method == "structured":
        st.caption("Structured: removing a layer's output channels removes them from every layer coupled to it "
                   "(a residual stream, a concatenation), so coupled layers share one row of numbers; the "
                   "classifier's outputs are the classes and are never removed (empty row).")
with right:
    st.subheader("Most fragile layers")
    st.caption("Fragility: " + result.get("fragility", sensitivity.FRAGILITY) + ".")
    by_name = {layer["name"]: layer for layer in result["layers"]}
    rows = [{"layer": name, "points lost (mean)": round(100 * by_name[name]["fragility"], 2),
             "params": by_name[name]["params"]} for name in result["fragile"][:12]]
    st.dataframe(rows, hide_index=True)
    st.caption(f"Settings: {', '.join(sensitivity.setting_label(s) for s in result['settings'])} ({unit}).")
