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
    """Registered techniques, the built-in ones in BUILTIN's order (whatever imported them first)."""
    _load_builtin()
    builtin = [n for m in BUILTIN for n, s in TECHNIQUES.items() if s.apply.__module__ == f"{__name__}.{m}"]
    return builtin + [n for n in TECHNIQUES if n not in builtin]


# the built-in technique modules, in the order the app and the CLI list them: a new technique adds its line
BUILTIN = ("pruning", "quantization", "distillation", "pipeline")


def _load_builtin():
    import importlib
    for mod in BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


__all__ = ["TECHNIQUES", "register", "get_technique", "technique_names", "Context", "ParamSpec",
           "TechniqueOutput", "TechniqueSpec"]
