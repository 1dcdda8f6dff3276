"""Class mode in the app: who this browser session is (student or instructor), the checks at the point of
action, and the sidebar's login box.

core.roles holds the rules; this is only the Streamlit glue. Session state keeps a token that is
valid for this browser session only, never a plain flag and never the password.
"""
from __future__ import annotations

import os
import time

import streamlit as st

from core import roles

_TOKEN_KEY = "_lab.instructor_token"
_LOGIN_KEY = "_lab.login_failures"
_LOGIN_MESSAGE = "_lab.login_message"
_PASSWORD_FIELD = "_lab.password"   # the form's field; blanked by the callback as soon as it is read


def _secret_password() -> str | None:
    try:
        return st.secrets.get(roles.SECRETS_KEY)
    except FileNotFoundError as exc:   # no secrets file is the laptop case; a broken one must not open class mode
        if getattr(exc, "error_id", None) == "no-secrets-found":
            return None
        raise


def _password() -> str | None:
    return roles.password(None if os.environ.get(roles.PASSWORD_ENV) else _secret_password())


def session_id() -> str | None:
    """This browser session's id (None outside a running script)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else None


def class_mode() -> bool:
    return _password() is not None


def can(action: str) -> bool:
    """May this browser session perform `action` (one of core.roles.INSTRUCTOR_ACTIONS)?"""
    return roles.can(action, pw=_password(), token=st.session_state.get(_TOKEN_KEY), session_id=session_id())


def is_instructor() -> bool:
    """True outside class mode (one person on a laptop) and for a session that logged in."""
    return roles.is_instructor(pw=_password(), token=st.session_state.get(_TOKEN_KEY), session_id=session_id())


def require_instructor(action: str, stop: bool = False) -> bool:
    """Check at the place an action is performed: True if allowed, else a warning (and st.stop if asked)."""
    if can(action):
        return True
    st.warning("Only the instructor can do this in class mode.", icon=":material/lock:")
    if stop:
        st.stop()
    return False


def _login_submitted() -> None:
    """The login form's callback: runs before the page, so the typed password is blanked before any page code runs."""
    ss = st.session_state
    attempt = ss.get(_PASSWORD_FIELD, "")
    ss[_PASSWORD_FIELD] = ""
    pw, state = _password(), ss.setdefault(_LOGIN_KEY, {})
    wait = roles.lockout_left(state, time.time())
    if wait > 0:
        ss[_LOGIN_MESSAGE] = f"Too many attempts: try again in {wait:.0f} s."
    elif roles.check_password(attempt, pw):
        ss.pop(_LOGIN_KEY, None)
        ss[_TOKEN_KEY] = roles.make_token(pw, session_id() or "")
    else:
        roles.record_failure(state, time.time())
        ss[_LOGIN_MESSAGE] = "Wrong password."


def login_box() -> None:
    """Sidebar: who you are, and the instructor's login or log-out (nothing at all outside class mode)."""
    if not class_mode():
        return
    ss = st.session_state
    if is_instructor():
        st.markdown(":material/school: **Instructor**")
        if st.button("Log out", key="_lab.logout", icon=":material/logout:"):
            ss.pop(_TOKEN_KEY, None)
            st.rerun()
        return
    st.caption("Class mode: student")
    with st.expander("Instructor login", expanded=_LOGIN_MESSAGE in ss):
        with st.form("_lab.login", clear_on_submit=True, border=False):
            st.text_input("Password", type="password", key=_PASSWORD_FIELD, autocomplete="current-password")
            st.form_submit_button("Log in", icon=":material/login:", on_click=_login_submitted)
        if msg := ss.pop(_LOGIN_MESSAGE, None):
            st.error(msg)
