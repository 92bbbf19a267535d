"""Command line: fine-tune or probe a ViT on a folder, a zip, or built-in Fashion-MNIST.

    python -m explorer.finetune --fashion-mnist 2000 --mode linear --resolution 112
    python -m explorer.finetune --data photos.zip --mode last_k --last-k 2 --epochs 5
    python -m explorer.finetune --fashion-mnist 2000 --layerwise
    python -m explorer.finetune --fashion-mnist 2000 --mode linear --probe-block 11
    accelerate launch --multi_gpu --num_processes 2 -m explorer.finetune --data ./imgs --mode full
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m explorer.finetune ...   (CPU, gloo)

The same engine as the tab (`explorer.finetune.engine`); with several processes each trains
its shard of every batch (data parallel) and only the main process prints and saves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from explorer.datasets import (
    DatasetError,
    ImageSet,
    fashion_mnist,
    ingest_zip,
    load_image_folder,
    train_val_split,
)
from explorer.finetune.checkpoint import run_name, save_checkpoint
from explorer.finetune.engine import MODES, PROBE_POOLS, FinetuneConfig, run_finetune
from explorer.models import DEFAULT_MODEL, build_vit


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m explorer.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="ImageFolder directory or .zip (one folder per class)")
    src.add_argument("--fashion-mnist", type=int, metavar="N",
                     help="use N Fashion-MNIST training images (stratified subset)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalogue name, timm name or local:<dir>")
    p.add_argument("--mode", choices=MODES, default="linear")
    p.add_argument("--last-k", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None, help="training side in px")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test", type=int, default=None, metavar="N",
                   help="with --fashion-mnist: validate on N official test images instead")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-block", type=int, default=None, metavar="K",
                   help="linear mode: probe the features after block K (default: last); "
                        "the saved model keeps K blocks")
    p.add_argument("--probe-pool", choices=PROBE_POOLS, default=None,
                   help="linear mode: probe the class token or the mean patch token "
                        "(default: the model's own pooling)")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint directory to write (timm's layout: config.json + "
                        "model.safetensors)")
    p.add_argument("--layerwise", action="store_true",
                   help="fit a linear probe after every block instead of training")
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[ImageSet, ImageSet, str]:
    """(train, val, dataset label) from the CLI flags."""
    if args.fashion_mnist:
        data = fashion_mnist("train", args.fashion_mnist, seed=args.seed)
        if args.test:
            return data, fashion_mnist("test", args.test, seed=args.seed), "fashion-mnist"
        train, val = train_val_split(data, args.val_fraction, seed=args.seed)
        return train, val, "fashion-mnist"
    path = Path(args.data)
    data = ingest_zip(path) if path.suffix.lower() == ".zip" else load_image_folder(path)
    if data.skipped:
        say("skipped: " + ", ".join(f"{n} {why}" for why, n in data.skipped.items()))
    train, val = train_val_split(data, args.val_fraction, seed=args.seed)
    train.root, data.root = data.root, None  # the unpacked zip now belongs to `train`
    return train, val, path.stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train, val, label = load_data(args)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    say(f"classes: {json.dumps(train.class_counts())} (train), {len(val)} validation images")
    try:
        return run(args, train, val, label)
    finally:
        train.cleanup()  # the temp dir of an unpacked zip, if any


def run(args: argparse.Namespace, train: ImageSet, val: ImageSet, label: str) -> int:
    """Train (or probe) and save, as the flags say."""
    model = build_vit(args.model)
    if args.layerwise:
        from explorer.finetune.probe import vit_layerwise_probe
        from explorer.finetune.resolution import snap_resolution

        size = snap_resolution(model, args.resolution)
        *_, (_, _, probe) = vit_layerwise_probe(model, train, val, size, args.batch_size,
                                                args.model)
        for depth, acc in zip(probe.depths, probe.val_acc, strict=True):
            say(f"block {depth:2d}: val acc {acc:.3f}")
        return 0
    config = FinetuneConfig(
        mode=args.mode, last_k=args.last_k, resolution=args.resolution, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, augment=not args.no_augment,
        mixed_precision=args.mixed_precision, seed=args.seed, probe_block=args.probe_block,
        probe_pool=args.probe_pool)
    event = None
    for event in run_finetune(model, train, val, config, model_key=args.model):
        if event.stage == "train" and event.done % 10 and event.done != event.total:
            continue
        if event.stage.startswith("features") and event.done % 20 and event.done != event.total:
            continue
        _print_event(event)
    result = event.result
    if args.out is not None and _is_main_process():
        out = save_checkpoint(result, args.out, args.model, config)
        say(f"saved {out} in timm's layout: --model local:{out}, or "
            f"timm.create_model('local-dir:{out}', pretrained=True)")
    elif args.out is None:
        say(f"not saved (pass --out DIR; e.g. runs/{run_name(args.model, config, label)})")
    return 0


def say(text: str) -> None:
    """Print on the main process only (every process runs this script)."""
    if _is_main_process():
        print(text, flush=True)


def _print_event(event) -> None:
    m = event.metrics
    if event.stage == "train":
        say(f"step {event.done}/{event.total}  epoch {m['epoch']:.2f}  loss {m['loss']:.4f}  "
            f"acc {m['acc']:.3f}  lr {m['lr']:.2e}")
    elif event.stage == "eval":
        say(f"eval  step {event.done}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}")
    elif event.stage in ("done", "cancelled"):
        r = event.result
        say(f"{event.stage}: val_acc {r.val_acc:.4f}  timings "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items()))
    else:
        say(f"{event.stage} {event.done}/{event.total}")


def _is_main_process() -> bool:
    # From the launcher's environment: creating accelerate's PartialState here, before the
    # engine's Accelerator, would fix the process group without the CPU flag.
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
