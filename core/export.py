"""Take a model home: any stored result, or any cached teacher, exported in formats that run without the lab.

- ONNX: fp32 for teachers, pruned models and students (simulated low-bit weights carry their rounded
  values, activation rounding included); the stored QDQ graph for real int8; fp16/bf16 results store
  their weights in that type (ONNX Runtime computes in fp32).
- `.pt2`: a `torch.export` program, loadable with `torch.export.load(path).module()`.
- state_dict: tensors only (`torch.load(path, weights_only=True)`) plus `<name>.arch.json`, whose
  `rebuild_source` rebuilds the module from torch and torchvision alone (pruned layers resized).
- a model card (`<name>.card.json`) beside them: dataset, classes in output order, input spec, metrics.

The ONNX and `.pt2` models take plain pixels: the dataset's normalization is inside the graph, so
the input is uint8 N×3×32×32 RGB in [0, 255] and the output the logits, one column per class.

Nothing is half-written: every file goes to a temporary name in the output folder and all of them
are renamed into place only once every one is complete.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import cache, settings
from .errors import LabError

FORMATS = ("onnx", "pt2", "state_dict")
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
# what every exported graph takes: raw 8-bit pixels (normalization is inside the graph)
PIXEL_INPUT = {"shape": [None, 3, 32, 32], "dtype": "uint8", "range": [0, 255], "layout": "NCHW", "channels": "RGB"}
TEACHER_PREFIX = "teacher-"   # a teacher's run key: this + the stem of its cache file
ARCH_FORMAT = "lab-arch-v1"
CARD_METRICS = ["accuracy", "eval_images", "size_bytes", "gzip_bytes", "params", "nonzero_params", "macs",
                "latency_ms_b1", "latency_p95_ms_b1", "latency_ms_b64", "latency_p95_ms_b64", "threads",
                "threads_b1", "latency_runtime"]
class Unexpressible(LabError):
    """A format cannot hold this model: refused when asked for by name, listed as skipped under "all"."""


ORT_ONLY = ("it is an ONNX Runtime model (real int8 kernels) that torch.export and a state dict cannot "
            "express; export it as onnx")


@functools.lru_cache(maxsize=1)
def lab_version() -> str:
    """core.__version__ when the package defines one, else the git commit of the checkout, else "unknown"."""
    import core
    version = getattr(core, "__version__", None)
    if version:
        return str(version)
    try:
        import subprocess
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=settings.PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"0+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ----------------------------------------------------------------------------- what is exported
@dataclass
class Source:
    """One exportable thing: a stored run, or a cached teacher (technique "teacher")."""
    run: str
    technique: str
    dataset: str
    model: str                     # the teacher architecture the run started from
    params: dict
    metrics: dict                  # what the lab measured for the exported model
    weights_path: Path
    teacher_path: Path | None
    baseline_metrics: dict | None = None
    cpu: str | None = None
    target: str = "edge-cpu"
    created: float | None = None
    notes: list = field(default_factory=list)
    result: object = None          # the ExperimentResult (None for a teacher)

    @property
    def stem(self) -> str:
        key = self.run[len(TEACHER_PREFIX):] if self.run.startswith(TEACHER_PREFIX) else self.run
        return cache.slug(f"{self.model}-{self.technique}-{key}")


def _pick_metrics(m: dict | None) -> dict:
    return {k: m[k] for k in CARD_METRICS if m and k in m}


def _from_result(r) -> Source:
    return Source(run=r.key, technique=r.technique, dataset=r.dataset, model=r.model, params=dict(r.params),
                  metrics=_pick_metrics(dict(r.compressed, eval_images=r.compressed.get("eval_images", r.eval_images))),
                  weights_path=Path(r.model_path), teacher_path=Path(r.teacher_path) if r.teacher_path else None,
                  baseline_metrics=_pick_metrics(r.baseline), cpu=r.cpu or None,
                  target=getattr(r, "target", None) or "edge-cpu", created=r.created, notes=list(r.notes), result=r)


def _teacher_metrics(meta: dict) -> dict:
    """The teacher's own measurement (full test set), else the largest baseline a run measured of it."""
    if meta.get("metrics"):
        return _pick_metrics(meta["metrics"])
    sha = (meta.get("sha256") or "x")[:16]
    best = None
    for f in (settings.cache_dir() / "baselines").glob(f"{sha}-*.json"):
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if best is None or (m.get("eval_images") or 0) > (best.get("eval_images") or 0):
            best = m
    return _pick_metrics(best)


