"""What every compression technique provides, so one runner can drive them all.

A technique module defines a `TechniqueSpec`: its parameters (with ranges, so the CLI and
the app's sliders come from one list), `apply(ctx) -> TechniqueOutput`, and
`load(state, ctx) -> nn.Module` to rebuild a saved compressed model without unpickling code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .. import cache
from ..errors import InvalidParameter, LabError
from ..progress import ProgressFn


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str                       # "int" | "float" | "choice" | "bool" | "str"
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    step: float | None = None       # slider step in the app

    def valid_range(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "float"):
            return f"{'an integer' if self.kind == 'int' else 'a number'} from {self.low} to {self.high}"
        return "text"

    def coerce(self, value):
        """Validate and normalise one value; InvalidParameter names the parameter and its range."""
        try:
            if self.kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                v = int(value)
            elif self.kind == "float":
                v = float(value)
                if math.isnan(v):
                    raise ValueError
            elif self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    v = value.lower() in ("true", "1", "yes")
                else:
                    v = bool(value)
            elif self.kind == "choice":
                v = value
                if v not in self.choices:
                    raise ValueError
            else:
                v = str(value)
        except (TypeError, ValueError):
            raise InvalidParameter(self.name, value, self.valid_range()) from None
        if self.kind in ("int", "float") and not (self.low <= v <= self.high):
            raise InvalidParameter(self.name, value, self.valid_range())
        return v


@dataclass
class Context:
    """Everything a technique may use. The teacher model must not be modified: copy it."""
    teacher: Any                    # core.teachers.Teacher
    data: Any                       # core.datasets.DataBundle
    params: dict
    device: str = "cpu"
    progress: ProgressFn = None
    eval_size: int = 1000
    target: str = "edge-cpu"        # where latency is timed (core.targets): a pipeline times each step there


def run_checkpoint(kind: str, teacher, data, params: dict, train_key: dict, version: int):
    """Where a technique's interrupted training run (fine-tuning, a KD student) keeps its last finished
    epoch: unique to the teacher's weights, the data, the parameters and the training settings."""
    key = {"teacher": teacher.meta.get("sha256") or str(teacher.path), "params": params, "train": train_key,
           "version": version}
    return cache.checkpoint_path(kind, data.fingerprint, key)


@dataclass
class TechniqueOutput:
    model: nn.Module                          # the compressed model, on the CPU, eval mode
    state: dict                               # saved with torch.save; must load with weights_only=True
    input_dtype: torch.dtype = torch.float32  # what the model takes (fp16 mode: torch.half)
    eval_device: str = "cpu"                  # where its accuracy is measured (int8: CPU only)
    size_bytes: Optional[int] = None          # override of the shipped size (e.g. packed low-bit weights)
    gzip_bytes: Optional[int] = None
    file_bytes: Optional[int] = None          # bytes of `state` saved, when the technique measured it already
    macs: Optional[int] = None                # override when the counter cannot run (quantized modules)
    params: Optional[int] = None
    nonzero_params: Optional[int] = None
    runtime: str = "pytorch-eager"            # where latency was measured
    baseline_model: Optional[nn.Module] = None  # a baseline timed in the same runtime, if not the teacher
    time_deployed: bool = False                 # also time both in ONNX Runtime fp32 (runner.deployed_latency)
    extra: dict = field(default_factory=dict)   # technique-specific numbers (sparse bytes, bits...)
    history: list = field(default_factory=list)  # per-epoch rows when training happened
    scratch: Optional[dict] = None               # distillation: the from-scratch student's metrics
    scratch_history: list = field(default_factory=list)
    notes: list = field(default_factory=list)    # what the user should know (e.g. a failed conversion)


