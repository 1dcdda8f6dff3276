"""Class: the instructor's view of the job layer — who waits for what, cancel, the engine's nodes."""
import pandas as pd
import streamlit as st

from core import jobs
from pages import _errors, _jobs, _roles

st.title("Class")
_roles.require_instructor("cancel_others_jobs", stop=True)
lab = _jobs.lab()
status = lab.status()
eng = status["engine"]
where = "this machine (embedded Ray)" if eng["local"] else f"the Ray cluster at {eng['address']}"
st.caption(f"Heavy work runs in Ray workers on {where}: {status['workers']['interactive']} interactive workers "
           f"(slider results; one CPU each), {status['workers']['long']} for long jobs (training, fine-tuning, "
           "distillation; they run at low priority so sliders stay fast).")

c = st.columns(4)
c[0].metric("Interactive busy", f"{status['busy']['interactive']}/{status['workers']['interactive']}", border=True)
c[1].metric("Interactive queued", status["queued"]["interactive"], border=True)
c[2].metric("Long busy", f"{status['busy']['long']}/{status['workers']['long']}", border=True)
c[3].metric("Long queued", status["queued"]["long"], border=True)

st.subheader("Nodes")
st.dataframe(pd.DataFrame(status["nodes"]), hide_index=True, width="stretch")

st.subheader("Jobs")
runs = lab.jobs()[::-1]
if not runs:
    st.info("No jobs yet: they appear here as students move sliders.", icon=":material/info:")
else:
    st.dataframe(pd.DataFrame([j.row() for j in runs]), hide_index=True, width="stretch")
    active = [j for j in runs if j.active]
    if active:
        pick = st.selectbox("Cancel a job", [j.id for j in active], key="class.cancel_pick",
                            format_func=lambda i: f"{lab.get(i).label} · {lab.get(i).state} · {lab.get(i).owners}")
        if st.button("Cancel it", key="class.cancel", icon=":material/cancel:") \
                and _roles.require_instructor("cancel_others_jobs"):
            lab.cancel(pick, instructor=True)
            st.rerun()
st.button("Refresh", icon=":material/refresh:", key="class.refresh")

st.subheader("Cluster")
st.caption("Attach this server to a Ray cluster to add CPUs or GPUs (docs/cluster.md). Running jobs are stopped; "
           "finished epochs are kept for resuming.")
addr = st.text_input("Ray cluster address (host:port)", key="class.address",
                     placeholder=eng["address"] if not eng["local"] else "e.g. 127.0.0.1:6379")
if st.button("Attach", key="class.attach", icon=":material/hub:", disabled=not addr.strip()) \
        and _roles.require_instructor("attach_cluster"):
    with _errors.guarded("Not connected: "):
        jobs.reattach(addr.strip())
        st.success(f"Attached to {addr.strip()}.", icon=":material/hub:")