def _from_teacher(path: Path, meta: dict) -> Source:
    settings_ = dict(meta.get("settings") or {})
    settings_.pop("dataset", None)   # the fingerprint: the card names the dataset already
    notes = [] if meta.get("metrics") else (
        ["the teacher's accuracy is what a compression run measured of it on its evaluation images"]
        if _teacher_metrics(meta) else ["the teacher was never measured: no accuracy to report"])
    return Source(run=TEACHER_PREFIX + path.stem, technique="teacher", dataset=meta["dataset"], model=meta["model"],
                  params=settings_, metrics=_teacher_metrics(meta), weights_path=path, teacher_path=path,
                  cpu=meta.get("cpu") or None, target=meta.get("target") or "edge-cpu",
                  created=meta.get("created_ts"), notes=notes)


def _teachers() -> list[tuple[Path, dict]]:
    """Every finished cached teacher, newest first."""
    return [(Path(m["path"]), m) for m in cache.list_entries("teachers") if m.get("kind", "teacher") == "teacher"]


def find_run(key: str, store=None) -> Source:
    """A stored run by its key, or a cached teacher by "teacher-<stem>"."""
    key = (key or "").strip()
    if key.startswith(TEACHER_PREFIX):
        stem = key[len(TEACHER_PREFIX):]
        for path, meta in _teachers():
            if path.stem == stem:
                return _from_teacher(path, meta)
        raise LabError(f"no cached teacher {key!r} (teacher keys are 'teacher-' + the stem of the file under "
                       f"{settings.cache_dir() / 'teachers'})")
    from .results import ResultStore
    r = (store or ResultStore.default()).get(key)
    if r is None:
        raise LabError(f"no stored run {key!r} (a run key is the 16-character key of a compress result; "
                       "teachers are 'teacher-<stem>')")
    return _from_result(r)


def find_latest(dataset: str | None = None, model: str | None = None, technique: str | None = None,
                store=None) -> Source:
    """The newest stored run (or, with technique "teacher", cached teacher) matching the filters."""
    want = ", ".join(f"{k} {v}" for k, v in (("dataset", dataset), ("model", model), ("technique", technique)) if v)
    if technique == "teacher":
        for path, meta in _teachers():
            if (not dataset or meta.get("dataset") == dataset) and (not model or meta.get("model") == model):
                return _from_teacher(path, meta)
        raise LabError(f"no cached teacher{' with ' + want if want else ''}")
    from .results import ResultStore
    runs = [r for r in (store or ResultStore.default()).all(dataset, technique)
            if (not model or r.model == model) and Path(r.model_path).exists()]
    if not runs:
        raise LabError(f"no stored run{' with ' + want if want else ''} (use --technique teacher for teachers)")
    return _from_result(max(runs, key=lambda r: r.created))


# ----------------------------------------------------------------------------- loading the model
@dataclass
class Loaded:
    module: nn.Module | None       # the model as the lab runs it (None: ONNX Runtime only)
    onnx: bytes | None             # an ONNX Runtime-only graph (int8), float "input" -> "logits"
    precision: str                 # fp32, int8, fp16, bf16, or "fp32 (weights rounded to N bits)"
    arch: str | None               # the lab architecture name of `module`
    num_classes: int
    refused: dict = field(default_factory=dict)   # format -> why it cannot be exported


