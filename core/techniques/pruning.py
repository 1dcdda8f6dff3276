"""Pruning: remove whole channels (structured, torch-pruning) or single weights (unstructured).

Structured pruning builds torch-pruning's DependencyGraph, so coupled layers (residual
additions, DenseNet concatenations, batch norms) lose the same channels and the model
really gets smaller and faster. Unstructured pruning only writes zeros: the dense file and
the latency stay the same; `extra` reports what a sparse encoding would take.

Saved state is plain tensors plus names: a structured model is rebuilt by creating the base
architecture and shrinking each layer to the saved tensor shapes (no pickled modules).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from .. import metrics
from ..errors import InvalidParameter, LabError
from ..models import build_model
from ..progress import emit
from ..training import TrainConfig, resumable_fit, training_precision
from . import bn_correction, register
from .base import Context, ParamSpec, TechniqueOutput, TechniqueSpec, run_checkpoint

STRUCTURED_MAX_RATIO = 0.9
STATE_FORMAT = "prune-v1"
EXAMPLE_INPUT = (1, 3, 32, 32)

PARAMS = [
    ParamSpec("ratio", "float", 0.5, 0.0, 0.95, step=0.05,
              help="fraction removed: channels per layer (structured) or weights (unstructured)"),
    ParamSpec("method", "choice", "structured", choices=("structured", "unstructured"),
              help="structured removes whole channels (smaller, faster); unstructured zeroes single weights"),
    ParamSpec("scope", "choice", "layer", choices=("layer", "global"),
              help="layer: every layer loses the same fraction; global: one ranking over all layers"),
    ParamSpec("importance", "choice", "magnitude", choices=("magnitude", "l2", "bn_scale", "random"),
              help="how channels/weights are ranked: L1 magnitude, L2 magnitude, batch-norm scale, random"),
    ParamSpec("bn_correction", "bool", True,
              help="before any fine-tuning, move each batch norm's statistics by as much as pruning moved its "
                   f"input, measured on {bn_correction.IMAGES} training images (ResNet-34 on CIFAR-10, half "
                   "the weights of every layer: 3.3 -> 0.9 points lost)"),
    ParamSpec("channel_multiple", "int", 8, 1, 64, step=1,
              help="structured: each pruned layer keeps a multiple of this many channels (the nearest one, so the "
                   "ratio moves by up to half of it per layer): vector units and ONNX Runtime's blocked layouts run "
                   "multiples of 8 or 16 fast; 1 keeps exactly the ratio (a ResNet-34 pruned 0.3 then ran 3x "
                   "slower than the teacher in ONNX Runtime, docs/bench_pruning.md)"),
    ParamSpec("finetune_epochs", "int", 0, 0, 50, step=1, help="epochs of fine-tuning after pruning"),
    ParamSpec("finetune_subset", "int", 0, 0, 1_000_000, step=500,
              help="training images used for fine-tuning (0 = all)"),
    ParamSpec("finetune_lr", "float", 0.01, 1e-5, 1.0, step=0.005, help="peak learning rate of fine-tuning"),
    ParamSpec("allocation", "choice", "uniform", choices=("uniform", "sensitivity"),
              help="uniform: every layer loses `ratio`; sensitivity: per-layer ratios chosen from the sensitivity "
                   "scan (core/sensitivity.py, on 500 training images) for the same total: the MACs of uniform "
                   "structured pruning (within 3%; the most accurate of several measured candidates, uniform "
                   "included), or the weights uniform unstructured pruning zeroes; docs/sensitivity.md"),
]


def check(p: dict) -> None:
    if p.get("allocation", "uniform") == "uniform":
        p.pop("allocation", None)   # absent when uniform: every result key made before allocation existed holds
    elif p["scope"] != "layer":
        raise InvalidParameter("scope", p["scope"], "layer with allocation=sensitivity (the scan sets each layer's ratio)")
    elif p["ratio"] > STRUCTURED_MAX_RATIO:
        raise InvalidParameter("ratio", p["ratio"], f"a number from 0.0 to {STRUCTURED_MAX_RATIO} with "
                                                    "allocation=sensitivity (the scan's largest ratio)")
    if p["method"] == "unstructured":
        p["channel_multiple"] = 8   # no channel is removed: one cache entry whatever it says
    if p["method"] == "structured" and p["ratio"] > STRUCTURED_MAX_RATIO:
        raise InvalidParameter("ratio", p["ratio"],
                               f"a number from 0.0 to {STRUCTURED_MAX_RATIO} for structured pruning "
                               f"(up to 0.95 for unstructured)")
    if p["method"] == "unstructured" and p["importance"] == "bn_scale":
        raise InvalidParameter("importance", p["importance"],
                               "magnitude, l2 or random for unstructured pruning "
                               "(bn_scale ranks channels, so it needs method=structured)")


# ----------------------------------------------------------------------------- helpers
def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def classifier_head(model: nn.Module) -> nn.Module:
    """The output layer (the last Linear in module order for every registered teacher)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LabError("pruning needs a model whose output layer is nn.Linear")
    return linears[-1]


