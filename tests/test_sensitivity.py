"""The per-layer sensitivity scan (core.sensitivity): one layer changed at a time, structured pruning equal to
torch-pruning's, the cache, the CLI contract and its bad input, the job kind, the heat map and the Layers page."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from core import sensitivity, settings, views
from core.cli import main

EVAL = 200


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher()


def _changed(before: dict, model) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _watch(monkeypatch, model, calls: list):
    """Record, at every evaluation of the scan, which state tensors differ from the teacher's."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = sensitivity.SuffixEvaluator.accuracy

    def accuracy(self, modules):
        calls.append((set(modules), _changed(before, model)))
        return original(self, modules)
    monkeypatch.setattr(sensitivity.SuffixEvaluator, "accuracy", accuracy)
    return before


@pytest.mark.parametrize("technique,method,setting", [("quantize", "per_channel", [8, 3]), ("prune", "unstructured", [0.5])])
def test_each_setting_changes_only_its_own_layer_and_the_teacher_is_restored(teacher, shapes, monkeypatch,
                                                                              technique, method, setting):
    calls: list = []
    before = _watch(monkeypatch, teacher.model, calls)
    out = sensitivity.scan(teacher, shapes, technique, method, setting, EVAL)
    names = [n for n, _ in sensitivity.scan_layers(teacher.model)]
    assert [c[0] for c in calls] == [{n} for n in names for _ in setting]   # every conv/linear layer, one at a time
    for (layer,), changed in ((tuple(m), ch) for m, ch in calls):
        assert changed == {f"{layer}.weight"}, (layer, changed)   # every other tensor bit-for-bit the same
    assert _changed(before, teacher.model) == set()
    assert [r["name"] for r in out["layers"]] == names
    label = sensitivity.setting_label(setting[-1])
    assert all(0 <= r["accuracy"][label] <= 1 for r in out["layers"])
    # fragility: the mean accuracy lost, most fragile first
    frag = {r["name"]: r["fragility"] for r in out["layers"]}
    assert out["fragile"] == sorted(out["fragile"], key=lambda n: -frag[n])
    worst = max(out["layers"], key=lambda r: sum(out["baseline_accuracy"] - a for a in r["accuracy"].values()))
    assert frag[out["fragile"][0]] == pytest.approx(frag[worst["name"]])


