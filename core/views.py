"""What the app shows, built without Streamlit: Altair charts, tables, Pareto fronts, image grids.

Pages call these and only place the results; everything here is plain pandas/Altair/numpy so it
can be tested without a browser and reused in notebooks.
"""
from __future__ import annotations

import math

import altair as alt
import numpy as np
import pandas as pd

from .results import cpu_counts

TEACHER_COLOR = "#333333"


def technique_colors() -> dict[str, str]:
    """Each registered technique's colour (its spec's), and the teacher's."""
    from .techniques import get_technique, technique_names
    return {**{n: get_technique(n).color for n in technique_names()}, "teacher": TEACHER_COLOR}


SERIES_TITLES = {"train": "teacher", "finetune": "fine-tuning", "distill": "distilled student",
                 "scratch": "student from scratch"}


# ----------------------------------------------------------------------------- formatting
def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_count(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def fmt_pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%"


def _ratio(before, after) -> float | None:
    try:
        if not before or not after or math.isnan(before) or math.isnan(after):
            return None
    except TypeError:
        return None
    return before / after


def _card(label, value, before, delta, good: bool | None, arrow: str) -> dict:
    return {"label": label, "value": value, "before": before, "delta": delta,
            "delta_color": "gray" if good is None else "green" if good else "red",
            "delta_arrow": "off" if good is None else arrow}


def metric_cards(baseline: dict, compressed: dict) -> list[dict]:
    """Before/after cards for st.metric: label, value, before, delta text, delta_color, delta_arrow.

    Accuracy shows percentage points; size, parameters and MACs a reduction factor; latency a
    speed-up (within 10% counts as "about the same": timing noise). Green means better for the
    user (more accurate, smaller, faster).
    """
    b, c = baseline or {}, compressed or {}
    acc_b, acc_c = b.get("accuracy"), c.get("accuracy")
    if acc_b is None or acc_c is None:
        cards = [_card("Accuracy", fmt_pct(acc_c), fmt_pct(acc_b), None, None, "off")]
    else:
        d = 100 * (acc_c - acc_b)
        good = None if abs(d) < 0.05 else d > 0
        cards = [_card("Accuracy", fmt_pct(acc_c), fmt_pct(acc_b), f"{d:+.1f} pts", good,
                       "up" if d > 0 else "down")]
    for key, label, fmt in (("size_bytes", "Size", fmt_bytes), ("params", "Parameters", fmt_count),
                            ("macs", "MACs", fmt_count), ("latency_ms_b1", "Latency (batch 1, CPU)", fmt_ms)):
        r = _ratio(b.get(key), c.get(key))
        faster = key.startswith("latency")
        if r is None:
            cards.append(_card(label, fmt(c.get(key)), fmt(b.get(key)), None, None, "off"))
        elif abs(r - 1) < (0.10 if faster else 0.02):  # latency: timing noise is not a speed-up
            cards.append(_card(label, fmt(c.get(key)), fmt(b.get(key)), "about the same", None, "off"))
        elif r > 1:
            cards.append(_card(label, fmt(c.get(key)), fmt(b.get(key)),
                               f"{r:.2f}× {'faster' if faster else 'smaller'}", True, "down"))
        else:
            cards.append(_card(label, fmt(c.get(key)), fmt(b.get(key)),
                               f"{1 / r:.2f}× {'slower' if faster else 'larger'}", False, "up"))
    return cards


def batch_plan_words(plans: dict | None) -> str:
    """A sentence saying which models ran a batch split into one part per core (ort_session.BATCH_PLANS)."""
    split = [role for role, plan in (plans or {}).items() if plan == "split"]
    if not split:
        return ""
    who = "Both models" if len(split) == len(plans) else f"The {split[0]} model"
    return (f" {who} ran the batch of 64 cut into one part per core, each on its own thread "
            "(faster for {} than one run sharing every layer between the cores).".format(
                "them" if len(split) > 1 else "it"))


def deployed_latency_line(baseline: dict, compressed: dict) -> str | None:
    """One sentence setting the eager speed-up beside ONNX Runtime's, when the result has both."""
    d = (compressed.get("extra") or {}).get("deployed")
    if not d:
        return None
    if "error" in d:
        return f"Not timed in ONNX Runtime: the model could not be exported ({d['error']})."
    eager = _ratio(baseline.get("latency_ms_b64"), compressed.get("latency_ms_b64"))
    macs = _ratio(baseline.get("macs"), compressed.get("macs"))
    return (f"Deployed in ONNX Runtime (fp32; batch norm, ReLU and adds fused into the convolutions): "
            f"batch 64 {fmt_ms(d['baseline_ms_b64'])} → {fmt_ms(d['compressed_ms_b64'])}, "
            f"{d['speedup_b64']:.2f}× faster (eager PyTorch: {eager:.2f}×; MACs {macs:.2f}× fewer); "
            f"batch 1 {d['speedup_b1']:.2f}× faster.{batch_plan_words(d.get('batch_plan_b64'))}" if eager and macs else
            f"Deployed in ONNX Runtime (fp32): batch 64 {d['speedup_b64']:.2f}× faster, batch 1 {d['speedup_b1']:.2f}×.")


# ----------------------------------------------------------------------------- training curves
def history_frame(series: dict[str, list[dict]], metrics=("val_accuracy", "train_accuracy")) -> pd.DataFrame:
    """Per-epoch history rows per series (e.g. "distill", "scratch") as one long table for charts."""
    rows = []
    for name, hist in series.items():
        for h in hist or []:
            for m in metrics:
                if h.get(m) is not None:
                    rows.append({"epoch": int(h["epoch"]), "series": SERIES_TITLES.get(name, name),
                                 "split": "validation" if m.startswith("val") else "train",
                                 "accuracy": float(h[m])})
    return pd.DataFrame(rows, columns=["epoch", "series", "split", "accuracy"])


def history_chart(frame: pd.DataFrame, reference: float | None = None, reference_label: str = "teacher",
                  height: int = 260) -> alt.Chart:
    """Accuracy per epoch: one colour per series, solid validation and dashed train lines."""
    base = alt.Chart(frame).encode(
        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("series:N", title=None),
        strokeDash=alt.StrokeDash("split:N", sort=["validation", "train"],
                                  legend=alt.Legend(title=None, symbolType="stroke")),
        tooltip=["series", "split", "epoch", alt.Tooltip("accuracy:Q", format=".1%")])
    chart = base.mark_line(point=True)
    if reference is not None and not math.isnan(reference):
        ref = pd.DataFrame({"accuracy": [reference], "label": [f"{reference_label} {reference:.1%}"]})
        rule = alt.Chart(ref).mark_rule(color="#333", strokeDash=[2, 2]).encode(y="accuracy:Q")
        text = alt.Chart(ref).mark_text(align="left", dx=4, dy=-6, color="#333").encode(
            y="accuracy:Q", text="label:N", x=alt.value(0))
        chart = chart + rule + text
    return chart.properties(height=height)


# ----------------------------------------------------------------------------- trade-offs
# a Pareto front compares runs of one teacher on one dataset: across datasets (or teachers) a run is
# "dominated" by one that solved an easier problem or started from a bigger model, which says nothing
FRONT_GROUPS = ("dataset", "model")


def pareto_mask(frame: pd.DataFrame, cost: str, gain: str = "compressed_accuracy",
                by: tuple | list | None = FRONT_GROUPS) -> pd.Series:
    """True for runs no other run beats: none is at most as costly and at least as accurate (and better in one).

    One front per group of `by` (default: per dataset and teacher; the columns the frame has);
    `by=None` or `()` makes one front over every run."""
    ok = frame[cost].notna() & frame[gain].notna()
    mask = pd.Series(False, index=frame.index)
    keys = [c for c in (by or ()) if c in frame.columns]
    sub = frame.loc[ok, [cost, gain] + keys]
    groups = sub.groupby(keys, sort=False, dropna=False) if keys else [(None, sub)]
    for _, g in groups:
        # sort by cost ascending, accuracy descending; a point is on the front if it beats every cheaper one
        order = g[[cost, gain]].astype(float).sort_values([cost, gain], ascending=[True, False])
        best = -math.inf
        for idx, value in order[gain].items():
            if value > best:
                mask[idx] = True
                best = value
    return mask


def front_label(frame: pd.DataFrame, by: tuple | list | None = FRONT_GROUPS) -> pd.Series:
    """The front each run belongs to, as text ("cifar10 · resnet34"); one label when `by` is empty."""
    keys = [c for c in (by or ()) if c in frame.columns]
    if not keys:
        return pd.Series("all runs", index=frame.index, dtype=object)
    return frame[keys].astype(str).agg(" · ".join, axis=1)


def tradeoff_chart(frame: pd.DataFrame, cost: str, cost_title: str, log_x: bool = True, divide: float = 1.0,
                   height: int = 380, by: tuple | list | None = FRONT_GROUPS) -> alt.LayerChart:
    """Accuracy vs a cost (size, latency), coloured by technique, the Pareto fronts drawn as step lines.

    One front per dataset and teacher (`by`; None: one front over all runs). `divide` rescales the
    cost for the axis (bytes -> MB); each teacher is drawn as a cross.
    """
    df = frame.copy()
    df = df[df[cost].notna() & df["compressed_accuracy"].notna()]
    df["pareto"] = pareto_mask(df, cost, by=by) if len(df) else pd.Series(dtype=bool)
    df["front"] = front_label(df, by) if len(df) else pd.Series(dtype=object)
    df["on front"] = np.where(df["pareto"], "Pareto front", "dominated")
    df["x"] = df[cost] / divide
    scale = alt.Scale(type="log") if log_x else alt.Scale(zero=False)
    colors = technique_colors()
    domain = [t for t in colors if t in set(df.get("technique", []))] or list(colors)
    color = alt.Color("technique:N", scale=alt.Scale(domain=domain, range=[colors[t] for t in domain]))
    x = alt.X("x:Q", title=cost_title, scale=scale, axis=alt.Axis(format="~g"))
    y = alt.Y("compressed_accuracy:Q", title="accuracy", axis=alt.Axis(format="%"), scale=alt.Scale(zero=False))
    tooltip = [alt.Tooltip("setting:N"), alt.Tooltip("dataset:N"), alt.Tooltip("model:N"),
               alt.Tooltip("compressed_accuracy:Q", title="accuracy", format=".1%"),
               alt.Tooltip("x:Q", title=cost_title, format=",.3~f"), alt.Tooltip("on front:N"),
               alt.Tooltip("front:N", title="front of")]
    points = alt.Chart(df).mark_point(filled=True, size=80).encode(
        x=x, y=y, color=color, shape=alt.Shape("on front:N", title=None,
                                               scale=alt.Scale(domain=["Pareto front", "dominated"],
                                                               range=["diamond", "circle"])),
        tooltip=tooltip)
    front = df[df["pareto"]].sort_values(cost)
    line = alt.Chart(front).mark_line(interpolate="step-after", color="#888", strokeDash=[4, 3]).encode(
        x=x, y=y, detail="front:N")   # one line per front, never joined across datasets or teachers
    layers = [line, points]
    bcost = cost.replace("compressed_", "baseline_")
    if len(frame) and bcost in frame and "baseline_accuracy" in frame:
        per = [c for c in ("dataset", "model") if c in frame.columns]   # a teacher per dataset and model
        teach = frame.drop_duplicates(per)[per + [bcost, "baseline_accuracy"]].dropna()
        if len(teach):
            label = "teacher " + teach["model"] + (" on " + teach["dataset"].astype(str) if "dataset" in teach else "")
            teach = pd.DataFrame({"x": teach[bcost] / divide, "compressed_accuracy": teach["baseline_accuracy"],
                                  "label": label})
            layers.append(alt.Chart(teach).mark_point(shape="cross", size=140, color="#333", strokeWidth=2)
                          .encode(x=x, y=y, tooltip=["label:N"]))
    return alt.layer(*layers).properties(height=height)


def main_param(params) -> str | None:
    """The parameter a sweep chart puts on its x-axis: the first numeric one, else the first."""
    params = list(params)
    for p in params:
        if p.kind in ("int", "float"):
            return p.name
    return params[0].name if params else None


def sweep_frame(frame: pd.DataFrame, param: str) -> pd.DataFrame:
    """One technique's runs with the swept parameter as a column (from the JSON params)."""
    import json
    if frame.empty:
        return frame.assign(**{param: []})
    df = frame.copy()
    df[param] = [json.loads(p).get(param) for p in df["params"]]
    return df


def sweep_chart(frame: pd.DataFrame, param: str, height: int = 260) -> alt.Chart:
    """Accuracy against the technique's main parameter; the teacher's accuracy as a dashed rule."""
    df = sweep_frame(frame, param)
    numeric = pd.api.types.is_numeric_dtype(df[param]) if len(df) else True
    x = alt.X(f"{param}:{'Q' if numeric else 'N'}", title=param)
    pts = alt.Chart(df).mark_point(filled=True, size=70).encode(
        x=x, y=alt.Y("compressed_accuracy:Q", title="accuracy", axis=alt.Axis(format="%"),
                     scale=alt.Scale(zero=False)),
        color=alt.Color("setting:N", legend=None),
        tooltip=["setting:N", alt.Tooltip("compressed_accuracy:Q", title="accuracy", format=".1%"),
                 alt.Tooltip("compressed_size_bytes:Q", title="bytes", format=",")])
    layers = [pts]
    if len(df) and df["baseline_accuracy"].notna().any():
        ref = pd.DataFrame({"y": [float(df["baseline_accuracy"].dropna().iloc[-1])]})
        layers.append(alt.Chart(ref).mark_rule(strokeDash=[2, 2], color="#333").encode(y="y:Q"))
    return alt.layer(*layers).properties(height=height)


def best_per_dataset(frame: pd.DataFrame, min_size_ratio: float = 1.0) -> pd.DataFrame:
    """Per dataset: the most accurate run that is at least `min_size_ratio` times smaller than its teacher."""
    cols = ["dataset", "technique", "setting", "compressed_accuracy", "accuracy_drop", "size_ratio",
            "latency_speedup_b1"]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    ok = frame[frame["size_ratio"].fillna(0) >= min_size_ratio]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    idx = ok.groupby("dataset")["compressed_accuracy"].idxmax()
    return ok.loc[idx, cols].reset_index(drop=True)


def timed_elsewhere_line(result_cpu: str, here: str) -> str | None:
    """A sentence when a stored result's latency was timed on another CPU than this one (None otherwise,
    or when the result predates the lab recording it)."""
    if not result_cpu or result_cpu == here:
        return None
    return (f"Latency timed on another CPU ({result_cpu}), not on this one ({here}): its milliseconds and "
            "speed-ups are that machine's (delete the run on the Compare page and run it again to time it here).")


def cpu_mix_line(frame: pd.DataFrame) -> str | None:
    """A sentence when the runs' latencies come from several CPUs (a cache copied between machines)."""
    counts = cpu_counts(frame)
    if len(counts) < 2:
        return None
    parts = "; ".join(f"{cpu}: {n} run{'s' * (n != 1)}" for cpu, n in counts.items())
    return (f"These runs were timed on {len(counts)} CPUs ({parts}): compare latencies only between runs "
            "timed on the same CPU (the cpu column).")


def compare_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the Compare page shows (and downloads), in a readable order."""
    cols = ["created", "dataset", "model", "technique", "setting", "eval_images", "baseline_accuracy",
            "compressed_accuracy", "accuracy_drop", "baseline_size_bytes", "compressed_size_bytes",
            "size_ratio", "baseline_latency_ms_b1", "compressed_latency_ms_b1", "latency_speedup_b1",
            "baseline_params", "compressed_params", "baseline_macs", "compressed_macs", "macs_ratio",
            "scratch_accuracy", "runtime", "target", "cpu", "node", "seconds", "key"]
    return frame[[c for c in cols if c in frame]] if len(frame) else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- probabilities
def topk_frame(probs, classes: list[str], k: int = 5) -> pd.DataFrame:
    p = np.asarray(probs, dtype=float)
    order = np.argsort(-p)[:k]
    return pd.DataFrame({"class": [classes[i] for i in order], "probability": p[order],
                         "rank": np.arange(1, len(order) + 1)})


def topk_chart(frame: pd.DataFrame, title: str, color: str = "#4c78a8") -> alt.LayerChart:
    """Horizontal bars of the top classes, most likely on top, each labelled with its percentage."""
    base = alt.Chart(frame).encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y("class:N", sort=alt.EncodingSortField("rank", order="ascending"), title=None),
        tooltip=["class", alt.Tooltip("probability:Q", format=".1%")])
    bars = base.mark_bar(color=color)
    labels = base.mark_text(align="left", dx=4, color="#333").encode(text=alt.Text("probability:Q", format=".1%"))
    return alt.layer(bars, labels, title=title).properties(height=alt.Step(28))


# ----------------------------------------------------------------------------- images
def upscale(img_chw: np.ndarray, size: int = 128) -> np.ndarray:
    """3×h×w uint8 -> size×size×3, nearest neighbour, so the pixels the model sees stay visible."""
    img = np.asarray(img_chw).transpose(1, 2, 0)
    f = max(1, size // img.shape[0])
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def bordered(img_hwc: np.ndarray, color: tuple[int, int, int] | None, width: int = 6) -> np.ndarray:
    if color is None:
        return img_hwc
    out = img_hwc.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


WRONG = (214, 39, 40)
DISAGREE = (255, 159, 14)


def grid_items(frame: pd.DataFrame, images: np.ndarray, only_disagreements: bool = False,
               size: int = 96) -> list[dict]:
    """Tiles for the predictions grid: the upscaled image, a border colour and a caption.

    Red border: the compressed model is wrong. Orange: it is right but disagrees with the teacher.
    """
    items = []
    for pos, row in enumerate(frame.itertuples(index=False)):
        if only_disagreements and not row.disagree:
            continue
        wrong = row.compressed_pred != row.true
        color = WRONG if wrong else DISAGREE if row.disagree else None
        mark = "✗" if wrong else "≠" if row.disagree else "✓"
        caption = f"{mark} true: {row.true}\nteacher: {row.teacher_pred}\ncompressed: {row.compressed_pred}"
        items.append({"image": bordered(upscale(images[pos], size), color), "caption": caption,
                      "wrong": bool(wrong), "disagree": bool(row.disagree)})
    return items


# ----------------------------------------------------------------------------- home page diagrams
# Small and legend-free: Streamlit gives a chart exactly its height, so legends would squeeze the plot.
DIAGRAM_HEIGHT = 210


def prune_diagram() -> alt.Chart:
    """Weights sorted by magnitude; the smallest half (grey) is what pruning removes."""
    rng = np.random.default_rng(3)
    w = np.sort(np.abs(rng.normal(0, 1, 24)))[::-1]
    df = pd.DataFrame({"weight": [f"w{i:02d}" for i in range(24)], "magnitude": w,
                       "fate": np.where(np.arange(24) < 12, "kept", "pruned")})
    return alt.Chart(df, title="grey: smallest weights, pruned").mark_bar().encode(
        x=alt.X("weight:N", sort=None, axis=None), y=alt.Y("magnitude:Q", title="|weight|"),
        color=alt.Color("fate:N", scale=alt.Scale(domain=["kept", "pruned"], range=["#e45756", "#dddddd"]),
                        legend=None),
        tooltip=["fate"]).properties(height=DIAGRAM_HEIGHT)


def quantize_diagram(bits: int = 3) -> alt.Chart:
    """A float signal (grey) and its uniform low-bit version (blue): few levels = few bits per weight."""
    x = np.linspace(-1, 1, 200)
    y = np.sin(2.5 * x) * 0.9
    levels = 2 ** bits - 1
    q = np.round((y + 1) / 2 * levels) / levels * 2 - 1
    df = pd.concat([pd.DataFrame({"x": x, "value": y, "kind": "float32"}),
                    pd.DataFrame({"x": x, "value": q, "kind": f"{bits}-bit"})])
    return alt.Chart(df, title=f"grey: float32, blue: {bits}-bit").mark_line().encode(
        x=alt.X("x:Q", axis=None), y=alt.Y("value:Q", title="weight value"),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["float32", f"{bits}-bit"], range=["#bbbbbb", "#4c78a8"]),
                        legend=None)).properties(height=DIAGRAM_HEIGHT)


def distill_diagram(temperature: float = 4.0) -> alt.Chart:
    """The teacher's outputs for a disc at T=1 (light) and T (green): soft targets show which classes look alike."""
    logits = np.array([6.0, 3.5, 2.5, 1.0, 0.0])
    names = ["disc", "ring", "ellipse", "square", "plus"]
    rows = []
    for t, label in ((1.0, "T=1"), (temperature, f"T={temperature:g}")):
        p = np.exp(logits / t)
        p /= p.sum()
        rows += [{"class": n, "probability": float(v), "targets": label} for n, v in zip(names, p)]
    return alt.Chart(pd.DataFrame(rows), title=f"light: T=1, green: T={temperature:g}").mark_bar().encode(
        x=alt.X("class:N", sort=None, title=None, axis=alt.Axis(labelAngle=-40)), xOffset="targets:N",
        y=alt.Y("probability:Q", title="teacher's probability", axis=alt.Axis(format="%", tickCount=4)),
        color=alt.Color("targets:N", scale=alt.Scale(range=["#9ecae9", "#54a24b"]), legend=None),
        tooltip=["targets", "class", alt.Tooltip("probability:Q", format=".0%")]).properties(height=DIAGRAM_HEIGHT)


DIAGRAMS = {"prune": prune_diagram, "quantize": quantize_diagram, "distill": distill_diagram}


def diagram(technique: str) -> alt.Chart | None:
    """The Home page's picture of a technique; None for one that has none (it is optional)."""
    make = DIAGRAMS.get(technique)
    return make() if make else None


# ----------------------------------------------------------------------------- pipelines
PIPELINE_MEASURES = (("size_bytes", "file size (MB)", 2 ** 20), ("macs", "MACs (M)", 1e6),
                     ("latency_ms_b1", "latency, batch 1 (ms)", 1.0), ("accuracy", "accuracy (%)", 0.01))


def pipeline_frame(baseline: dict, steps: list[dict]) -> pd.DataFrame:
    """One row per (stage, measure): the teacher, then the model after each step."""
    stages = [("0 teacher", baseline)] + [(f"{i + 1} {s['technique']}", s["metrics"]) for i, s in enumerate(steps)]
    rows = []
    for label, m in stages:
        for key, title, unit in PIPELINE_MEASURES:
            v = (m or {}).get(key)
            if isinstance(v, (int, float)) and v == v:
                rows.append({"stage": label, "measure": title, "value": v / unit})
    return pd.DataFrame(rows, columns=["stage", "measure", "value"])


def pipeline_chart(baseline: dict, steps: list[dict], height: int = 160) -> alt.FacetChart:
    """The waterfall: size, MACs, latency and accuracy after each step, one panel each."""
    frame = pipeline_frame(baseline, steps)
    base = alt.Chart(frame).encode(
        x=alt.X("stage:N", sort=None, title=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("value:Q", title=None),
        tooltip=["stage", "measure", alt.Tooltip("value:Q", format=",.3~f")])
    layered = alt.layer(base.mark_bar(color="#b279a2"), base.mark_text(dy=-6, fontSize=10).encode(
        text=alt.Text("value:Q", format=",.3~g")))
    return layered.properties(height=height, width=180).facet(
        column=alt.Column("measure:N", title=None, sort=[t for _, t, _ in PIPELINE_MEASURES])
    ).resolve_scale(y="independent")


# ----------------------------------------------------------------------------- per-layer view
LAYER_COLUMNS = ["name", "kind", "params", "macs", "channels", "channels_kept", "sparsity", "bits", "weight_error"]


def layers_frame(layers: list[dict]) -> pd.DataFrame:
    """A result's `layers` (core.layers) as a table, in model order; channels as "in → out"."""
    frame = pd.DataFrame(layers, columns=LAYER_COLUMNS)
    frame["channels"] = [f"{c[0]} → {c[1]}" if isinstance(c, (list, tuple)) and len(c) == 2 else "" for c in
                         frame["channels"]]
    return frame


def layers_chart(layers: list[dict], height: int = 180) -> alt.VConcatChart:
    """Parameters per layer coloured by weight bits (top); channels kept, sparsity and weight error per
    layer (bottom). Layers in model order; the tooltip has every field."""
    frame = layers_frame(layers)
    frame["order"] = range(len(frame))
    frame["bits"] = frame["bits"].map(lambda b: f"{b} bits" if b == b and b is not None else "?")
    many = len(frame) > 40
    x = alt.X("name:N", sort=alt.SortField("order"), title=None,
              axis=alt.Axis(labels=not many, labelAngle=-60, labelLimit=120, ticks=not many))
    width = min(900, max(320, 14 * len(frame)))   # a bar per layer: DenseNet-121 has 121
    tooltip = ["name:N", "kind:N", alt.Tooltip("params:Q", format=","), alt.Tooltip("macs:Q", format=","),
               "channels:N", alt.Tooltip("channels_kept:Q", format=".0%"), alt.Tooltip("sparsity:Q", format=".1%"),
               "bits:N", alt.Tooltip("weight_error:Q", format=".3g")]
    bits_order = sorted(frame["bits"].unique(), key=lambda b: int(b.split()[0]) if b[0].isdigit() else 99)
    params = alt.Chart(frame, title="parameters per layer (colour: weight bits)").mark_bar().encode(
        x=x, y=alt.Y("params:Q", title="parameters"),
        color=alt.Color("bits:N", sort=bits_order, scale=alt.Scale(scheme="viridis"), title="weights"),
        tooltip=tooltip).properties(height=height, width=width)
    fractions = frame.melt(id_vars=["name", "order", "kind", "params", "macs", "channels", "bits"],
                           value_vars=["channels_kept", "sparsity", "weight_error"], var_name="measure")
    fractions = fractions.dropna(subset=["value"])
    lines = alt.Chart(fractions, title="channels kept, sparsity and weight error (relative L2) per layer").mark_line(
        point=True).encode(
        x=x, y=alt.Y("value:Q", title="fraction", axis=alt.Axis(format="%")),
        color=alt.Color("measure:N", scale=alt.Scale(domain=["channels_kept", "sparsity", "weight_error"],
                                                     range=["#e45756", "#4c78a8", "#f58518"]), title=None),
        tooltip=["name:N", "measure:N", alt.Tooltip("value:Q", format=".3g"), alt.Tooltip("params:Q", format=","),
                 "channels:N", "bits:N"]).properties(height=height, width=width)
    return alt.vconcat(params, lines).resolve_scale(color="independent")


# ----------------------------------------------------------------------------- sensitivity scan (core.sensitivity)
def sensitivity_frame(scan: dict) -> pd.DataFrame:
    """One row per (layer, setting) of a sensitivity scan: layer, order, setting, accuracy, drop (points)."""
    base = scan["baseline_accuracy"]
    rows = []
    for i, layer in enumerate(scan["layers"]):
        for s in scan["settings"]:
            label = f"{s:g}" if isinstance(s, float) else str(s)
            acc = layer["accuracy"].get(label)
            rows.append({"layer": layer["name"], "order": i, "setting": label, "accuracy": acc,
                         "drop": None if acc is None else 100 * (base - acc), "params": layer.get("params"),
                         "group": layer.get("group") or layer["name"]})
    return pd.DataFrame(rows, columns=["layer", "order", "setting", "accuracy", "drop", "params", "group"])


def sensitivity_heatmap(scan: dict, height_per_layer: int = 14) -> alt.Chart:
    """Layer × setting heat map of the accuracy a scan measured (layers in model order, settings as scanned;
    colour: points lost against the teacher; empty cells: not scannable, e.g. the classifier's outputs)."""
    frame = sensitivity_frame(scan)
    order = [f"{s:g}" if isinstance(s, float) else str(s) for s in scan["settings"]]
    title = "bits" if scan.get("technique") == "quantize" else "fraction removed"
    many = frame["layer"].nunique() > 60
    return alt.Chart(frame.dropna(subset=["accuracy"])).mark_rect().encode(
        x=alt.X("setting:O", sort=order, title=title),
        y=alt.Y("layer:N", sort=alt.SortField("order"), title=None, axis=alt.Axis(labels=not many, labelLimit=220)),
        color=alt.Color("drop:Q", title="points lost", scale=alt.Scale(scheme="reds", domainMin=0)),
        tooltip=["layer:N", "setting:O", alt.Tooltip("accuracy:Q", format=".1%"),
                 alt.Tooltip("drop:Q", format=".1f", title="points lost"), alt.Tooltip("params:Q", format=","),
                 "group:N"],
    ).properties(height=max(160, height_per_layer * frame["layer"].nunique()), width=min(600, 60 * len(order)))
