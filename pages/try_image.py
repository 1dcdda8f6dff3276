import streamlit as st

from core import views
from core.images import load_image_32
from core.predict import example_images, image_probs, png_bytes
from pages import _errors, _resources, _widgets

st.title("Try an image")
st.caption("Upload a photo or pick an example: it is shrunk to 32×32 pixels (what the models see) and both "
           "models give their five most likely classes.")
data = _resources.require_data()
teacher = _resources.require_teacher(data)

src = st.radio("Image", ["Example from the test set", "Upload"], horizontal=True, key="try.source")
image, name = None, None
if src == "Upload":
    up = st.file_uploader("JPEG, PNG or WebP (up to 10 MB)", type=["jpg", "jpeg", "png", "webp"], key="try.upload",
                          help="Any size and colour mode: grayscale, RGBA, 16-bit and CMYK are converted to RGB.")
    if up is not None:
        try:
            image, name = load_image_32(up.getvalue()), up.name
        except Exception as exc:  # noqa: BLE001 - any unreadable upload is the user's to fix
            _errors.show_error(exc, f"Cannot use {up.name}: ")
else:
    examples = example_images(data, per_class=2)
    labels = [lab for lab, _ in examples]
    pick = st.selectbox("Example", range(len(examples)), format_func=lambda i: labels[i], key="try.example")
    name, image = examples[pick]

if image is None:
    st.info("Upload an image to see the predictions.", icon=":material/info:")
    st.stop()

result = _widgets.pick_result(data, "try.result")
c0, c1, c2 = st.columns([1, 2, 2], gap="large")
with c0:
    st.image(png_bytes(image, scale=6), caption=f"{name}: as the model sees it (32×32, enlarged)")
with _errors.guarded("Prediction failed: "):
    with c1:
        frame = views.topk_frame(image_probs(teacher.model, data, image), data.classes)
        st.altair_chart(views.topk_chart(frame, f"Teacher: {frame['class'].iloc[0]}", "#333333"), width="stretch")
    with c2:
        if result is None:
            st.info("No compressed model yet for this teacher: run a technique to compare.", icon=":material/info:")
        else:
            compressed = _resources.compressed_model(result.key, result)
            frame = views.topk_frame(image_probs(compressed, data, image), data.classes)
            st.altair_chart(views.topk_chart(frame, f"Compressed ({result.technique}): {frame['class'].iloc[0]}",
                                             views.technique_colors().get(result.technique, "#4c78a8")),
                            width="stretch")
