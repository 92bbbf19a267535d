"""Train a small ImageGPT on Fashion-MNIST: `python -m explorer.igpt.train --out runs/igpt-fmnist`.

Built on the loop core every trainer shares (`explorer.training`: accelerate, AdamW and its
schedule, clipping, checkpoint-and-resume): one CPU process here; `accelerate launch -m
explorer.igpt.train ...` on one or many GPUs (each process takes its slice of every global
batch; bf16 autocast on GPU). This module keeps iGPT's own data path (token sequences).

Resumable: every `--ckpt-every-min` minutes (and at the end) it writes `OUT/ckpt.pt` (model,
optimiser, step, config); running the same command again continues from it. Each checkpoint
also writes the test-subset bits/dim to `OUT/log.jsonl` and a grid of completions of held-out
test images to `OUT/samples_stepN.png` (original | samples, bottom half generated).

`--export DIR` writes the trained model in transformers' ImageGPT format (config.json +
model.safetensors) with its palette (see `explorer.igpt.checkpoint.export_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from explorer.igpt.data import load_fashion_mnist
from explorer.igpt.model import IGPTConfig, ImageGPT
from explorer.igpt.palette import grey_palette, grey_quantize
from explorer.igpt.sequence import model_inputs
from explorer.training import Recipe, TrainLoop


@dataclass
class TrainConfig:
    out: str = "runs/igpt-fmnist"
    levels: int = 8  # grey levels: the 8 greys of the lecture's 9-bit palette (3 bits)
    size: int = 28  # image side; 28 = Fashion-MNIST's own resolution
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    batch_size: int = 32  # global batch (images), split across processes
    lr: float = 2e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac at max_steps
    warmup_steps: int = 200
    max_steps: int = 3600  # the schedule ends at max_steps or max_minutes, whichever is first
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_minutes: float = 0.0  # training-time budget (eval/checkpoints not counted); 0 = off
    ckpt_every_min: float = 10.0
    log_every: int = 10
    eval_images: int = 512  # test images scored at each checkpoint (first N of the test set)
    sample_images: int = 8  # test images completed at each checkpoint
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    mixed_precision: str = "auto"  # "auto" = bf16 on GPU, none on CPU (bf16 is ~100x slower)
    dropout: float = 0.0  # embeddings, attention and residuals; fights overfitting on long runs
    hflip: float = 0.0  # probability of mirroring a training image (clothes stay clothes)


def progress(step: int, train_seconds: float, tc: TrainConfig) -> float:
    """Fraction of the run done: by steps, or by training time when `max_minutes` is set
    (whichever is further), so a run on a shared CPU still finishes its schedule in time."""
    by_steps = step / tc.max_steps
    by_time = train_seconds / (tc.max_minutes * 60) if tc.max_minutes else 0.0
    return min(1.0, max(by_steps, by_time))


def recipe(tc: TrainConfig) -> Recipe:
    """nanoGPT's AdamW (betas 0.9/0.95, no decay on norms and biases, clipped gradients);
    linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_frac."""
    return Recipe(lr=tc.lr, total_steps=tc.max_steps, weight_decay=tc.weight_decay,
                  warmup_steps=tc.warmup_steps, min_lr_frac=tc.min_lr_frac, betas=(0.9, 0.95),
                  grad_clip=tc.grad_clip, decay_norms_and_biases=False)


def lr_at(step: int, frac: float, tc: TrainConfig) -> float:
    """The learning rate of step ``step`` when ``frac`` (`progress(...)`) of the run is done."""
    return tc.lr * recipe(tc).factor(step, frac)


def load_tokens(split: str, tc: TrainConfig) -> torch.Tensor:
    """Fashion-MNIST split -> (N, size, size) uint8 grey-level tokens."""
    images, _ = load_fashion_mnist(split)
    if tc.size != images.shape[-1]:
        images = F.interpolate(images[:, None].float(), size=(tc.size, tc.size), mode="area")
        images = images[:, 0].round().clamp(0, 255).to(torch.uint8)
    return grey_quantize(images, tc.levels).to(torch.uint8)


def batch_indices(step: int, n: int, tc: TrainConfig, rank: int, world: int) -> torch.Tensor:
    """This process's slice of global batch `step`: a fresh permutation each epoch, so a
    resumed run sees the same batches as an uninterrupted one."""
    per_epoch = n // tc.batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch))
    return perm[i * tc.batch_size:(i + 1) * tc.batch_size][rank::world]


def model_config(tc: TrainConfig) -> IGPTConfig:
    return IGPTConfig(vocab_size=tc.levels + 1, n_positions=tc.size * tc.size, n_embd=tc.n_embd,
                      n_layer=tc.n_layer, n_head=tc.n_head, dropout=tc.dropout)


def augment(images: torch.Tensor, step: int, tc: TrainConfig) -> torch.Tensor:
    """(B, H, W) tokens -> the same with each image mirrored left-right with probability
    `hflip`; seeded by step, so a resumed run sees the same batches. A mirrored garment is
    still a garment, so the pixel statistics the model learns stay those of the data."""
    if not tc.hflip:
        return images
    g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
    flip = torch.rand(len(images), generator=g) < tc.hflip
    return torch.where(flip[:, None, None], images.flip(-1), images)


@torch.no_grad()
def evaluate(model: ImageGPT, test: torch.Tensor, tc: TrainConfig) -> float:
    """Bits/dim on the first `eval_images` test images."""
    from explorer.igpt.likelihood import bits_per_dim, pixel_nll_bits

    model.eval()
    bits = pixel_nll_bits(model, test[: tc.eval_images].long(), batch_size=64)
    model.train()
    return bits_per_dim(bits)


def save_samples(model: ImageGPT, test: torch.Tensor, tc: TrainConfig, path: Path) -> None:
    """Complete the bottom half of `sample_images` test images, 3 samples each, as a PNG."""
    from explorer.igpt.plots import completion_grid
    from explorer.igpt.sampler import SampleConfig, complete

    model.eval()
    n, s = tc.sample_images, tc.size
    real = test[:n].long().flatten(1)  # (n, L)
    prefix = real[:, : (s // 2) * s].repeat_interleave(3, 0)  # (3n, P)
    samples = complete(model, prefix, s * s, SampleConfig(seed=0)).view(n, 3, s, s).cpu()
    model.train()
    completion_grid(real.view(n, s, s), samples, grey_palette(tc.levels), rows_kept=s // 2,
                    scale=3).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f, v in asdict(TrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--export", default="", help="write the model in ImageGPT format to DIR")
    p.add_argument("--export-only", action="store_true", help="export the checkpoint and stop")
    p.add_argument("--eval-only", action="store_true",
                   help="score the checkpoint on the first --eval-images test images and stop")
    args = vars(p.parse_args(argv))
    export_dir, export_only = args.pop("export"), args.pop("export_only")
    eval_only = args.pop("eval_only")
    tc = TrainConfig(**args)

    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"

    torch.manual_seed(tc.seed)
    model = ImageGPT(model_config(tc))
    loop = TrainLoop(model, recipe(tc), mixed_precision=tc.mixed_precision,
                     extra_state=lambda: {"train_config": asdict(tc),
                                          "model_config": asdict(model.config)})
    acc = loop.accelerator
    if tc.threads and acc.device.type == "cpu":
        torch.set_num_threads(tc.threads)
    trained_with = asdict(tc)
    if loop.resume(ckpt_path):
        trained_with = loop.resumed_extra.get("train_config", trained_with)  # for export
        acc.print(f"resumed from {ckpt_path} at step {loop.step}")
    model = loop.unwrapped

    if export_only:
        from explorer.igpt.checkpoint import export_pretrained

        export_pretrained(model, grey_palette(tc.levels), export_dir,
                          train_config={**trained_with, "step": loop.step})
        acc.print(f"exported step {loop.step} to {export_dir}")
        return

    if eval_only:
        t0 = time.time()
        rec = {"step": loop.step, "test_bpd": evaluate(model, load_tokens("test", tc), tc),
               "test_images": tc.eval_images, "eval_s": round(time.time() - t0, 1)}
        (out / f"test_bpd_step{loop.step:05d}.json").write_text(json.dumps(rec))
        acc.print(json.dumps(rec))
        return

    train = load_tokens("train", tc)
    test = load_tokens("test", tc)
    start_token = tc.levels
    acc.print(f"model {model.num_params():,} params, train {tuple(train.shape)}, device "
              f"{acc.device}, mixed precision {acc.mixed_precision}, {acc.num_processes} "
              f"process(es)")
    log = open(out / "log.jsonl", "a") if acc.is_main_process else None

    def checkpoint(final: bool = False) -> None:
        loop.save(ckpt_path)
        if not acc.is_main_process:
            return
        t0 = time.time()
        bpd = evaluate(model, test, tc)
        save_samples(model, test, tc, out / f"samples_step{loop.step:05d}.png")
        rec = {"step": loop.step, "eval_bpd": bpd, "eval_images": tc.eval_images,
               "train_seconds": round(loop.seconds), "eval_s": round(time.time() - t0, 1),
               "final": final}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        acc.print(rec, flush=True)

    def batches():
        step = loop.step
        while True:
            idx = batch_indices(step, len(train), tc, acc.process_index, acc.num_processes)
            inputs, targets = model_inputs(augment(train[idx], step, tc).long(), start_token)
            yield inputs.to(acc.device), targets.to(acc.device)
            step += 1

    def loss_fn(m, batch):
        inputs, targets = batch
        return F.cross_entropy(m(inputs).float().flatten(0, 1), targets.flatten())

    last_ckpt = time.time()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    for event in loop.fit(batches(), loss_fn, progress=lambda step, s: progress(step, s, tc)):
        loss_acc, n_acc = loss_acc + event.loss, n_acc + 1
        if event.step % tc.log_every == 0 and acc.is_main_process:
            dt = time.time() - t_log
            rec = {"step": event.step, "train_bpd": loss_acc / n_acc / math.log(2),
                   "lr": event.lr, "img_per_s": n_acc * tc.batch_size / dt,
                   "train_seconds": round(event.seconds),
                   "epoch": event.step * tc.batch_size / len(train)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if time.time() - last_ckpt > tc.ckpt_every_min * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint(final=True)
    if export_dir and acc.is_main_process:
        from explorer.igpt.checkpoint import export_pretrained

        export_pretrained(model, grey_palette(tc.levels), export_dir,
                          train_config={**asdict(tc), "step": loop.step})
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
