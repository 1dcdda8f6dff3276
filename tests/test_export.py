"""Exports (python -m core export): every format of every technique runs in a fresh process without the lab
and agrees with the lab's own predictions on the images the run evaluated; the card; bad input.

Small and fast: the conftest's 1-epoch Shapes teacher (shared with the quantization and distillation tests),
tiny technique settings, and latency timing stubbed out while the runs are made (exports never read it).
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from core import export as lab_export
from core.cli import main
from core.datasets import load_dataset
from core.predict import predict_probs
from core.runner import ExperimentConfig, load_compressed, run_experiment
from core.training import TrainConfig

TEACHER_CFG = TrainConfig(epochs=1, subset=1500, batch_size=64, lr=0.05)   # the make_teacher fixture's recipe
EVAL = 192   # a size no other test file asks for: these runs (stub latency) never serve another file's request
RUNS = {
    "prune": ("prune", {"ratio": 0.5, "bn_correction": False}),
    "fake4": ("quantize", {"mode": "fake", "bits": 4, "bn_correction": False, "activations": True,
                           "calibration_images": 32}),
    "int8": ("quantize", {"mode": "int8", "calibration_images": 32}),
    "distill": ("distill", {"epochs": 1, "subset": 256}),
    "fp16": ("quantize", {"mode": "fp16"}),
    # a pruned architecture named only by the packed file's header, its weights rounded
    "pipeline": ("pipeline", {"steps": "prune:ratio=0.5,bn_correction=false; quantize:bits=4,bn_correction=false"}),
}
LOW_PRECISION = {"fake4", "int8", "fp16", "pipeline"}   # agreement target 99% (else 99.5%)


def _stub_latency(monkeypatch):
    from core import measure, metrics, runner

    def lat(bs):
        return metrics.Latency(batch_size=bs, median_ms=1.0, p95_ms=1.0, threads=1, runs=1)

    def compare(a, b, batch_size=1, *args, **kwargs):
        return lat(batch_size), lat(batch_size), 1.0
    monkeypatch.setattr(metrics, "compare_latency", compare)
    monkeypatch.setattr(metrics, "measure_latency", lambda m, batch_size=1, *a, **k: lat(batch_size))
    for mod in (runner, measure):   # the ONNX Runtime timing of structured pruning, wherever it lives
        monkeypatch.setattr(mod, "deployed_latency", lambda *a, **k: {}, raising=False)


@pytest.fixture(scope="module")
def runs(make_teacher, shapes):
    teacher = make_teacher("resnet34")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _stub_latency(mp)
        for name, (tech, params) in RUNS.items():
            if name == "fp16" and not __import__("core.techniques.quantization", fromlist=["x"]).half_support("fp16")[0]:
                continue
            cfg = ExperimentConfig("shapes", "resnet34", tech, params, eval_size=EVAL, teacher_train=TEACHER_CFG,
                                   device="cpu")
            out[name] = run_experiment(cfg)
    return teacher, out


def _cli(*argv):
    """(exit code, stdout, stderr) of `python -m core ...` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Every run and the teacher exported through the CLI with --format all: {name: (json line, run key)}."""
    teacher, results = runs
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for name, r in results.items():
        code, out, err = _cli("export", "--run", r.key, "--format", "all", "--out", str(root / name), "--json")
        assert code == 0, err
        done[name] = json.loads(out.strip().splitlines()[-1])
    code, out, err = _cli("export", "--latest", "--technique", "teacher", "--dataset", "shapes", "--model",
                          "resnet34", "--format", "all", "--out", str(root / "teacher"), "--json")
    assert code == 0, err
    done["teacher"] = json.loads(out.strip().splitlines()[-1])
    return done


def _lab_predictions(runs, shapes):
    """The lab's own top-1 on the images each run evaluated (the teacher: those its card reports)."""
    teacher, results = runs
    x, _ = shapes.eval_split(EVAL)
    preds = {name: predict_probs(load_compressed(r), shapes, x).argmax(1).numpy() for name, r in results.items()}
    preds["teacher"] = predict_probs(teacher.model, shapes, x).argmax(1).numpy()
    return x.numpy(), preds


# Each runs in a fresh interpreter that cannot import the lab (_foreign); one with ONNX Runtime only, one with torch.
ORT_CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    import onnxruntime as ort
    assert importlib.util.find_spec("core") is None, "the lab is importable"
    job = json.load(open(sys.argv[1]))
    x = np.load(job["images"], allow_pickle=False)
    out = {}
    for name, path in job["files"].items():
        try:
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            one = sess.run(None, {inp.name: x[:1]})[0]          # batch 1 and the whole set: a dynamic batch
            logits = sess.run(None, {inp.name: x})[0]
            assert one.shape == (1, logits.shape[1]) and np.allclose(one[0], logits[0], atol=1e-3)
            out[name] = {"pred": logits.argmax(1).tolist(), "input": [inp.name, inp.type, inp.shape[1:]]}
        except Exception as exc:   # reported per file: the test of that file fails, not every test
            out[name] = {"error": repr(exc)[:500]}
    assert "torch" not in sys.modules
    print(json.dumps(out))