def _arch_name(source: Source, state) -> str | None:
    if source.technique == "teacher":
        return source.model
    if isinstance(state, dict):
        for k in ("arch", "student"):   # pruning records its architecture, distillation its student
            if isinstance(state.get(k), str):
                return state[k]
        if state.get("format") == "packfile":   # a pipeline: the packed file's header names it
            from . import packfile
            return packfile.read_header(bytes(state["file"].numpy().tobytes())).get("arch")
    return source.model if source.technique == "quantize" else None


def load(source: Source, data) -> Loaded:
    """The source's model, rebuilt by the lab's own loader from its cache file (weights_only)."""
    meta = cache.read_sidecar(source.weights_path)
    if meta is None:
        raise LabError(f"the saved model of {source.run} ({source.weights_path}) is missing; run it again")
    state = cache.load_state(source.weights_path, meta)
    num_classes = data.num_classes
    if source.technique == "teacher":
        from .models import build_model
        with torch.device("meta"):   # no weight initialisation: the saved tensors are assigned
            module = build_model(source.model, int(meta.get("num_classes", num_classes)))
        try:
            module.load_state_dict(state, assign=True)
        except RuntimeError as exc:
            raise LabError(f"teacher {source.weights_path} does not fit {source.model}: {str(exc)[:120]}") from None
        return Loaded(module.eval(), None, "fp32", source.model, num_classes)
    from .techniques import Context, get_technique
    from .teachers import Teacher
    # only the teacher's sidecar (architecture, classes) is needed to rebuild: its weights may be gone
    tmeta = (cache.read_sidecar(source.teacher_path) if source.teacher_path else None) or \
        {"model": source.model, "num_classes": num_classes}
    if isinstance(state, dict) and state.get("format") == "onnx":   # real int8 (or its fp32 fallback) in ORT
        from .techniques.ort_session import tensor_to_bytes
        reason = ORT_ONLY if state.get("precision", "int8") == "int8" else \
            "it is an ONNX Runtime model (int8 conversion fell back to fp32 ONNX); export it as onnx"
        return Loaded(None, tensor_to_bytes(state["onnx"]), state.get("precision", "int8"), None, num_classes,
                      refused={"pt2": reason, "state_dict": reason})
    ctx = Context(teacher=Teacher(None, tmeta, source.teacher_path, cached=True), data=data, params=source.params)
    module = get_technique(source.technique).load(state, ctx)
    if isinstance(getattr(module, "onnx_bytes", None), bytes):   # an ONNX Runtime model (a pipeline's int8 step)
        label = getattr(module, "label", "int8")
        return Loaded(None, module.onnx_bytes, label, None, num_classes,
                      refused={"pt2": ORT_ONLY, "state_dict": ORT_ONLY})
    dtype = _module_dtype(module)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    if source.params.get("mode") == "fake":
        acts = f", activations to {source.params.get('act_bits')}" if source.params.get("activations") else ""
        precision = f"fp32 (weights rounded to {source.params.get('bits')} bits{acts})"
    arch = _arch_name(source, state)
    loaded = Loaded(module.eval(), None, precision, arch, num_classes)
    if arch is None:
        loaded.refused["state_dict"] = f"no architecture spec is known for technique {source.technique!r}"
    return loaded


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------- pixels in, logits out
class PixelModel(nn.Module):
    """uint8 pixels in [0, 255] -> the lab's normalization -> the model -> float32 logits."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.compute_dtype = _module_dtype(model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # the very operations of DataBundle.normalize, so predictions match the lab's
        x = (pixels.float() / 255 - self.mean) / self.std
        return self.model(x.to(self.compute_dtype)).float()


def with_pixel_input(onnx_bytes: bytes, mean, std, props: dict | None = None) -> bytes:
    """An ONNX graph taking float normalized input, with the normalization prepended: uint8 `pixels` in."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    if len(inputs) != 1:
        raise LabError(f"the ONNX graph has {len(inputs)} inputs, expected one image batch")
    old = inputs[0]
    batch = old.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.dim_value else "batch")
    taken = {x for n in g.node for x in list(n.input) + list(n.output)} | inits | {v.name for v in g.input}
    name = INPUT_NAME if INPUT_NAME not in taken else "pixels_u8"
    consts = [numpy_helper.from_array(np.array(255, np.float32), "pixels_255"),
              numpy_helper.from_array(np.array(mean, np.float32).reshape(1, 3, 1, 1), "pixels_mean"),
              numpy_helper.from_array(np.array(std, np.float32).reshape(1, 3, 1, 1), "pixels_std")]
    nodes = [helper.make_node("Cast", [name], ["pixels_f32"], to=TensorProto.FLOAT, name="pixels_cast"),
             helper.make_node("Div", ["pixels_f32", "pixels_255"], ["pixels_01"], name="pixels_div255"),
             helper.make_node("Sub", ["pixels_01", "pixels_mean"], ["pixels_centred"], name="pixels_sub_mean"),
             helper.make_node("Div", ["pixels_centred", "pixels_std"], [old.name], name="pixels_div_std")]
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, [batch_dim, 3, 32, 32])
    kept_inputs = [v for v in g.input if v.name != old.name]
    del g.input[:]
    g.input.extend([new_input] + kept_inputs)
    g.initializer.extend(consts)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    if props:
        helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def half_storage(onnx_bytes: bytes, dtype: torch.dtype) -> bytes:
    """Float weights stored in fp16/bf16, each read through a Cast to float (ONNX Runtime computes in fp32)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    to = TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.BFLOAT16
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    casts = []
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT or len(t.dims) < 1 or int(np.prod(t.dims)) < 16:
            continue   # scalars and tiny constants stay fp32
        values = torch.from_numpy(numpy_helper.to_array(t).copy()).to(dtype)
        stored = f"{t.name}_{'fp16' if dtype == torch.float16 else 'bf16'}"
        if dtype == torch.float16:
            new = numpy_helper.from_array(values.numpy(), stored)
        else:   # numpy has no bfloat16: the raw 16-bit patterns
            new = helper.make_tensor(stored, to, list(t.dims), values.view(torch.int16).numpy().tobytes(), raw=True)
        casts.append((t, new))
    for t, new in casts:
        name = t.name
        t.CopyFrom(new)
        g.node.insert(0, helper.make_node("Cast", [new.name], [name], to=TensorProto.FLOAT, name=f"{name}_cast"))
    return model.SerializeToString()


# ----------------------------------------------------------------------------- state dict + architecture
# Self-contained: torch (and torchvision for the teachers' architectures) only. Exported in every
# .arch.json as "rebuild_source"; `rebuild(spec, state_dict)` gives the eval-mode module, which takes
# NORMALIZED float input (spec["normalization"]), unlike the ONNX and .pt2 exports.
REBUILD_SOURCE = '''
import torch
import torch.nn as nn


def _resize_to_state(model, state_dict):
    """Pruned layers: every parameter and buffer takes the saved shape, layer sizes follow."""
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state_dict.get(prefix + pname)
            if saved is None or saved.shape == t.shape:
                continue
            new = torch.empty(saved.shape, dtype=saved.dtype)
            if isinstance(t, nn.Parameter):
                setattr(module, pname, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                module._buffers[pname] = new
        if isinstance(module, nn.Conv2d):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = module.running_mean.shape[0] if module.running_mean is not None \\
                else module.weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape


def _activation_rounding(model, spec):
    """Simulated low-bit activations: each listed layer's input rounded to its calibrated grid."""
    qmax = 2 ** int(spec["bits"]) - 1
    for name, (scale, zero_point) in spec["layers"].items():
        def hook(_module, inputs, scale=float(scale), zp=int(zero_point)):
            x = inputs[0]
            q = torch.clamp(torch.round(x / scale) + zp, 0, qmax)
            return ((q - zp) * scale).to(x.dtype), *inputs[1:]
        model.get_submodule(name).register_forward_pre_hook(hook)