def _plain_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _finetune(model: nn.Module, ctx: Context, p: dict) -> list[dict]:
    if p["finetune_epochs"] <= 0:
        return []
    cfg = TrainConfig(epochs=p["finetune_epochs"], subset=p["finetune_subset"], lr=p["finetune_lr"],
                      precision=training_precision(ctx.device))
    # the pruned model is rebuilt the same way on a rerun; the checkpoint restores its weights (and masks)
    partial = run_checkpoint(f"finetune-{ctx.teacher.name}", ctx.teacher, ctx.data, {**p, **SPEC.key_parts(p)},
                             cfg.key(), SPEC.version)
    history = resumable_fit(model, ctx.data, cfg, partial, what="fine-tuning", device=ctx.device,
                            progress=ctx.progress, stage="finetune", eval_size=ctx.eval_size)
    partial.unlink(missing_ok=True)
    return history


def _finish(model: nn.Module) -> nn.Module:
    # contiguous weights on the CPU, as a reloaded model has: same layout, identical logits
    return model.cpu().to(memory_format=torch.contiguous_format).eval()


# ----------------------------------------------------------------------------- structured
def _importance(name: str):
    import torch_pruning as tp
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.RandomImportance()


def structured_prune(model: nn.Module, ratio: float, scope: str = "layer",
                     importance: str = "magnitude", progress=None, channel_multiple: int = 1,
                     ratios: dict | None = None) -> nn.Module:
    """Remove `ratio` of the channels of every prunable group in place (the output layer is kept), each
    layer keeping a multiple of `channel_multiple` channels; `ratios` ({module: ratio}, torch-pruning's
    pruning_ratio_dict) gives the group of each listed module its own ratio."""
    if importance == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                            for m in model.modules()):
        raise InvalidParameter("importance", importance,
                               "magnitude, l2 or random for this model (it has no batch norm layers)")
    model.cpu().eval()
    threads = torch.get_num_threads()
    # the graph work is thousands of tiny tensor ops: thread hand-offs cost more than they save
    # (DenseNet-121 on a busy 2-core machine: 86 s with 2 threads, 23 s with 1)
    torch.set_num_threads(1)
    try:
        _structured_step(model, ratio, scope, importance, progress, channel_multiple, ratios)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _structured_step(model, ratio, scope, importance, progress, channel_multiple=1, ratios=None):
    example = torch.zeros(EXAMPLE_INPUT)
    emit(progress, stage="prune", kind="message", message="tracing the dependency graph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = _nearest_multiple_pruner()(
            model, example, importance=_importance(importance), pruning_ratio=ratio, pruning_ratio_dict=ratios,
            global_pruning=(scope == "global"),
            # global ranking may empty a layer it finds unimportant; keep at least 10% of each
            max_pruning_ratio=max(ratio, STRUCTURED_MAX_RATIO),
            ignored_layers=[classifier_head(model)],
            round_to=channel_multiple if channel_multiple > 1 else None)
        emit(progress, stage="prune", kind="message", message=f"removing {ratio:.0%} of the channels")
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random importance is reproducible
            pruner.step()


def _nearest_multiple_pruner():
    """torch-pruning's BasePruner, each layer's kept channels rounded to the *nearest* multiple of round_to.

    BasePruner rounds them down: at ratio 0.3 a DenseNet growth layer kept 16 of its 32 channels (half),
    and DenseNet-121 lost 4.7 points after an epoch of fine-tuning instead of 2.6."""
    import torch_pruning as tp

    class NearestMultiplePruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            kept = max(round_to, round_to * int((current_channels - n_pruned) / round_to + 0.5))
            return max(current_channels - kept, 0)
    return NearestMultiplePruner


