"""Per-layer sensitivity: the teacher's accuracy after compressing ONE conv/linear layer at a time.

Techniques and settings
- prune / structured: the layer's output channels removed as torch-pruning removes them, with the rest of
  the graph kept consistent (torch-pruning's dependency graph: a residual stream or a concatenation loses
  the same channels in every coupled layer, so the layers of one group share one row of numbers; `group`
  names it). Channels ranked by L1 magnitude, the ratio exact (no channel multiple), at 0.1-0.9.
- prune / unstructured: the layer's smallest weights zeroed (magnitude, `pruning.keep_mask`), 0.1-0.9.
- quantize / per_channel or per_tensor: the layer's weights rounded to 8/6/4/3/2 bits with
  `quant_fake.quantize_tensor` (the simulated quantization of the technique).
No batch-norm correction and no fine-tuning: the scan measures the raw damage of each layer.

How it is fast (docs/sensitivity.md): the teacher's own weights are changed in place and restored bit for
bit after each evaluation (no copy per setting); the evaluation images are normalized once; the model is
traced once with torch.fx and, for each setting, only the part of the graph from the first changed layer
onwards is run again, from activations recorded in one clean pass. Structured pruning is evaluated by
zeroing what torch-pruning would remove (the group's output channels of producers, batch norms and the
input columns of consumers, indices from torch-pruning's own group): exactly the function of the pruned
model, checked against torch-pruning's real pruning in tests/test_sensitivity.py.

Fragility of a layer: its accuracy lost (baseline - accuracy, in points of a fraction) averaged over the
settings of the scan; `fragile` lists the scanned layers by it, most fragile first (ties: the loss at the
strongest setting, then the layer order).

Results are cached as JSON under cache_dir()/sensitivity/, keyed by the teacher's checksum, the dataset's
fingerprint, the technique, method, settings, evaluation size and SCAN_VERSION.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import cache, settings as lab_settings
from .errors import InvalidParameter, LabError
from .progress import ProgressFn, emit

SCAN_VERSION = 1
TECHNIQUES = ("prune", "quantize")
METHODS = {"prune": ("structured", "unstructured"), "quantize": ("per_channel", "per_tensor")}
# five ratios, not nine: a ResNet-34 scan on 500 images stays within 90 s on two cores (docs/sensitivity.md);
# --settings 0.1,0.2,...,0.9 asks for more
DEFAULT_SETTINGS = {"prune": (0.1, 0.3, 0.5, 0.7, 0.9), "quantize": (8, 6, 4, 3, 2)}
SETTING_RANGE = {"prune": (0.0, 0.95), "quantize": (1, 16)}
DEFAULT_EVAL_SIZE = 500
SPLITS = ("test", "train")
CHUNK = 256                   # images per forward pass
ACTIVATION_BUDGET = 1 << 30   # bytes of recorded activations; beyond it a setting runs the whole model
FRAGILITY = ("accuracy lost (baseline - accuracy) averaged over the settings of the scan; "
             "ties broken by the loss at the strongest setting")


# ----------------------------------------------------------------------------- requests
def parse_settings(technique: str, value) -> list:
    """The settings of a scan from a list or a comma-separated text: ratios (prune, in (0, 0.95]) or bit
    widths (quantize, integers 1-16), in the given order without repeats; InvalidParameter otherwise."""
    if value is None or value == "" or value == []:
        return list(DEFAULT_SETTINGS[technique])
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    lo, hi = SETTING_RANGE[technique]
    valid = ("comma-separated ratios in (0, 0.95], e.g. 0.1,0.5,0.9" if technique == "prune"
             else "comma-separated bit widths from 1 to 16, e.g. 8,4,2")
    out = []
    for item in items:
        try:
            if isinstance(item, bool) or item == "":
                raise ValueError
            if technique == "prune":
                v = float(item)
                if math.isnan(v) or not lo < v <= hi:
                    raise ValueError
                v = round(v, 4)
            else:
                f = float(item)
                if not f.is_integer() or not lo <= f <= hi:
                    raise ValueError
                v = int(f)
        except (TypeError, ValueError):
            raise InvalidParameter("settings", value, valid) from None
        if v not in out:
            out.append(v)
    return out


def setting_label(value) -> str:
    """A setting as the key of a layer's `accuracy` (JSON keys are text): "0.5", "4"."""
    return f"{value:g}" if isinstance(value, float) else str(int(value))


