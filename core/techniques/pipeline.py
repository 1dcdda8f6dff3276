"""Pipelines: techniques chained in order, each step starting from the previous step's model.

Prune (with fine-tuning) → distil (the original teacher teaches the pruned model) → quantize (simulated
bits or real int8), as Deep Compression chained pruning, quantization and entropy coding. Every step's
model is stored as a real compressed file (core.packfile) under a key made of the steps so far, so
changing a later step reuses the earlier ones; the result's size is the size of the last step's file,
and the model measured is the one loaded back from that file.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import cache, metrics, settings
from ..errors import InvalidParameter, LabError
from ..progress import emit
from . import get_technique, register, technique_names
from .base import Context, ParamSpec, TechniqueOutput, TechniqueSpec

PIPELINE_VERSION = 1
SEPARATOR = ";"


# ----------------------------------------------------------------------------- steps
def parse_steps(text: str | list[str]) -> list[tuple[str, dict]]:
    """"prune:method=structured,ratio=0.5; quantize:mode=fake,bits=4" (or a list of such steps) →
    [(technique, validated params)], in an order a pipeline can run; one clear LabError otherwise."""
    parts = text if isinstance(text, (list, tuple)) else str(text).split(SEPARATOR)
    parts = [p.strip() for p in parts if p and p.strip()]
    if not parts:
        raise InvalidParameter("steps", text, 'steps such as "prune:ratio=0.5" "quantize:bits=4"')
    steps, last = [], None
    for part in parts:
        name, _, args = part.partition(":")
        name = name.strip()
        stages = {n: get_technique(n).pipeline_stage for n in technique_names()}
        steppable = sorted((n for n, s in stages.items() if s is not None), key=stages.get)
        if name not in steppable:
            raise LabError(f"unknown pipeline step {name!r}; a step is one of: {', '.join(steppable)}")
        params = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise LabError(f"step {part!r}: {item!r} is not name=value")
            params[key.strip()] = value.strip()
        spec = get_technique(name)
        params = spec.validate(params)
        if name == "quantize" and params.get("activations"):
            raise LabError("a pipeline's quantize step rounds weights only (activations=false)")
        if last is not None and stages[name] <= stages[last]:
            order = " → ".join(sorted(steppable, key=stages.get))
            raise LabError(f"{name} cannot come after {last}: a pipeline runs {order}, each at most once")
        steps.append((name, params))
        last = name
    return steps


def step_text(name: str, params: dict) -> str:
    """A step as text with only the parameters that differ from their defaults."""
    spec = get_technique(name)
    changed = [f"{p.name}={params[p.name]}" for p in spec.params if params.get(p.name, p.default) != p.default]
    return f"{name}:{','.join(changed)}" if changed else name


def canonical(text: str | list[str]) -> str:
    return f"{SEPARATOR} ".join(step_text(n, p) for n, p in parse_steps(text))


def _check(p: dict) -> None:
    p["steps"] = canonical(p["steps"])   # equal pipelines share one key however they were spelled


def trains(params: dict) -> bool:
    try:
        return any(get_technique(n).trains(p) for n, p in parse_steps(params.get("steps", "")))
    except LabError:
        return False


# ----------------------------------------------------------------------------- running
def _is_onnx(model) -> bool:
    return hasattr(model, "onnx_bytes")   # an OrtModule (an nn.Module too, but not one torch can count)



def pipeline_dir() -> Path:
    return settings.cache_dir() / "pipelines"


def _as_teacher(teacher, model: nn.Module, key: str):
    """The model so far, dressed as the teacher a step starts from (its own checksum: the step key)."""
    from ..teachers import Teacher
    meta = {"model": teacher.meta["model"], "num_classes": teacher.meta.get("num_classes"), "sha256": key}
    return Teacher(model=model, meta=meta, path=None, cached=True)


def _write(path: Path, out: TechniqueOutput, arch: str, data, step: dict) -> None:
    from .. import packfile
    packfile.write(path, out.model, arch, data.num_classes, packfile.meta_for(data, step=step))


def _read(path: Path):
    from .. import packfile
    return packfile.load(path)


def _step_metrics(model, data, eval_size: int, target: str, path: Path, counts: dict) -> dict:
    """Accuracy, file size, counts and batch-1 latency of one step's model (cached per evaluation size
    and target beside its file)."""
    from ..measure import predict, time_batch
    from ..targets import get_target
    where = path.with_name(f"{path.stem}-eval{eval_size}-{target}.json")
    try:
        return json.loads(where.read_text())
    except (OSError, ValueError):
        pass
    x, y = data.eval_split(eval_size)
    module = not _is_onnx(model)
    logits = predict(model, data, x, "cpu", torch.float32)
    m = {"accuracy": metrics.accuracy(logits, y), "size_bytes": path.stat().st_size, "eval_images": len(y),
         "params": metrics.count_params(model) if module else counts.get("params"),
         "nonzero_params": metrics.count_nonzero_params(model) if module else counts.get("nonzero_params"),
         "macs": metrics.count_macs(model) if module else counts.get("macs")}
    lat = time_batch(model, None, 1, get_target(target))[1]
    m.update(latency_ms_b1=lat.median_ms, latency_p95_ms_b1=lat.p95_ms, target=target)
    cache.atomic_write_json(m, where)
    return m


def apply(ctx: Context) -> TechniqueOutput:
    steps = parse_steps(ctx.params["steps"])
    arch, data = ctx.teacher.meta["model"], ctx.data
    target = ctx.target
    key = cache.stable_hash({"teacher": ctx.teacher.meta.get("sha256"), "dataset": data.fingerprint,
                             "pipeline": PIPELINE_VERSION}, 16)
    model, rows, history, notes, out = ctx.teacher.model, [], [], [], None
    counts = {"params": metrics.count_params(model), "nonzero_params": metrics.count_nonzero_params(model)}
    for i, (name, params) in enumerate(steps):
        spec = get_technique(name)
        key = cache.stable_hash({"after": key, "technique": name, "version": spec.version, "params": params,
                                 **spec.key_parts(params)}, 16)
        path = pipeline_dir() / f"{key}.lab"
        t0 = time.perf_counter()
        loaded = None
        if path.exists():
            try:
                loaded = _read(path)
            except LabError:   # damaged: computed again
                path.unlink(missing_ok=True)
        cached = loaded is not None
        if not cached:
            emit(ctx.progress, stage=name, kind="message",
                 message=f"step {i + 1}/{len(steps)}: {step_text(name, params)}")
            if spec.continue_from is not None:
                sctx = Context(teacher=ctx.teacher, data=data, params=params, device=ctx.device,
                               progress=ctx.progress, eval_size=ctx.eval_size)
                out = spec.continue_from(sctx, copy.deepcopy(model), key)
            else:
                sctx = Context(teacher=_as_teacher(ctx.teacher, model, key), data=data, params=params,
                               device=ctx.device, progress=ctx.progress, eval_size=ctx.eval_size)
                out = spec.apply(sctx)
            step_meta = {"technique": name, "params": params, "history": out.history, "notes": out.notes,
                         "runtime": out.runtime, "seconds": time.perf_counter() - t0}
            _write(path, out, arch, data, step_meta)
            loaded = _read(path)   # the pipeline goes on from the file's model: what is measured is what is stored
        model, header = loaded
        step = (header.get("meta") or {}).get("step") or {}
        if not _is_onnx(model):
            counts = {"params": metrics.count_params(model), "nonzero_params": metrics.count_nonzero_params(model),
                      "macs": metrics.count_macs(model)}
        history += [dict(h, step=i + 1) for h in step.get("history", [])]
        notes += [f"step {i + 1} ({name}): {n}" for n in step.get("notes", [])]
        m = _step_metrics(model, data, ctx.eval_size, target, path, counts)
        rows.append({"technique": name, "params": params, "metrics": m, "cached": cached,
                     "file": str(path), "seconds": round(time.perf_counter() - t0, 3)})
    onnx = _is_onnx(model)
    size = path.stat().st_size
    baseline = None
    if onnx:   # int8 is timed beside the teacher's ONNX Runtime twin, like a plain int8 result
        from ..measure import deployed_twin
        baseline = deployed_twin(ctx.teacher.model)
    from .ort_session import RUNTIME
    state = {"format": "packfile", "file": torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)}
    return TechniqueOutput(model=model, state=state, size_bytes=size, file_bytes=size, gzip_bytes=size,
                           params=counts.get("params"), nonzero_params=counts.get("nonzero_params"),
                           macs=counts.get("macs"), runtime=RUNTIME if onnx else "pytorch-eager",
                           baseline_model=baseline, history=history, notes=notes,
                           extra={"steps": rows, "file_path": str(path), "file_bytes": size,
                                  "steps_cached": sum(r["cached"] for r in rows)})


def load(state: dict, ctx: Context) -> nn.Module:
    from .. import packfile
    if not isinstance(state, dict) or state.get("format") != "packfile":
        raise LabError("saved pipeline model is not a packed file; run the pipeline again")
    return packfile.decode(bytes(state["file"].numpy().tobytes()))[0]


SPEC = register(TechniqueSpec(
    name="pipeline",
    title="Pipeline",
    summary=("Chain the techniques: prune, then distil the pruned model from the original teacher, then "
             "quantize it, each step starting from the last one's model, as Deep Compression did. The size "
             "is that of a real compressed file the lab writes and loads back."),
    params=[ParamSpec("steps", "str", "prune:ratio=0.5; quantize:bits=4",
                      help='steps in order, separated by ";": technique:name=value,... '
                           '(prune, then distill, then quantize; each at most once)')],
    apply=apply, load=load, check=_check, trains_if=trains,
    refresh=lambda out, ctx: apply(ctx),   # another evaluation size: every step is cached, only measured again
    url="pipeline", icon=":material/conveyor_belt:", color="#b279a2", page="pages._pipeline_view",
    version=1,
))