def _tag_channels(model: nn.Module) -> dict[str, torch.Tensor]:
    """Write each batch norm's channel numbers into its running mean (returning the real means), so
    that after torch-pruning has sliced the layers the survivors say which channels they were.
    torch-pruning slices running means with the rest and ranks channels by weights only."""
    saved = {}
    for name, m in model.named_modules():
        if isinstance(m, bn_correction.BatchNorm) and m.running_mean is not None:
            saved[name] = (m.running_mean.clone(), m.running_var.clone())
            m.running_mean.copy_(torch.arange(len(m.running_mean), dtype=m.running_mean.dtype))
    return saved


def _kept_channels_per_bn(model: nn.Module, saved: dict) -> dict[str, torch.Tensor]:
    """Undo `_tag_channels`: restore the real running means, return the kept channel numbers."""
    kept = {}
    for name, m in model.named_modules():
        if name in saved:
            mean, var = saved[name]
            idx = m.running_mean.round().long()
            m.running_mean.copy_(mean[idx])
            if not torch.equal(m.running_var, var[idx]):
                raise LabError(f"could not tell which channels of {name} pruning kept")
            kept[name] = idx
    return kept


# ----------------------------------------------------------------------------- unstructured
def keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """1 for the weights kept, 0 for the `n_prune` lowest scores (ties broken by position).

    A k-th value threshold: much faster on a CPU than torch.topk/sort over millions of weights."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if n_prune <= 0:
        return torch.ones_like(scores)
    if n_prune >= n:
        return torch.zeros_like(scores)
    thr = flat.kthvalue(n_prune).values
    keep = flat > thr
    missing = (n - n_prune) - int(keep.sum())
    if missing > 0:
        ties = (flat == thr).nonzero().flatten()[:missing]
        keep[ties] = True
    return keep.to(scores.dtype).view_as(scores)


def _unstructured_masks(model: nn.Module, ratio: float, scope: str, importance: str,
                        ratios: dict[str, float] | None = None) -> None:
    """Attach torch.nn.utils.prune masks (weight = weight_orig * weight_mask) to conv/linear weights;
    `ratios` ({layer name: ratio}) gives listed layers their own ratio (scope layer)."""
    named = prunable_layers(model)
    layers = [m for _, m in named]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        scores = [torch.rand(m.weight.shape, generator=gen) if importance == "random" else m.weight.abs()
                  for m in layers]
        if scope == "global":
            flat = torch.cat([s.reshape(-1) for s in scores])
            keep = keep_mask(flat, round(ratio * flat.numel())).split([s.numel() for s in scores])
            masks = [k.view_as(s) for k, s in zip(keep, scores)]
        else:
            masks = [keep_mask(s, round((ratios or {}).get(n, ratio) * s.numel())) for (n, _), s in zip(named, scores)]
    for m, mask in zip(layers, masks):
        tprune.custom_from_mask(m, "weight", mask.to(m.weight.dtype))


def _remove_masks(model: nn.Module) -> None:
    for _, m in prunable_layers(model):
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")


def sparse_sizes(state: dict, sparse_keys: set[str]) -> dict:
    """Bytes of the sparse encodings of a state dict: the pruned tensors as a 1-bit mask plus
    fp32 nonzero values (bitmask) or int32 flat indices plus fp32 values (coo); others stay dense."""
    dense_other = 0
    bitmask = coo = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if k in sparse_keys:
            nnz = int(torch.count_nonzero(v))
            bitmask += (v.numel() + 7) // 8 + nnz * 4
            coo += nnz * (4 + 4)
        else:
            dense_other += nbytes
    return {"sparse_bitmask_bytes": dense_other + bitmask, "sparse_coo_bytes": dense_other + coo}


# ----------------------------------------------------------------------------- apply / load
def apply(ctx: Context) -> TechniqueOutput:
    p = ctx.params
    teacher = ctx.teacher
    arch, num_classes = teacher.meta["model"], int(teacher.meta["num_classes"])
    model = copy.deepcopy(teacher.model).cpu().eval()  # the teacher itself is never touched
    notes: list[str] = []
    corrected = 0
    if p["method"] == "structured":
        if p.get("allocation") == "sensitivity":
            model, corrected, allocation, info = _sensitivity_structured(model, ctx, p)
        else:
            allocation, info = None, {}
            corrected = _prune_and_correct(model, ctx, p, None, ctx.progress)
        history = _finetune(model, ctx, p)
        model = _finish(model)
        state = _state(arch, num_classes, p, _plain_state(model))
        kept = _kept_channels(teacher.model, model)
        extra = {"method": "structured", "scope": p["scope"], "importance": p["importance"],
                 "kept_channel_fraction": kept}
        if p["ratio"] > 0 and kept == 1.0:
            notes.append("no channel was removed: the importance scores all tie "
                         "(e.g. batch-norm scales of an untrained model are all 1)")
    else:
        emit(ctx.progress, stage="prune", kind="message", message=f"zeroing {p['ratio']:.0%} of the weights")
        ratios, allocation, info = (_sensitivity_weight_ratios(model, ctx, p) if p.get("allocation") == "sensitivity"
                                    else (None, None, {}))
        _unstructured_masks(model, p["ratio"], p["scope"], p["importance"], ratios)
        if p["bn_correction"]:
            corrected = bn_correction.correct_against_teacher(model, ctx)
        history = _finetune(model, ctx, p)   # the masks stay on, so pruned weights stay zero
        _remove_masks(model)
        model = _finish(model)
        state = _state(arch, num_classes, p, _plain_state(model))
        extra = _unstructured_extra(model, state)
        extra.update(method="unstructured", scope=p["scope"], importance=p["importance"])
        if p["importance"] == "l2":
            notes.append("for single weights L1 and L2 magnitude give the same ranking")
        notes.append("unstructured pruning only writes zeros: the dense file and the latency do not change; "
                     "extra.sparse_bitmask_bytes is what a sparse format (1-bit mask + fp32 nonzero values) takes")
    extra["corrected_batch_norms"] = corrected
    if allocation is not None:   # {layer: fraction removed} chosen from the sensitivity scan
        extra["allocation"] = allocation
        extra.update(info)
        notes.append("allocation=sensitivity: each layer's ratio was chosen from the sensitivity scan (500 training "
                     "images) for the same total as uniform pruning at this ratio; extra.allocation lists them")
        if "allocation_search" in info:
            notes.append(_search_note(info["allocation_search"]))
    # the file sizes of unstructured pruning are measured once, here, and reused by the runner
    sizes = ({"size_bytes": extra["dense_bytes"], "gzip_bytes": extra["gzip_bytes"], "file_bytes": extra["dense_bytes"]}
             if "gzip_bytes" in extra else {})
    return TechniqueOutput(model=model, state=state, history=history, extra=extra, notes=notes,
                           time_deployed=p["method"] == "structured", **sizes)


def _prune_and_correct(model: nn.Module, ctx: Context, p: dict, ratios: dict[str, float] | None, progress) -> int:
    """Structured pruning of `model` in place (`ratios`: {layer name: ratio} of some groups' representatives),
    then its batch-norm correction if asked; returns the number of batch norms corrected."""
    modules = dict(model.named_modules())
    saved = _tag_channels(model) if p["bn_correction"] else {}
    structured_prune(model, p["ratio"], p["scope"], p["importance"], progress, p["channel_multiple"],
                     {modules[n]: r for n, r in ratios.items()} if ratios is not None else None)
    if not p["bn_correction"]:
        return 0
    return bn_correction.correct_against_teacher(model, ctx, _kept_channels_per_bn(model, saved))


# The candidates of structured allocation=sensitivity, measured in this order: (loss curves, how far each
# group's ratio may move from the uniform ratio; None: as far as the curves go). "scan": the single-layer
# scan around the teacher; "context": a scan around the uniformly pruned model (allocation.context_scan);
# "uniform": uniform pruning itself. Single-layer losses added up miss how cuts compound along a plain
# chain: on VGG16-BN the scan's own allocation lost 13 points to uniform (docs/sensitivity.md).
SEARCH = (("scan", None), ("scan", 0.3), ("scan", 0.2), ("scan", 0.1), ("context", None), ("context", 0.2),
          ("uniform", 0.0))


def _search_note(search: dict) -> str:
    def what(shift):
        return "unbounded" if shift is None else f"within ±{shift:g}"
    def name(t):
        return "uniform" if t["source"] == "uniform" else f"{t['source']} ({what(t['max_shift'])})"
    tried = ", ".join(f"{name(t)} {t['accuracy']:.1%}" for t in search["tried"])
    chosen = next(t for t in search["tried"] if t["chosen"])
    return (f"allocations measured on {search['images']} training images after batch-norm correction: {tried}; "
            f"kept: {name(chosen)}")


def _sensitivity_structured(model: nn.Module, ctx: Context, p: dict) -> tuple[nn.Module, int, dict, dict]:
    """Structured allocation=sensitivity: per-group ratios from the scan for uniform pruning's MACs at
    p["ratio"], one candidate per SEARCH, each pruned and corrected as the result will be and measured
    on the scan's training images; the most accurate is kept (ties: the earlier). Returns (the pruned
    model, batch norms corrected, {layer: fraction of its output channels removed}, what was targeted and
    tried)."""
    from .. import allocation, sensitivity
    scan = allocation.allocation_scan(ctx.teacher, ctx.data, "prune", "structured", ctx.progress)
    emit(ctx.progress, stage="prune", kind="message", message="choosing each layer's ratio from the sensitivity scan")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the dependency graph: thousands of tiny tensor ops (see structured_prune)
    try:
        plan = allocation.StructuredPlan(model)
    finally:
        torch.set_num_threads(threads)
    images, labels = sensitivity.scan_images(ctx.data, allocation.ALLOCATION_SCAN)
    curves = {"scan": scan, "uniform": scan}
    tried, best = [], None
    for i, (source, shift) in enumerate(SEARCH):
        if source not in curves:
            emit(ctx.progress, stage="prune", kind="message",
                 message=f"scanning each group around uniform pruning at {p['ratio']:g}")
            curves[source] = allocation.context_scan(model, images, labels, plan, p["ratio"], p["channel_multiple"],
                                                     bn_correction=p["bn_correction"])
        kept, macs = allocation.allocate_structured(curves[source], plan, p["ratio"], p["channel_multiple"],
                                                    STRUCTURED_MAX_RATIO, shift)
        same = next((t for t in tried if t["kept"] == kept), None)
        if same is not None:   # an allocation already measured
            tried.append(dict(same, source=source, max_shift=shift))
            continue
        emit(ctx.progress, stage="prune", kind="message",
             message=f"measuring allocation {i + 1}/{len(SEARCH)} ({source}, each ratio within "
                     f"{'any' if shift is None else f'±{shift:g}'} of {p['ratio']:g})")
        candidate = copy.deepcopy(model)
        corrected = _prune_and_correct(candidate, ctx, p, {g: allocation.ratio_for_kept(plan.channels[g], k)
                                                           for g, k in kept.items()}, None)
        acc = sensitivity.accuracy_on(candidate, images, labels)
        tried.append({"source": source, "max_shift": shift, "kept": kept, "macs": int(macs["macs"]),
                      "accuracy": acc})
        if best is None or acc > best[0]:
            best = (acc, len(tried) - 1, candidate, corrected, macs)
    acc, index, pruned, corrected, macs = best
    kept = tried[index]["kept"]
    layers = {}
    for g, k in kept.items():
        for name in plan.members[g]:
            layers[name] = round(1 - k / plan.channels[g], 4)
    for name, _ in prunable_layers(model):
        layers.setdefault(name, 0.0)   # the classifier: its outputs are the classes
    info = {"allocation_target": {"macs_uniform": int(macs["target_macs"]), "macs": int(macs["macs"]),
                                  "measure": "conv/linear MACs"}, "allocation_scan": scan.get("key"),
            "allocation_search": {"images": len(labels),
                                  "tried": [dict({k: v for k, v in t.items() if k != "kept"}, chosen=j == index)
                                            for j, t in enumerate(tried)]}}
    return pruned, corrected, {name: layers[name] for name, _ in prunable_layers(model)}, info


def _sensitivity_weight_ratios(model: nn.Module, ctx: Context, p: dict) -> tuple[dict, dict, dict]:
    """Unstructured allocation=sensitivity: {layer: fraction of its weights zeroed} (twice: for the masks and
    for extra), as many weights in all as uniform pruning at p["ratio"] zeroes (at least, and as few more as
    the layer sizes allow), and what was targeted."""
    from .. import allocation
    scan = allocation.allocation_scan(ctx.teacher, ctx.data, "prune", "unstructured", ctx.progress)
    sizes = {n: m.weight.numel() for n, m in prunable_layers(model)}
    ratios = allocation.allocate_unstructured(scan, p["ratio"], sizes)
    zeroed = sum(round(ratios[n] * sizes[n]) for n in sizes)
    info = {"allocation_target": {"zeroed_uniform": sum(round(p["ratio"] * v) for v in sizes.values()),
                                  "zeroed": zeroed, "measure": "conv/linear weights zeroed"},
            "allocation_scan": scan.get("key")}
    return ratios, dict(ratios), info


def _state(arch: str, num_classes: int, p: dict, state_dict: dict) -> dict:
    return {"format": STATE_FORMAT, "arch": arch, "num_classes": num_classes, "method": p["method"],
            "state_dict": state_dict}


def _unstructured_extra(model: nn.Module, state: dict) -> dict:
    state_dict = state["state_dict"]
    keys = {f"{n}.weight" for n, _ in prunable_layers(model)}
    prunable = sum(state_dict[k].numel() for k in keys)
    zeros = sum(int((state_dict[k] == 0).sum()) for k in keys)
    sizes = metrics.size_report(state)
    dense, gz = sizes["size_bytes"], sizes["gzip_bytes"]
    return {"prunable_params": prunable, "pruned_params": zeros, "sparsity": zeros / max(prunable, 1),
            "dense_bytes": dense, "gzip_bytes": gz, **sparse_sizes(state_dict, keys),
            "sparse_encoding": "pruned conv/linear weights as a 1-bit mask + fp32 nonzero values "
                               "(coo: int32 index + fp32 value per nonzero); other tensors dense fp32"}


def _kept_channels(before: nn.Module, after: nn.Module) -> float:
    def width(m):
        return sum(x.out_channels for x in m.modules() if isinstance(x, nn.Conv2d))
    return width(after) / max(width(before), 1)


def shrink_to_state(model: nn.Module, state_dict: dict) -> nn.Module:
    """Resize every parameter/buffer to the saved shapes and fix the layers' size attributes."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
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
            module.num_features = module.running_mean.shape[0] if module.running_mean is not None \
                else module.weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    return model


