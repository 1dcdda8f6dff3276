import streamlit as st

from core import views
from core.predict import grid_indices, prediction_frame
from pages import _errors, _resources, _widgets

st.title("Predictions")
st.caption("Test images with their true label, the teacher's prediction and the compressed model's. "
           "Red border: the compressed model is wrong. Orange: it is right but disagrees with the teacher.")
data = _resources.require_data()
teacher = _resources.require_teacher(data)
result = _widgets.pick_result(data, "pred.result")
if result is None:
    _widgets.no_runs_hint(data)
    st.stop()

c1, c2, c3 = st.columns([2, 2, 1])
n = c1.select_slider("Images", [24, 48, 96, 192, 480], value=48, key="pred.n")
seed = c2.number_input("Sample", 0, 999, 0, key="pred.seed", help="Another class-balanced sample of the test set.")
only = c3.toggle("Only disagreements", key="pred.only")


@st.cache_data(max_entries=32, show_spinner="Predicting…")
def _frame(result_key: str, teacher_sha: str, n: int, seed: int, _teacher, _compressed, _data):
    idx = grid_indices(_data, n, seed)
    return prediction_frame(_teacher, _compressed, _data, idx), _data.test_x[idx].numpy()


with _errors.guarded("Could not compute predictions: "):
    compressed = _resources.compressed_model(result.key, result)
    frame, images = _frame(result.key, teacher.meta.get("sha256", ""), n, int(seed), teacher.model, compressed, data)
    m1, m2, m3 = st.columns(3)
    m1.metric("Teacher correct", f"{frame.teacher_correct.mean():.0%}", border=True)
    m2.metric("Compressed correct", f"{frame.compressed_correct.mean():.0%}",
              f"{100 * (frame.compressed_correct.mean() - frame.teacher_correct.mean()):+.0f} pts", border=True)
    m3.metric("Disagreements", f"{int(frame.disagree.sum())} of {len(frame)}", border=True)
    items = views.grid_items(frame, images, only_disagreements=only)
    if not items:
        st.success("The two models agree on every image of this sample.", icon=":material/handshake:")
    per_row = 8
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, item in zip(cols, items[start:start + per_row]):
            col.image(item["image"], caption=item["caption"], width="stretch")
