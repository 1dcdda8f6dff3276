"""Model Compression Lab: the Streamlit app (`streamlit run app.py`).

The sidebar selection (dataset, teacher, device, evaluation size) lives in st.session_state
and is shared by every page; all computation is in core/.
"""
import logging

import streamlit as st

# torch.utils.benchmark (latency) imports cpp_extension, which warns on CPU-only machines that
# have a stray nvcc on PATH; it is noise for this app, which never compiles extensions
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

st.set_page_config(page_title="Model Compression Lab", page_icon=":material/compress:", layout="wide")

from app_pages import _shared  # noqa: E402  (after set_page_config)

PAGES = {
    "Lab": [st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
            st.Page("app_pages/teacher.py", title="Teacher", icon=":material/school:")],
    "Compress": [st.Page("app_pages/pruning.py", title="Pruning", icon=":material/content_cut:"),
                 st.Page("app_pages/quantization.py", title="Quantization", icon=":material/filter_9_plus:"),
                 st.Page("app_pages/distillation.py", title="Distillation", icon=":material/science:")],
    "Inspect": [st.Page("app_pages/predictions.py", title="Predictions", icon=":material/grid_view:"),
                st.Page("app_pages/try_image.py", title="Try an image", icon=":material/upload:"),
                st.Page("app_pages/compare.py", title="Compare", icon=":material/scatter_plot:")],
}

page = st.navigation(PAGES)
_shared.sidebar()
page.run()
