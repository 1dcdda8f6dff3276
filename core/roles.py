"""Class mode: who may do what when one server is shared by an instructor and a class.

Class mode is on when an instructor password is configured (environment variable, or a value the
app passes in from its secrets). Then only a browser session holding a valid instructor token may
perform the actions in INSTRUCTOR_ACTIONS; without a password everyone is the instructor.

The token is HMAC(key, session id), the key derived from the password and a random salt made once
per process: it proves this session logged in, cannot be forged or reused by another session, and
dies with the process. The password itself is never stored.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

PASSWORD_ENV = "COMPRESSION_LAB_INSTRUCTOR_PASSWORD"
SECRETS_KEY = "instructor_password"

# every action only the instructor may perform in class mode (pages ask through can())
INSTRUCTOR_ACTIONS = frozenset({
    "train_teacher",        # Teacher page: train a new teacher
    "delete_teacher",       # Teacher page: remove a cached teacher
    "delete_runs",          # Compare page: delete selected runs or clear them all
    "data_folder",          # sidebar: read an image folder from the server's disk
    "attach_cluster",       # attach the server to a compute cluster
    "cancel_others_jobs",   # cancel a job another session started
})

MAX_FAILURES = 5        # wrong passwords in a row before a lockout
LOCKOUT_SECONDS = 30.0  # long enough to stop guessing by hand, short enough not to strand a typo

_SALT = secrets.token_bytes(32)


def password(secret: str | None = None) -> str | None:
    """The configured instructor password: the environment first, then the app's secret; '' is none."""
    value = os.environ.get(PASSWORD_ENV) or secret
    return value if isinstance(value, str) and value else None


def class_mode(secret: str | None = None) -> bool:
    return password(secret) is not None


def _key(pw: str) -> bytes:
    return hmac.new(_SALT, pw.encode(), hashlib.sha256).digest()


def make_token(pw: str, session_id: str) -> str:
    return hmac.new(_key(pw), session_id.encode(), hashlib.sha256).hexdigest()


def verify_token(token, pw: str | None, session_id: str | None) -> bool:
    """True only for the token make_token gave this password and this session id in this process."""
    if not pw or not session_id or not isinstance(token, str):
        return False
    return hmac.compare_digest(token.encode(), make_token(pw, session_id).encode())


def check_password(attempt, pw: str | None) -> bool:
    if not pw or not isinstance(attempt, str):
        return False
    return hmac.compare_digest(attempt.encode(), pw.encode())


def is_instructor(*, pw: str | None, token, session_id: str | None) -> bool:
    """Outside class mode (no password) everyone is; in class mode only a session with a valid token."""
    return pw is None or verify_token(token, pw, session_id)


def can(action: str, *, pw: str | None, token, session_id: str | None) -> bool:
    """May this session perform `action`? Unknown actions raise, so a typo never opens a gate."""
    if action not in INSTRUCTOR_ACTIONS:
        raise ValueError(f"unknown instructor action {action!r}; known: {', '.join(sorted(INSTRUCTOR_ACTIONS))}")
    return is_instructor(pw=pw, token=token, session_id=session_id)


def lockout_left(state: dict, now: float) -> float:
    """Seconds this session must still wait before another password attempt (0 = may try)."""
    return max(0.0, float(state.get("until", 0.0)) - now)


def record_failure(state: dict, now: float) -> None:
    """Count a wrong password; the MAX_FAILURES-th in a row locks the session out for a while."""
    state["failures"] = int(state.get("failures", 0)) + 1
    if state["failures"] >= MAX_FAILURES:
        state["failures"], state["until"] = 0, now + LOCKOUT_SECONDS
