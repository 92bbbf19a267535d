"""What the lab's results show, as pure functions: grid summaries, the compute frontier, the
relative-bias tables and the translation test.

- `error_vs_data`: test error per architecture and data size, mean and spread over seeds;
- `convergence`: the convergence check of a run from its validation curve;
- `compute_curves` / `best_per_budget`: the ViT size sweep as error against training
  compute (3 × forward FLOPs × examples seen; each width trained to several budgets, every
  point a finished run), and which size is best at each budget;
- `relative_tables`: each head's learned bias w_{i−j} as a (2H−1)×(2W−1) image;
- `shift_images`, `attention_shift_distance`, `feature_shift_error`: the translation test.
  Shift the input by whole patches; an equivariant layer's output on the shifted input is its
  output on the original, shifted. Borders (where content entered or left) are excluded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explorer.attention import EachLayer, capture
from explorer.lab.engine import LabRun
from explorer.lab.models import (
    ARCH_LABELS,
    PATCH,
    RelPosAttention,
    relative_table,
)
from explorer.patches import grid_for, patch_size

# ---------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorPoint:
    arch: str
    train_images: int
    mean: float  # test error, mean over seeds
    low: float  # min and max over seeds
    high: float
    seeds: int


def is_main(row: dict, variant: str = "original") -> bool:
    """A run of the architecture grid (`LabRun.in_arch_grid`) on ``variant`` data."""
    return LabRun.of(row).in_arch_grid and row["variant"] == variant


def seed_runs(rows: list[dict], arch: str, train_images: int, *,
              variant: str = "original") -> list[dict]:
    """The grid's runs of ``arch`` at its grid size on ``train_images`` images of
    ``variant``, one per seed."""
    return [r for r in rows if (r["arch"], r["train_images"]) == (arch, train_images)
            and is_main(r, variant)]


def error_vs_data(rows: list[dict], variant: str = "original") -> dict[str, list[ErrorPoint]]:
    """Test error (1 − accuracy) of each architecture at its grid size, per data size; the
    architectures in the grid's order (`ARCH_LABELS`), whatever the rows', so every figure
    and table built from it lists them alike."""
    by = defaultdict(list)
    for r in rows:
        if is_main(r, variant):
            by[(r["arch"], r["train_images"])].append(1.0 - r["test_acc"])
    out: dict[str, list[ErrorPoint]] = defaultdict(list)
    order = list(ARCH_LABELS)
    for (arch, n), errs in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        out[arch].append(ErrorPoint(arch, n, float(np.mean(errs)), min(errs), max(errs),
                                    len(errs)))
    return dict(out)


def winners(curves: dict[str, list[ErrorPoint]]) -> dict[int, str]:
    """The architecture with the lowest mean test error at each data size where at least two
    architectures have finished (one alone wins nothing)."""
    at: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for arch, points in curves.items():
        for p in points:
            at[p.train_images].append((p.mean, arch))
    return {n: min(runs)[1] for n, runs in sorted(at.items()) if len(runs) > 1}


def _sizes(ns: list[int]) -> str:
    return f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}–{ns[-1]:,}"


def winners_sentence(curves: dict[str, list[ErrorPoint]]) -> str:
    """Which architecture has the lowest mean test error, over runs of consecutive sizes,
    naming the architectures not yet finished at those sizes: "Lowest test error: CNN at
    500–7,500 images, CoAtNet (mini) at 20,000–60,000 (CoAtNet (mini) not yet at 500)."."""
    best = winners(curves)
    if not best:
        return ""
    groups: list[tuple[str, list[int]]] = []
    for n, arch in best.items():
        if groups and groups[-1][0] == arch:
            groups[-1][1].append(n)
        else:
            groups.append((arch, [n]))
    text = "Lowest test error: " + ", ".join(
        f"**{ARCH_LABELS[a]}** at {_sizes(ns)} images" for a, ns in groups)
    missing = []
    for arch, points in curves.items():
        absent = sorted(set(best) - {p.train_images for p in points})
        if absent:
            missing.append(f"{ARCH_LABELS[arch]} at {', '.join(f'{n:,}' for n in absent)}")
    if missing:
        text += f" (not finished yet: {'; '.join(missing)} images)"
    return text + "."


