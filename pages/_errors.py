"""Failures shown as messages instead of tracebacks: a LabError as one line, anything else folded."""
from __future__ import annotations

import contextlib
import traceback

import streamlit as st

from core.errors import LabError


def show_error(exc: BaseException, what: str = "") -> None:
    """User problems (LabError) as one line; anything else as a short message with details folded."""
    if isinstance(exc, LabError):
        st.error(f"{what}{exc}", icon=":material/warning:")
        return
    st.error(f"{what}something went wrong ({type(exc).__name__}: {exc}). Other sessions are not "
             f"affected; try again or change the settings.", icon=":material/error:")
    with st.expander("Technical details"):
        st.code("".join(traceback.format_exception(exc))[-4000:])


@contextlib.contextmanager
def guarded(what: str = ""):
    """Run a block; show errors as messages instead of tracebacks. Streamlit's reruns pass through."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the page must survive any failure
        show_error(exc, what)