def load(state: dict, ctx: Context | None = None) -> nn.Module:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LabError("this file is not a pruned model saved by this version of the lab")
    model = build_model(state["arch"], int(state["num_classes"]))
    sd = state["state_dict"]
    if state.get("method") == "structured":
        shrink_to_state(model, sd)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise LabError(f"pruned weights do not fit {state['arch']}: {str(exc)[:160]}") from None
    return _finish(model)


SPEC = register(TechniqueSpec(
    name="prune", title="Pruning",
    summary=("Pruning removes the least important parts of a trained network: whole channels "
             "(structured, a genuinely smaller and faster model) or single weights (unstructured, "
             "zeros that only shrink the file once it is compressed or stored sparsely). "
             "A short fine-tuning afterwards wins back most of the lost accuracy."),
    params=PARAMS, apply=apply, load=load, check=check,
    url="pruning", icon=":material/content_cut:", color="#e45756", pipeline_stage=0,
    sweep_grid=({"method": "unstructured", "ratio": 0.5},
                {"method": "structured", "ratio": 0.3, "finetune_epochs": 1},
                {"method": "structured", "ratio": 0.5, "finetune_epochs": 1}),
    # 2: fine-tuning in bf16 where the hardware runs it; 3: structured results also timed in ONNX Runtime;
    # 4: DenseNets exported for that timing as a running concatenation; 5: batch-norm correction;
    # 6: structured layers keep a multiple of channel_multiple (8) channels; 7: the nearest multiple
    version=7,
    # structured allocation 2: candidates measured; 5: candidates from a scan around uniform pruning too
    # (3 and 4: experiments that never shipped, whose results may sit in a developer's cache)
    rule_versions=lambda p: ({"structured_allocation": 5}
                             if p.get("allocation") == "sensitivity" and p.get("method") == "structured" else {})))
