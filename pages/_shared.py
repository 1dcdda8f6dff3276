"""Streamlit glue shared by every page: sidebar selection, cached models, jobs, progress, errors.

Only this package imports streamlit; all computation is in core/ (runner, predict, views).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import traceback

import streamlit as st

import core
from core import views
from core.datasets import DATASETS
from core.errors import LabError
from core.models import MODELS, TEACHERS
from core.settings import available_devices, default_device

EVAL_CHOICES = [200, 500, 1000, 2000, 0]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# ----------------------------------------------------------------------------- shared selection
def init_state() -> None:
    """Defaults for the sidebar selection (shared by all pages through st.session_state)."""
    ss = st.session_state
    ss.setdefault("dataset", core.DEFAULT_DATASET)
    ss.setdefault("teacher_model", core.DEFAULT_TEACHER)
    ss.setdefault("device", default_device())
    ss.setdefault("eval_size", _env_int("COMPRESSION_LAB_APP_EVAL", 1000))
    ss.setdefault("folder_path", "")


def eval_label(n: int) -> str:
    return "full test set" if n == 0 else f"{n:,} test images"


def sidebar() -> None:
    init_state()
    with st.sidebar:
        names = list(DATASETS) + (["folder"] if can("data_folder") else [])
        if st.session_state.dataset not in names:   # e.g. the instructor logged out while on a folder
            st.session_state.dataset = core.DEFAULT_DATASET
        st.selectbox("Dataset", names, key="dataset",
                     format_func=lambda n: "Image folder…" if n == "folder" else
                     f"{DATASETS[n].title}" + (" (generated, offline)" if not DATASETS[n].needs_download else ""),
                     help="Shapes is generated on the spot (no download); CIFAR-10 and SVHN need their files.")
        if st.session_state.dataset == "folder":
            st.text_input("Folder with train/<class>/ images", key="folder_path",
                          placeholder="/path/to/images")
        st.selectbox("Teacher", TEACHERS, key="teacher_model", format_func=lambda n: MODELS[n].title)
        devices = available_devices()
        if st.session_state.device not in devices:
            st.session_state.device = devices[0]
        st.selectbox("Training device", devices, key="device",
                     help="Latency is always measured on the CPU.")
        st.selectbox("Evaluate on", EVAL_CHOICES, key="eval_size", format_func=eval_label,
                     help="Every comparison uses the same fixed, class-balanced subset of the test set.")
        data = try_data()
        if data is not None:
            entry = teacher_entry(data, st.session_state.teacher_model)
            if entry is None:
                st.warning(f"No cached {MODELS[st.session_state.teacher_model].title} teacher for "
                           f"{data.label} yet — train one on the Teacher page.", icon=":material/school:")
            else:
                hist = entry[1].get("history") or [{}]
                acc = hist[-1].get("val_accuracy")
                st.success(f"Teacher cached ({len(hist)} epochs"
                           + (f", validation {acc:.1%}" if acc is not None else "") + ")", icon=":material/check_circle:")
        login_box()


def dataset_name() -> str:
    init_state()
    name = st.session_state.dataset
    if name == "folder" and not can("data_folder"):   # checked here too: this is where the folder is read
        return core.DEFAULT_DATASET
    if name == "folder":
        path = (st.session_state.get("folder_path") or "").strip()
        return f"folder:{path}" if path else "folder:"
    return name


# ----------------------------------------------------------------------------- cached resources
@st.cache_resource(show_spinner="Loading the dataset…", max_entries=4)
def _load_data(name: str):
    return core.load_dataset(name)


def try_data():
    """The selected dataset, or None after showing why it is unavailable (e.g. offline CIFAR-10)."""
    try:
        return _load_data(dataset_name())
    except LabError as exc:
        st.error(f"**Dataset unavailable.** {exc}", icon=":material/cloud_off:")
        return None


def require_data():
    data = try_data()
    if data is None:
        st.info("Pick another dataset in the sidebar (Shapes works offline).")
        st.stop()
    return data


def teacher_entry(data, model: str):
    from core.predict import latest_teacher_entry
    return latest_teacher_entry(data, model)


@st.cache_resource(show_spinner="Loading the teacher…", max_entries=6)
def _load_teacher(path: str, sha: str):
    from pathlib import Path

    from core.teachers import load_teacher_file
    t = load_teacher_file(Path(path))
    if t is None:
        raise LabError(f"the cached teacher {path} is damaged; train it again on the Teacher page")
    return t


def current_teacher(data, model: str | None = None):
    """The teacher the runner will use (newest cached for dataset+model), loaded once per process."""
    model = model or st.session_state.teacher_model
    entry = teacher_entry(data, model)
    if entry is None:
        return None
    return _load_teacher(str(entry[0]), entry[1].get("sha256", ""))


def require_teacher(data):
    t = current_teacher(data)
    if t is None:
        st.info(f"There is no cached **{MODELS[st.session_state.teacher_model].title}** teacher for "
                f"**{data.label}** yet. Train it first (a few epochs are enough on Shapes).", icon=":material/school:")
        st.page_link("pages/teacher.py", label="Go to the Teacher page", icon=":material/school:")
        st.stop()
    return t


@st.cache_resource(show_spinner="Loading the compressed model…", max_entries=8)
def compressed_model(key: str, _result):
    from core.runner import load_compressed
    return load_compressed(_result)


def store():
    from core.results import ResultStore
    return ResultStore()


# ----------------------------------------------------------------------------- jobs
# Heavy work goes to core.jobs (Ray workers); the server process only submits, follows and draws.
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
    sid = (_session_id() or "local")[:6]
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


# ----------------------------------------------------------------------------- progress
class LiveProgress:
    """A core progress callback drawing a progress bar, a status log and growing accuracy charts."""

    def __init__(self, title: str, reference: float | None = None, reference_label: str = "teacher",
                 chart: bool = True):
        self.status = st.status(title, expanded=True)
        with self.status:
            self.bar = st.progress(0.0, text="starting…")
            self.chart_slot = st.empty() if chart else None
            self.log = st.empty()
        self.reference, self.reference_label = reference, reference_label
        self.series: dict[str, list[dict]] = {}
        self.messages: list[str] = []
        self._last = 0.0
        self.fraction, self.text = 0.0, ""

    def draw_bar(self, fraction: float, text: str) -> None:
        self.fraction, self.text = fraction, text
        self.bar.progress(fraction, text=text)

    def __call__(self, ev) -> None:
        now = time.monotonic()
        if ev.kind == "batch":
            if now - self._last < 0.2 and ev.step < ev.total:
                return
            self._last = now
            ep = f" epoch {ev.epoch}/{ev.epochs} ·" if ev.epochs else ""
            self.draw_bar(min(1.0, ev.fraction), f"{views.SERIES_TITLES.get(ev.stage, ev.stage)}:"
                          f"{ep} batch {ev.step}/{ev.total}")
        elif ev.kind == "start":
            ep = f" epoch {ev.epoch}/{ev.epochs}" if ev.epochs else ""
            self.draw_bar(0.0, f"{views.SERIES_TITLES.get(ev.stage, ev.stage)}:{ep}")
        elif ev.kind == "epoch" and ev.metrics:
            self.series.setdefault(ev.stage, []).append(ev.metrics)
            self.redraw()
            m = ev.metrics
            self.note(f"{views.SERIES_TITLES.get(ev.stage, ev.stage)} epoch {ev.epoch}/{ev.epochs}: "
                      f"train {m.get('train_accuracy', float('nan')):.1%}, "
                      f"validation {m.get('val_accuracy', float('nan')):.1%}")
        elif ev.kind == "message" and ev.message:
            self.note(ev.message)
            self.status.update(label=ev.message[:1].upper() + ev.message[1:] + "…")

    def note(self, text: str) -> None:
        self.messages.append(text)
        self.log.caption("  \n".join(self.messages[-6:]))

    def redraw(self) -> None:
        if self.chart_slot is None or not self.series:
            return
        frame = views.history_frame(self.series)
        self.chart_slot.altair_chart(views.history_chart(frame, self.reference, self.reference_label),
                                     width="stretch")

    def done(self, label: str, ok: bool = True) -> None:
        self.bar.progress(1.0, text="done" if ok else "stopped")
        self.status.update(label=label, state="complete" if ok else "error", expanded=False)


# ----------------------------------------------------------------------------- errors
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


# ----------------------------------------------------------------------------- widgets and cards
def log_grid(low: float, high: float, default: float) -> list[float]:
    """1-2-5 steps per decade within [low, high], plus the default: a usable slider for learning rates."""
    import math
    values = {float(default)}
    for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for m in (1, 2, 5):
            v = float(f"{m}e{e}")
            if low <= v <= high:
                values.add(v)
    return sorted(values)


def param_widgets(params, prefix: str, container=None) -> dict:
    """One widget per ParamSpec: numbers become sliders (a 1-2-5 log scale for ranges over three
    decades, a number box for huge integer ranges), choices radios or select boxes, booleans checkboxes."""
    c = container or st
    values = {}
    for p in params:
        key = f"{prefix}.{p.name}"
        label = p.name.replace("_", " ")
        if p.kind == "float" and p.low > 0 and p.high / p.low >= 1000:
            st.session_state.setdefault(key, float(p.default))
            values[p.name] = c.select_slider(label, log_grid(p.low, p.high, p.default), key=key, help=p.help,
                                             format_func=lambda v: f"{v:g}")
        elif p.kind in ("int", "float"):
            is_int = p.kind == "int"
            low, high = (int(p.low), int(p.high)) if is_int else (float(p.low), float(p.high))
            step = p.step if p.step is not None else (1 if is_int else (high - low) / 100)
            step = int(step) if is_int else float(step)
            default = int(p.default) if is_int else float(p.default)
            st.session_state.setdefault(key, default)
            if (high - low) / max(step, 1e-12) <= 400:
                values[p.name] = c.slider(label, low, high, step=step, key=key, help=p.help)
            else:
                values[p.name] = c.number_input(label, low, high, step=step, key=key, help=p.help)
        elif p.kind == "choice":
            st.session_state.setdefault(key, p.default)
            opts = list(p.choices)
            if len(opts) <= 4 and all(len(str(o)) <= 14 for o in opts):
                values[p.name] = c.radio(label, opts, key=key, help=p.help, horizontal=True)
            else:
                values[p.name] = c.selectbox(label, opts, key=key, help=p.help)
        elif p.kind == "bool":
            st.session_state.setdefault(key, bool(p.default))
            values[p.name] = c.checkbox(label, key=key, help=p.help)
        else:
            st.session_state.setdefault(key, str(p.default))
            values[p.name] = c.text_input(label, key=key, help=p.help)
    return values


def metric_row(baseline: dict, compressed: dict, per_row: int = 3) -> None:
    cards = views.metric_cards(baseline, compressed)
    cols = []
    for start in range(0, len(cards), per_row):
        cols += st.columns(per_row)
    for col, card in zip(cols, cards):
        col.metric(card["label"], card["value"], card["delta"], delta_color=card["delta_color"],
                   delta_arrow=card["delta_arrow"], help=f"teacher: {card['before']}", border=True)


def teacher_metric_row(m: dict) -> None:
    cols = st.columns(5)
    cols[0].metric("Accuracy", views.fmt_pct(m.get("accuracy")), border=True,
                   help=f"on {m.get('eval_images', '?')} test images")
    cols[1].metric("Size", views.fmt_bytes(m.get("size_bytes")), border=True)
    cols[2].metric("Parameters", views.fmt_count(m.get("params")), border=True)
    cols[3].metric("MACs", views.fmt_count(m.get("macs")), border=True, help="multiply-accumulates per image")
    cols[4].metric("Latency (batch 1, CPU)", views.fmt_ms(m.get("latency_ms_b1")), border=True,
                   help=f"one image at a time on {m.get('threads_b1', m.get('threads', '?'))} CPU thread(s)")


def download_model(result, key: str) -> None:
    """The compressed model file exactly as core saved it (a state dict; load with weights_only=True).

    The bytes are read only when the button is clicked (models are tens of MB)."""
    from pathlib import Path
    path = Path(result.model_path)
    if not path.exists():
        st.caption("The compressed model file is no longer in the cache.")
        return
    name = f"{result.dataset.replace(':', '_').replace('/', '_')}-{result.model}-{result.technique}-{result.key[:8]}.pt"
    st.download_button(f"Download the compressed model ({views.fmt_bytes(path.stat().st_size)})",
                       data=functools.partial(path.read_bytes), file_name=name, mime="application/octet-stream", key=key,
                       icon=":material/download:", on_click="ignore")
    if result.technique == "quantize" and (result.params or {}).get("mode") == "int8":
        from core.predict import stored_onnx
        st.download_button("Download as ONNX (int8, runs in ONNX Runtime)",
                           data=functools.partial(lambda r: stored_onnx(r) or b"", result),
                           file_name=name[:-3] + ".onnx", mime="application/octet-stream", key=f"{key}.onnx",
                           icon=":material/download:", on_click="ignore")


def pick_result(data, key: str, label: str = "Compressed model"):
    """Choose one stored run for this dataset and teacher (default: this session's latest run)."""
    runs = [r for r in store().all(dataset=data.name) if r.model == st.session_state.teacher_model]
    if not runs:
        return None
    runs = runs[::-1]
    last = st.session_state.get("last_result_key")
    keys = [r.key for r in runs]
    by_key = {r.key: r for r in runs}
    if st.session_state.get(key) not in by_key:
        st.session_state[key] = last if last in by_key else keys[0]
    chosen = st.selectbox(label, keys, key=key, format_func=lambda k: (
        f"{by_key[k].label()} · accuracy {views.fmt_pct(by_key[k].compressed.get('accuracy'))} · "
        f"{views.fmt_bytes(by_key[k].compressed.get('size_bytes'))}"))
    return by_key[chosen]


def no_runs_hint(data) -> None:
    st.info(f"No compressed model for {MODELS[st.session_state.teacher_model].title} on {data.label} yet: "
            "run one first.", icon=":material/info:")
    cols = st.columns(3)
    cols[0].page_link("pages/pruning.py", label="Pruning", icon=":material/content_cut:")
    cols[1].page_link("pages/quantization.py", label="Quantization", icon=":material/filter_9_plus:")
    cols[2].page_link("pages/distillation.py", label="Distillation", icon=":material/science:")


# ----------------------------------------------------------------------------- class mode (instructor role)
# core.roles holds the rules; this is only the Streamlit glue. Session state keeps a token that is
# valid for this browser session only, never a plain flag and never the password.
from core import roles  # noqa: E402  (kept with its section)

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


def _session_id() -> str | None:
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else None


def class_mode() -> bool:
    return _password() is not None


def can(action: str) -> bool:
    """May this browser session perform `action` (one of core.roles.INSTRUCTOR_ACTIONS)?"""
    return roles.can(action, pw=_password(), token=st.session_state.get(_TOKEN_KEY), session_id=_session_id())


def is_instructor() -> bool:
    """True outside class mode (one person on a laptop) and for a session that logged in."""
    return roles.is_instructor(pw=_password(), token=st.session_state.get(_TOKEN_KEY), session_id=_session_id())


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
        ss[_TOKEN_KEY] = roles.make_token(pw, _session_id() or "")
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
