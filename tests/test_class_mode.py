"""Class mode: with an instructor password, students run and view but cannot train, delete or read folders.

The pages are driven with AppTest on a fresh cache holding a copy of the tiny shared teacher and two
stored runs, so deleting them touches no other test; a Train press that gets past the gate finds
its settings "already cached" (what is under test is whether the press gets through, not training).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

from core import cache, roles
from core.results import ExperimentResult, ResultStore

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PASSWORD = "correct horse 42"
GATED_BUTTONS = ["teacher.train", "teacher.delete", "cmp.delete", "cmp.clear"]


@pytest.fixture(autouse=True)
def _navigation_pages_under_pages_dir(monkeypatch):
    """As in test_app.py: AppTest must let st.navigation win over the old automatic pages/ folder."""
    from streamlit.runtime.pages_manager import PagesManager
    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", init)


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["eval_size"] = 200
    return at.run()


def visit(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, f"{page}: {[e.value for e in at.exception]}"
    return at


def buttons(at: AppTest) -> set[str]:
    return {b.key for b in at.button if b.key}


def shown(at: AppTest, state: bool = True) -> str:
    """Every element's protobuf (labels, values, bodies) and widget value, and the session state if asked."""
    out = [str(at.session_state.to_dict())] if state else []

    def walk(node):
        out.append(str(getattr(node, "proto", "")))
        try:
            out.append(repr(node.value))
        except Exception:  # noqa: BLE001 - blocks and some elements have no value
            pass
        for child in getattr(node, "children", {}).values():
            walk(child)
    walk(at.main)
    walk(at.sidebar)
    return "\n".join(out)


def log_in(at: AppTest, password: str) -> AppTest:
    at.text_input(key="_lab.password").input(password)
    next(b for b in at.button if b.label == "Log in").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def fake_run(key: str, teacher_path: Path) -> ExperimentResult:
    m = {"accuracy": 0.8, "size_bytes": 4_000_000, "params": 1_000_000, "macs": 5_000_000, "latency_ms_b1": 2.0}
    return ExperimentResult(key=key, dataset="shapes", dataset_label="Shapes", model="resnet34",
                            technique="quantize", params={"bits": 8}, baseline=m,
                            compressed={**m, "size_bytes": 1_000_000, "accuracy": 0.79}, eval_images=200,
                            seconds=1.0, teacher_path=str(teacher_path))


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", epochs=1, subset=1500)


@pytest.fixture
def lab(teacher, fresh_cache, monkeypatch):
    """A fresh cache with a copy of the tiny teacher and two stored runs; no password unless a test sets one."""
    monkeypatch.delenv(roles.PASSWORD_ENV, raising=False)
    root = teacher.path.parents[3]                       # <cache>/teachers/<dataset>/<model>/<key>.pt
    copied = fresh_cache / teacher.path.relative_to(root)
    copied.parent.mkdir(parents=True)
    for src in (teacher.path, cache.sidecar_path(teacher.path)):
        shutil.copy2(src, copied.parent / src.name)
    store = ResultStore()
    for key in ("run-a", "run-b"):
        store.add(fake_run(key, copied))
    return SimpleNamespace(teacher=copied, store=store, cache=fresh_cache)


@pytest.fixture
def trainings(monkeypatch, teacher):
    """Train presses that got past the gate. The button's first step is find_teacher: answered with the tiny
    teacher ("already cached: nothing to train"), so the gate is exercised and nothing is trained."""
    import core.teachers
    calls = []

    def find(data, settings):
        calls.append(settings)
        return teacher
    monkeypatch.setattr(core.teachers, "find_teacher", find)
    return calls


def teacher_files(lab) -> list[Path]:
    return [p for p in (lab.teacher, cache.sidecar_path(lab.teacher)) if p.exists()]


def do_every_instructor_action(at: AppTest, lab, trainings) -> None:
    """Train, delete one run, clear the rest, delete the teacher: each must happen."""
    visit(at, "pages/teacher.py")
    at.button(key="teacher.train").click().run()
    assert not at.exception and len(trainings) == 1
    assert any("already cached: nothing to train" in s.value for s in at.success)
    visit(at, "pages/compare.py")
    at.multiselect(key="cmp.doomed").select("run-a").run()
    at.button(key="cmp.delete").click().run()
    assert lab.store.count() == 1
    at.checkbox(key="cmp.sure").check().run()
    at.button(key="cmp.clear").click().run()
    assert lab.store.count() == 0
    visit(at, "pages/teacher.py")
    at.checkbox(key="teacher.delete_sure").check().run()
    at.button(key="teacher.delete").click().run()
    assert not at.exception and teacher_files(lab) == []
    assert any(s.value.startswith("Deleted the ResNet-34 teacher") for s in at.success)