@dataclass
class TechniqueSpec:
    name: str
    title: str
    summary: str                     # two sentences for the app's home page
    params: list[ParamSpec]
    apply: Callable[[Context], TechniqueOutput]
    load: Callable[[dict, Context], nn.Module]
    check: Optional[Callable[[dict], None]] = None   # cross-parameter checks after coercion
    version: int = 1                 # bump to invalidate cached results when apply() changes
    # the parameters whose "auto" this machine decides, resolved: part of the cache key, so another CPU
    # computes its own result instead of being served one made for different hardware
    machine_params: Optional[Callable[[dict], dict]] = None
    # versions of rules that only some parameter values use (allocation=sensitivity's search): in the cache
    # key only for those values, so that changing such a rule leaves every other result's key as it was
    rule_versions: Optional[Callable[[dict], dict]] = None
    # a stored trained model measured on another evaluation size: redo what depends on it (distillation's
    # from-scratch twin is measured on the same images)
    refresh: Optional[Callable[["TechniqueOutput", Context], "TechniqueOutput"]] = None
    # in a pipeline: steps run in increasing stage (prune 0, distill 1, quantize 2); None: not a step. A step
    # starts from the model so far, given to apply() as ctx.teacher, unless the spec has continue_from
    # (distillation: the original teacher teaches the model so far)
    pipeline_stage: Optional[int] = None
    continue_from: Optional[Callable[[Context, nn.Module, str], "TechniqueOutput"]] = None
    page: str = ""                   # a pages module with render(name) for its own page (default: the generic one)
    trains_if: Optional[Callable[[dict], bool]] = None   # overrides trains() (a pipeline trains if a step does)
    # how the app, the CLI and the sweep present it: the registry is their only list of techniques
    url: str = ""                    # the app page's URL path (default: the name)
    icon: str = ":material/tune:"    # Material icon of its page and links
    color: str = "#888888"           # its colour in every chart
    sweep_grid: tuple = ()           # the settings `python -m core sweep` runs by default
    history_series: str = "finetune"  # what its training curve is called (views.SERIES_TITLES)

    @property
    def page_url(self) -> str:
        return self.url or self.name

    def key_parts(self, params: dict) -> dict:
        """What besides the technique, version and parameters decides a result: {"machine": ..., "rules": ...},
        each only when not empty."""
        parts = {"machine": self.machine_params(params) if self.machine_params else {},
                 "rules": self.rule_versions(params) if self.rule_versions else {}}
        return {k: v for k, v in parts.items() if v}

    def validate(self, params: dict | None) -> dict:
        params = dict(params or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidParameter(unknown[0], params[unknown[0]],
                                   f"a parameter of {self.name} ({', '.join(sorted(known))})")
        out = {p.name: p.coerce(params.get(p.name, p.default)) for p in self.params}
        if self.check:
            self.check(out)
        return out

    def trains(self, params: dict) -> bool:
        """Whether these settings train (fine-tuning, distillation): minutes, not seconds (the long lane).
        Epochs that the chosen mode ignores (quantize's qat_epochs outside int8) validate to 0."""
        if self.trains_if is not None:
            return self.trains_if(params)
        try:
            params = self.validate(params)
        except LabError:
            pass
        return any(p.kind == "int" and p.name.endswith("epochs") and params.get(p.name, 0) > 0 for p in self.params)


def calibration_images(data, n: int, seed: int = 7) -> torch.Tensor:
    """n normalized training images (a fixed stratified subset), NCHW float32."""
    from ..datasets import stratified_subset
    n = min(int(n), len(data.train_y))
    idx = stratified_subset(data.train_y, n, seed=seed)
    return data.normalize(data.train_x[idx]).contiguous()


def observe(model: nn.Module, modules, images: torch.Tensor, *, pre_hook=None, hook=None, batch: int = 64) -> None:
    """One pass of `model` (the caller puts it in eval mode) over `images`, in batches without gradients, with
    `pre_hook(module, inputs)` and/or `hook(module, inputs, output)` on each of `modules`, removed afterwards:
    how calibration reads activations."""
    handles = []
    for m in modules:
        if pre_hook is not None:
            handles.append(m.register_forward_pre_hook(pre_hook))
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(images[i:i + batch].float())
    finally:
        for h in handles:
            h.remove()