def rebuild(spec, state_dict):
    builder = spec["builder"]
    if builder["kind"] == "torchvision":
        import torchvision
        model = getattr(torchvision.models, builder["name"])(weights=None, **builder["kwargs"])
    else:
        namespace = {"torch": torch, "nn": nn}
        exec(builder["source"], namespace)
        model = namespace[builder["class"]](**builder["kwargs"])
    if spec.get("resize_to_state"):
        _resize_to_state(model, state_dict)
    model.load_state_dict(state_dict, assign=True)   # the saved tensors themselves (their dtype too)
    model = model.to(getattr(torch, spec.get("dtype", "float32"))).eval()
    if spec.get("activation_rounding"):
        _activation_rounding(model, spec["activation_rounding"])
    return model
'''


# the students' constructor arguments (the registry builds them through lambdas); a student missing here
# is rebuilt with num_classes only, and the rebuild check refuses its state dict if that is wrong
STUDENT_KWARGS = {"cnn_small": {"width": 32}, "resnet8": {"widths": [16, 32, 64], "blocks": 1},
                  "resnet14_wide": {"widths": [32, 64, 128], "blocks": 2}}


def _builder(arch: str, num_classes: int) -> dict:
    from . import models
    spec = models.get_spec(arch)
    if spec.torchvision_name:   # the lab's head swap gives the very module of num_classes=...
        return {"kind": "torchvision", "name": spec.torchvision_name, "kwargs": {"num_classes": num_classes}}
    cls = type(spec.build(num_classes))
    needs = [models.BasicBlock] if cls is models.ResNetSmall else []
    return {"kind": "source", "class": cls.__name__, "kwargs": {"num_classes": num_classes, **STUDENT_KWARGS.get(arch, {})},
            "source": "\n\n".join(inspect.getsource(c) for c in needs + [cls])}


def arch_spec(loaded: Loaded, data) -> dict:
    from .models import build_model
    module, arch = loaded.module, loaded.arch
    with torch.device("meta"):   # shapes only: no weight initialisation
        fresh = build_model(arch, loaded.num_classes).state_dict()
    state = module.state_dict()
    spec = {"format": ARCH_FORMAT, "arch": arch, "num_classes": loaded.num_classes,
            "builder": _builder(arch, loaded.num_classes),
            "resize_to_state": any(k in fresh and fresh[k].shape != v.shape for k, v in state.items()),
            "dtype": str(_module_dtype(module)).replace("torch.", ""),
            "normalization": {"mean": list(data.mean), "std": list(data.std),
                              "formula": "(pixels / 255 - mean) / std, per RGB channel"},
            "input": "normalized float NCHW RGB 32x32 (see normalization); the ONNX and .pt2 files take raw pixels",
            "activation_rounding": None,
            "usage": "spec = json.load(...); exec(spec['rebuild_source'], ns); "
                     "model = ns['rebuild'](spec, torch.load(state_dict_path, weights_only=True))",
            "rebuild_source": REBUILD_SOURCE}
    quantizer = getattr(module, "_activation_quantizer", None)
    if quantizer is not None and quantizer.qparams:
        spec["activation_rounding"] = {"bits": int(quantizer.bits),
                                       "layers": {n: [float(s), int(z)] for n, (s, z) in quantizer.qparams.items()}}
    return spec


def _rebuilt(spec: dict, state: dict) -> nn.Module:
    namespace: dict = {}
    exec(REBUILD_SOURCE, namespace)
    with torch.device("meta"):   # built without initialising weights; the saved tensors are assigned
        return namespace["rebuild"](spec, state)


def _check_rebuild(spec: dict, state: dict, module: nn.Module) -> None:
    """The spec must rebuild the very model: same outputs on one input (else the export is refused)."""
    try:
        rebuilt = _rebuilt(spec, dict(state))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(_module_dtype(module))
        with torch.inference_mode():
            a, b = module.eval()(x).float(), rebuilt(x).float()
        ok = torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(a.abs().max())))
    except Exception as exc:   # any failure means the spec is not enough
        raise Unexpressible(f"state_dict export of {spec['arch']}: the architecture spec does not rebuild it "
                       f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not ok:
        raise Unexpressible(f"state_dict export of {spec['arch']}: the rebuilt model computes differently")


# ----------------------------------------------------------------------------- writing
class _Staging:
    """Files written under temporary names in the output folder; renamed into place together, or removed."""

    def __init__(self, out: Path):
        self.out = out
        self.pending: list[tuple[Path, Path]] = []

    def path(self, name: str) -> tuple[Path, Path]:
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.", suffix=".partial")
        os.close(fd)
        final = self.out / name
        self.pending.append((Path(tmp), final))
        return Path(tmp), final

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.pending = []


def _prepare_out(out) -> tuple[Path, list[Path]]:
    """The output folder, made if missing and checked writable before any work; (path, folders made here)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LabError(f"cannot write to {out}: it is a file, not a folder")
    made = [d for d in [out, *out.parents] if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        _remove_empty(made)
        raise LabError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return out, made


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:   # innermost first; a folder that is not empty stays
        try:
            d.rmdir()
        except OSError:
            return


def plan(formats) -> list[str]:
    """Validated format names ("all" = every format)."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    if "all" in formats:
        return list(FORMATS)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise LabError(f"unknown format {bad[0] if bad else ''!r}; choose onnx, pt2, state_dict or all")
    return list(dict.fromkeys(formats))


def _write_bytes(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def export(source: Source, formats="all", out_dir=".", data=None) -> dict:
    """Export `source` in `formats` (a name, a list, or "all": what the source can take) into `out_dir`.

    Returns {"run", "files": {format: path, ..., "card": path}, "skipped": {format: why}}; a format asked
    for by name that the source cannot take raises LabError before anything is written.
    """
    from .datasets import load_dataset
    wanted = plan(formats)
    explicit = not (formats == "all" or (not isinstance(formats, str) and "all" in formats))
    out, made = _prepare_out(out_dir)
    stage = _Staging(out)
    try:
        data = data or load_dataset(source.dataset)
        loaded = load(source, data)
        skipped = {f: loaded.refused[f] for f in wanted if f in loaded.refused}
        if skipped and explicit:
            f = next(iter(skipped))
            raise Unexpressible(f"{source.run} cannot be exported as {f}: {skipped[f]}")
        files, details = {}, {}
        props = {"classes": list(data.classes), "dataset": source.dataset, "run": source.run,
                 "technique": source.technique, "lab_version": lab_version(),
                 "input": "uint8 pixels N x 3 x 32 x 32 RGB in [0, 255]; normalization inside"}
        for fmt in (f for f in wanted if f not in skipped):
            try:
                details[fmt] = _WRITERS[fmt](source, loaded, data, stage, files, props)
            except Unexpressible as exc:
                if explicit:
                    raise
                skipped[fmt] = str(exc)   # "all": what the result can take
        tmp, card_path = stage.path(f"{source.stem}.card.json")
        card = model_card(source, loaded, data, files, details, skipped)
        _write_bytes(tmp, json.dumps(card, indent=1, default=_json_default).encode())
        files["card"] = str(card_path)
        stage.commit()
    except BaseException as exc:
        stage.discard()
        _remove_empty(made)
        if isinstance(exc, OSError):   # a full disk, a folder gone read-only: one line, nothing left behind
            raise LabError(f"cannot write to {out}: {exc.strerror or exc}") from None
        raise
    return {"run": source.run, "files": files, "skipped": skipped}


def _onnx(source, loaded, data, stage, files, props) -> dict:
    if loaded.onnx is not None:
        graph, kind = loaded.onnx, ("QDQ int8, as the lab runs it" if loaded.precision == "int8" else "fp32")
    else:
        from .techniques.onnx_export import export_onnx
        try:
            graph = export_onnx(loaded.module)
        except Exception as exc:
            raise Unexpressible(f"{source.run} cannot be exported as onnx: {type(exc).__name__}: "
                                f"{str(exc)[:160]}") from None
        kind = loaded.precision
        if _module_dtype(loaded.module) in (torch.float16, torch.bfloat16):
            graph = half_storage(graph, _module_dtype(loaded.module))
            kind = f"{loaded.precision} weights (ONNX Runtime computes in fp32)"
    graph = with_pixel_input(graph, data.mean, data.std, props)
    tmp, final = stage.path(f"{source.stem}.onnx")
    _write_bytes(tmp, graph)
    files["onnx"] = str(final)
    return {"file": final.name, "precision": kind, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "bytes": len(graph), "run_with": "onnxruntime.InferenceSession(path).run(None, {'pixels': x_uint8})"}


def _pt2(source, loaded, data, stage, files, props) -> dict:
    from torch.export import Dim
    wrapped = PixelModel(loaded.module, data.mean, data.std).eval()
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    try:
        program = torch.export.export(wrapped, (example,),
                                      dynamic_shapes={"pixels": {0: Dim("batch", min=1, max=1 << 16)}})
    except Exception as exc:
        raise Unexpressible(f"{source.run} cannot be exported as pt2 (torch.export: {type(exc).__name__}: "
                       f"{str(exc)[:160]})") from None
    tmp, final = stage.path(f"{source.stem}.pt2")
    with open(tmp, "wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's packaging remarks on half tensors: not the user's concern
        torch.export.save(program, f)
    files["pt2"] = str(final)
    return {"file": final.name, "precision": loaded.precision, "torch": torch.__version__,
            "run_with": "torch.export.load(path).module()(x_uint8)"}


def _state_dict(source, loaded, data, stage, files, props) -> dict:
    spec = arch_spec(loaded, data)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.module.state_dict().items()}
    _check_rebuild(spec, state, loaded.module)
    tmp, final = stage.path(f"{source.stem}.state_dict.pt")
    with open(tmp, "wb") as f:
        torch.save(state, f)
    arch_tmp, arch_final = stage.path(f"{source.stem}.arch.json")
    _write_bytes(arch_tmp, json.dumps(spec, indent=1).encode())
    files["state_dict"] = str(final)
    return {"file": final.name, "architecture": arch_final.name, "precision": loaded.precision,
            "input": "normalized float (the architecture file's normalization), not raw pixels",
            "run_with": "torch.load(path, weights_only=True) + the architecture file's rebuild_source"}


_WRITERS = {"onnx": _onnx, "pt2": _pt2, "state_dict": _state_dict}


def model_card(source: Source, loaded: Loaded, data, files: dict, details: dict, skipped: dict) -> dict:
    m = source.metrics
    return {
        "dataset": source.dataset, "dataset_label": data.label, "classes": list(data.classes),
        "input": dict(PIXEL_INPUT),
        "normalization": {"inside": True, "mean": list(data.mean), "std": list(data.std),
                          "formula": "(pixels / 255 - mean) / std, per RGB channel"},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(data.classes)],
                   "meaning": "logits; column i is classes[i] (softmax gives probabilities)"},
        "accuracy": m.get("accuracy"), "eval_images": m.get("eval_images"),
        "technique": source.technique, "params": source.params, "model": source.model,
        "architecture": loaded.arch, "precision": loaded.precision,
        "metrics": m, "baseline_metrics": source.baseline_metrics,
        "lab_version": lab_version(), "cpu": source.cpu, "target": source.target, "run": source.run,
        "created": source.created, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": {f: Path(p).name for f, p in files.items()}, "formats": details, "skipped": skipped,
        "notes": source.notes,
    }


def _json_default(o):
    try:
        return float(o)
    except Exception:
        return str(o)
