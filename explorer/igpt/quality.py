"""Does a completion still show the right garment? Completion quality judged by a classifier.

Pure pieces of `python -m explorer.bench igpt_quality` (numbers in BENCHMARKS.md, "iGPT
completion quality"): an independent small CNN trained on the quantised training images, a
copy-and-paste baseline (the bottom of the training image whose kept top rows are closest), a
model's own completions, and the share of completions whose class the CNN agrees with.

All images here are palette tokens, (N, H, W) int64 in 0..K-1 of an evenly spaced grey
palette, so a token's index is proportional to its grey value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explorer.igpt.model import ImageGPT
from explorer.igpt.sampler import SampleConfig, complete


def stratified_indices(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """`per_class` random indices of each class (class order, each sorted), reproducible.

    labels: (N,) int64 -> (C * per_class,) int64.
    """
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than {per_class}")
        picked.append(members[torch.randperm(len(members), generator=gen)[:per_class]].sort()[0])
    return torch.cat(picked)


def grey_input(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, H, W) tokens of an evenly spaced grey palette -> (N, 1, H, W) float in [0, 1]."""
    return (tokens.float() / (levels - 1)).unsqueeze(1)


class GarmentCNN(nn.Module):
    """The judge: two 3×3 conv blocks and a linear head (~0.4 M parameters), Fashion-MNIST size.

    Deliberately unrelated to the iGPT (convolutional, discriminative, trained separately), so
    it agrees with a completion only when the pixels show the class.
    """

    def __init__(self, classes: int = 10, side: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(64 * (side // 4) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float in [0, 1] -> (B, classes) logits."""
        return self.head(self.features(x))


def train_classifier(tokens: torch.Tensor, labels: torch.Tensor, levels: int, epochs: int = 4,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> GarmentCNN:
    """Fit a `GarmentCNN` on (N, H, W) tokens with Adam, seeded (data order and init).

    Horizontal flips (p = 0.5) as augmentation: garments are left-right symmetric classes.
    Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GarmentCNN(int(labels.max()) + 1, tokens.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = grey_input(tokens, levels)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            xb = x[batch]
            flip = torch.rand(len(batch), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def classify(model: nn.Module, tokens: torch.Tensor, levels: int, batch_size: int = 1000
             ) -> torch.Tensor:
    """(N, H, W) tokens -> (N,) predicted classes."""
    return torch.cat([model(grey_input(chunk, levels)).argmax(-1)
                      for chunk in tokens.split(batch_size)])


def agreement(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of completions whose predicted class is the true label (the "class kept")."""
    return float((predicted == labels).float().mean())


def nearest_neighbour_completion(query: torch.Tensor, train: torch.Tensor, rows_kept: int,
                                 chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-and-paste completion: the bottom rows of the training image whose top rows are
    closest (squared L2 on the tokens, i.e. on the grey values up to a constant factor).

    Args:
        query: (Q, H, W) tokens; only its top ``rows_kept`` rows are looked at.
        train: (N, H, W) tokens to copy from.
        rows_kept: rows given, 1..H-1.

    Returns:
        (Q, H, W) tokens (the query's top rows, the neighbour's bottom rows) and (Q,) the
        neighbours' indices into ``train`` (the first one on ties).
    """
    H = query.shape[1]
    if not 0 < rows_kept < H:
        raise ValueError(f"rows_kept must be in 1..{H - 1} (got {rows_kept})")
    bank = train[:, :rows_kept].flatten(1).float()  # (N, rows_kept * W)
    bank_sq = (bank * bank).sum(1)  # (N,)
    nearest = []
    for q in query[:, :rows_kept].flatten(1).float().split(chunk):  # (c, rows_kept * W)
        # |q - b|^2 without the per-query constant |q|^2; exact on these small integers
        nearest.append((bank_sq[None] - 2 * q @ bank.T).argmin(1))
    idx = torch.cat(nearest)
    out = train[idx].clone()
    out[:, :rows_kept] = query[:, :rows_kept]
    return out, idx


def sample_completions(model: ImageGPT, query: torch.Tensor, rows_kept: int,
                       cfg: SampleConfig, batch_size: int = 300) -> torch.Tensor:
    """The model's completions: (Q, H, W) tokens, top ``rows_kept`` rows given, the rest
    sampled with ``cfg`` (one sample per query; a batch per ``batch_size`` queries)."""
    Q, H, W = query.shape
    out = []
    for i, chunk in enumerate(query.split(batch_size)):
        batch_cfg = SampleConfig(cfg.temperature, cfg.top_k, cfg.top_p, cfg.greedy,
                                 None if cfg.seed is None else cfg.seed + 1000 * i)
        out.append(complete(model, chunk.flatten(1)[:, :rows_kept * W], H * W, batch_cfg))
    return torch.cat(out).view(Q, H, W).cpu()
