"""The app's pages (st.Page sources for app.py's st.navigation) and their helpers (the _-prefixed modules)."""
import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import get_script_run_ctx

# A pages/ folder puts a fresh server in Streamlit's old multipage mode (a deep link runs one page file alone) until
# st.navigation runs; every page imports this package first, so end that mode here and rerun the session via app.py.
_old_mode, PagesManager.uses_pages_directory = PagesManager.uses_pages_directory, False
if _old_mode and get_script_run_ctx() is not None:
    st.rerun()