# ----------------------------------------------------------------------------- core.roles
def test_a_token_is_bound_to_its_session_its_password_and_this_process():
    token = roles.make_token(PASSWORD, "session-a")
    assert roles.verify_token(token, PASSWORD, "session-a")
    assert not roles.verify_token(token, PASSWORD, "session-b")           # copied into another browser
    assert not roles.verify_token(token, "another password", "session-a")  # the password was changed
    tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert not roles.verify_token(tampered, PASSWORD, "session-a")
    for forged in (True, 1, "", None, "instructor", roles.make_token(PASSWORD, "session-b")):
        assert not roles.verify_token(forged, PASSWORD, "session-a")
    assert not roles.verify_token(token, PASSWORD, None)
    # the key mixes in a per-process salt: HMAC of the password alone (what an outsider could compute) fails
    import hashlib
    import hmac
    outsider = hmac.new(hmac.new(b"", PASSWORD.encode(), hashlib.sha256).digest(), b"session-a", hashlib.sha256)
    assert not roles.verify_token(outsider.hexdigest(), PASSWORD, "session-a")


def test_password_lookup_class_mode_and_can(monkeypatch):
    monkeypatch.delenv(roles.PASSWORD_ENV, raising=False)
    assert roles.password() is None and not roles.class_mode()
    assert roles.password(secret="from-secrets") == "from-secrets" and roles.class_mode("from-secrets")
    monkeypatch.setenv(roles.PASSWORD_ENV, "from-env")
    assert roles.password(secret="from-secrets") == "from-env"
    monkeypatch.setenv(roles.PASSWORD_ENV, "")
    assert roles.password() is None                                        # empty: not class mode
    assert roles.check_password(PASSWORD, PASSWORD)
    assert not roles.check_password(PASSWORD + " ", PASSWORD) and not roles.check_password(None, PASSWORD)
    assert not roles.check_password("", None)
    assert roles.INSTRUCTOR_ACTIONS == {"train_teacher", "delete_teacher", "delete_runs", "data_folder",
                                        "attach_cluster", "cancel_others_jobs"}
    token = roles.make_token(PASSWORD, "s")
    for action in roles.INSTRUCTOR_ACTIONS:
        assert roles.can(action, pw=None, token=None, session_id="s")          # laptop: everyone
        assert not roles.can(action, pw=PASSWORD, token=None, session_id="s")
        assert roles.can(action, pw=PASSWORD, token=token, session_id="s")
    with pytest.raises(ValueError, match="unknown instructor action"):
        roles.can("delete_runz", pw=None, token=None, session_id="s")


def test_five_wrong_passwords_lock_the_session_out_for_a_while():
    state = {}
    for _ in range(roles.MAX_FAILURES - 1):
        roles.record_failure(state, now=100.0)
    assert roles.lockout_left(state, 100.0) == 0
    roles.record_failure(state, now=100.0)
    assert roles.lockout_left(state, 101.0) == roles.LOCKOUT_SECONDS - 1
    assert roles.lockout_left(state, 100.0 + roles.LOCKOUT_SECONDS) == 0


def test_delete_teacher_file_removes_the_entry_and_nothing_outside_the_cache(lab, tmp_path):
    from core.errors import LabError
    from core.predict import latest_teacher_entry
    from core.teachers import delete_teacher_file
    outside = tmp_path / "mine.pt"
    outside.write_bytes(b"not the cache's")
    with pytest.raises(LabError, match="not a cached teacher"):
        delete_teacher_file(outside)
    with pytest.raises(LabError):
        delete_teacher_file(lab.teacher.parent / ".." / ".." / ".." / ".." / outside.name)
    assert outside.exists()
    assert sorted(delete_teacher_file(lab.teacher)) == sorted([lab.teacher, cache.sidecar_path(lab.teacher)])
    assert teacher_files(lab) == []
    from core.datasets import load_dataset
    assert latest_teacher_entry(load_dataset("shapes"), "resnet34") is None


# ----------------------------------------------------------------------------- the app
def test_without_a_password_everyone_is_the_instructor_as_before(lab, trainings):
    at = new_app()
    assert not at.exception
    assert not [c for c in at.sidebar.caption if "Class mode" in c.value] and not at.sidebar.expander
    assert not [m for m in at.sidebar.markdown if "Instructor" in m.value] and "Log out" not in [b.label for b in at.button]
    assert "folder" in at.selectbox(key="dataset").options[-1].lower()
    do_every_instructor_action(at, lab, trainings)