# A change of less than this (in error, i.e. accuracy points / 100) is "about the same".
SAME = 0.01


def gap_sentence(curves: dict[str, list[ErrorPoint]], arch: str = "vit",
                 reference: str = "cnn") -> str:
    """How the test-error gap between ``arch`` and ``reference`` moves from the smallest to
    the largest data size both were trained on, and where ``arch`` overtakes, if it does (or
    how often the lead changes hands, if more than once)."""
    a = {p.train_images: p.mean for p in curves.get(arch, [])}
    r = {p.train_images: p.mean for p in curves.get(reference, [])}
    common = sorted(set(a) & set(r))
    if len(common) < 2:
        return ""
    gaps = [100 * (a[n] - r[n]) for n in common]  # > 0: arch has the higher error
    lo, hi = common[0], common[-1]

    def behind(g: float) -> str:
        return (f"{abs(g):.1f} points behind" if g > 0 else f"{abs(g):.1f} points ahead of")

    text = (f"The {ARCH_LABELS[arch]} is {behind(gaps[0])} the {ARCH_LABELS[reference]} at "
            f"{lo:,} images and {behind(gaps[-1])} it at {hi:,}")
    # where the order changes (> 0: behind, ≤ 0: level or ahead). A gap that changes sign
    # does not "narrow": once is an overtaking, more than once a lead that changes hands,
    # said in the first sentence (presenter mode shows that one, `lecture.fold_details`),
    # rather than naming the first crossing as if it held
    flips = [n for n, g0, g1 in zip(common[1:], gaps, gaps[1:], strict=False)
             if (g0 > 0) != (g1 > 0)]
    if len(flips) == 1:
        verb = "overtakes it" if gaps[-1] <= 0 else "falls behind it"
        return text + f": the {ARCH_LABELS[arch]} {verb} at {flips[0]:,} images."
    if flips:
        later = [(n, g) for n, g in zip(common, gaps, strict=True) if n >= flips[0]]
        span = max(abs(g) for _, g in later)
        ahead = and_list([f"{n:,}" for n, g in later if g <= 0])
        behind_at = and_list([f"{n:,}" for n, g in later if g > 0])
        return text + (f", but the lead changes hands {len(flips)} times on the way. From "
                       f"{flips[0]:,} images on the two stay within {span:.1f} points (the "
                       f"{ARCH_LABELS[arch]} ahead at {ahead} images, behind at {behind_at}).")
    if abs(gaps[-1]) < abs(gaps[0]) - 100 * SAME:
        text += ": the gap narrows with data"
    elif abs(gaps[-1]) > abs(gaps[0]) + 100 * SAME:
        text += ": the gap widens with data"
    else:
        text += ": the gap stays about the same"
    # the two ends alone would hide a gap that first widens, then narrows (or the reverse):
    # name the size where it is widest (narrowest) when that lies between them
    ends = (abs(gaps[0]), abs(gaps[-1]))
    inner = [(abs(g), n) for n, g in zip(common[1:-1], gaps[1:-1], strict=True)]
    if inner:
        wide, narrow = max(inner), min(inner)
        if wide[0] > max(ends) + 100 * SAME:
            text += f" (widest at {wide[1]:,} images: {wide[0]:.1f} points)"
        elif narrow[0] < min(ends) - 100 * SAME:
            text += f" (narrowest at {narrow[1]:,} images: {narrow[0]:.1f} points)"
    return text + "."


def seed_sentence(rows: list[dict]) -> str:
    """How far apart two seeds of the same run land (the architecture grid, both variants):
    the largest and the median spread in test accuracy over the runs trained with more than
    one seed, the scale below which a difference between architectures may be chance; ""
    before any run has a second seed."""
    by = defaultdict(list)
    for r in rows:
        if LabRun.of(r).in_arch_grid:
            by[(r["arch"], r["train_images"], r["variant"])].append(r["test_acc"])
    spreads = sorted(100 * (max(a) - min(a)) for a in by.values() if len(a) > 1)
    if not spreads:
        return ""
    runs = "1 run of the grid has" if len(spreads) == 1 else f"{len(spreads)} runs of the grid have"
    return (f"Seeds: {runs} finished with a second seed; the seeds of a run land "
            f"within {spreads[-1]:.1f} points of each other in test accuracy (median "
            f"{float(np.median(spreads)):.1f}; the shaded bands): a difference between "
            "architectures smaller than that may be chance." + _seed_winners(rows))


