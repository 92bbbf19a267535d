"""The lecture "Vision Transformers" (ML@B Edu) as data: its steps in order, and its numbers.

Each step names the live view that illustrates it (`Step.figure`, built by
`explorer.ui.lecture_view`) and the tab a link opens, prepared the same way. A step's `text`
says only what holds for any model and image; every sentence about the figure shown is made
by one of the `*_note` functions below from the data the figure is drawn from (token counts,
the rollout map, the distance profile...), so the words cannot contradict the picture. The
numbers in `PAPER_*` are copied from the lecture's slides (which quote the papers); nothing
there is measured by the app, and every figure built from them says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from explorer.attention.sinks import SINK_FACTOR


@dataclass(frozen=True)
class Step:
    """One stop on the lecture's path.

    Attributes:
        title: the slide's idea in a few words.
        text: two or three plain sentences (Markdown).
        figure: which live view illustrates it (a key of `explorer.ui.lecture_tab.FIGURES`).
        tab: the tab a link opens for the full view (see `explorer.ui.links.TABS`).
        caption: what the figure shows, also the start of its download's file name.
    """

    title: str
    text: str
    figure: str
    tab: str
    caption: str


STEPS: tuple[Step, ...] = (
    Step("Text tokens",
         "A transformer reads a **sequence of tokens**: text is cut into tokens, each looked up "
         "as an embedding vector, given a position embedding, and passed through stacked "
         "attention + MLP blocks. To use it on images we first have to turn a picture into "
         "such a sequence.",
         "sequence", "tokens", "token-sequence"),
    Step("Pixels as words (iGPT)",
         "The naive way: treat every pixel as a word. 24-bit colour would need 16.7 million "
         "words, so iGPT uses a **9-bit palette** (8 levels per channel, 512 colours) and reads "
         "pixels in **raster order**, row by row. But attention costs grow with the square of "
         "the sequence, and the sequence grows with the square of the side: a 256×256 image is "
         "65,536 tokens (BERT reads 512), so iGPT stops at 64×64.",
         "rgb9", "igpt", "9-bit-palette"),
    Step("Patches and a linear projection",
         "\"An image is worth 16x16 words\": instead of pixels, cut the image into **patches**, "
         "flatten each and project it linearly to one token. The grid below shows each patch "
         "with its token index.",
         "patches", "tokens", "patch-grid"),
    Step("Position embeddings and their interpolation",
         "Attention alone does not know where a patch is, so each token gets a learned "
         "**position embedding**. Each tile shows how similar one patch's embedding is to all "
         "others. Trained at one resolution and used at another, the embeddings are "
         "**interpolated** to the new grid (try another size).",
         "positions", "tokens", "position-similarity"),
    Step("Attention and rollout",
         "In every block each token takes a weighted average of all tokens, weights from "
         "softmax(QKᵀ/√d). **Rollout** chains the attention of all layers (counting the "
         "residual path) to show which patches reach the class token; the lecture expects "
         "the object to stand out.",
         "rollout", "attention", "attention-rollout"),
    Step("A global receptive field, unlike a CNN",
         "A convolution sees only its kernel, so a CNN's receptive field grows layer by "
         "layer. A ViT's attention can reach the whole image from the first block. Each dot "
         "is one head's mean attention distance; in the ViT paper (averaged over images) "
         "some early heads already look far and the distance grows with depth.",
         "distance", "distance", "mean-attention-distance"),
    Step("Inductive bias and data",
         "CNNs build in locality, 2-D neighbourhoods and translation equivariance; a ViT "
         "has far fewer such assumptions and must **learn them from data**, so the lecture "
         "says it does worse than a CNN on little data and better with a lot. Below, the "
         "experiment **run here**: four ~0.2 M-parameter models trained from scratch on 500 "
         "to 60,000 Fashion-MNIST images, retrained longer (up to a limit) while still "
         "improving. Its tab adds scrambled images and a live run.",
         "lab-data", "lab", "lab-error-vs-training-images"),
    Step("Scaling",
         "\"Scaling Vision Transformers\": error falls when data, model size and compute grow "
         "together, and bigger models are more sample-efficient (a 2B-parameter ViT reached "
         "the ImageNet state of the art). Below, ViTs of four widths trained here, error against "
         "training compute: the dashed line is the best any size reached within each budget.",
         "lab-compute", "lab", "lab-error-vs-training-compute"),
    Step("CoAtNet: convolution meets relative attention",
         "CoAtNet adds *some* inductive bias back: early MBConv (MobileNetV2 convolution) "
         "stages, then attention with a weight that depends only on the **relative position** "
         "i−j: softmax over j of xᵢᵀxⱼ + w₍ᵢ₋ⱼ₎. Below, the learned w of every head of the "
         "relative-attention ViT trained here: a (2H−1)×(2W−1) image centred on the query.",
         "lab-bias", "lab", "lab-relative-position-bias"),
)

# The lecture's slide "Nice results!" (ViT paper, Table 2): ImageNet top-1 % and the
# pre-training compute in TPUv3-core-days.
PAPER_IMAGENET = (
    # (model, pre-training data, ImageNet top-1 %, TPUv3-core-days)
    ("ViT-H/14", "JFT-300M", 88.55, 2500),
    ("ViT-L/16", "JFT-300M", 87.76, 680),
    ("ViT-L/16", "ImageNet-21k", 85.30, 230),
    ("BiT-L (ResNet152x4)", "JFT-300M", 87.54, 9900),
    ("Noisy Student (EfficientNet-L2)", "JFT-300M", 88.4, 12300),
)
PAPER_SOURCE = "ViT paper (Dosovitskiy et al. 2021), Table 2, as quoted in the lecture"


# ---------------------------------------------------------------------------------------
# What the shown figure says: sentences computed from the data each figure is drawn from.
# ---------------------------------------------------------------------------------------

PAPER_PATCH = 16  # "An image is worth 16x16 words": the patch side the lecture quotes
TREND_CORRELATION = 0.7  # |Pearson r| of block means vs depth that counts as a trend


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def sequence_note(grid: tuple[int, int], prefix_names: list[str]) -> str:
    """Step 1: the sequence shown, counted. ``grid`` is (rows, cols) of patches."""
    rows, cols = grid
    n = rows * cols
    prefix = (f" after {_plural(len(prefix_names), 'prefix token')} ({', '.join(prefix_names)})"
              if prefix_names else "")
    return (f"Here the image is read as {rows}×{cols} = **{n} patch tokens** in raster order"
            f"{prefix}: **{n + len(prefix_names)} tokens** in all.")


def palette_note(size: tuple[int, int], colours: int) -> str:
    """Step 2: the photo shown, (height, width) px, read as pixel words; ``colours``: the
    distinct 9-bit colours it uses."""
    h, w = size
    return (f"The photo below is {w}×{h} px: as pixel words it would be **{w * h:,} tokens**; "
            f"in the 9-bit palette it uses {colours} of the 512 colours.")


def patch_note(size: tuple[int, int], patch: tuple[int, int]) -> str:
    """Step 3: tokens of the image shown. ``size`` and ``patch`` are (height, width) px."""
    (h, w), (ph, pw) = size, patch
    rows, cols = h // ph, w // pw
    note = (f"Here a {w}×{h} px image becomes **{rows * cols} tokens of {pw}×{ph} px** "
            f"({rows}×{cols} patches) instead of {w * h:,} pixel tokens.")
    if (ph, pw) != (PAPER_PATCH, PAPER_PATCH):
        paper = (h // PAPER_PATCH) * (w // PAPER_PATCH)
        note += (f" This model's patches are {pw}×{ph} px, not the title's "
                 f"{PAPER_PATCH}×{PAPER_PATCH}, which would give {paper} tokens at this size.")
    return note


@dataclass(frozen=True)
class PositionFacts:
    """Mean cosine similarity of a patch's position embedding to three kinds of others.

    Attributes:
        neighbour: the 4-adjacent patches.
        line: patches in the same row or column, not adjacent.
        other: all remaining patches.
    """

    neighbour: float
    line: float
    other: float


def position_facts(sim) -> PositionFacts:
    """`PositionFacts` of a (rows, cols, rows, cols) similarity (`position_similarity`)."""
    rows, cols = sim.shape[:2]
    r, c = np.divmod(np.arange(rows * cols), cols)
    dr, dc = np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None])
    s = np.asarray(sim, dtype=np.float64).reshape(rows * cols, rows * cols)
    near = dr + dc == 1
    line = ((dr == 0) | (dc == 0)) & (dr + dc > 1)
    other = (dr > 0) & (dc > 0) & ~near
    mean = lambda mask: float(s[mask].mean()) if mask.any() else float("nan")  # noqa: E731
    return PositionFacts(mean(near), mean(line), mean(other))


def position_note(native_grid: tuple[int, int], grid: tuple[int, int], facts: PositionFacts) -> str:
    """Step 4: where the embeddings come from and what the tiles show, from their data."""
    (nr, nc), (r, c) = native_grid, grid
    if (nr, nc) == (r, c):
        where = f"Here the embeddings are used on the {r}×{c} grid they were trained on (no interpolation)."
    else:
        way = "down" if nr * nc > r * c else "up"
        where = (f"Here the embeddings were trained on a {nr}×{nc} grid and are interpolated "
                 f"{way} to this image's {r}×{c} grid.")
    order = f"(mean similarity {facts.neighbour:.2f} to the 4 neighbours"
    order += f", {facts.line:.2f} to the rest of the row and column" if facts.line == facts.line else ""
    order += f", {facts.other:.2f} to all others)"
    if facts.neighbour > facts.other and facts.line > facts.other:
        what = f"Nearby patches, and then the patch's row and column, light up {order}."
    elif facts.neighbour > facts.other:
        what = f"Nearby patches light up, but rows and columns do not stand out {order}."
    else:
        what = f"On this grid nearby patches do not stand out {order}."
    return f"{where} {what}"


@dataclass(frozen=True)
class RolloutFacts:
    """What a class-token rollout map shows.

    Attributes:
        peak: (row, col) of its brightest patch, 0-based.
        peak_share: the rollout that patch holds; mean_share: the mean over patches.
        top_tenth: the share of the patches' rollout held by the brightest 10% of patches.
        sink_block: the first block (0-based) in which the peak patch is an attention sink
            (`explorer.attention.patch_sinks`), else None.
        sink: that block's `Sink` for the peak patch, else None.
        num_tokens: N, the sequence length (for the uniform share 1/N).
    """

    peak: tuple[int, int]
    peak_share: float
    mean_share: float
    top_tenth: float
    sink_block: int | None
    sink: object | None
    num_tokens: int


def rollout_facts(rollout, sinks: list[list], num_prefix_tokens: int, num_tokens: int) -> RolloutFacts:
    """`RolloutFacts` of a (rows, cols) rollout map, given each block's patch sinks.

    Args:
        rollout: (rows, cols) class-token rollout over the patches.
        sinks: per block, its `explorer.attention.Sink` list (token indices in the sequence).
    """
    r = np.asarray(rollout, dtype=np.float64)
    rows, cols = r.shape
    flat = r.reshape(-1)
    top = int(flat.argmax())
    k = max(1, round(0.1 * flat.size))
    top_tenth = float(np.sort(flat)[::-1][:k].sum() / flat.sum())
    token = num_prefix_tokens + top
    found = [(b, s) for b, block in enumerate(sinks) for s in block if s.token == token]
    block, sink = found[0] if found else (None, None)
    return RolloutFacts(divmod(top, cols), float(flat[top]), float(flat.mean()), top_tenth,
                        block, sink, num_tokens)


def _where(row: int, col: int, grid: tuple[int, int]) -> str:
    """A patch's place in words: "row 16, column 16, the bottom-right corner"."""
    rows, cols = grid
    vertical = {0: "top", rows - 1: "bottom"}.get(row)
    horizontal = {0: "left", cols - 1: "right"}.get(col)
    place = f"row {row + 1}, column {col + 1}"
    if vertical and horizontal:
        place += f", the {vertical}-{horizontal} corner"
    elif vertical or horizontal:
        place += f", on the {vertical or horizontal} edge"
    return place


