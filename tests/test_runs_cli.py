"""`python -m core runs`: list the stored runs (table, JSON, CSV), filter them, delete one (class mode: instructor only)."""
import csv
import io
import json
from datetime import datetime, timezone

import pytest

from core.cli import main

COLUMNS = ["key", "dataset", "model", "technique", "params", "accuracy", "size_bytes", "latency_ms_b1",
           "created", "target"]
T0 = 1_700_000_000.0   # 2023-11-14T22:13:20 UTC


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:          # argparse rejects bad flags by exiting
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _add(store, key, created, dataset="shapes", model="resnet34", technique="quantize", params=None,
         accuracy=0.9, size=1000, latency=1.5, target="edge-cpu", with_file=True):
    """A stored run (and, like a real one, its compressed model file with a sidecar in the cache)."""
    import torch
    from core import cache
    from core.results import ExperimentResult
    from core.runner import compressed_path
    path = compressed_path(key)
    if with_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save_entry(path, {"w": torch.ones(3)}, {"kind": "compressed", "key": key})
    base = {"accuracy": 0.95, "size_bytes": 4000, "latency_ms_b1": 3.0}
    r = ExperimentResult(key=key, dataset=dataset, dataset_label=dataset, model=model, technique=technique,
                         params=params if params is not None else {"mode": "int8"}, baseline=base,
                         compressed={"accuracy": accuracy, "size_bytes": size, "latency_ms_b1": latency},
                         eval_images=100, seconds=0.1, model_path=str(path), target=target, created=created)
    store.add(r)
    return r


@pytest.fixture
def store(fresh_cache, monkeypatch):
    from core.cli import runs_cmd
    from core.results import ResultStore
    for var in ("COMPRESSION_LAB_INSTRUCTOR_PASSWORD", "COMPRESSION_LAB_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runs_cmd, "SECRETS_FILES", ())   # this machine's Streamlit secrets play no part
    s = ResultStore()
    # added out of time order: the listing sorts by creation, newest last
    _add(s, "bbbb000000000002", T0 + 200, technique="prune", params={"method": "structured", "ratio": 0.5},
         accuracy=0.8, size=2000, latency=2.0)
    _add(s, "aaaa000000000001", T0, accuracy=0.91, size=1100, latency=1.1)
    _add(s, "cccc000000000003", T0 + 400, dataset="cifar10", model="vgg16_bn", technique="distill",
         params={"student": "resnet8"}, accuracy=None, size=500, latency=0.5, target="cpu-server")
    return s


def test_runs_table_lists_every_run_newest_last(capsys, store):
    code, out, err = _cli(capsys, "runs")
    assert code == 0 and err == ""
    keyed = [ln for ln in out.splitlines() if any(k in ln for k in ("aaaa", "bbbb", "cccc"))]
    assert [ln.split()[2] for ln in keyed] == ["aaaa000000000001", "bbbb000000000002", "cccc000000000003"]
    assert "2023-11-14 22:13" in keyed[0] and "0.9100" in keyed[0] and "prune(method=structured, ratio=0.5)" in keyed[1]
    assert "cpu-server" in keyed[2] and "vgg16_bn" in keyed[2]


def test_runs_json_has_exactly_the_contract_keys_and_filters(capsys, store):
    code, out, _ = _cli(capsys, "runs", "--json")
    rows = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and [r["key"] for r in rows] == ["aaaa000000000001", "bbbb000000000002", "cccc000000000003"]
    assert all(list(r) == COLUMNS for r in rows)
    first = rows[0]
    assert first == {"key": "aaaa000000000001", "dataset": "shapes", "model": "resnet34", "technique": "quantize",
                     "params": {"mode": "int8"}, "accuracy": 0.91, "size_bytes": 1100, "latency_ms_b1": 1.1,
                     "created": "2023-11-14T22:13:20+00:00", "target": "edge-cpu"}
    assert datetime.fromisoformat(rows[2]["created"]) == datetime.fromtimestamp(T0 + 400, timezone.utc)
    assert rows[2]["accuracy"] is None and rows[2]["target"] == "cpu-server"

    def keys(*flags):
        code, out, _ = _cli(capsys, "runs", "--json", *flags)
        assert code == 0
        return [r["key"][:4] for r in json.loads(out.strip().splitlines()[-1])]
    assert keys("--technique", "prune") == ["bbbb"]
    assert keys("--dataset", "shapes") == ["aaaa", "bbbb"]
    assert keys("--model", "vgg16_bn") == ["cccc"]
    assert keys("--dataset", "shapes", "--technique", "distill") == []
    code, out, _ = _cli(capsys, "runs", "--technique", "distill", "--dataset", "svhn")
    assert code == 0 and "No stored runs match." in out


def test_runs_csv_parses_with_the_same_columns(capsys, store):
    code, out, _ = _cli(capsys, "runs", "--csv", "--dataset", "shapes")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(rows[0]) == COLUMNS and len(rows) == 2
    assert [r["key"] for r in rows] == ["aaaa000000000001", "bbbb000000000002"]
    assert json.loads(rows[1]["params"]) == {"method": "structured", "ratio": 0.5}   # a comma inside survives
    assert float(rows[1]["accuracy"]) == 0.8 and int(rows[1]["size_bytes"]) == 2000
    assert rows[0]["created"] == "2023-11-14T22:13:20+00:00"


def test_delete_removes_the_row_and_its_compressed_file_only(capsys, store):
    from core.runner import compressed_path
    doomed, kept = compressed_path("bbbb000000000002"), compressed_path("aaaa000000000001")
    assert doomed.exists() and doomed.with_suffix(".json").exists()
    code, out, err = _cli(capsys, "runs", "--delete", "bbbb000000000002", "--json")
    assert code == 0 and err == ""
    report = json.loads(out.strip().splitlines()[-1])
    assert report["deleted"] == "bbbb000000000002" and len(report["files"]) == 2
    assert store.get("bbbb000000000002") is None and store.count() == 2
    assert not doomed.exists() and not doomed.with_suffix(".json").exists()
    assert kept.exists() and kept.with_suffix(".json").exists()


def test_delete_never_touches_a_file_outside_the_compressed_folder(capsys, store, tmp_path):
    from core.results import ExperimentResult
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"x")
    r = store.get("aaaa000000000001").to_dict()
    store.add(ExperimentResult.from_dict({**r, "key": "dddd000000000004", "model_path": str(outside)}))
    code, _, _ = _cli(capsys, "runs", "--delete", "dddd000000000004")
    assert code == 0 and store.get("dddd000000000004") is None and outside.exists()


