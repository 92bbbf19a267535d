"""Fine-tuning benchmark: `python -m explorer.bench finetune [--train 10000 --test 2000 ...]`.

Three measurements in one run, on the offline DINOv2 ViT-S/14 and Fashion-MNIST:

1. Linear probe through our engine (frozen backbone, features computed once, head trained on
   them): accuracy on official test images and wall time, split into feature extraction and
   head training.
2. Training throughput (images/s) of our engine against a plain PyTorch loop on the same
   model, data, optimiser and schedule, interleaved (E P E P ...) so drifting background load
   hits both alike; the median of each is compared.
3. Layer-wise linear probe: accuracy after every block against depth (and for the iGPT model
   trained here, if its checkpoint exists).

Results go to stdout and, with ``--json PATH``, to a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from explorer.bench.machine import cpu_name
from explorer.datasets import ImageSet, fashion_mnist
from explorer.finetune.data import PixelDataset, make_loader
from explorer.finetune.engine import FinetuneConfig, finetune, prepare_model
from explorer.finetune.probe import FEATURE_CACHE, vit_layerwise_probe
from explorer.models import DEFAULT_MODEL, build_vit
from explorer.training import Recipe, warmup_steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m explorer.bench finetune")
    p.add_argument("--train", type=int, default=10_000, help="Fashion-MNIST training images")
    p.add_argument("--test", type=int, default=2_000, help="official test images")
    p.add_argument("--resolution", type=int, default=112, help="probe resolution (px)")
    p.add_argument("--epochs", type=int, default=30, help="linear-head epochs")
    p.add_argument("--probe-block", type=int, default=None, metavar="K",
                   help="linear probe after block K (default: last block)")
    p.add_argument("--probe-pool", choices=["token", "avg"], default=None,
                   help="linear probe of the class token or the mean patch token")
    p.add_argument("--tp-resolution", type=int, default=56, help="throughput resolution (px)")
    p.add_argument("--tp-images", type=int, default=192, help="images per throughput run")
    p.add_argument("--tp-rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--tp-mode", default="full", choices=["full", "last_k"])
    p.add_argument("--layer-train", type=int, default=2_000)
    p.add_argument("--layer-test", type=int, default=1_000)
    p.add_argument("--igpt", default=None, metavar="DIR",
                   help="iGPT checkpoint dir to probe (default: the offline assets/igpt)")
    p.add_argument("--skip", default="",
                   help="comma list of parts to skip: probe,tp,layers,igpt")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; on a shared 2-core machine "
                        "1 thread was ~2x faster for ViT-S at 112 px while others ran)")
    p.add_argument("--json", default=None, help="also write results here")
    return p.parse_args(argv)


def bench_linear_probe(train: ImageSet, test: ImageSet, resolution: int, epochs: int,
                       probe_block: int | None = None, probe_pool: str | None = None
                       ) -> dict:
    """Engine linear probe from a fresh model, empty feature cache: the full wall time.

    ``probe_block``: probe after that block (the model truncated to it); ``probe_pool``:
    "token" (class token) or "avg" (mean patch token); None = the model's own (class token).
    """
    FEATURE_CACHE.clear()
    start = time.perf_counter()
    model = build_vit(DEFAULT_MODEL)
    build_s = time.perf_counter() - start
    config = FinetuneConfig(mode="linear", resolution=resolution, epochs=epochs,
                            batch_size=256, feature_batch_size=64, probe_block=probe_block,
                            probe_pool=probe_pool)
    result = finetune(model, train, test, config, model_key=DEFAULT_MODEL)
    wall = time.perf_counter() - start
    n_images = len(train) + len(test)
    return {
        "val_acc": result.val_acc,
        "probe_block": len(result.model.blocks),
        "probe_pool": result.model.global_pool,
        "resolution": list(result.resolution),
        "train_images": len(train),
        "test_images": len(test),
        "wall_s": wall,
        "build_model_s": build_s,
        "features_s": result.timings["features"],
        "features_ms_per_image": 1000 * result.timings["features"] / n_images,
        "head_train_s": result.timings["train"],
        "epochs": epochs,
    }


def plain_loop(model: torch.nn.Module, data: ImageSet, size: tuple[int, int], batch_size: int,
               lr: float, seed: int) -> float:
    """The reference: a textbook PyTorch loop with the same data, optimiser and schedule.

    Returns:
        Training images per second after the first step (data loading included), measured
        as `steady_throughput` measures the engine.
    """
    torch.manual_seed(seed)
    data_config = timm.data.resolve_model_data_config(model)
    loader = make_loader(PixelDataset(data, data_config, size, augment=True), batch_size,
                         shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    recipe = Recipe(lr=lr, total_steps=len(loader), warmup_steps=warmup_steps(len(loader), 0.05))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.factor)
    model.train()
    seen, start, marks = 0, time.perf_counter(), []
    for pixels, labels, _ in loader:
        loss = F.cross_entropy(model(pixels), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a real loop logs its loss; the engine does too
        seen += len(labels)
        marks.append({"images": seen, "time": time.perf_counter() - start})
    return steady_throughput(marks)


def steady_throughput(history: list[dict]) -> float:
    """Images/s from the end of the first step to the end of the last (skips warm-up)."""
    steps = [h for h in history if "images" in h]
    first, last = steps[0], steps[-1]
    return (last["images"] - first["images"]) / (last["time"] - first["time"])


def bench_throughput(data: ImageSet, val: ImageSet, resolution: int, rounds: int, mode: str
                     ) -> dict:
    """Interleaved engine vs plain loop on copies of one model (same weights each round)."""
    base = build_vit(DEFAULT_MODEL)
    config = FinetuneConfig(mode=mode, last_k=2, resolution=resolution, epochs=1,
                            batch_size=32, lr=3e-5)
    engine, plain = [], []
    for _ in range(rounds):
        result = finetune(copy.deepcopy(base), data, val, config)
        engine.append(steady_throughput(result.history))
        model = copy.deepcopy(base)
        size = prepare_model(model, len(data.classes), config)
        plain.append(plain_loop(model, data, size, config.batch_size, config.peak_lr,
                                config.seed))
        print(f"  round: engine {engine[-1]:.2f} img/s, plain {plain[-1]:.2f} img/s", flush=True)
    return {
        "mode": mode,
        "resolution": [resolution, resolution],
        "images_per_run": len(data),
        "batch_size": config.batch_size,
        "engine_images_per_s": engine,
        "plain_images_per_s": plain,
        "engine_median": statistics.median(engine),
        "plain_median": statistics.median(plain),
        "ratio_of_medians": statistics.median(engine) / statistics.median(plain),
        # Each round's pair ran back to back, so its ratio cancels slow load drift best.
        "median_round_ratio": statistics.median(e / p for e, p in zip(engine, plain,
                                                                        strict=True)),
    }


def bench_layerwise(train: ImageSet, test: ImageSet, resolution: int) -> dict:
    model = build_vit(DEFAULT_MODEL)
    size = (resolution, resolution)
    start = time.perf_counter()
    *_, (_, _, probe) = vit_layerwise_probe(model, train, test, size, 64, DEFAULT_MODEL)
    return {"model": DEFAULT_MODEL, "resolution": list(size), "train_images": len(train),
            "test_images": len(test), "depths": probe.depths, "val_acc": probe.val_acc,
            "train_acc": probe.train_acc, "best_depth": probe.best_depth,
            "wall_s": time.perf_counter() - start}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, "
                   f"torch threads {torch.get_num_threads()}, "
                   f"cuda {torch.cuda.is_available()}",
        "loadavg_start": os.getloadavg(),
    }
    print(json.dumps(out), flush=True)
    if "probe" not in skip:
        train = fashion_mnist("train", args.train, seed=0)
        test = fashion_mnist("test", args.test, seed=0)
        out["linear_probe"] = bench_linear_probe(train, test, args.resolution, args.epochs,
                                                 args.probe_block, args.probe_pool)
        print("linear probe:", json.dumps(out["linear_probe"]), flush=True)
    if "tp" not in skip:
        data = fashion_mnist("train", args.tp_images, seed=1)
        val = fashion_mnist("test", 10, seed=1)
        out["throughput"] = bench_throughput(data, val, args.tp_resolution, args.tp_rounds,
                                             args.tp_mode)
        print("throughput:", json.dumps(out["throughput"]), flush=True)
    train = fashion_mnist("train", args.layer_train, seed=2)
    test = fashion_mnist("test", args.layer_test, seed=2)
    if "layers" not in skip:
        out["layerwise"] = bench_layerwise(train, test, args.resolution)
        print("layer-wise:", json.dumps(out["layerwise"]), flush=True)
    if "igpt" not in skip:
        igpt = igpt_layerwise(train, test, args.igpt)
        out["layerwise_igpt"] = igpt or "no iGPT checkpoint yet"
        print("layer-wise iGPT:", json.dumps(out["layerwise_igpt"]), flush=True)
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))


def igpt_layerwise(train: ImageSet, test: ImageSet, directory: str | None = None
                   ) -> dict | None:
    """The same probe on the iGPT trained here (or in ``directory``); None if there is none."""
    try:
        from explorer.finetune.igpt_probe import igpt_layerwise_probe
        from explorer.igpt.checkpoint import ASSET_DIR
    except ImportError:
        return None
    start = time.perf_counter()
    probe = igpt_layerwise_probe(train, test, directory)
    if probe is None:
        return None
    train_config = Path(directory or ASSET_DIR) / "train_config.json"
    step = json.loads(train_config.read_text()).get("step") if train_config.exists() else None
    return {"model": probe.model_name, "checkpoint_step": step,
            "depths": probe.depths, "val_acc": probe.val_acc,
            "train_acc": probe.train_acc, "best_depth": probe.best_depth,
            "wall_s": time.perf_counter() - start}


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
