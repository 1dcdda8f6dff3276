import json
import multiprocessing as mp
import subprocess
import sys
import time

import pytest
import torch

from core.cli import main
from core.errors import InvalidParameter, LabError
from core.results import ExperimentResult, ResultStore
from core.runner import ExperimentConfig


def _fake_result(i: int, writer: str) -> ExperimentResult:
    m = {"accuracy": 0.5, "size_bytes": 1000 + i, "latency_ms_b1": 1.0, "macs": 10}
    return ExperimentResult(key=f"{writer}-{i}", dataset="shapes", dataset_label="Shapes", model="resnet34",
                            technique="quantize", params={"bits": i}, baseline=m, compressed=m,
                            eval_images=10, seconds=0.1)


def _write_many(path, writer, n):
    store = ResultStore(path)
    for i in range(n):
        store.add(_fake_result(i, writer))


def test_sqlite_store_two_writer_processes_lose_no_row(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultStore(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w, 150)) for w in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ResultStore(path)
    assert store.count() == 300
    import sqlite3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    frame = store.dataframe()
    assert len(frame) == 300 and {"compressed_accuracy", "size_ratio", "technique"} <= set(frame.columns)
    store.delete("a-0")
    assert store.count() == 299 and store.get("a-0") is None and store.get("b-3").params == {"bits": 3}


def test_config_validation_refuses_before_work():
    with pytest.raises(LabError, match="unknown technique"):
        ExperimentConfig(technique="sharpen").validate()
    with pytest.raises(LabError, match="unknown teacher"):
        ExperimentConfig(model="alexnet").validate()
    with pytest.raises(InvalidParameter, match="eval_size"):
        ExperimentConfig(eval_size=-5).validate()
    with pytest.raises(LabError, match="unknown dataset"):
        ExperimentConfig(dataset="mnist").validate()


def _cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:          # argparse rejects bad flags by exiting
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json_has_the_documented_keys(capsys):
    code, out, _ = _cli(capsys, "info", "--json")
    info = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and {"datasets", "models", "students", "devices", "cache"} <= set(info)
    assert all(isinstance(info[k], list) for k in ("datasets", "models", "students", "devices", "cache"))
    assert "shapes" in [d["name"] for d in info["datasets"]] and "cpu" in info["devices"]
    # what this CPU offers int8 (VNNI or not: docs/bench_quantization.md, 2026-12-06) and bf16
    cpu = info["cpu"]
    assert cpu["cores"] >= 1 and cpu["vector"] and cpu["int8_line"].startswith("int8:")
    assert cpu["bf16"] in (True, False) and cpu["int8_vnni"] in (True, False, None)
    code, text, _ = _cli(capsys, "info")
    assert code == 0 and f"CPU: {cpu['name']}" in text and cpu["int8_line"] in text


@pytest.mark.parametrize("caps, words", [
    ({"architecture": "x86_64", "avx2": True, "cpu_name": "Old"}, "no VNNI"),
    ({"architecture": "x86_64", "avx2": True, "avx512_vnni": True, "cpu_name": "New"}, "VNNI 8-bit dot products"),
    ({"architecture": "aarch64", "cpu_name": "Arm"}, "no 16-bit saturation"),
])
def test_cpu_summary_says_what_int8_gains_here(caps, words, monkeypatch):
    from core import hardware
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    s = hardware.cpu_summary()
    assert words in s["int8_line"] and s["name"] == caps["cpu_name"]
    assert s["int8_vnni"] is {"Old": False, "New": True, "Arm": None}[caps["cpu_name"]]
    assert hardware.cpu_line(s).startswith(caps["cpu_name"] + ",")


def _cache_listing(cache_dir):
    return sorted((str(p), p.stat().st_size) for p in cache_dir.rglob("*") if p.is_file())


def test_train_json_then_served_from_cache(capsys, fresh_cache):
    args = ["train", "--dataset", "shapes", "--model", "resnet34", "--epochs", "1", "--subset", "128",
            "--batch-size", "64", "--json", "--quiet"]
    code, out, _ = _cli(capsys, *args)
    first = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and first["cached"] is False
    for k in ("dataset", "model", "accuracy", "size_bytes", "params", "macs", "latency_ms_b1",
              "latency_ms_b64", "history", "cached"):
        assert k in first
    assert 0 <= first["accuracy"] <= 1 and len(first["history"]) == 1 and first["params"] == 21_289_802
    t0 = time.perf_counter()
    code, out, _ = _cli(capsys, *args)
    second = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and second["cached"] is True and second["accuracy"] == first["accuracy"]
    assert time.perf_counter() - t0 < 5


def test_a_flag_two_techniques_share_is_one_flag_for_both():
    import argparse
    from core.cli import compress_cmd
    parser = argparse.ArgumentParser()
    compress_cmd.register(parser.add_subparsers())
    for tech, flag, want in (("quantize", "--no-bn-correction", False), ("prune", "--bn-correction", True)):
        args = parser.parse_args(["compress", "--technique", tech, flag])
        assert compress_cmd.params_from_args(args) == {"bn_correction": want}
    assert compress_cmd.params_from_args(parser.parse_args(["compress", "--technique", "prune"])) == {}


def test_every_command_prints_its_help(capsys):
    from core.cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices   # argparse keeps them nowhere public
    assert {"train", "compress", "sweep", "prepare", "info"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()   # a stray "%" in a registry help text used to break `compress --help`
        assert name in text and "--" in text
    assert "90% of the calibration images" in " ".join(commands["compress"].format_help().split())   # unwrapped


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "imagenet"], "unknown dataset"),
    (["train", "--model", "resnet9000"], "unknown teacher"),
    (["train", "--epochs", "-1"], "out of range"),
    (["train", "--epochs", "many"], "not an integer"),
    (["train", "--dataset", "cifar10"], "CIFAR-10 is not in"),
    (["train", "--dataset", "folder:/definitely/not/here"], "does not exist"),
    (["compress", "--technique", "prune", "--ratio", "1.2"], "out of range"),
    (["compress", "--technique", "quantize", "--bits", "0"], "out of range"),
    (["compress", "--technique", "distill", "--temperature", "-1"], "out of range"),
    (["compress", "--technique", "quantize", "--ratio", "0.5"], "belongs to --technique prune"),
    (["compress", "--technique", "distill", "--no-bn-correction"], "belongs to --technique prune"),
    (["compress", "--technique", "quantize", "--calibration-images", "-5"], "out of range"),  # flags from the registry
    (["compress", "--technique", "distill", "--batch-size", "x"], "not an integer"),
    (["compress", "--technique", "zip"], "invalid choice"),
])
def test_bad_input_one_line_exit_2_cache_untouched(capsys, fresh_cache, argv, needle):
    fresh_cache.mkdir(parents=True, exist_ok=True)
    before = _cache_listing(fresh_cache)
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert _cache_listing(fresh_cache) == before


def test_cli_process_exit_code_and_single_stderr_line(tmp_path):
    env = {"COMPRESSION_LAB_CACHE": str(tmp_path), "COMPRESSION_LAB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "core", "train", "--dataset", "svhn", "--data-root",
                        str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "SVHN" in lines[0] and str(tmp_path / "none") in lines[0]
    p = subprocess.run([sys.executable, "-m", "core", "train", "--epochs", "x"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