@pytest.mark.parametrize("argv, needle", [
    (["runs", "--delete", "nope0000"], "no stored run has key 'nope0000'"),
    (["runs", "--technique", "sharpen"], "unknown technique 'sharpen'"),
    (["runs", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["runs", "--model", "alexnet"], "unknown model 'alexnet'"),
    (["runs", "--json", "--csv"], "not allowed with"),
    (["runs", "--delete", "aaaa000000000001", "--technique", "quantize"], "--delete takes one run key"),
    (["runs", "--password", "x"], "unrecognized arguments"),   # a password never goes on the command line
])
def test_bad_input_one_line_exit_2_nothing_deleted(capsys, store, argv, needle):
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and needle in _one_line(err)
    assert store.count() == 3


class _Terminal:
    def isatty(self):
        return True


def test_class_mode_refuses_delete_without_the_instructor_password(capsys, store, monkeypatch):
    from core.cli import runs_cmd
    from core.runner import compressed_path
    monkeypatch.setenv("COMPRESSION_LAB_INSTRUCTOR_PASSWORD", "open sesame")
    key = "aaaa000000000001"
    code, _, err = _cli(capsys, "runs", "--delete", key)          # no password, stdin not a terminal
    assert code == 2 and "only the instructor deletes runs" in _one_line(err)
    monkeypatch.setenv("COMPRESSION_LAB_PASSWORD", "open sesame!")
    code, _, err = _cli(capsys, "runs", "--delete", key)
    assert code == 2 and "wrong instructor password" in _one_line(err)
    assert store.get(key) is not None and compressed_path(key).exists()
    code, out, _ = _cli(capsys, "runs", "--json")                 # everyone may still list
    assert code == 0 and len(json.loads(out.strip().splitlines()[-1])) == 3

    monkeypatch.setenv("COMPRESSION_LAB_PASSWORD", "open sesame")
    code, out, err = _cli(capsys, "runs", "--delete", key)
    assert code == 0 and err == "" and store.get(key) is None and not compressed_path(key).exists()

    # at a terminal the password is asked for, hidden, when the environment does not give it
    monkeypatch.delenv("COMPRESSION_LAB_PASSWORD")
    asked = []
    monkeypatch.setattr(runs_cmd.sys, "stdin", _Terminal())
    monkeypatch.setattr(runs_cmd.getpass, "getpass", lambda prompt: asked.append(prompt) or "open sesame")
    code, _, err = _cli(capsys, "runs", "--delete", "bbbb000000000002")
    assert code == 0 and asked == ["Instructor password: "] and store.get("bbbb000000000002") is None


def test_class_mode_from_the_apps_streamlit_secret(capsys, store, monkeypatch, tmp_path):
    from core.cli import runs_cmd
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('instructor_password = "from the app"\n')
    monkeypatch.setattr(runs_cmd, "SECRETS_FILES", (secrets,))
    code, _, err = _cli(capsys, "runs", "--delete", "aaaa000000000001")
    assert code == 2 and "only the instructor" in _one_line(err) and store.count() == 3
    monkeypatch.setenv("COMPRESSION_LAB_PASSWORD", "from the app")
    code, _, _ = _cli(capsys, "runs", "--delete", "aaaa000000000001")
    assert code == 0 and store.count() == 2
    secrets.write_text("instructor_password = [broken\n")          # unreadable: refuse, never open up
    code, _, err = _cli(capsys, "runs", "--delete", "bbbb000000000002")
    assert code == 2 and "cannot read" in _one_line(err) and store.count() == 2