def rollout_note(facts: RolloutFacts, grid: tuple[int, int], masked: RolloutFacts | None = None,
                 masked_tokens: int = 0) -> str:
    """Step 5: what the rollout map shows; an attention sink named and explained when its
    brightest patch is one; with ``masked`` (the facts of the rollout with ``masked_tokens``
    sink patches taken out, drawn on the right), what that map shows too.

    The first paragraph says where each map peaks; how spread the maps are and why a sink is
    one follow in a paragraph of their own, which presenter mode folds (`fold_details`)."""
    ratio = facts.peak_share / facts.mean_share
    place = _where(*facts.peak, grid)
    sink = ": an **attention sink**, not a sign of where the object is" if facts.sink else ""
    lead = (f"{'Here the' if masked is None else 'Left, the'} brightest patch (at {place}) holds "
            f"{facts.peak_share:.1%} of the class token's rollout, {ratio:.0f}× the mean "
            f"patch{sink}.")
    spread = f"The brightest tenth of the patches hold {facts.top_tenth:.0%} of it."
    if masked is not None:
        lead += " " + _masked_note(masked, grid, masked_tokens)
        spread = (f"The brightest tenth of the patches hold {facts.top_tenth:.0%} of the left "
                  f"map and {masked.top_tenth:.0%} of the right one.")
    if facts.sink is None:
        return f"{lead}\n\n{spread}"
    s = facts.sink
    return (f"{lead}\n\nWhy a sink: in block {facts.sink_block + 1} the tokens put on average "
            f"{s.share:.0%} of their attention on that one patch (uniform would be "
            f"{1 / facts.num_tokens:.1%}; {s.queries:.0%} of them give it over "
            f"{SINK_FACTOR:g}× that), a place where the block parks attention it does not need, and "
            f"rollout multiplies it through the blocks above. {spread}")


