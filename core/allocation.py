"""Sensitivity allocation: per-layer pruning ratios or bit widths chosen from the sensitivity scan
(core/sensitivity.py) to meet the same global target as uniform settings: the MACs of uniform structured
pruning, the weights uniform unstructured pruning zeroes, an average number of bits. The scan's
single-layer losses are added up as if independent; for structured pruning a scan around uniform pruning
(context_scan) measures them in the company of the other cuts, and the pruner measures the candidates of
both (techniques/pruning.py SEARCH). docs/sensitivity.md has what each gets right and wrong.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .errors import InvalidParameter, LabError
from .progress import ProgressFn
from .sensitivity import layer_counts, scan, scan_layers, setting_label, structured_groups

# The scan that sensitivity allocation reads: on training images, so that the layers are not chosen on the
# test images the result is then measured on.
ALLOCATION_SCAN = {"eval_size": 500, "split": "train"}
ALLOCATION_TOLERANCE = 0.03   # the global target (MACs, parameters) is met within ±3%
BIT_CHOICES = (2, 3, 4, 5, 6, 7, 8)


def allocation_scan(teacher, data, technique: str, method: str, progress: ProgressFn = None) -> dict:
    """The scan sensitivity allocation uses (run once, then from the cache): default settings, 500 training
    images."""
    return scan(teacher, data, technique, method, None, ALLOCATION_SCAN["eval_size"], progress,
                split=ALLOCATION_SCAN["split"])


def drop_curve(result: dict, layer: str) -> tuple[list[float], list[float]]:
    """(settings, accuracy lost) of one layer, with (0 removed, 0 lost) for pruning; made non-decreasing in
    the strength of the setting (a layer that happened to gain accuracy at some ratio counts as losing none)."""
    row = next(r for r in result["layers"] if r["name"] == layer)
    base = result["baseline_accuracy"]
    pts = sorted((float(s), base - row["accuracy"][setting_label(s)]) for s in result["settings"]
                 if row["accuracy"].get(setting_label(s)) is not None)
    if result["technique"] == "prune":
        if result.get("anchored", True):   # a context scan's curve passes through its own base instead
            pts = [(0.0, 0.0)] + [p for p in pts if p[0] > 0]
        xs, ys, worst = [], [], -math.inf
        for x, y in pts:
            worst = max(worst, y)
            xs.append(x)
            ys.append(worst)
        return xs, ys
    # quantize: fewer bits lose more; 16 bits lose nothing
    pts = [p for p in pts] + [(16.0, 0.0)]
    xs, ys, worst = [], [], 0.0
    for x, y in sorted(pts, reverse=True):
        worst = max(worst, y)
        xs.append(x)
        ys.append(worst)
    return xs[::-1], ys[::-1]


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1]


def _knapsack(items: list[tuple[list[float], list[float]]], budget: float, units: int = 20000) -> list[int]:
    """Multiple-choice knapsack: for each item one option (costs[i], losses[i]) so that the total cost stays
    within `budget` and the total loss is smallest (ties: the larger cost, so the budget is used). Costs are
    rounded up to budget/units, so the true total never exceeds the budget; when that leaves no room, the
    cheapest option of every item if it fits (the target is the smallest setting everywhere).
    Returns the option indices."""
    try:
        return _knapsack_rounded(items, budget, units, math.ceil)
    except LabError:
        cheapest = [min(range(len(costs)), key=costs.__getitem__) for costs, _ in items]
        if sum(costs[j] for (costs, _), j in zip(items, cheapest)) <= budget * (1 + 1e-9):
            return cheapest
        raise


def _knapsack_rounded(items, budget: float, units: int, rounding) -> list[int]:
    import numpy as np
    unit = budget / units
    inf = float("inf")
    best = np.full(units + 1, inf)
    best[0] = 0.0
    choices = []
    tie = 1e-9 / max(budget, 1e-12)

    def width(c: float) -> int:
        return int(rounding(c / unit - 1e-9 if rounding is math.ceil else c / unit + 1e-9))
    for costs, losses in items:
        new = np.full(units + 1, inf)
        pick = np.full(units + 1, -1, dtype=np.int16)
        for j, (c, loss) in enumerate(zip(costs, losses)):
            w = width(c)
            if w > units:
                continue
            cand = np.full(units + 1, inf)
            cand[w:] = best[:units + 1 - w] + loss - tie * c
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        choices.append(pick)
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        raise LabError("no allocation fits the target (even the smallest setting of every layer is too large)")
    out = []
    for costs, pick in zip(reversed([it[0] for it in items]), reversed(choices)):
        j = int(pick[end])
        out.append(j)
        end -= width(costs[j])
    return out[::-1]


def allocate_bits(result: dict, target_bits: float, sizes: dict[str, int]) -> dict[str, int]:
    """Per-layer weight bits (BIT_CHOICES) whose average weighted by parameters is at most `target_bits` and
    as close to it as the layer sizes allow, with the smallest sum of the scan's single-layer losses."""
    names = [n for n in sizes]
    items = []
    for n in names:
        xs, ys = drop_curve(result, n)
        items.append(([b * sizes[n] for b in BIT_CHOICES], [_interp(xs, ys, b) for b in BIT_CHOICES]))
    picks = _knapsack(items, target_bits * sum(sizes.values()))
    return {n: BIT_CHOICES[j] for n, j in zip(names, picks)}