def _seed_winners(rows: list[dict]) -> str:
    """Whether each seed alone gives the same winner (lowest test error) at a data size, on
    the original images: a seed draws the training images, the initialisation and the batch
    order, and its training images are the same for every architecture, so the architectures
    compare within a seed. Checked at the sizes where every architecture trained there has
    finished the same two or more seeds; "" where there is none."""
    err: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if is_main(r):
            err[r["train_images"]][r["arch"]][r["seed"]] = 1.0 - r["test_acc"]
    same, differ = [], []
    for n, by_arch in sorted(err.items()):
        seeds = {frozenset(s) for s in by_arch.values()}
        if len(by_arch) < 2 or len(seeds) != 1 or len(seed_set := next(iter(seeds))) < 2:
            continue
        best = {s: min(by_arch, key=lambda a, s=s: by_arch[a][s]) for s in sorted(seed_set)}
        if len(set(best.values())) == 1:
            same.append(n)
        else:
            differ.append(f"{n:,} images (" + ", ".join(
                f"the {ARCH_LABELS[a]} with seed {s}" for s, a in best.items()) + ")")
    if not same and not differ:
        return ""
    text = (" Each seed also draws the training images, the same for every architecture, "
            "so the architectures compare within a seed:")
    text += " the lowest test error goes to the same architecture with every seed"
    if same:
        text += f" at {and_list([f'{n:,}' for n in same])} images"
    if differ:
        text += (", but not at " if same else " at none of the sizes with two seeds: not at ") \
            + and_list(differ) + ": there the winner depends on the seed"
    return text + "."


def and_list(items: list[str]) -> str:
    """Items as a list in words: "a", "a and b", "a, b and c"."""
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def scramble_sentence(rows: list[dict]) -> str:
    """Where the scrambled runs land: each architecture's mean change in test error from
    original to scrambled images, over the data sizes every architecture shown was trained
    on both ways (so that the means compare; while the grid fills in, an architecture with
    no such size is shown over its own, and says which)."""
    original, scrambled = error_vs_data(rows), error_vs_data(rows, "scrambled")
    diffs: dict[str, dict[int, float]] = {}
    for arch, points in scrambled.items():
        base = {p.train_images: p.mean for p in original.get(arch, [])}
        if both := {p.train_images: p.mean - base[p.train_images] for p in points
                    if p.train_images in base}:
            diffs[arch] = both
    if not diffs:
        return ""
    common = set.intersection(*(set(d) for d in diffs.values()))
    changes = {arch: float(np.mean([d[n] for n in (common or d)])) for arch, d in diffs.items()}
    parts = []
    for arch, d in sorted(changes.items(), key=lambda kv: kv[1]):
        own = "" if common else f" ({', '.join(f'{n:,}' for n in sorted(diffs[arch]))} images)"
        if abs(d) < SAME:  # the change in accuracy, as "loses" and "gains" read
            parts.append(f"the {ARCH_LABELS[arch]} is unchanged ({-100 * d:+.1f} points){own}")
        else:
            parts.append(f"the {ARCH_LABELS[arch]} {'loses' if d > 0 else 'gains'} "
                         f"{100 * abs(d):.1f} points{own}")
    over = (f"mean over the sizes trained both ways: {', '.join(f'{n:,}' for n in sorted(common))}"
            " images" if common else "mean over each one's sizes trained both ways")
    sentence = (f"On scrambled images, test accuracy against the original images ({over}): "
                + "; ".join(parts) + ".")
    if "vit" in changes:
        # its scrambled run is its original run from another, equally likely initialisation
        # (the permuted patch projection and position embeddings; the same batches), so its
        # change measures what chance alone does to a run
        sentence += (f" The {ARCH_LABELS['vit']} cannot tell the two apart, so its "
                     f"{100 * abs(changes['vit']):.1f}-point change is what another "
                     "initialisation gives: a change that small is chance, not bias.")
    return sentence