def _masked_note(m: RolloutFacts, grid: tuple[int, int], tokens: int) -> str:
    what = "the sink patch" if tokens == 1 else f"the {tokens} sink patches"
    return (f"Right, the same rollout with {what} taken out of every block's attention (the "
            f"other weights renormalised): its brightest patch is at {_where(*m.peak, grid)}, "
            f"{m.peak_share / m.mean_share:.0f}× the mean.")


# Characters of a step's words (its text and the shown part of its note) that fit beside its
# figure in presenter mode at 1280x720 (tests/browser/test_presenter_screen.py checks it).
PRESENTER_CHARS = 700
# where a note may be cut: between paragraphs, sentences, or before a list item
_UNIT = re.compile(r"(\n\n+|(?<=[.!?])[ ]+(?=[A-Z*(])|\n(?=- ))")


def fold_details(note: str, budget: int | None = None,
                 summary: str = "More about this figure") -> str:
    """``note`` for a projector: its first paragraph shown (cut after the sentence that
    reaches ``budget`` characters, if given, keeping at least one), the rest (the explanation
    behind it) folded into a collapsed ``<details>`` a click opens. The words are the note's
    own, only hidden: nothing is rewritten."""
    units = _UNIT.split(note.strip())  # [unit, separator, unit, ...]
    shown, used, i = units[0], len(units[0]), 1
    while i < len(units) and not units[i].startswith("\n\n"):
        if budget is not None and used + len(units[i]) + len(units[i + 1]) > budget:
            break
        shown += units[i] + units[i + 1]
        used += len(units[i]) + len(units[i + 1])
        i += 2
    rest = "".join(units[i + 1:]).strip()
    if not rest:
        return shown
    return f"{shown}\n\n<details><summary>{summary}</summary>\n\n{rest}\n\n</details>"


