"""One ResultStore per process: the store at `<cache>/results.sqlite` is opened (WAL pragma, schema script)
once and reused by the pages and core's defaults, and opened again only when the cache moves."""
import sys

from streamlit.testing.v1 import AppTest

from core import predict, runner
from core.results import ResultStore
from core.runner import ExperimentConfig


def _count_opens(monkeypatch) -> list:
    """Start from no default store; return the list of paths each ResultStore() opened."""
    opened = []
    original = ResultStore.__init__

    def init(self, path=None):
        original(self, path)
        opened.append(self.path)
    monkeypatch.setattr(ResultStore, "__init__", init)
    monkeypatch.setattr(ResultStore, "_default", None)
    monkeypatch.setattr(ResultStore, "_default_key", None)
    return opened


def test_one_default_store_per_cache_dir(tmp_path, monkeypatch):
    opened = _count_opens(monkeypatch)
    monkeypatch.setenv("COMPRESSION_LAB_CACHE", str(tmp_path / "a"))
    a = ResultStore.default()
    assert ResultStore.default() is a and len(opened) == 1
    assert a.path == tmp_path / "a" / "results.sqlite" and a.count() == 0

    from pages import _resources
    assert _resources.store() is a and len(opened) == 1              # the pages share it

    monkeypatch.setattr(runner, "result_key", lambda cfg, teacher, data: "no-such-key")
    assert predict.cached_result(ExperimentConfig(technique="quantize"), None, None) is None
    assert len(opened) == 1                                            # core's default is the same store

    monkeypatch.setenv("COMPRESSION_LAB_CACHE", str(tmp_path / "b"))   # tests move the cache between tests
    b = ResultStore.default()
    assert b is not a and b.path == tmp_path / "b" / "results.sqlite" and len(opened) == 2
    assert ResultStore.default() is b and len(opened) == 2

    b.path.unlink()                                                    # a removed file is opened again
    assert ResultStore.default().count() == 0 and len(opened) == 3


def _page_asking_for_the_store_three_times():
    from pages import _resources
    for _ in range(3):
        _resources.store().count()


def test_page_reruns_open_the_store_once(tmp_path, monkeypatch):
    opened = _count_opens(monkeypatch)
    monkeypatch.setenv("COMPRESSION_LAB_CACHE", str(tmp_path))
    # AppTest.from_function leaves its script as sys.modules["__main__"]: later spawned processes would run it
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    at = AppTest.from_function(_page_asking_for_the_store_three_times).run()
    at.run()
    assert not at.exception and opened == [tmp_path / "results.sqlite"]
