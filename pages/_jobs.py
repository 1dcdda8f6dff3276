"""Jobs from a page: heavy work goes to core.jobs (Ray workers); the server process only submits,
follows (drawing LiveProgress) and cancels.
"""
from __future__ import annotations

import streamlit as st

from core.errors import LabError
from pages._errors import show_error
from pages._progress import LiveProgress
from pages._roles import can, class_mode, is_instructor, session_id


def lab():
    """This server's job manager (one per process; started on first use). A cluster that cannot be reached
    stops the page with one line: the lab never falls back to this machine without saying so."""
    from core import jobs
    try:
        return jobs.manager()
    except LabError as exc:
        st.error(f"**Not connected to the compute engine.** {exc}", icon=":material/cloud_off:")
        st.stop()


def owner() -> str:
    """Who asked, as the Class view shows it: this browser session, and whether it is the instructor."""
    sid = (session_id() or "local")[:6]
    return f"{'instructor' if class_mode() and is_instructor() else 'browser'} {sid}"


def submit(kind: str, payload: dict, label: str, lane: str | None = None):
    """Queue a job (or join the identical one already queued or running); None after showing why not."""
    from core.jobs import JobLimit
    try:
        return lab().submit(kind, payload, owner=owner(), label=label, lane=lane, owner_long_limit=1)
    except JobLimit as exc:
        st.warning(str(exc), icon=":material/hourglass_top:")
        mine = [j for j in lab().jobs(owner=owner(), active_only=True) if j.lane == "long"]
        for j in mine:
            cancel_button(j)
        return None
    except LabError as exc:
        show_error(exc)
        return None


def cancel_button(job) -> bool:
    """A Cancel button for a job this session asked for (or any job, for the instructor); True when pressed
    (the job is then cancelled, or left to the other sessions that still wait for it)."""
    instructor = class_mode() and can("cancel_others_jobs")
    if owner() not in job.owners and not instructor:
        return False
    if st.button(f"Cancel {job.label or job.kind}", key=f"cancel.{job.id}", icon=":material/cancel:"):
        lab().cancel(job.id, by=owner(), instructor=instructor)
        st.info("Cancelled. Finished epochs are kept: running the same settings again resumes them.",
                icon=":material/cancel:")
        return True
    return False


def follow(job, title: str, reference: float | None = None, chart: bool = True):
    """Draw a job's progress as it streams in until it ends; its result, or None after showing the error.

    The loop touches the page at least every 0.3 s, so a Cancel click or a moved slider (a Streamlit
    rerun) interrupts the wait at once; the job itself goes on for whoever else waits for it."""
    if cancel_button(job):
        return None
    prog = LiveProgress(title, reference=reference, chart=chart)

    def heartbeat() -> None:
        where = f" on {job.node}" if job.node else ""
        prog.bar.progress(prog.fraction, text=prog.text or ("queued…" if job.state == "queued"
                                                           else f"running{where}…"))
    try:
        out = job.follow(prog, poll=0.3, on_wait=heartbeat)
    except Exception as exc:  # noqa: BLE001 - shown as a message; other sessions carry on
        prog.done("Stopped" if job.state == "cancelled" else "Failed", ok=False)
        show_error(exc)
        return None
    prog.done(f"Done in {job.wait_s:.1f} s on {job.node}" if job.node else "Done")
    return out