def test_structured_scan_equals_torch_pruning_and_touches_only_the_group(teacher, shapes, monkeypatch):
    import torch_pruning as tp
    from core.techniques.pruning import _importance, classifier_head
    model = teacher.model
    x, y = sensitivity._images(shapes, 64, "test")
    dg, groups = sensitivity.structured_groups(model)
    names = {m: n for n, m in model.named_modules()}
    ev = sensitivity.SuffixEvaluator(model, x, y, [{names[d.target.module] for d, _ in g
                                                    if list(d.target.module.parameters(recurse=False))}
                                                   for _, g, _ in groups])
    for rep, group, imp in (groups[0], groups[len(groups) // 2], groups[-1]):
        touched = {names[d.target.module] for d, _ in group if list(d.target.module.parameters(recurse=False))}
        with sensitivity._ZeroedGroup(dg, group, sensitivity.pruned_indices(imp, 0.5)):
            emulated = torch.cat(ev.logits(touched))
        real = copy.deepcopy(model)
        mods = dict(real.named_modules())
        tp.pruner.BasePruner(real, torch.zeros(1, 3, 32, 32), importance=_importance("magnitude"), pruning_ratio=0.0,
                             pruning_ratio_dict={mods[rep]: 0.5}, ignored_layers=[classifier_head(real)]).step()
        assert sum(p.numel() for p in real.parameters()) < sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            assert torch.allclose(emulated, real(x), atol=1e-4), rep

    calls: list = []
    before = _watch(monkeypatch, model, calls)
    out = sensitivity.scan(teacher, shapes, "prune", "structured", [0.5], EVAL)
    assert len(calls) == len(groups)
    for modules, changed in calls:
        assert changed and {k.rsplit(".", 1)[0] for k in changed} <= modules   # nothing outside the group
    assert _changed(before, model) == set()
    rows = {r["name"]: r for r in out["layers"]}
    head = [n for n, m in model.named_modules() if m is classifier_head(model)][0]
    assert rows[head]["accuracy"]["0.5"] is None and head not in out["fragile"]
    # coupled layers (ResNet's residual stream) share their group's row
    stream = [r for r in out["layers"] if r["group"] == rows["layer1.0.conv2"]["group"]]
    assert len(stream) > 1 and len({r["accuracy"]["0.5"] for r in stream}) == 1


def test_cli_contract_cache_and_job_kind(teacher, shapes, capsys):
    from core.worker import Warm, run_streaming
    payload = {"dataset": "shapes", "model": "resnet34", "technique": "prune", "method": "unstructured",
               "settings": [0.3, 0.9], "eval_size": EVAL}
    outcome = dict(run_streaming("sensitivity", payload, {}, Warm(), {}, lambda: False))   # the job kind, in process
    made = outcome["result"]
    assert made["cached"] is False and made["settings"] == [0.3, 0.9]
    files = list((settings.cache_dir() / "sensitivity").glob("*.json"))
    assert any(json.loads(f.read_text())["key"] == made["key"] for f in files)
    from core.teachers import latest_teacher
    newest = latest_teacher(shapes, "resnet34")   # the teacher the command picks (other tests may train newer ones)
    sensitivity.scan(newest, shapes, "quantize", None, [8, 3], EVAL)
    assert main(["sensitivity", "--technique", "quantize", "--settings", "8,3", "--eval-size", str(EVAL),
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("dataset", "model", "technique", "method", "settings", "baseline_accuracy", "layers", "fragile",
              "eval_images", "seconds", "cached"):
        assert k in out, k
    assert out["cached"] is True and out["settings"] == [8, 3] and out["eval_images"] == EVAL
    assert set(out["layers"][0]) >= {"name", "params", "macs", "accuracy"}
    assert set(out["layers"][0]["accuracy"]) == {"8", "3"}
    assert sum(r["params"] for r in out["layers"]) <= sum(p.numel() for p in teacher.model.parameters())
    chart = views.sensitivity_heatmap(out).to_dict()
    assert chart["mark"]["type"] == "rect"
    assert len(views.sensitivity_frame(out)) == 2 * len(out["layers"])


@pytest.mark.parametrize("args,words", [
    (["--technique", "distill"], "invalid choice"),
    (["--technique", "prune", "--method", "per_channel"], "method"),
    (["--technique", "quantize", "--method", "structured"], "method"),
    (["--technique", "prune", "--settings", "0.1,abc"], "settings"),
    (["--technique", "prune", "--settings", "1.5"], "settings"),
    (["--technique", "quantize", "--settings", "4.5"], "settings"),
    (["--technique", "prune", "--model", "resnet8"], "unknown teacher"),
    (["--technique", "prune", "--dataset", "nope"], "unknown dataset"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_cached(fresh_cache, capsys, args, words):
    try:
        code = main(["sensitivity", *args, "--json"])
    except SystemExit as exc:   # argparse's own checks (choices) exit while parsing
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (Path(fresh_cache) / "sensitivity").exists()


def test_layers_page_shows_the_cached_scan(teacher, shapes, monkeypatch):
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest
    original = PagesManager.__init__

    def init(self, *args, **kwargs):   # as tests/test_app.py: st.navigation pages live in pages/
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", init)
    sensitivity.scan(teacher, shapes, "prune", "unstructured", [0.3, 0.9], EVAL)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.session_state["eval_size"] = EVAL
    at.run()
    at.switch_page("pages/layers.py")
    at.session_state["layers.method.prune"] = "unstructured"
    at.session_state["layers.settings.prune"] = "0.3,0.9"
    at.session_state["layers.eval"] = EVAL
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Most fragile layers" in s.value for s in at.subheader)
    assert not at.error
    at.session_state["layers.settings.prune"] = "0.3,x"
    at.run()
    assert any("settings" in e.value for e in at.error)