""")
TORCH_CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    import torch
    assert importlib.util.find_spec("core") is None, "the lab is importable"
    job = json.load(open(sys.argv[1]))
    x = torch.from_numpy(np.load(job["images"], allow_pickle=False))

    def pt2(path):
        model = torch.export.load(path).module()
        assert model(x[:1]).shape[0] == 1                 # a dynamic batch
        return model(x).argmax(1).tolist()                # raw uint8 pixels in

    def state_dict(weights, arch):
        spec = json.load(open(arch))
        ns = {}
        exec(spec["rebuild_source"], ns)
        model = ns["rebuild"](spec, torch.load(weights, weights_only=True))
        norm = spec["normalization"]   # a state dict takes normalized input: the spec says how
        mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
        xn = ((x.float() / 255 - mean) / std).to(getattr(torch, spec["dtype"]))
        return model(xn).float().argmax(1).tolist()

    out = {"pt2": {}, "state_dict": {}}
    with torch.inference_mode():
        for fmt, run in (("pt2", pt2), ("state_dict", state_dict)):
            for name, args in job[fmt].items():
                try:
                    out[fmt][name] = run(*([args] if isinstance(args, str) else args))
                except Exception as exc:   # reported per file
                    out[fmt][name] = {"error": repr(exc)[:500]}
    print(json.dumps(out))
""")


def _foreign(jobs, tmp):
    """Run each (script, job) in its own fresh interpreter, isolated (-I: no PYTHONPATH, no cwd on the path)
    in an empty folder, all at once; their last stdout lines as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    procs = []
    for i, (script, job) in enumerate(jobs):
        (tmp / f"check{i}.py").write_text(script)
        (tmp / f"job{i}.json").write_text(json.dumps(job))
        procs.append(subprocess.Popen([sys.executable, "-I", f"check{i}.py", f"job{i}.json"], cwd=tmp, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.fixture(scope="module")
def round_trip(runs, exported, shapes, tmp_path_factory):
    """{(name, format): top-1 of the exported file in a process without the lab}, the ONNX inputs, the lab's."""
    x, lab = _lab_predictions(runs, shapes)
    tmp = tmp_path_factory.mktemp("foreign")
    np.save(tmp / "images.npy", x)
    files = {n: e["files"] for n, e in exported.items()}
    images = str(tmp / "images.npy")
    ort_out, torch_out = _foreign([
        (ORT_CHECK, {"images": images, "files": {n: f["onnx"] for n, f in files.items()}}),
        (TORCH_CHECK, {"images": images, "pt2": {n: f["pt2"] for n, f in files.items() if "pt2" in f},
                       "state_dict": {n: [f["state_dict"], f["state_dict"][:-len(".state_dict.pt")] + ".arch.json"]
                                      for n, f in files.items() if "state_dict" in f}})], tmp)
    preds = {(n, "onnx"): v.get("error") or np.array(v["pred"]) for n, v in ort_out.items()}
    for fmt in ("pt2", "state_dict"):
        preds.update({(n, fmt): v["error"] if isinstance(v, dict) else np.array(v) for n, v in torch_out[fmt].items()})
    return preds, {n: v.get("input") for n, v in ort_out.items()}, lab


CASES = [(n, f) for n in ["teacher", *RUNS] for f in ("onnx", "pt2", "state_dict")]


@pytest.mark.parametrize("name, fmt", CASES)
def test_export_runs_without_the_lab_and_agrees_with_it(name, fmt, exported, round_trip):
    if name not in exported:
        pytest.skip(f"{name}: this CPU cannot run the mode")
    preds, _, lab = round_trip
    if name == "int8" and fmt != "onnx":   # ONNX Runtime kernels only: said so in the JSON, not written
        assert fmt not in exported[name]["files"] and "ONNX Runtime" in exported[name]["skipped"][fmt]
        return
    got = preds[(name, fmt)]
    assert not isinstance(got, str), got   # the file failed to load or run there
    agreement = float((got == lab[name]).mean())
    assert len(got) == len(lab[name]) > 100 and agreement >= (0.99 if name in LOW_PRECISION else 0.995), agreement


def test_onnx_takes_raw_uint8_pixels(round_trip):
    _, inputs, _ = round_trip
    for name, spec in inputs.items():   # normalization is inside the graph: the input is the 8-bit image
        assert spec == ["pixels", "tensor(uint8)", [3, 32, 32]], name


CARD_KEYS = {"dataset", "classes", "input", "accuracy", "eval_images", "technique", "params", "metrics",
             "lab_version", "cpu", "target"}


def _baselines_of(teacher):
    from core.settings import cache_dir
    files = (cache_dir() / "baselines").glob(f"{teacher.meta['sha256'][:16]}-*.json")
    return [json.loads(f.read_text()) for f in files]