def test_a_student_sees_no_instructor_action_and_forged_state_opens_none(lab, trainings, monkeypatch, tmp_path):
    monkeypatch.setenv(roles.PASSWORD_ENV, PASSWORD)
    private = tmp_path / "someone-elses-files"
    private.mkdir()
    at = AppTest.from_file(APP, default_timeout=120)
    # forged before the first run (AppTest cannot send a widget value its last run did not offer)
    for key, value in {"instructor": True, "is_instructor": True, "role": "instructor", "admin": True,
                       "_lab.instructor_token": roles.make_token(PASSWORD, "another session"),
                       "dataset": "folder", "folder_path": str(private), "cmp.doomed": ["run-a", "run-b"],
                       "cmp.sure": True, "teacher.delete_sure": True, "eval_size": 200}.items():
        at.session_state[key] = value
    at.run()
    assert "Class mode: student" in [c.value for c in at.sidebar.caption]
    for page in ("pages/home.py", "pages/teacher.py", "pages/compare.py"):
        visit(at, page)
        assert not buttons(at) & set(GATED_BUTTONS), page
        for b in at.button:                  # press whatever a student is offered (not the timing-only estimate)
            if b.key not in ("teacher.estimate",) and b.label != "Log in":
                b.click().run()
                assert not at.exception
        assert at.session_state["dataset"] == "shapes"
        assert all("folder" not in o.lower() for o in at.selectbox(key="dataset").options)
        assert "folder_path" not in {t.key for t in at.text_input}
        assert str(private) not in shown(at, state=False)
    visit(at, "pages/teacher.py")
    assert any("only the instructor trains" in c.value for c in at.caption)
    assert trainings == [] and len(teacher_files(lab)) == 2 and lab.store.count() == 2
    assert not list((lab.cache / "datasets").glob("folder-*"))           # the server never read the folder
    assert "Class mode: student" in [c.value for c in at.sidebar.caption]


def test_wrong_password_is_refused_without_a_hint_and_locks_out_after_five(lab, monkeypatch):
    monkeypatch.setenv(roles.PASSWORD_ENV, PASSWORD)
    at = new_app()
    log_in(at, "correct horse 41")
    assert [e.value for e in at.error] == ["Wrong password."]
    assert "Log out" not in [b.label for b in at.button]
    for _ in range(roles.MAX_FAILURES - 1):
        log_in(at, "guess")
    log_in(at, PASSWORD)                                                   # right, but locked out
    assert [e.value for e in at.error] and at.error[0].value.startswith("Too many attempts")
    assert "Log out" not in [b.label for b in at.button]
    assert PASSWORD not in shown(at) and at.text_input(key="_lab.password").value == ""


def test_the_password_unlocks_every_action_and_log_out_locks_them_again(lab, trainings, monkeypatch):
    monkeypatch.setenv(roles.PASSWORD_ENV, PASSWORD)
    at = log_in(new_app(), PASSWORD)
    assert "Log out" in [b.label for b in at.button] and not at.error
    assert any("Instructor" in m.value for m in at.sidebar.markdown)
    assert PASSWORD not in shown(at)                  # not echoed, not left in the field or in session state
    assert "folder" in at.selectbox(key="dataset").options[-1].lower()
    do_every_instructor_action(at, lab, trainings)
    next(b for b in at.button if b.label == "Log out").click().run()
    visit(at, "pages/compare.py")
    assert "Class mode: student" in [c.value for c in at.sidebar.caption]
    assert not buttons(at) & set(GATED_BUTTONS)
    assert all("folder" not in o.lower() for o in at.selectbox(key="dataset").options)


def _gated_script():
    """Forged state straight into the glue: what a page's own check at the point of action sees."""
    import streamlit as st

    from pages import _roles, _selection
    st.session_state.update(instructor=True, dataset="folder", folder_path="/etc")
    st.write(f"dataset: {_selection.dataset_name()}")
    if _roles.require_instructor("delete_runs"):
        st.success("deleted")
    _roles.require_instructor("train_teacher", stop=True)
    st.success("trained")


def test_require_instructor_and_the_folder_are_checked_where_they_are_used(monkeypatch):
    monkeypatch.setenv(roles.PASSWORD_ENV, PASSWORD)
    at = AppTest.from_function(_gated_script).run()
    assert not at.exception and not at.success
    assert [w.value for w in at.warning] == ["Only the instructor can do this in class mode."] * 2
    assert "dataset: shapes" in [m.value for m in at.markdown]
    monkeypatch.delenv(roles.PASSWORD_ENV)
    at = AppTest.from_function(_gated_script).run()
    assert [s.value for s in at.success] == ["deleted", "trained"] and not at.warning
    assert "dataset: folder:/etc" in [m.value for m in at.markdown]


def test_the_secrets_file_turns_class_mode_on_too(lab):
    at = AppTest.from_file(APP, default_timeout=120)
    at.secrets[roles.SECRETS_KEY] = PASSWORD
    at.run()
    assert "Class mode: student" in [c.value for c in at.sidebar.caption]
    log_in(at, PASSWORD)
    assert "Log out" in [b.label for b in at.button]


def test_the_class_page_is_the_instructors_only(lab, monkeypatch):
    monkeypatch.setenv(roles.PASSWORD_ENV, PASSWORD)
    at = new_app()
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("pages/class_view.py")            # not in a student's navigation at all
    alone = AppTest.from_file(str(Path(APP).parent / "pages" / "class_view.py"), default_timeout=120).run()
    assert not alone.exception and not alone.dataframe   # and the page itself refuses a student
    assert [w.value for w in alone.warning] == ["Only the instructor can do this in class mode."]
    assert not buttons(alone) & {"class.attach", "class.cancel", "class.refresh"}
    log_in(at, PASSWORD)
    visit(at, "pages/class_view.py")
    assert at.dataframe and "class.attach" in buttons(at)
    assert any(t.value == "Class" for t in at.title)
