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

from pages import _nav, _roles, _sidebar  # noqa: E402  (after set_page_config)

PAGES = {
    "Lab": [st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
            st.Page("pages/teacher.py", title="Teacher", icon=":material/school:")],
    "Compress": _nav.technique_pages(),   # one page per registered technique
    "Inspect": [st.Page("pages/predictions.py", title="Predictions", icon=":material/grid_view:"),
                st.Page("pages/try_image.py", title="Try an image", icon=":material/upload:"),
                st.Page("pages/layers.py", title="Layers", icon=":material/layers:"),
                st.Page("pages/compare.py", title="Compare", icon=":material/scatter_plot:")],
}

if _roles.is_instructor():   # the Class view: jobs of every browser, cancel, the engine's nodes
    PAGES["Lab"].append(st.Page("pages/class_view.py", title="Class", icon=":material/groups:"))
page = st.navigation(PAGES)
_sidebar.sidebar()
page.run()
