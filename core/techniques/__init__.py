"""Technique registry by name: "prune", "quantize", "distill"."""
from __future__ import annotations

from ..errors import LabError
from .base import Context, ParamSpec, TechniqueOutput, TechniqueSpec

TECHNIQUES: dict[str, TechniqueSpec] = {}


def register(spec: TechniqueSpec) -> TechniqueSpec:
    TECHNIQUES[spec.name] = spec
    return spec


def get_technique(name: str) -> TechniqueSpec:
    _load_builtin()
    if name not in TECHNIQUES:
        raise LabError(f"unknown technique {name!r}; choose one of: {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]


def technique_names() -> list[str]:
    _load_builtin()
    return list(TECHNIQUES)


def _load_builtin():
    import importlib
    for mod in ("pruning", "quantization", "distillation"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


__all__ = ["TECHNIQUES", "register", "get_technique", "technique_names", "Context", "ParamSpec",
           "TechniqueOutput", "TechniqueSpec"]