def validate(technique: str, method: str | None = None, settings=None, eval_size: int = DEFAULT_EVAL_SIZE,
             split: str = "test") -> tuple[str, str, list, int, str]:
    """(technique, method, settings, eval_size, split) checked and normalised; InvalidParameter or LabError
    (one clear line) for anything else, before any work."""
    if technique not in TECHNIQUES:
        raise LabError(f"unknown technique {technique!r} for a sensitivity scan; choose one of: "
                       f"{', '.join(TECHNIQUES)}")
    method = method or METHODS[technique][0]
    if method not in METHODS[technique]:
        raise InvalidParameter("method", method, f"one of {', '.join(METHODS[technique])} for {technique}")
    if not isinstance(eval_size, int) or isinstance(eval_size, bool) or eval_size < 0:
        raise InvalidParameter("eval_size", eval_size, "0 (all the images) or a positive integer")
    if split not in SPLITS:
        raise InvalidParameter("split", split, "test or train")
    return technique, method, parse_settings(technique, settings), eval_size, split


def _request(teacher, data, technique, method, settings, eval_size, split) -> dict:
    req = {"teacher": teacher.meta.get("sha256") or str(getattr(teacher, "path", "")),
           "dataset": data.fingerprint, "technique": technique, "method": method,
           "settings": [setting_label(s) for s in settings], "eval_size": eval_size, "version": SCAN_VERSION}
    if split != "test":
        req["split"] = split
    return req


def cache_path(key: str) -> Path:
    return lab_settings.cache_dir() / "sensitivity" / f"{key}.json"


def scan_key(teacher, data, technique, method=None, settings=None, eval_size=DEFAULT_EVAL_SIZE,
             split="test") -> str:
    return cache.stable_hash(_request(teacher, data, *validate(technique, method, settings, eval_size, split)), 16)


def read_cached(key: str) -> dict | None:
    """The stored scan under `key`, marked cached; None when absent or unreadable."""
    import json
    path = cache_path(key)
    if not path.exists():
        return None
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        cache.report_corrupt(path, "unreadable JSON")
        return None
    if not isinstance(out, dict) or "layers" not in out:
        return None
    out["cached"] = True
    return out


def cached_scan(teacher, data, technique, method=None, settings=None, eval_size=DEFAULT_EVAL_SIZE,
                split="test") -> dict | None:
    return read_cached(scan_key(teacher, data, technique, method, settings, eval_size, split))


# ----------------------------------------------------------------------------- layers
def scan_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear layer, by qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_counts(model: nn.Module, input_size=(1, 3, 32, 32)) -> dict[str, dict]:
    """{name: {"params", "macs"}} of each conv/linear layer for one image of `input_size`."""
    out, handles = {}, []

    def hook(name):
        def fn(m, inp, res):
            if isinstance(m, nn.Conv2d):
                macs = res.numel() // res.shape[0] * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            else:
                macs = res.numel() // res.shape[0] * m.in_features
            params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            out.setdefault(name, {"params": int(params), "macs": 0})["macs"] += int(macs)
        return fn
    for name, m in scan_layers(model):
        handles.append(m.register_forward_hook(hook(name)))
    try:
        was = model.training
        with torch.inference_mode():
            model.eval()(torch.zeros(input_size))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    for name, m in scan_layers(model):   # a layer that never ran still has its parameters
        out.setdefault(name, {"params": int(sum(p.numel() for p in m.parameters(recurse=False))), "macs": 0})
    return out