# The convergence rule (issue 20): in the last 20% of training the validation accuracy
# improves by less than 0.3 points, and train accuracy is at least test accuracy. The gain is
# read from a line through every evaluation of the last fifth (and the last one at or before
# its start), not from two single evaluations: on a validation split of 50–2,000 images one
# evaluation wobbles by ±0.3–2 points, and two points alone made the verdict a coin flip on
# the smallest runs. The line is Theil–Sen's (the median of the slopes between every pair of
# evaluations), not least squares': a least-squares line was pulled +0.34 points by a single
# image's dip on a flat 120-image curve (the CNN on 1,200 images), and on a split that small
# one image is 0.8 points.
LAST_SHARE = 0.2
MAX_LATE_GAIN = 0.003


@dataclass(frozen=True)
class Convergence:
    late_gain: float  # rise of the fitted line over the last 20% of the steps
    train_minus_test: float
    converged: bool


def late_line(curve: list[tuple], steps: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Theil–Sen's line through the evaluations from the last one at or before
    ``1 − LAST_SHARE`` of ``steps`` to the end (slope: the median of the slopes between every
    pair; intercept: the median of y − slope·x), as its two ends ((step, accuracy) at the
    first and the last of those evaluations); with one evaluation, a flat line on it."""
    cut = (1 - LAST_SHARE) * steps
    start = max((i for i, (step, *_) in enumerate(curve) if step <= cut), default=0)
    points = [(step, v) for step, v, *_ in curve[start:]]
    slopes = [(y1 - y0) / (x1 - x0) for i, (x0, y0) in enumerate(points)
              for x1, y1 in points[i + 1:] if x1 != x0]
    slope = float(np.median(slopes)) if slopes else 0.0
    intercept = float(np.median([y - slope * x for x, y in points]))
    x0, x1 = points[0][0], points[-1][0]
    return (x0, intercept + slope * x0), (x1, intercept + slope * x1)


def late_gain(curve: list[tuple], steps: int) -> float:
    """The validation accuracy's rise over the last ``LAST_SHARE`` of ``steps``: `late_line`'s
    rise (with two evaluations: their difference)."""
    (_, y0), (_, y1) = late_line(curve, steps)
    return y1 - y0


def convergence(row: dict) -> Convergence:
    """The convergence check of one run from its validation curve (`late_gain`) and its train
    and test accuracy."""
    gain = late_gain(row["curve"], row["steps"])
    gap = row["train_acc"] - row["test_acc"]
    return Convergence(gain, gap, gain < MAX_LATE_GAIN and gap >= 0)


def run_label(row: dict) -> str:
    """A grid run in words: "ViT (absolute positions), 60,000 images, seed 0, scrambled"."""
    variant = f", {row['variant']}" if row["variant"] != "original" else ""
    return f"{ARCH_LABELS[row['arch']]}, {row['train_images']:,} images, seed {row['seed']}{variant}"


def failed_checks(c: Convergence) -> list[str]:
    """Which parts of the convergence check ``c`` fails, in words ([] when it passes): the
    one wording the tab and the lecture use for "why this run has not converged"."""
    why = []
    if c.late_gain >= MAX_LATE_GAIN:
        why.append(f"validation accuracy still rising: {100 * c.late_gain:+.1f} points in the "
                   f"last {100 * LAST_SHARE:.0f}% of steps")
    if c.train_minus_test < 0:
        why.append(f"train accuracy {-100 * c.train_minus_test:.1f} points below test")
    return why


def unconverged_sentence(rows: list[dict], archs: Collection[str] | None = None,
                         variants: Collection[str] = ("original", "scrambled")) -> str:
    """The architecture grid's runs of ``archs`` (all: None) on ``variants`` that ended
    without passing the convergence check, and why, so that a sentence comparing their
    points says that a point may still move ("" when every such run passed). A run lands
    unconverged only at the last attempt the rule allows (`grid.next_attempts`)."""
    parts = []
    for r in rows:
        if not LabRun.of(r).in_arch_grid or r["variant"] not in variants \
                or (archs is not None and r["arch"] not in archs):
            continue
        why = failed_checks(convergence(r))
        if why:
            parts.append(f"{run_label(r)} ({'; '.join(why)})")
    if not parts:
        return ""
    return (f"Not converged when the rule's last attempt ended, so these points may still move "
            f"with longer training: {'; '.join(parts)}.")


@dataclass(frozen=True)
class ComputeCurve:
    width: int
    params: int
    train_images: int
    compute: list[float]  # training FLOPs of each budget the width was trained to
    error: list[float]  # the finished run's test error at each


def compute_curves(rows: list[dict], attempts: Sequence[dict] = (), arch: str = "vit",
                   train_images: set[int] | None = None) -> list[ComputeCurve]:
    """Test error against training compute (3 × forward FLOPs × examples seen): one curve per
    (width, data size), one point per finished budget, seed 0, original data.

    Args:
        attempts: the runs the convergence rule trained again (`grid.ATTEMPTS_CSV`): each
            is a complete run at its own budget, so a point of its curve too.
        arch: which architecture's runs.
        train_images: the data sizes to keep; None = those where ``arch`` was trained at
            more than one width (the size sweep).
    """
    runs = [r for r in [*rows, *attempts] if r["arch"] == arch and r["seed"] == 0
            and r["variant"] == "original"]
    widths = defaultdict(set)
    for r in runs:
        widths[r["train_images"]].add(r["width"])
    if train_images is None:
        train_images = {n for n, ws in widths.items() if len(ws) > 1}
    groups = defaultdict(list)
    for r in runs:
        if r["train_images"] in train_images:
            groups[(r["train_images"], r["width"])].append(r)
    curves = []
    for (n, width), group in sorted(groups.items()):
        group.sort(key=lambda r: r["steps"])
        curves.append(ComputeCurve(
            width, group[0]["params"], n,
            [3.0 * r["flops"] * r["steps"] * r["batch"] for r in group],
            [1.0 - r["test_acc"] for r in group]))
    return curves


def best_per_budget(curves: list[ComputeCurve], budgets: np.ndarray) -> list[int | None]:
    """For each compute budget, the width whose curve reached the lowest error within it
    (each curve's best point at or below the budget); None where no curve has a point."""
    best = []
    for b in budgets:
        choice, low = None, np.inf
        for c in curves:
            errs = [e for x, e in zip(c.compute, c.error, strict=False) if x <= b]
            if errs and min(errs) < low:
                choice, low = c.width, min(errs)
        best.append(choice)
    return best


# ---------------------------------------------------------------------------------------
# Relative attention
# ---------------------------------------------------------------------------------------


def relative_tables(model: nn.Module) -> torch.Tensor:
    """(layers, heads, 2H−1, 2W−1) learned bias of every `RelPosAttention` block; the centre
    entry is a patch attending to itself, right of centre keys to its right."""
    tables = [relative_table(b.attn) for b in model.blocks if isinstance(b.attn, RelPosAttention)]
    if not tables:
        raise ValueError("This model has no relative-position bias.")
    return torch.stack(tables)


# ---------------------------------------------------------------------------------------
# The translation test
# ---------------------------------------------------------------------------------------


def shift_images(x: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) shifted down by ``dy`` and right by ``dx`` pixels; what enters is ``fill``."""
    out = torch.full_like(x, fill)
    H, W = x.shape[-2:]
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        x[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


def interior(grid: tuple[int, int], dy: int, dx: int, margin: int = 1) -> torch.Tensor:
    """Grid positions (row-major indices) p whose shifted position p + (dy, dx) is on the grid
    too, both at least ``margin`` cells from every border (where zero padding or the shifted
    content's edge could change what a position sees)."""
    rows, cols = grid
    keep = []
    for r in range(rows):
        for c in range(cols):
            r2, c2 = r + dy, c + dx
            if all(margin <= v < n - margin for v, n in ((r, rows), (c, cols), (r2, rows),
                                                          (c2, cols))):
                keep.append(r * cols + c)
    return torch.tensor(keep, dtype=torch.long)


def attention_shift_distance(model: nn.Module, pixels: torch.Tensor, shift: int = 1,
                             margin: int = 1) -> torch.Tensor:
    """Per layer, how far the attention on the input shifted by ``shift`` patches (down and
    right) is from the unshifted input's attention, shifted: the total-variation distance
    between each interior query's attention over interior keys (both renormalised), averaged
    over queries, heads and images. 0 = shift-equivariant, 1 = disjoint.

    Returns:
        (layers,) distances.
    """
    ph, pw = patch_size(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    shifted = shift_images(pixels, shift * ph, shift * pw, fill=float(pixels.min()))
    grid = grid_for(pixels.shape[-2:], (ph, pw))
    keep = interior(grid, shift, shift, margin)
    moved = keep + shift * grid[1] + shift  # the same patches after the shift
    rows_a: list[torch.Tensor] = []

    def restricted(probs, queries):
        p = probs[:, :, prefix + queries][..., prefix + queries]
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12)

    capture(model, pixels, [EachLayer(lambda _l, p: rows_a.append(restricted(p, keep)))])
    dist: list[torch.Tensor] = []
    capture(model, shifted, [EachLayer(lambda layer, p: dist.append(
        0.5 * (restricted(p, moved) - rows_a[layer]).abs().sum(-1).mean()))])
    return torch.stack(dist)


def feature_maps(model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """(B, C, h, w) feature maps after every stage (CNN) or block (ViT, patch tokens on their
    grid), for `feature_shift_error`."""
    maps: list[torch.Tensor] = []
    if hasattr(model, "blocks"):
        grid = grid_for(pixels.shape[-2:], patch_size(model))
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        handles = [b.register_forward_hook(lambda _m, _a, out: maps.append(
            out[:, prefix:].transpose(1, 2).reshape(out.shape[0], -1, *grid)))
            for b in model.blocks]
    else:
        stages = [m for m in model.features if not isinstance(m, nn.MaxPool2d)]
        handles = [m.register_forward_hook(lambda _m, _a, out: maps.append(out)) for m in stages]
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        for h in handles:
            h.remove()
    return maps


def feature_shift_error(model: nn.Module, pixels: torch.Tensor, shift_px: int,
                        margin_px: int = 4) -> torch.Tensor:
    """Per layer, ‖F(shift x) − shift F(x)‖ / ‖F(x)‖ over interior positions, for a shift of
    ``shift_px`` pixels down and right (a whole number of every layer's stride).

    Positions within ``margin_px`` input pixels of a border (or of where the content entered)
    are excluded.

    Returns:
        (layers,) relative errors: ~0 for an equivariant layer.
    """
    fill = float(pixels.min())
    before = feature_maps(model, pixels)
    after = feature_maps(model, shift_images(pixels, shift_px, shift_px, fill=fill))
    errors = []
    H = pixels.shape[-1]
    for a, b in zip(before, after, strict=True):
        stride = H // a.shape[-1]
        s, m = shift_px // stride, -(-margin_px // stride)
        n = a.shape[-1]
        ref = a[..., m:n - m - s, m:n - m - s]
        got = b[..., m + s:n - m, m + s:n - m]
        errors.append((got - ref).norm() / ref.norm().clamp_min(1e-12))
    return torch.stack(errors)


def shift_equivariance_table(models: dict[str, nn.Module], pixels: torch.Tensor,
                             shift_px: int = PATCH) -> dict[str, dict[str, list[float]]]:
    """The translation test for several models on the same images, shifted ``shift_px``
    pixels (whole patches of every ViT): per model, ``features`` (every model) and
    ``attention`` (ViTs) per layer."""
    out = {}
    for name, model in models.items():
        entry = {}
        if hasattr(model, "blocks"):
            patches, rest = divmod(shift_px, patch_size(model)[0])
            if rest:
                raise ValueError(f"{name}: a {shift_px}-px shift is not whole patches.")
            entry["attention"] = attention_shift_distance(model, pixels, patches).tolist()
        entry["features"] = feature_shift_error(model, pixels, shift_px).tolist()
        out[name] = entry
    return out
