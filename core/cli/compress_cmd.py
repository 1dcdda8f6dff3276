"""`compress`: run one technique on the cached teacher and print before/after metrics."""
from __future__ import annotations

import argparse

from ..runner import ExperimentConfig, submit_experiment
from ..targets import DEFAULT_TARGET, TARGETS
from ..techniques import get_technique, technique_names
from .common import add_data_args, float_range, human_bytes, int_range, print_json, progress_for


def register(sub):
    p = sub.add_parser("compress", help="prune, quantize or distill the cached teacher")
    add_data_args(p)
    p.add_argument("--model", default="resnet34", help="the teacher (its newest cached version; trained if none)")
    p.add_argument("--technique", required=True, choices=TECHNIQUES)
    owners: dict[str, list[str]] = {}
    for tech in TECHNIQUES:
        for spec in get_technique(tech).params:
            owners.setdefault(spec.name, []).append(tech)
    for tech in TECHNIQUES:   # one flag per technique parameter, straight from the registry
        g = p.add_argument_group(tech)
        for spec in get_technique(tech).params:
            if owners[spec.name][0] != tech:
                continue   # a parameter several techniques share is one flag, listed under the first
            shared = f"; {', '.join(owners[spec.name])}" if len(owners[spec.name]) > 1 else ""
            g.add_argument(f"--{spec.name.replace('_', '-')}", help=f"{spec.help} (default {spec.default}{shared})".replace("%", "%%"),
                           **_arg_options(spec))
    p.add_argument("--eval-size", type=int_range(0), default=1000, help="test images (0 = the full test set)")
    p.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET,
                   help="where latency is timed: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()))
    p.set_defaults(handler=run)


TECHNIQUES = technique_names()   # the registry's order


def _arg_options(spec) -> dict:
    """argparse options of one ParamSpec: its type and range, so bad values fail while parsing."""
    if spec.kind == "bool":   # --flag / --no-flag: a default-on parameter can be switched off
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if spec.kind == "choice":
        return {"choices": list(spec.choices)}
    if spec.kind == "int":
        return {"type": int_range(int(spec.low), int(spec.high) if spec.high is not None else None)}
    if spec.kind == "float":
        return {"type": float_range(spec.low, spec.high)}
    return {}


def params_from_args(args) -> dict:
    """Only the flags that belong to the technique and were given; a foreign flag is an error."""
    from ..errors import LabError
    params = {}
    own = {spec.name for spec in get_technique(args.technique).params}
    for tech in TECHNIQUES:
        for n in (spec.name for spec in get_technique(tech).params):
            v = getattr(args, n, None)
            if v is None:
                continue
            if n not in own:
                raise LabError(f"--{n.replace('_', '-')} belongs to --technique {tech}, not {args.technique}")
            params[n] = v
    return params


def run(args) -> int:
    cfg = ExperimentConfig(dataset=args.dataset, model=args.model, technique=args.technique,
                           params=params_from_args(args), eval_size=args.eval_size,
                           data_root=args.data_root, device=args.device, target=args.target).validate()
    result = submit_experiment(cfg, progress=progress_for(args), address=args.ray_address)
    if args.json:
        print_json(result.summary())
        return 0
    print_result(result)
    return 0


def print_result(r) -> None:
    b, c = r.baseline, r.compressed
    print(f"{r.technique} {r.params} on {r.model} / {r.dataset_label} "
          f"({'from cache' if r.cached else f'{r.seconds:.1f} s'}; {r.eval_images} test images)")
    rows = [("accuracy", "accuracy", lambda v: f"{v:.4f}"), ("size", "size_bytes", human_bytes),
            ("gzip size", "gzip_bytes", human_bytes), ("params", "params", lambda v: f"{v:,}"),
            ("non-zero", "nonzero_params", lambda v: f"{v:,}"), ("MACs", "macs", lambda v: f"{v:,}"),
            ("latency b1", "latency_ms_b1", lambda v: f"{v:.2f} ms"),
            ("latency b64", "latency_ms_b64", lambda v: f"{v:.1f} ms")]
    sides = [("teacher", b), ("compressed", c)] + ([("scratch", r.scratch)] if r.scratch else [])
    print(f"  {'':<12}" + "".join(f"{name:>16}" for name, _ in sides))
    for label, key, fmt in rows:
        print(f"  {label:<12}" + "".join(f"{fmt(s[key]) if s.get(key) is not None else '-':>16}" for _, s in sides))
    print(f"  latency measured on the CPU, runtime {r.runtime}: batch 1 on "
          f"{c.get('threads_b1', c.get('threads'))} thread(s), batch 64 on {c.get('threads')}")
    from .. import views
    deployed = views.deployed_latency_line(b, c)
    if deployed:
        print(f"  {deployed}")
    for note in r.notes:
        print(f"  note: {note}")
    print(f"  compressed model: {r.model_path}")
