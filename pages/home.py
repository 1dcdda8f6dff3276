import re

import streamlit as st

from core import hardware, views
from core.models import MODELS
from core.techniques import get_technique, technique_names
from pages import _nav, _resources

st.title("Model Compression Lab")
st.markdown("Make an image classifier **smaller and faster** and see what it costs in accuracy: "
            "train (or load) a big *teacher*, then prune it, quantize it or distill it into a small student, "
            "and compare every run on the same test images.")

data = _resources.try_data()
ss = st.session_state
c1, c2, c3 = st.columns(3)
with c1:
    if data is not None:
        st.metric("Dataset", data.title, border=True,
                  help=f"{len(data.train_y):,} training / {len(data.test_y):,} test images, "
                       f"{data.num_classes} classes ({', '.join(data.classes)}). {data.source}")
        if data.generated:
            st.caption("Generated data: made on this machine in seconds, no download needed.")
    else:
        st.metric("Dataset", "unavailable", border=True)
with c2:
    cached = data is not None and _resources.teacher_entry(data, ss.teacher_model) is not None
    st.metric("Teacher", MODELS[ss.teacher_model].title, "cached" if cached else "not trained yet",
              delta_color="green" if cached else "orange", delta_arrow="off", border=True)
    if not cached:
        st.page_link("pages/teacher.py", label="Train it on the Teacher page", icon=":material/school:")
with c3:
    st.metric("Training device", ss.device.upper(), border=True, help="Latency is timed on the deployment target chosen in the sidebar.")
    st.caption(f"Latency CPU: {hardware.cpu_line()}")

names = technique_names()
st.subheader("Ways to compress")
for col, name in zip(st.columns(len(names)), names):
    spec = get_technique(name)
    with col:
        st.markdown(f"#### {spec.title}")
        sentences = re.split(r"(?<=[.!?])\s+", spec.summary.strip())
        st.write(" ".join(sentences[:2]))
        chart = views.diagram(name)
        if chart is not None:
            st.altair_chart(chart, width="stretch")
        st.page_link(_nav.technique_page(name), label=f"Open {spec.title.lower()}", icon=":material/arrow_forward:")

st.subheader("How to use it in class")
st.markdown(
    "1. **Teacher** — train the selected teacher (a few epochs on Shapes take minutes on a CPU) or reuse the cached one.\n"
    "2. **Pruning / Quantization / Distillation** — move a slider: without training a result appears in "
    "seconds, and settings you ran before come back instantly.\n"
    "3. **Predictions** and **Try an image** — see where the compressed model and the teacher disagree.\n"
    "4. **Compare** — every run as a table and as accuracy-vs-size and accuracy-vs-latency charts with the "
    "Pareto front.")
