"""Shared fixtures: every test session gets its own empty cache and no network downloads."""
import os
import tempfile

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="lab-test-cache-")
os.environ["COMPRESSION_LAB_CACHE"] = _SESSION_CACHE
os.environ["COMPRESSION_LAB_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)   # the tests start their own engine (and their own test clusters)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see docs/teachers.md (threads)
os.environ.setdefault("COMPRESSION_LAB_DATA", os.path.join(_SESSION_CACHE, "data"))


# the quick loop (`bash tests/run.sh --quick`) leaves these out: real browsers, real clusters, simulated classes
SLOW_FILES = {"test_browser.py", "test_cluster.py", "test_classroom.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """The session's cache holds hundreds of MB of models: gone afterwards unless asked to keep it.
    The job layer's Ray workers (started by the first test that submits a job) stop first."""
    from core import jobs
    jobs.shutdown()
    if not os.environ.get("LAB_KEEP_TEST_CACHE"):
        import shutil
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes():
    from core.datasets import load_dataset
    return load_dataset("shapes")


@pytest.fixture(scope="session")
def make_teacher(shapes):
    """Train (once per session, then from the cache) a small-budget teacher on the offline default."""
    from core.teachers import TeacherSettings, get_teacher
    from core.training import TrainConfig

    def make(model="resnet34", epochs=1, subset=1500, batch_size=64):
        cfg = TrainConfig(epochs=epochs, subset=subset, batch_size=batch_size, lr=0.05)
        return get_teacher(shapes, TeacherSettings(model, cfg), device="cpu", measure=False)
    return make


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A test that must start from an empty cache (cache tests, CLI exit codes)."""
    monkeypatch.setenv("COMPRESSION_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