def allocate_unstructured(result: dict, ratio: float, sizes: dict[str, int], step: float = 0.01) -> dict[str, float]:
    """Per-layer fractions of weights zeroed (0 to the scan's largest ratio) that zero at least as many weights
    as `ratio` of every layer (and as few more as possible) with the smallest sum of single-layer losses."""
    top = max(result["settings"])
    if ratio > top + 1e-9:
        raise InvalidParameter("ratio", ratio, f"at most {top:g} with allocation=sensitivity (the scan's largest ratio)")
    grid = [round(i * step, 4) for i in range(int(round(top / step)) + 1)]
    names = list(sizes)
    items = []
    for n in names:
        xs, ys = drop_curve(result, n)
        # the cost is what is kept: at most the weights uniform pruning keeps
        items.append(([sizes[n] - round(r * sizes[n]) for r in grid], [_interp(xs, ys, r) for r in grid]))
    kept = sum(sizes[n] - round(ratio * sizes[n]) for n in names)
    picks = _knapsack(items, kept)
    return {n: grid[j] for n, j in zip(names, picks)}


def kept_channels(channels: int, ratio: float, multiple: int = 1) -> int:
    """Channels torch-pruning keeps of `channels` at `ratio` in the lab's pruner (nearest multiple)."""
    n_pruned = channels - int(channels * (1 - ratio))
    if n_pruned <= 0:
        return channels
    kept = channels - n_pruned
    if multiple > 1:
        kept = max(multiple, multiple * int(kept / multiple + 0.5))
    return min(channels, kept)


def ratio_for_kept(channels: int, kept: int) -> float:
    """A ratio at which the lab's pruner keeps exactly `kept` of `channels` (kept a multiple already)."""
    return 0.0 if kept >= channels else 1 - (kept + 0.5) / channels


