"""A deep link to /pipeline on a fresh server runs this file first (Streamlit's pages/ folder); importing the
pages package hands the session to app.py's navigation, where the page is generated from the technique registry."""
import pages  # noqa: F401
