"""The Streamlit app through streamlit.testing (AppTest): every page, real small runs, uploads.

A tiny cached teacher (conftest `make_teacher`) is what the app picks up through
`latest_teacher`, and evaluation uses 200 test images, so the whole file stays fast.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import views
from core.techniques import get_technique, technique_names
from core.results import results_frame

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(autouse=True)
def _navigation_pages_under_pages_dir(monkeypatch):
    """Our st.navigation pages live in pages/ (the project's fixed layout). AppTest flags any app
    with a pages/ folder as an old-style multipage app and then runs a switched-to page without
    the entrypoint (no sidebar). The real server lets st.navigation win; make AppTest do the same."""
    from streamlit.runtime.pages_manager import PagesManager
    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False
    monkeypatch.setattr(PagesManager, "__init__", init)
# every page: the files, and one page per registered technique (by its name)
PAGES = ["pages/home.py", "pages/teacher.py", *technique_names(), "pages/predictions.py", "pages/try_image.py",
         "pages/compare.py"]


def new_app(eval_size: int = 200) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["eval_size"] = eval_size
    return at.run()


def visit(at: AppTest, page: str) -> AppTest:
    """Open a page file, or a technique's generated page by its registry name."""
    if page.endswith(".py"):
        at.switch_page(page)
    else:   # a callable page: AppTest.switch_page takes files only, so pick its registered hash by URL
        url = get_technique(page).page_url
        at._page_hash = next(h for h, info in at._registered_pages.items() if info.get("url_pathname") == url)
    at.run()
    assert not at.exception, f"{page}: {[e.value for e in at.exception]}"
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [s.value for s in at.success]
    return "\n".join(str(p) for p in parts)


def metrics(at: AppTest) -> dict:
    return {m.label: m for m in at.metric}


def png(size=(48, 40), mode="RGB", fmt="PNG") -> bytes:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", epochs=1, subset=1500)


# ----------------------------------------------------------------------------- first launch
def test_every_technique_page_answers_a_deep_link():
    """A fresh server serves a first request for /<page> from pages/<page>.py (test_browser checks one): every
    registered technique's page has that file, and it only hands the session to app.py's navigation."""
    root = Path(__file__).resolve().parent.parent
    for name in technique_names():
        stub = root / "pages" / f"{get_technique(name).page_url}.py"
        assert stub.is_file(), f"{name}: add {stub.relative_to(root)} (see docs/contributing.md)"
        import ast
        body = ast.parse(stub.read_text()).body
        assert [ast.unparse(n) for n in body if not isinstance(n, ast.Expr)] == ["import pages"], stub
    # until st.navigation runs, every file in pages/ is a page whose URL is its name without leading "_" or
    # digits: two files with one URL break every request (pages/_pipeline.py and pages/pipeline.py did)
    import re
    urls = [re.sub(r"^[_\d]+", "", f.stem) for f in (root / "pages").glob("*.py") if f.stem != "__init__"]
    assert len(urls) == len(set(urls)), sorted(u for u in urls if urls.count(u) > 1)


def test_every_page_loads_on_first_launch_with_nothing_cached(fresh_cache):
    at = new_app()
    assert not at.exception
    assert "Generated data" in texts(at)
    assert metrics(at)["Teacher"].delta == "not trained yet"
    for page in PAGES[1:]:
        visit(at, page)
    visit(at, "quantize")
    assert "no cached" in texts(at).lower() and "Train it first" in texts(at)
    visit(at, "pages/teacher.py")
    assert at.number_input(key="teacher.epochs").value == 5   # small default for the offline dataset
    from core.training import bf16_training_supported
    assert at.toggle(key="teacher.bf16").value == bf16_training_supported("cpu")   # the recipe's precision


def test_an_unreachable_cluster_is_one_message_and_no_local_fallback(monkeypatch):
    import socket

    from core import engine, jobs
    with socket.socket() as s:                       # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setattr(jobs, "_MANAGER", None)     # as in a freshly started server
    monkeypatch.setattr(engine, "_ENGINE", None)
    at = visit(new_app(), "pages/class_view.py")
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in errors[0]
    assert "unset RAY_ADDRESS" in errors[0] and not at.dataframe
    assert engine._ENGINE is None and jobs._MANAGER is None   # nothing was started here instead


def test_missing_dataset_offline_is_a_message_not_a_traceback():
    at = new_app()
    at.selectbox(key="dataset").set_value("cifar10").run()
    assert not at.exception
    assert any("Dataset unavailable" in e.value for e in at.error)
    visit(at, "prune")
    assert any("Dataset unavailable" in e.value for e in at.error)
    assert "Shapes works offline" in texts(at)


# ----------------------------------------------------------------------------- with a teacher
def test_teacher_page_shows_the_cached_teacher(teacher):
    at = visit(new_app(), "pages/teacher.py")
    m = metrics(at)
    assert {"Accuracy", "Size", "Parameters", "MACs", "Latency (batch 1, CPU)"} <= set(m)
    assert m["Parameters"].value.endswith("M")          # resnet34: ~21M parameters
    assert m["Latency (batch 1, CPU)"].value.endswith("ms")   # timed, not "–"
    assert "Current teacher" in [s.value for s in at.subheader]


def test_teacher_latency_is_timed_even_after_a_compress_run_stored_the_accuracy(teacher, shapes):
    from core.measure import baseline_metrics, has_latency, stored_baseline
    baseline_metrics(teacher, shapes, 500)               # what a compress run leaves: no latency
    assert not has_latency(stored_baseline(teacher.meta, 500))
    at = visit(new_app(500), "pages/teacher.py")
    assert metrics(at)["Latency (batch 1, CPU)"].value.endswith("ms")


def test_teacher_page_estimates_the_training_time_for_the_current_settings(teacher):
    at = visit(new_app(), "pages/teacher.py")
    at.number_input(key="teacher.epochs").set_value(3).run()
    at.button(key="teacher.estimate").click().run()
    assert not at.exception, [e.value for e in at.exception]
    info = [i.value for i in at.info if "Estimated on this machine" in i.value]
    assert info and "for 3 epochs" in info[0]


def test_quantization_slider_change_reruns_and_shows_a_result(teacher):
    at = visit(new_app(), "quantize")
    assert "bits=8" in texts(at)                        # auto-run on load: no training involved
    size8 = metrics(at)["Size"].value
    at.slider(key="quantize.bits").set_value(4).run()
    assert not at.exception
    assert "bits=4" in texts(at) and "computed in" in texts(at)
    size4 = metrics(at)["Size"].value
    assert size4 != size8 and "smaller" in metrics(at)["Size"].delta
    t0 = time.perf_counter()
    at.slider(key="quantize.bits").set_value(8).run()   # same settings again: the stored result
    assert time.perf_counter() - t0 < 30
    assert "stored result (instant)" in texts(at) and metrics(at)["Size"].value == size8
    assert at.get("download_button"), "the compressed model can be downloaded"
    assert "Your quantization runs so far (2)" in [s.value for s in at.subheader]


def test_slider_results_are_computed_in_ray_workers_and_listed_in_the_class_view(teacher):
    import os

    from core.results import ResultStore
    at = visit(new_app(), "quantize")
    at.slider(key="quantize.bits").set_value(3).run()
    assert not at.exception and "bits=3" in texts(at)
    run = next(r for r in ResultStore().all(technique="quantize") if r.params.get("bits") == 3)
    assert run.engine["kind"] == "ray" and run.engine["local"] is True and run.engine["node"]
    from core import jobs
    job = next(j for j in jobs.manager().jobs() if j.kind == "compress" and j.payload["technique"] == "quantize"
               and j.payload["params"].get("bits") == 3)
    assert job.pid and job.pid != os.getpid() and job.owners[0].startswith("browser")
    visit(at, "pages/class_view.py")          # no password set: this browser is the instructor
    labels = " ".join(str(df.value.to_csv()) for df in at.dataframe)
    assert "bits': 3" in labels and run.engine["node"] in labels
    visit(at, "pages/compare.py")             # every run says where it ran
    assert run.engine["node"] in at.dataframe[0].value["node"].tolist()


def test_pruning_slider_change_and_distillation_run(teacher):
    at = visit(new_app(), "prune")
    at.slider(key="prune.ratio").set_value(0.3).run()
    assert not at.exception
    assert "ratio=0.3" in texts(at)
    assert "smaller" in metrics(at)["Parameters"].delta  # structured pruning removes channels

    visit(at, "distill")
    assert "press **Run**" in texts(at)                 # training settings never auto-run
    at.radio(key="distill.student").set_value("cnn_small")
    at.slider(key="distill.epochs").set_value(1)
    at.number_input(key="distill.subset").set_value(500)
    at.run()
    at.button(key="distill.run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    m = metrics(at)
    assert "Same student trained from scratch (no teacher)" in m
    assert "student=cnn_small" in texts(at)


def test_predictions_grid_and_disagreement_filter(teacher):
    at = visit(new_app(), "pages/predictions.py")
    if "run one first" in texts(at):                    # run in isolation: make one result first
        visit(at, "quantize")
        visit(at, "pages/predictions.py")
    m = metrics(at)
    assert {"Teacher correct", "Compressed correct", "Disagreements"} <= set(m)
    n_images = len(at.get("image"))
    assert n_images >= 1
    disagreements = int(m["Disagreements"].value.split()[0])
    at.toggle(key="pred.only").set_value(True).run()
    assert not at.exception
    shown = len(at.get("image"))
    assert shown == disagreements or (disagreements == 0 and "agree on every image" in texts(at))


UPLOADS = [
    ("photo.png", png(), True),
    ("wide.jpg", png((300, 120), fmt="JPEG"), True),
    ("gray16.png", png(mode="I;16"), True),
    ("rgba.png", png(mode="RGBA"), True),
    ("cmyk.jpg", png(mode="CMYK", fmt="JPEG"), True),
    ("photo.webp", png(fmt="WEBP"), True),
    ("notes.png", b"this is not an image at all", "is not an image the lab can read"),  # an image's name
    ("cut.png", png((64, 64))[:200], "damaged or truncated"),
]


@pytest.mark.parametrize("name,content,ok", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_upload_good_and_bad_images(teacher, name, content, ok):
    """ok: True for images that must be shown, else the phrase the error must contain."""
    at = visit(new_app(), "pages/try_image.py")
    assert len(at.get("image")) == 1                     # a bundled example is shown first
    at.radio(key="try.source").set_value("Upload").run()
    at.file_uploader(key="try.upload").upload(name, content, "image/png").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    if ok is True:
        assert not errors
        assert len(at.get("image")) == 1 and at.get("image")[0].captions[0].startswith(f"{name}: as the model sees it")
    else:   # one plain sentence for the class, no decoder internals
        assert errors and errors[0].startswith(f"Cannot use {name}: ") and ok in errors[0]
        assert "BytesIO" not in errors[0] and "Error" not in errors[0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_upload_decompression_bomb_is_refused(teacher):
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, format="PNG")   # 48 Mpixel, tiny file
    at = visit(new_app(), "pages/try_image.py")
    at.radio(key="try.source").set_value("Upload").run()
    at.file_uploader(key="try.upload").upload("bomb.png", buf.getvalue(), "image/png").run()
    assert not at.exception
    assert any("too large" in e.value for e in at.error)


def test_compare_table_download_and_delete(teacher):
    from core.results import ResultStore
    at = visit(new_app(), "pages/compare.py")
    if not at.dataframe:
        visit(at, "quantize")
        visit(at, "pages/compare.py")
    before = ResultStore().count()
    assert before >= 1 and at.dataframe
    assert any(b.label == "Download as CSV" for b in at.get("download_button"))
    assert "Accuracy vs size" in [s.value for s in at.subheader]
    key = at.multiselect(key="cmp.doomed").options[0]
    at.multiselect(key="cmp.doomed").select(key).run()
    at.button(key="cmp.delete").click().run()
    assert not at.exception
    assert ResultStore().count() == before - 1


def test_runs_timed_on_another_cpu_are_flagged(teacher):
    """A cache copied from another machine: the Compare page says latencies come from two CPUs, and the
    technique page says where a stored result was timed."""
    import dataclasses
    from core import hardware
    from core.results import ResultStore
    here, elsewhere = hardware.cpu_id(), "Another CPU, 64 cores, AVX512"
    store = ResultStore()
    at = visit(new_app(), "quantize")         # the default run (stored by an earlier test)
    mine = store.get(at.session_state["last_result_key"])
    assert mine.cpu == here and not any("another CPU" in w.value for w in at.warning)
    copy = dataclasses.replace(mine, key=mine.key + "-copied", cpu=elsewhere)
    store.add(copy)
    try:
        at = visit(new_app(), "pages/compare.py")
        warned = [w.value for w in at.warning if "CPUs" in w.value]
        assert warned and f"{elsewhere}: 1 run" in warned[0] and here in warned[0]
        assert "cpu" in at.dataframe[0].value.columns
        store.add(dataclasses.replace(mine, cpu=elsewhere))   # the page's own run, as if copied in
        at = visit(new_app(), "quantize")
        assert any(w.value.startswith(f"Latency timed on another CPU ({elsewhere})") for w in at.warning)
    finally:
        store.delete(copy.key)
        store.add(mine)
    assert views.timed_elsewhere_line("", here) is None          # rows stored before the lab recorded it
    assert views.cpu_mix_line(results_frame([mine])) is None


# ----------------------------------------------------------------------------- view helpers
def test_pareto_front_keeps_only_undominated_runs():
    df = pd.DataFrame({"cost": [1, 2, 3, 4, 2.5], "compressed_accuracy": [0.5, 0.8, 0.7, 0.9, 0.8]})
    assert views.pareto_mask(df, "cost").tolist() == [True, True, False, True, False]


def test_metric_cards_say_smaller_faster_and_points():
    cards = {c["label"]: c for c in views.metric_cards(
        {"accuracy": 0.9, "size_bytes": 4000, "params": 100, "macs": 10, "latency_ms_b1": 2.0},
        {"accuracy": 0.85, "size_bytes": 1000, "params": 100, "macs": 5, "latency_ms_b1": 1.95})}
    assert cards["Accuracy"]["delta"] == "-5.0 pts" and cards["Accuracy"]["delta_color"] == "red"
    assert cards["Size"]["delta"] == "4.00× smaller" and cards["Size"]["delta_color"] == "green"
    assert cards["Parameters"]["delta"] == "about the same"
    assert cards["Latency (batch 1, CPU)"]["delta"] == "about the same"   # 2.5% is timing noise


def test_deployed_latency_line_sets_onnx_runtime_beside_eager():
    base = {"macs": 75.0e6, "latency_ms_b64": 60.0}
    deployed = {"runtime": "onnxruntime-cpu", "baseline_ms_b64": 47.0, "compressed_ms_b64": 12.5,
                "speedup_b64": 3.76, "speedup_b1": 6.2}
    line = views.deployed_latency_line(base, {"macs": 19.4e6, "latency_ms_b64": 25.0, "extra": {"deployed": deployed}})
    assert "3.76× faster (eager PyTorch: 2.40×; MACs 3.87× fewer)" in line and "batch 1 6.20×" in line
    assert "split" not in line   # no plan recorded: nothing said about it
    deployed["batch_plan_b64"] = {"baseline": "whole", "compressed": "split"}
    line = views.deployed_latency_line(base, {"macs": 19.4e6, "latency_ms_b64": 25.0, "extra": {"deployed": deployed}})
    assert line.endswith("batch 1 6.20× faster. The compressed model ran the batch of 64 cut into one part per "
                         "core, each on its own thread (faster for it than one run sharing every layer between the cores).")
    deployed["batch_plan_b64"]["baseline"] = "split"
    line = views.deployed_latency_line(base, {"macs": 19.4e6, "latency_ms_b64": 25.0, "extra": {"deployed": deployed}})
    assert "Both models ran the batch of 64 cut into one part per core" in line and "faster for them" in line
    assert views.deployed_latency_line(base, {"macs": 1, "extra": {}}) is None     # not timed: nothing to say
    failed = {"extra": {"deployed": {"runtime": "onnxruntime-cpu", "error": "UnsupportedOperatorError: x"}}}
    assert "could not be exported (UnsupportedOperatorError" in views.deployed_latency_line(base, failed)


def test_best_per_dataset_respects_the_minimum_compression():
    df = pd.DataFrame({"dataset": ["a", "a", "b"], "technique": ["prune", "quantize", "distill"],
                       "setting": ["p", "q", "d"], "compressed_accuracy": [0.9, 0.8, 0.7],
                       "accuracy_drop": [0.0, 0.1, 0.2], "size_ratio": [1.5, 4.0, 10.0],
                       "latency_speedup_b1": [1.0, 1.0, 3.0]})
    assert views.best_per_dataset(df, 1.0)["technique"].tolist() == ["prune", "distill"]
    assert views.best_per_dataset(df, 2.0)["technique"].tolist() == ["quantize", "distill"]
    assert views.best_per_dataset(df, 50.0).empty


def test_compare_shows_the_sidebar_targets_runs_and_the_others_on_request(teacher):
    """Latencies only compare within one deployment target: Compare starts on the sidebar's, and every
    run records the target it was timed for."""
    import dataclasses
    from core.results import ResultStore
    store = ResultStore()
    at = visit(new_app(), "quantize")
    mine = store.get(at.session_state["last_result_key"])
    assert mine.target == "edge-cpu" and at.session_state["target"] == "edge-cpu"
    server = dataclasses.replace(mine, key=mine.key + "-server", target="cpu-server")
    store.add(server)
    try:
        at = visit(new_app(), "pages/compare.py")
        shown = at.dataframe[0].value
        assert "target" in shown.columns and set(shown["target"]) == {"edge-cpu"}
        at.multiselect(key="cmp.targets").select("cpu-server").run()
        assert set(at.dataframe[0].value["target"]) == {"edge-cpu", "cpu-server"}
    finally:
        store.delete(server.key)


def test_pipeline_page_adds_a_step_runs_and_draws_every_step(teacher):
    at = visit(new_app(), "pipeline")
    assert at.session_state["pipeline.steps"] == ["prune:ratio=0.5", "quantize:bits=4"]
    at.button(key="pipeline.remove.1").click().run()         # drop the default quantize step
    assert at.session_state["pipeline.steps"] == ["prune:ratio=0.5"]
    at.selectbox(key="pipeline.add.kind").select("quantize").run()
    at.slider(key="pipeline.add.quantize.bits").set_value(6).run()
    at.button(key="pipeline.add").click().run()
    assert at.session_state["pipeline.steps"] == ["prune:ratio=0.5", "quantize:bits=6"]
    at.button(key="pipeline.run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "After each step" in [s.value for s in at.subheader]
    assert "2 steps, 0 served from the cache" in texts(at)
    assert any(b.label == "Download the compressed file" for b in at.get("download_button"))