# ----------------------------------------------------------------------------- evaluation
class CorrectedBatchNorms:
    """Forward hooks on every batch norm of `model`: record(images) keeps each one's input statistics per chunk
    of CHUNK images (the unchanged model's); in "shift" mode each renormalizes its output with running
    statistics moved as techniques/bn_correction.py moves them, measured on the same chunk. That is a compress
    run's batch-norm correction, per change, without copying the model or touching its buffers; close()
    removes the hooks."""

    def __init__(self, model: nn.Module):
        from functools import partial
        from .techniques.bn_correction import BatchNorm, _channel_stats, shifted_statistics
        self.stats, self.shifted = _channel_stats, shifted_statistics   # imported once, not per batch-norm call
        self.model, self.mode, self.chunk, self.ref = model, None, 0, {}
        self.handles = [m.register_forward_hook(partial(self._hook, name)) for name, m in model.named_modules()
                        if isinstance(m, BatchNorm) and m.running_mean is not None]

    def record(self, images: torch.Tensor) -> "CorrectedBatchNorms":
        with torch.inference_mode():
            for ci, i in enumerate(range(0, len(images), CHUNK)):
                self.mode, self.chunk = "record", ci
                self.model.eval()(images[i:i + CHUNK])
        self.mode = None
        return self

    def _hook(self, name, m, inp, out):
        if self.mode is None:
            return None
        x = inp[0]
        mean, var = self.stats(x)
        if self.mode == "record":
            self.ref[(self.chunk, name)] = (mean, var)
            return None
        ref = self.ref.get((self.chunk, name))
        if ref is None:
            return None
        rm, rv = self.shifted(m, mean, var, *ref)
        return torch.nn.functional.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), m.weight, m.bias, False, 0.0, m.eps)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class SuffixEvaluator:
    """Accuracy of `model` on fixed normalized images, recomputing only what a change can affect.

    The model is traced once (torch.fx); one clean pass records, for every place a change may start (the
    first graph node calling one of the changed modules), the values that are still needed from there on.
    `accuracy(modules)` then runs the graph from that place. Without a trace, the whole model runs.
    With `bn` (CorrectedBatchNorms that recorded the same images), every batch norm is corrected on each pass.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, starts: list[set[str]],
                 budget: int = ACTIVATION_BUDGET, bn: "CorrectedBatchNorms | None" = None):
        self.model, self.labels, self.bn = model, labels, bn
        self.chunks = [images[i:i + CHUNK] for i in range(0, len(images), CHUNK)]
        self.gm, self.nodes, self.index = None, [], {}
        try:
            import torch.fx
            self.gm = torch.fx.symbolic_trace(model)
            self.nodes = list(self.gm.graph.nodes)
        except Exception:  # noqa: BLE001 - an untraceable model is evaluated whole
            self.gm = None
        self.first_call: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.op == "call_module":
                self.first_call.setdefault(node.target, i)
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i
        cuts = sorted({self.cut(s) for s in starts} - {0})
        self.saved: list[dict[int, dict]] = [{} for _ in self.chunks]   # chunk -> cut -> {node: value}
        self.base_logits = self._clean_pass(cuts, budget)

    def cut(self, modules: set[str]) -> int:
        """Index of the first node that a change of `modules` can affect (0: the whole model runs)."""
        if self.gm is None:
            return 0
        idx = [self.first_call[m] for m in modules if m in self.first_call]
        # a module the trace does not call directly (inside a leaf module): run everything
        return min(idx) if idx and len(idx) == len(modules) else 0

    def _live(self, cut: int) -> list:
        return [n for n in self.nodes[:cut] if n.op != "output" and self.last_use.get(n, -1) >= cut]

    def _clean_pass(self, cuts: list[int], budget: int) -> list[torch.Tensor]:
        used, logits = 0, []
        live = {c: self._live(c) for c in cuts}
        for ci, x in enumerate(self.chunks):
            self._bn_mode("shift", ci)
            if self.gm is None:
                with torch.inference_mode():
                    logits.append(self.model(x))
                continue
            env = {}
            with torch.inference_mode():
                for i, node in enumerate(self.nodes):
                    if i in live and used < budget:   # cloned: in-place ReLUs later in the pass change them
                        kept = {n: _clone(env[n]) for n in live[i]}
                        used += sum(_nbytes(v) for v in kept.values())
                        self.saved[ci][i] = kept
                    if node.op == "output":
                        logits.append(self._arg(node.args[0], env))
                        break
                    env[node] = self._execute(node, env, x)
        self._bn_mode(None)
        # a chunk without a recording for a cut runs that setting's whole model (`logits`)
        return logits

    def _bn_mode(self, mode, chunk: int = 0) -> None:
        if self.bn is not None:
            self.bn.mode, self.bn.chunk = mode, chunk

    def _arg(self, a, env):
        import torch.fx
        return torch.fx.node.map_arg(a, lambda n: env[n])

    def _execute(self, node, env, x):
        if node.op == "placeholder":
            return x
        args, kwargs = self._arg(node.args, env), self._arg(node.kwargs, env)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise LabError(f"cannot evaluate graph node {node.op}")

    def logits(self, modules: set[str]) -> list[torch.Tensor]:
        start = self.cut(modules)
        out = []
        with torch.inference_mode():
            for ci, x in enumerate(self.chunks):
                self._bn_mode("shift", ci)
                if self.gm is None:
                    out.append(self.model(x))
                    continue
                saved = self.saved[ci].get(start) if start else None
                env = {n: _clone(v) for n, v in saved.items()} if saved is not None else {}
                begin = start if saved is not None else 0
                for i in range(begin, len(self.nodes)):
                    node = self.nodes[i]
                    if node.op == "output":
                        out.append(self._arg(node.args[0], env))
                        break
                    env[node] = self._execute(node, env, x)
                    for inp in node.all_input_nodes:   # free what nothing later reads
                        if self.last_use.get(inp) == i:
                            env.pop(inp, None)
        self._bn_mode(None)
        return out

    def accuracy(self, modules: set[str]) -> float:
        return _accuracy(self.logits(modules), self.labels)

    def base_accuracy(self) -> float:
        return _accuracy(self.base_logits, self.labels)


def _accuracy(logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    pred = torch.cat([lg.argmax(1) for lg in logits]) if logits else torch.zeros(0, dtype=torch.long)
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return v


# ----------------------------------------------------------------------------- structured groups
def structured_groups(model: nn.Module):
    """torch-pruning's channel groups of `model` as the lab prunes it (the classifier head ignored):
    [(representative layer name, group, importance per channel)], in module order of the representatives.
    The representative is the first conv/linear (module order) whose output channels the group prunes."""
    import torch_pruning as tp
    import warnings
    from .techniques.pruning import _importance, classifier_head
    head = classifier_head(model)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
        ignored = list(head.modules())
        imp = _importance("magnitude")
        out = []
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
            producers = [names[d.target.module] for d, _ in group
                         if isinstance(d.target.module, (nn.Conv2d, nn.Linear))
                         and dg.is_out_channel_pruning_fn(d.handler) and d.target.module is not head]
            if not producers:
                continue
            out.append((min(producers, key=order.get), group, imp(group).detach().cpu()))
    out.sort(key=lambda g: order[g[0]])
    return dg, out


def pruned_indices(importance: torch.Tensor, ratio: float) -> list[int]:
    """The channels torch-pruning's local pruning removes at `ratio` (no channel multiple): the
    C - int(C * (1 - ratio)) least important."""
    n = len(importance)
    k = n - int(n * (1 - ratio))
    if k <= 0:
        return []
    return torch.topk(importance, k=min(k, n - 1), largest=False).indices.tolist()


class _ZeroedGroup:
    """What torch-pruning removes for a group, as zeros in place (undone on exit): the producers' output
    rows (weight and bias), the batch norms' scale and shift, the consumers' input columns."""

    def __init__(self, dg, group, idxs: list[int]):
        self.items = []
        pruning_group = dg.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, idxs)
        for dep, dep_idxs in pruning_group:
            m = dep.target.module
            if not isinstance(m, nn.Module) or not list(m.parameters(recurse=False)):
                continue   # adds, concatenations, activations: nothing stored
            idx = torch.as_tensor(list(dep_idxs), dtype=torch.long)
            out = dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.items += [(m.weight, 0, idx), (m.bias, 0, idx)]
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1:
                if out:
                    self.items.append((m.weight, 0, idx))
                    if m.bias is not None:
                        self.items.append((m.bias, 0, idx))
                else:
                    self.items.append((m.weight, 1, idx))
            else:
                raise LabError(f"the structured scan cannot emulate pruning a {type(m).__name__}")
        self.saved = []

    def __enter__(self):
        with torch.no_grad():
            for t, dim, idx in self.items:
                if t is None:
                    continue
                self.saved.append((t, t.detach().clone()))
                t.index_fill_(dim, idx, 0.0)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, old in reversed(self.saved):
                t.copy_(old)
        self.saved = []
        return False


# ----------------------------------------------------------------------------- the scan
def scan_images(data, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized images and labels a scan with {"eval_size", "split"} measures on."""
    return _images(data, spec["eval_size"], spec["split"])


