"""iGPT completion quality: does the completed image still show the right garment?

`python -m explorer.bench igpt_quality [--models offline,DIR] [--per-class 30] [--rows 7,14,21]
[--seeds 0,1,2] [--bits-images 10000] [--json PATH]`

Held-out Fashion-MNIST test images (``--per-class`` of each class, fixed seed) keep their top
``rows`` rows; the rest is filled in three ways, and an independent classifier
(`explorer.igpt.quality.GarmentCNN`, trained on all 60,000 training images in the same grey
levels; cached under ~/.cache/vit-explorer, retrained with a fixed seed when missing) says
whether the result still shows the true class:

- the real image (the upper bound: the classifier's own accuracy on these images);
- nearest neighbour: the bottom of the training image whose kept top rows are closest (L2);
- each model's samples (temperature 1, no top-k/top-p), one per image per seed.

``--bits-images N`` also scores the first N test images' bits/dim (teacher forcing, fp32).
Results: BENCHMARKS.md, "iGPT completion quality".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from explorer.bench.machine import describe
from explorer.igpt.checkpoint import ASSET_DIR, load_local
from explorer.igpt.data import load_fashion_mnist
from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits
from explorer.igpt.palette import grey_quantize
from explorer.igpt.quality import (
    agreement,
    classify,
    nearest_neighbour_completion,
    sample_completions,
    stratified_indices,
    train_classifier,
)
from explorer.igpt.sampler import SampleConfig
from explorer.models import cache_dir


def load_or_train_classifier(train_tokens: torch.Tensor, train_labels: torch.Tensor,
                             levels: int, epochs: int, seed: int) -> tuple[torch.nn.Module, str]:
    """The cached classifier for this recipe, or a freshly trained (and then cached) one."""
    from explorer.igpt.quality import GarmentCNN

    path = cache_dir() / "igpt-quality" / f"garment_cnn_{levels}grey_e{epochs}_s{seed}.pt"
    if path.exists():
        model = GarmentCNN(int(train_labels.max()) + 1, train_tokens.shape[-1])
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), f"cached {path}"
    t0 = time.perf_counter()
    model = train_classifier(train_tokens, train_labels, levels, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, f"trained in {time.perf_counter() - t0:.0f} s, saved to {path}"


def model_dirs(spec: str) -> list[Path]:
    return [ASSET_DIR if name == "offline" else Path(name) for name in spec.split(",")]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m explorer.bench igpt_quality",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default="offline", help="comma list: offline or checkpoint dirs")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--rows", default="7,14,21", help="rows kept, comma list")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma list")
    p.add_argument("--select-seed", type=int, default=0, help="seed of the image selection")
    p.add_argument("--epochs", type=int, default=4, help="classifier epochs")
    p.add_argument("--bits-images", type=int, default=0, metavar="N",
                   help="also score bits/dim on the first N test images (10000: all)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    models = [(str(d), load_local(d)) for d in model_dirs(args.models)]
    levels = models[0][1].palette.size
    if any(not m.palette.is_grey or m.palette.size != levels for _, m in models):
        raise SystemExit("all models must use the same grey palette")
    train_img, train_y = load_fashion_mnist("train")
    test_img, test_y = load_fashion_mnist("test")
    train_tok, test_tok = grey_quantize(train_img, levels), grey_quantize(test_img, levels)
    out: dict = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": describe(), "threads": torch.get_num_threads(), "levels": levels}
    print(f"# iGPT completion quality, {describe()}, {torch.get_num_threads()} threads, "
          f"{out['date_utc']}", flush=True)

    clf, how = load_or_train_classifier(train_tok, train_y, levels, args.epochs, seed=0)
    out["classifier_test_acc"] = agreement(classify(clf, test_tok, levels), test_y)
    print(f"classifier ({how}): {out['classifier_test_acc']:.2%} on all "
          f"{len(test_y)} test images", flush=True)

    idx = stratified_indices(test_y, args.per_class, args.select_seed)
    query, labels = test_tok[idx], test_y[idx]
    out["real"] = agreement(classify(clf, query, levels), labels)
    out["rows"] = {}
    for rows in rows_list:
        nn_done, _ = nearest_neighbour_completion(query, train_tok, rows)
        res = {"nearest_neighbour": agreement(classify(clf, nn_done, levels), labels)}
        for name, m in models:
            scores, t0 = [], time.perf_counter()
            for seed in seeds:
                done = sample_completions(m.model, query, rows, SampleConfig(seed=seed))
                scores.append(agreement(classify(clf, done, levels), labels))
            res[name] = {"per_seed": scores, "mean": statistics.mean(scores),
                         "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                         "sample_s": time.perf_counter() - t0}
        out["rows"][rows] = res
        print(json.dumps({rows: res}), flush=True)

    if args.bits_images:
        out["bits_per_dim"] = {}
        for name, m in models:
            t0 = time.perf_counter()
            bits = pixel_nll_bits(m.model, test_tok[:args.bits_images])
            out["bits_per_dim"][name] = {"images": args.bits_images,
                                         "bpd": bits_per_dim(bits, m.channels),
                                         "s": time.perf_counter() - t0}
            print(json.dumps({name: out["bits_per_dim"][name]}), flush=True)

    n = len(labels)
    print(f"\n{n} test images ({args.per_class} per class, selection seed "
          f"{args.select_seed}); class kept, % (samples: mean ± stdev over seeds {seeds})\n")
    head = ["completion"] + [f"{r} rows kept" for r in rows_list]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("| real image (upper bound) | " + " | ".join(f"{out['real']:.1%}" for _ in rows_list)
          + " |")
    print("| nearest neighbour | " + " | ".join(
        f"{out['rows'][r]['nearest_neighbour']:.1%}" for r in rows_list) + " |")
    for name, _ in models:
        cells = [f"{out['rows'][r][name]['mean']:.1%} ± {out['rows'][r][name]['stdev']:.1%}"
                 for r in rows_list]
        print(f"| samples, {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