@dataclass(frozen=True)
class DistanceProfile:
    """The shape of a (L, H) mean-attention-distance profile, in the terms a sentence uses.

    Attributes:
        means: (L,) mean over heads per block, px.
        most_global: (block, head, px) of the head with the largest distance, 0-based.
        highest, lowest: the blocks (0-based) with the largest and smallest mean.
        trend: "grows", "falls" or "mixed": the sign of the blocks' correlation with depth
            when |r| >= `TREND_CORRELATION`.
        recovers: for a "mixed" profile whose lowest block is not the last, whether the
            means from the lowest block on grow with depth (r >= `TREND_CORRELATION`).
        uniform: the distance of uniform attention over the grid, px.
    """

    means: tuple[float, ...]
    most_global: tuple[int, int, float]
    highest: int
    lowest: int
    trend: str
    recovers: bool
    uniform: float


def _correlation(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or v.std() == 0:
        return 0.0
    return float(np.corrcoef(np.arange(v.size), v)[0, 1])


def distance_profile(distances, uniform: float) -> DistanceProfile:
    """`DistanceProfile` of (L, H) distances (`explorer.distance.mean_attention_distance`)."""
    d = np.asarray(distances, dtype=np.float64)
    means = d.mean(axis=1)
    block, head = divmod(int(d.argmax()), d.shape[1])
    r = _correlation(means)
    trend = "grows" if r >= TREND_CORRELATION else "falls" if r <= -TREND_CORRELATION else "mixed"
    lowest = int(means.argmin())
    recovers = (trend == "mixed" and lowest < len(means) - 2
                and _correlation(means[lowest:]) >= TREND_CORRELATION)
    return DistanceProfile(tuple(float(m) for m in means), (block, head, float(d.max())),
                           int(means.argmax()), lowest, trend, recovers, float(uniform))


def distance_note(p: DistanceProfile) -> str:
    """Steps 6 and the distance tab: the plotted profile in words."""
    block, head, px = p.most_global
    last = len(p.means) - 1
    note = (f"Here the most global head is head {head + 1} of block {block + 1} at {px:.0f} px "
            f"(uniform attention over the whole image: {p.uniform:.0f} px). ")
    if p.trend == "grows":
        return note + (f"The mean over heads grows with depth, from {p.means[0]:.0f} px in block 1 "
                       f"to {p.means[last]:.0f} px in block {last + 1}.")
    if p.trend == "falls":
        return note + (f"The mean over heads falls with depth, from {p.means[0]:.0f} px in block 1 "
                       f"to {p.means[last]:.0f} px in block {last + 1}: on this image the distance "
                       "does not grow with depth.")
    note += (f"The mean over heads is highest in block {p.highest + 1} ({p.means[p.highest]:.0f} px) "
             f"and lowest in block {p.lowest + 1} ({p.means[p.lowest]:.0f} px)")
    if p.recovers:
        note += (f", then grows again to {p.means[last]:.0f} px in block {last + 1}"
                 + (f" without returning to block {p.highest + 1}'s level" if p.highest < p.lowest
                    else ""))
    return note + (": on this image the distance does not simply grow with depth (the paper's "
                   "plot averages many images, for a supervised ViT).")
