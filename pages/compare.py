import streamlit as st

from core import views
from core.results import results_frame
from pages import _errors, _resources, _roles, _widgets

st.title("Compare")
st.caption("Every run stored on this machine (all sessions, the CLI too). Click a column header to sort.")

store = _resources.store()
frame = results_frame(store.all())
if frame.empty:
    st.info("No runs yet: compress something first.", icon=":material/info:")
    st.stop()

c1, c2, c3, c4 = st.columns(4)
datasets = sorted(frame["dataset"].unique())
techniques = sorted(frame["technique"].unique())
models = sorted(frame["model"].unique())
targets = sorted(frame["target"].unique())
sel_d = c1.multiselect("Datasets", datasets, default=datasets, key="cmp.datasets")
sel_t = c2.multiselect("Techniques", techniques, default=techniques, key="cmp.techniques")
sel_m = c3.multiselect("Teachers", models, default=models, key="cmp.models")
# latencies only compare within one target: the sidebar's, where it has runs
mine = st.session_state.get("target")
sel_g = c4.multiselect("Targets", targets, default=[mine] if mine in targets else targets, key="cmp.targets",
                       help="where latency was timed (the sidebar's deployment target)")
view = frame[frame["dataset"].isin(sel_d) & frame["technique"].isin(sel_t) & frame["model"].isin(sel_m)
             & frame["target"].isin(sel_g)]

mixed = views.cpu_mix_line(view)
if mixed:
    st.warning(mixed, icon=":material/computer:")
table = views.compare_table(view)
# column -> (label, number format)
COLUMNS = {
    "baseline_accuracy": ("teacher acc", "percent"), "compressed_accuracy": ("accuracy", "percent"),
    "accuracy_drop": ("drop", "percent"), "scratch_accuracy": ("scratch acc", "percent"),
    "size_ratio": ("× smaller", "%.2f"), "latency_speedup_b1": ("× faster", "%.2f"),
    "macs_ratio": ("× fewer MACs", "%.2f"), "baseline_size_bytes": ("teacher bytes", "compact"),
    "compressed_size_bytes": ("bytes", "compact"), "baseline_latency_ms_b1": ("teacher ms", "%.2f"),
    "compressed_latency_ms_b1": ("ms", "%.2f"), "seconds": ("run s", "%.1f"),
}
config = {col: st.column_config.NumberColumn(label, format=fmt) for col, (label, fmt) in COLUMNS.items()}
config["created"] = st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm")
config["node"] = st.column_config.TextColumn("ran on", help="the Ray node (address/node id) that computed the run")
st.dataframe(table, hide_index=True, key="cmp.table", column_config=config)
st.download_button("Download as CSV", table.to_csv(index=False).encode(), file_name="compression_runs.csv",
                   mime="text/csv", icon=":material/download:", key="cmp.csv", on_click="ignore")

if len(view):
    a, b = st.columns(2)
    with a:
        st.subheader("Accuracy vs size")
        st.altair_chart(views.tradeoff_chart(view, "compressed_size_bytes", "size (MB, log)", divide=2 ** 20), width="stretch")
    with b:
        st.subheader("Accuracy vs latency")
        st.altair_chart(views.tradeoff_chart(view, "compressed_latency_ms_b1", "CPU latency, batch 1 (ms, log)"),
                        width="stretch")
    st.caption("◆ = on the Pareto front of its dataset and teacher (no other run of the same teacher on the same "
               "dataset is both smaller/faster and more accurate); dashed lines: one front per dataset and "
               "teacher; ✚ = each teacher.")

    st.subheader("Best technique per dataset")
    ratio = st.slider("At least this many times smaller than the teacher", 1.0, 32.0, 2.0, 0.5, key="cmp.ratio")
    best = views.best_per_dataset(view, ratio)
    if best.empty:
        st.caption("No run is that much smaller yet.")
    else:
        st.dataframe(best, hide_index=True, column_config={
            "compressed_accuracy": st.column_config.NumberColumn("accuracy", format="percent"),
            "accuracy_drop": st.column_config.NumberColumn("drop", format="percent"),
            "size_ratio": st.column_config.NumberColumn("× smaller", format="%.2f"),
            "latency_speedup_b1": st.column_config.NumberColumn("× faster", format="%.2f")})

may_delete = _roles.can("delete_runs")
st.subheader("Download or delete runs" if may_delete else "Download a run")
labels = {r.key: f"{r.dataset} · {r.model} · {r.label()}" for r in store.all()}
keys = [k for k in view["key"]]
with _errors.guarded():
    pick = st.selectbox("Run", keys, format_func=lambda k: labels.get(k, k), key="cmp.pick")
    if pick:
        r = store.get(pick)
        if r is not None:
            _widgets.download_model(r, key=f"cmp.dl.{pick}")
    if not may_delete:
        st.caption("Class mode: only the instructor deletes runs.")
        st.stop()
    d1, d2 = st.columns(2)
    doomed = d1.multiselect("Runs to delete", keys, format_func=lambda k: labels.get(k, k), key="cmp.doomed")
    if d1.button("Delete selected", disabled=not doomed, key="cmp.delete", icon=":material/delete:") \
            and _roles.require_instructor("delete_runs"):   # checked where it deletes, not only by hiding the button
        for k in doomed:
            store.delete(k)
        st.session_state.pop("cmp.doomed", None)
        st.rerun()
    sure = d2.checkbox("Yes, delete every run", key="cmp.sure")
    if d2.button("Clear all runs", disabled=not sure, key="cmp.clear", icon=":material/delete_sweep:") \
            and _roles.require_instructor("delete_runs"):
        store.clear()
        st.session_state.pop("cmp.sure", None)
        st.rerun()