def test_card_beside_the_files_reports_what_the_lab_measured(runs, exported, shapes, round_trip):
    teacher, results = runs
    preds, _, _ = round_trip
    _, y = shapes.eval_split(EVAL)
    for name, e in exported.items():
        card = json.loads(open(e["files"]["card"]).read())
        assert CARD_KEYS <= set(card) and card["lab_version"]
        assert card["input"] == {"shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255], "layout": "NCHW",
                                 "channels": "RGB"}
        assert card["dataset"] == "shapes" and card["classes"] == shapes.classes
        assert {os.path.dirname(p) for p in e["files"].values()} == {os.path.dirname(e["files"]["card"])}
        if name == "teacher":   # never measured on its own: the largest evaluation a run made of it
            seen = [(m["accuracy"], m["eval_images"]) for m in _baselines_of(teacher)]
            assert (card["accuracy"], card["eval_images"]) in seen and card["technique"] == "teacher"
            assert card["eval_images"] == max(n for _, n in seen)
        else:
            r = results[name]
            assert (card["accuracy"], card["eval_images"]) == (r.compressed["accuracy"], r.eval_images)
            assert (card["technique"], card["params"], card["cpu"], card["target"]) == \
                (r.technique, r.params, r.cpu, r.target)
            assert card["metrics"]["accuracy"] == r.compressed["accuracy"]
        if card["eval_images"] == len(y):   # the exported files score what the card says
            for fmt in ("onnx", "pt2", "state_dict"):
                if not isinstance(preds.get((name, fmt), ""), str):
                    assert abs(float((preds[(name, fmt)] == y.numpy()).mean()) - card["accuracy"]) <= 0.011


def test_export_json_names_the_formats_asked_for(runs, tmp_path):
    key = runs[1]["int8"].key
    code, out, err = _cli("export", "--run", key, "--format", "onnx", "--out", str(tmp_path / "x"), "--json")
    line = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and line["run"] == key and set(line["files"]) == {"onnx", "card"}
    assert all(os.path.isfile(p) for p in line["files"].values())
    # without --json: a line per file, and why the formats "all" left out were left out
    code, out, _ = _cli("export", "--run", key, "--out", str(tmp_path / "y"))
    assert code == 0 and "not pt2:" in out and "not state_dict:" in out and ".onnx" in out


def _refused(argv, needle):
    code, out, err = _cli(*argv)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--run", "0123456789abcdef"], "no stored run"),
    (["--run", "teacher-nosuchstem"], "no cached teacher"),
    (["--latest", "--technique", "teacher", "--model", "vgg16"], "no cached teacher"),
    (["--run", "0123456789abcdef", "--dataset", "shapes"], "--latest"),
    (["--latest", "--format", "tflite"], "invalid choice"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(argv, needle, runs, tmp_path):
    out = tmp_path / "out"
    _refused(["export", *argv, "--out", str(out)], needle)
    assert not out.exists()


def test_a_format_the_result_cannot_take_is_refused_before_writing(runs, tmp_path):
    out = tmp_path / "out"
    for fmt in ("pt2", "state_dict"):   # real int8 is ONNX Runtime only
        _refused(["export", "--run", runs[1]["int8"].key, "--format", fmt, "--out", str(out)], fmt)
        assert not out.exists()


def test_an_unwritable_output_folder_exits_2(runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    key = runs[1]["distill"].key
    _refused(["export", "--run", key, "--out", str(blocker)], "cannot write")
    _refused(["export", "--run", key, "--out", str(blocker / "sub")], "cannot write")
    assert blocker.read_text() == "not a folder"


def test_a_failure_midway_leaves_no_file_behind(runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    # the state dict is written after onnx and pt2: those must not stay, not even as temporary files
    monkeypatch.setitem(lab_export._WRITERS, "state_dict", full_disk)
    _refused(["export", "--run", runs[1]["distill"].key, "--format", "all", "--out", str(out)], "No space left")
    assert sorted(os.listdir(out)) == ["mine.txt"]


def test_all_writes_what_a_result_can_take_and_names_the_rest(runs, tmp_path, monkeypatch):
    def cannot(*a, **k):
        raise lab_export.Unexpressible("torch.export: this model cannot be traced")
    # a model one format cannot express: "all" writes the others and says why; asked by name, it is refused
    monkeypatch.setitem(lab_export._WRITERS, "pt2", cannot)
    key = runs[1]["distill"].key
    code, out, err = _cli("export", "--run", key, "--out", str(tmp_path / "all"), "--json")
    line = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and set(line["files"]) == {"onnx", "state_dict", "card"}
    assert "cannot be traced" in line["skipped"]["pt2"]
    assert json.loads(open(line["files"]["card"]).read())["skipped"] == line["skipped"]
    _refused(["export", "--run", key, "--format", "pt2", "--out", str(tmp_path / "pt2")], "cannot be traced")
    assert not (tmp_path / "pt2").exists()


def test_the_app_gets_a_zip_of_every_format_from_a_worker(runs):
    """The download button's export runs as a job (not in the server process) and returns one zip."""
    import io
    import zipfile
    from core import jobs
    out = jobs.run("export", {"run": runs[1]["prune"].key}, owner="test", label="export")
    names = zipfile.ZipFile(io.BytesIO(out["zip"])).namelist()
    assert any(n.endswith(".onnx") for n in names) and any(n.endswith(".pt2") for n in names)
    assert any(n.endswith(".card.json") or "card" in n for n in names) and not out["skipped"]