class StructuredPlan:
    """MACs of a model as a function of the channels each torch-pruning group keeps (conv/linear layers:
    MACs × kept out / out × kept in / in), for choosing per-group ratios that meet a global MACs target.
    A layer's input may concatenate several groups (DenseNet): its kept fraction is theirs summed."""

    def __init__(self, model: nn.Module, input_size=(1, 3, 32, 32)):
        self.dg, found = structured_groups(model)
        self.found = found   # (representative, torch-pruning group, importance per channel)
        names = {m: n for n, m in model.named_modules()}
        counts = layer_counts(model, input_size)
        self.groups = [rep for rep, _, _ in found]
        self.channels = {rep: len(imp) for rep, _, imp in found}
        self.members: dict[str, list[str]] = {}
        out_of, in_of = {}, {}
        for rep, group, _ in found:
            self.members[rep] = []
            for dep, _ in group:
                m = dep.target.module
                if not isinstance(m, (nn.Conv2d, nn.Linear)) or m not in names:
                    continue
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    out_of[names[m]] = rep
                    self.members[rep].append(names[m])
                elif self.dg.is_in_channel_pruning_fn(dep.handler):
                    in_of.setdefault(names[m], []).append(rep)
        self.layers = [(n, counts[n]["macs"], out_of.get(n), tuple(dict.fromkeys(in_of.get(n, ()))))
                       for n, _ in scan_layers(model)]
        self.modules = {rep: dict(model.named_modules())[rep] for rep in self.groups}

    def macs(self, kept: dict[str, int]) -> float:
        total = 0.0
        for _, macs, g_out, g_in in self.layers:
            f = 1.0
            if g_out is not None:
                f *= kept[g_out] / self.channels[g_out]
            if g_in:
                f *= sum(kept[g] for g in g_in) / sum(self.channels[g] for g in g_in)
            total += macs * f
        return total

    def uniform(self, ratio: float, multiple: int) -> dict[str, int]:
        return {g: kept_channels(self.channels[g], ratio, multiple) for g in self.groups}

    def weight(self, group: str) -> float:
        """MACs of the layers a group's channels come from, and its share of those they feed (full width)."""
        total = 0.0
        for _, macs, g_out, g_in in self.layers:
            if group == g_out:
                total += macs
            if group in g_in:
                total += macs * self.channels[group] / sum(self.channels[g] for g in g_in)
        return total


def allocate_structured(result: dict, plan: StructuredPlan, ratio: float, multiple: int,
                        max_ratio: float = 0.9, max_shift: float | None = None) -> tuple[dict[str, int], dict]:
    """Channels kept per group so that the model's conv/linear MACs are those of uniform pruning at `ratio`
    (within ALLOCATION_TOLERANCE, from below where possible) with a small sum of single-layer losses;
    with `max_shift`, each group's ratio stays within that much of `ratio` (0: uniform).

    Lagrangian choice per group (loss + λ · MACs share), λ bisected on the exact MACs of the plan, then
    channels given back greedily (most loss saved per MAC) while the target allows. Returns (kept per group,
    {"target_macs", "macs"})."""
    uniform = plan.uniform(ratio, multiple)
    target = plan.macs(uniform)
    full = plan.macs({g: plan.channels[g] for g in plan.groups})
    options, losses, weight = {}, {}, {}
    for g in plan.groups:
        c = plan.channels[g]
        low = kept_channels(c, max_ratio, multiple)
        ks = {k for k in range(1, c + 1) if k >= low and (k % multiple == 0 or k == c)} | {c}
        if max_shift is not None:   # the uniform choice always stays, so the target can be met
            ks = {k for k in ks if abs((1 - k / c) - ratio) <= max_shift + 1e-9} | {uniform[g]}
        ks = sorted(ks)
        xs, ys = drop_curve(result, g)
        options[g] = ks
        losses[g] = [_interp(xs, ys, 1 - k / c) for k in ks]
        weight[g] = plan.weight(g) / full

    def choose(lam: float) -> dict[str, int]:
        out = {}
        for g in plan.groups:
            c = plan.channels[g]
            scores = [loss + lam * weight[g] * k / c for k, loss in zip(options[g], losses[g])]
            out[g] = options[g][min(range(len(scores)), key=lambda i: (scores[i], -options[g][i]))]
        return out

    lo, hi = 0.0, 1.0
    while plan.macs(choose(hi)) > target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if plan.macs(choose(mid)) > target:
            lo = mid
        else:
            hi = mid
    kept = choose(hi)
    # give channels back while the target allows: the move that saves the most loss per MAC first
    while True:
        now = plan.macs(kept)
        best = None
        for g in plan.groups:
            i = options[g].index(kept[g])
            if i + 1 >= len(options[g]):
                continue
            trial = dict(kept, **{g: options[g][i + 1]})
            extra = plan.macs(trial) - now
            if plan.macs(trial) > target * (1 + ALLOCATION_TOLERANCE / 3):
                continue
            gain = losses[g][i] - losses[g][i + 1]
            score = gain / max(extra, 1e-9)
            if best is None or score > best[0]:
                best = (score, trial)
        if best is None or (best[0] <= 0 and plan.macs(kept) >= target * (1 - ALLOCATION_TOLERANCE / 3)):
            break
        kept = best[1]
    return kept, {"target_macs": target, "macs": plan.macs(kept)}


