"""Model Compression Lab: the Streamlit app (`streamlit run app.py`).

The sidebar selection (dataset, teacher, device, evaluation size) lives in st.session_state
and is shared by every page; all computation is in core/.
"""
import streamlit as st

st.set_page_config(page_title="Model Compression Lab", page_icon="🗜️", layout="wide")

from pages import _shared  # noqa: E402  (after set_page_config)

PAGES = {
    "Lab": [st.Page("pages/home.py", title="Home", icon="🏠", default=True),
            st.Page("pages/teacher.py", title="Teacher", icon="🧑‍🏫")],
    "Compress": [st.Page("pages/pruning.py", title="Pruning", icon="✂️"),
                 st.Page("pages/quantization.py", title="Quantization", icon="🔢"),
                 st.Page("pages/distillation.py", title="Distillation", icon="⚗️")],
    "Inspect": [st.Page("pages/predictions.py", title="Predictions", icon="🖼️"),
                st.Page("pages/try_image.py", title="Try an image", icon="📤"),
                st.Page("pages/compare.py", title="Compare", icon="📊")],
}

page = st.navigation(PAGES)
_shared.sidebar()
page.run()