def accuracy_on(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on normalized `images`, CHUNK at a time."""
    model.eval()
    with torch.inference_mode():
        return _accuracy([model(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)], labels)


def _images(data, eval_size: int, split: str):
    if split == "train":
        from .datasets import stratified_subset
        n = len(data.train_y) if eval_size == 0 else min(eval_size, len(data.train_y))
        idx = stratified_subset(data.train_y, n, seed=7)
        x, y = data.train_x[idx], data.train_y[idx]
    else:
        x, y = data.eval_split(eval_size)
    return data.normalize(x).contiguous(memory_format=torch.channels_last), y


def scan(teacher, data, technique: str = "prune", method: str | None = None, settings=None,
         eval_size: int = DEFAULT_EVAL_SIZE, progress: ProgressFn = None, split: str = "test") -> dict:
    """The sensitivity scan of `teacher` (served from the cache when it was made before). The teacher's
    weights are changed one layer at a time and always restored; nothing is stored when the scan fails."""
    technique, method, settings, eval_size, split = validate(technique, method, settings, eval_size, split)
    request = _request(teacher, data, technique, method, settings, eval_size, split)
    key = cache.stable_hash(request, 16)
    hit = read_cached(key)
    if hit is not None:
        return hit
    with cache.file_lock(f"sensitivity-{key}"):
        hit = read_cached(key)   # another process may have finished it while we waited
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        out = _run_scan(teacher, data, technique, method, settings, eval_size, split, progress)
        out.update(seconds=time.perf_counter() - t0, cached=False, key=key, request=request)
        cache.atomic_write_json(out, cache_path(key))
        return out


def _run_scan(teacher, data, technique, method, settings, eval_size, split, progress) -> dict:
    model = teacher.model
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    try:
        return _scan_model(model, teacher, data, technique, method, settings, eval_size, split, progress)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _scan_model(model, teacher, data, technique, method, settings, eval_size, split, progress) -> dict:
    labels = [setting_label(s) for s in settings]
    layers = scan_layers(model)
    size = tuple(data.train_x.shape[-2:])
    counts = layer_counts(model, (1, 3, *size))
    emit(progress, stage="sensitivity", kind="message",
         message=f"{technique} {method}: {len(layers)} layers × {len(settings)} settings")
    images, y = _images(data, eval_size, split)
    groups, dg = [], None
    if technique == "prune" and method == "structured":
        emit(progress, stage="sensitivity", kind="message", message="tracing torch-pruning's dependency graph")
        dg, found = structured_groups(model)
        names = {m: n for n, m in model.named_modules()}
        for rep, group, imp in found:
            producers = {names[d.target.module] for d, _ in group
                         if isinstance(d.target.module, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(d.handler)}
            touched = {names[d.target.module] for d, _ in group   # the layers whose weights change
                       if d.target.module in names and list(d.target.module.parameters(recurse=False))}
            groups.append({"rep": rep, "group": group, "imp": imp, "members": producers, "touched": touched})
        starts = [g["touched"] for g in groups]
    else:
        starts = [{n} for n, _ in layers]
    emit(progress, stage="sensitivity", kind="message",
         message=f"recording activations of {len(images)} images for the layer-by-layer passes")
    ev = SuffixEvaluator(model, images, y, starts)
    base = ev.base_accuracy()
    acc: dict[str, dict] = {n: {} for n, _ in layers}
    group_of: dict[str, str] = {}
    total = (len(groups) if groups else len(layers)) * len(settings)
    step = 0
    emit(progress, stage="sensitivity", kind="start", step=0, total=total)
    if technique == "prune" and method == "structured":
        for g in groups:
            for s, lab in zip(settings, labels):
                idxs = pruned_indices(g["imp"], s)
                if idxs:
                    with _ZeroedGroup(dg, g["group"], idxs):
                        a = ev.accuracy(g["touched"])
                else:
                    a = base
                for member in g["members"]:
                    acc[member][lab] = a
                    group_of[member] = g["rep"]
                step += 1
                emit(progress, stage="sensitivity", kind="batch", step=step, total=total)
    else:
        for name, module in layers:
            w = module.weight
            saved = w.detach().clone()
            try:
                for s, lab in zip(settings, labels):
                    with torch.no_grad():
                        w.copy_(_changed_weight(saved, module, technique, method, s))
                    acc[name][lab] = ev.accuracy({name})
                    step += 1
                    emit(progress, stage="sensitivity", kind="batch", step=step, total=total)
            finally:
                with torch.no_grad():
                    w.copy_(saved)
    emit(progress, stage="sensitivity", kind="done")
    rows = []
    for name, _ in layers:
        a = {lab: acc[name].get(lab) for lab in labels}
        row = {"name": name, "params": counts[name]["params"], "macs": counts[name]["macs"], "accuracy": a,
               "fragility": _fragility(base, a, labels)}
        if technique == "prune" and method == "structured":
            row["group"] = group_of.get(name)
        rows.append(row)
    strongest = labels[_strongest(technique, settings)]
    ranked = sorted((r for r in rows if r["fragility"] is not None),
                    key=lambda r: (-r["fragility"], -(base - r["accuracy"][strongest])))
    return {"dataset": data.name, "model": teacher.meta.get("model"), "technique": technique, "method": method,
            "settings": list(settings), "baseline_accuracy": base, "layers": rows,
            "fragile": [r["name"] for r in ranked], "fragility": FRAGILITY, "eval_images": len(y),
            "split": split, "teacher_sha256": teacher.meta.get("sha256")}


def _strongest(technique: str, settings: list) -> int:
    """Index of the strongest setting: the largest ratio, the fewest bits."""
    return max(range(len(settings)), key=lambda i: settings[i] if technique == "prune" else -settings[i])


def _fragility(base: float, acc: dict, labels: list[str]) -> float | None:
    vals = [acc[lab] for lab in labels if acc.get(lab) is not None]
    if not vals:
        return None   # not scanned (the classifier's outputs cannot be pruned away)
    return sum(base - v for v in vals) / len(vals)


def _changed_weight(w: torch.Tensor, module: nn.Module, technique: str, method: str, setting) -> torch.Tensor:
    if technique == "quantize":
        from .techniques import quant_fake
        per_channel = method == "per_channel"
        axis = quant_fake.channel_axis(module)
        codes, scale = quant_fake.quantize_tensor(w, int(setting), per_channel, axis)
        return quant_fake.dequantize(codes, scale, axis, per_channel).to(w.dtype)
    from .techniques.pruning import keep_mask
    return w * keep_mask(w.abs(), round(float(setting) * w.numel())).to(w.dtype)