def context_scan(model: nn.Module, images, labels, plan: StructuredPlan, ratio: float, multiple: int,
                 settings=(0.1, 0.3, 0.5, 0.7, 0.9), bn_correction: bool = True) -> dict:
    """A structured scan around uniform pruning instead of around the teacher: every group loses what the
    lab's pruner removes at `ratio`, then one group at a time is moved to each setting, and the accuracy on
    `images` is measured against that uniformly pruned model. A single-layer scan misses how cuts compound
    along a plain chain (VGG); measured in the company of the other cuts, each group's loss (or gain, below
    `ratio`) includes them. Channels are zeroed as the scan zeroes them (sensitivity._ZeroedGroup), ranked
    by the teacher's importance, and every weight is restored afterwards. With `bn_correction` every state
    is measured after the batch-norm correction the run applies (a uniformly pruned VGG16-BN is near chance
    without it, which leaves nothing to compare). Returns a scan-like dict (one row per group, named by its
    representative) for `allocate_structured`."""
    import torch
    from .sensitivity import CorrectedBatchNorms, SuffixEvaluator, _ZeroedGroup
    names = {m: n for n, m in model.named_modules()}
    uniform = {rep: plan.channels[rep] - k for rep, k in plan.uniform(ratio, multiple).items()}
    groups = {rep: (group, imp) for rep, group, imp in plan.found}
    cache: dict = {}

    def zeros(rep: str, n: int) -> list:
        """What removing the n least important channels of group `rep` zeroes: (tensor, dim, index)."""
        if (rep, n) not in cache:
            group, imp = groups[rep]
            idx = torch.topk(imp, k=min(n, len(imp) - 1), largest=False).indices.tolist() if n > 0 else []
            cache[rep, n] = [it for it in _ZeroedGroup(plan.dg, group, idx).items if it[0] is not None] if idx else []
        return cache[rep, n]

    tensors = {rep: {id(t): t for t, _, _ in zeros(rep, max(uniform[rep], 1))} for rep in groups}
    users: dict[int, list[str]] = {}
    for rep, ts in tensors.items():
        for key in ts:
            users.setdefault(key, []).append(rep)
    originals = {key: t.detach().clone() for ts in tensors.values() for key, t in ts.items()}
    every = {key: t for ts in tensors.values() for key, t in ts.items()}

    def set_state(removed: dict[str, int], keys) -> None:
        with torch.no_grad():
            for key in keys:
                t = every[key]
                t.copy_(originals[key])
                for rep in users[key]:
                    for u, dim, idx in zeros(rep, removed[rep]):
                        if u is t:
                            u.index_fill_(dim, idx, 0.0)

    touched = {rep: {names[d.target.module] for d, _ in groups[rep][0]
                     if d.target.module in names and list(d.target.module.parameters(recurse=False))}
               for rep in groups}
    rows, labels_of = [], [setting_label(x) for x in settings]
    bn = CorrectedBatchNorms(model).record(images) if bn_correction else None   # the teacher's statistics
    try:
        set_state(uniform, every)
        ev = SuffixEvaluator(model, images, labels, list(touched.values()), bn=bn)
        base = ev.base_accuracy()
        for rep in groups:
            acc = {}
            for x, label in zip(settings, labels_of):
                n = plan.channels[rep] - kept_channels(plan.channels[rep], x, multiple)
                if n == uniform[rep]:
                    acc[label] = base
                    continue
                set_state(dict(uniform, **{rep: n}), tensors[rep])
                acc[label] = ev.accuracy(touched[rep])
                set_state(uniform, tensors[rep])
            acc[setting_label(ratio)] = base
            rows.append({"name": rep, "accuracy": acc})
    finally:
        if bn is not None:
            bn.close()   # the model may be the teacher: no hook stays
        with torch.no_grad():
            for key, t in every.items():
                t.copy_(originals[key])
    return {"technique": "prune", "method": "structured", "anchored": False, "baseline_accuracy": base,
            "settings": sorted(set(settings) | {ratio}), "layers": rows, "eval_images": len(labels)}
