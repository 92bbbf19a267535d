"""The shipped result grid (`assets/lab/grid.csv`): what runs it holds, how to regenerate it,
how to read it.

    python -m explorer.lab.grid --workers 2          # resumes: finished runs are skipped

One CSV row per run (`COLUMNS`); the runs are `GRID_RUNS`: every architecture at every data
size with two seeds, then the ViT size sweep. Trained models of the runs in `KEEP_MODELS` are
saved beside it (``models/<run name>.safetensors``) for the relative-attention views and the
translation test. ``--workers N`` starts N processes (``--shard i/N`` each, every N-th run
of the list), each training one run at a time on one thread: two use both cores of the
2-vCPU machine. Rows are appended as runs finish, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from explorer.lab.engine import Budget, LabResult, LabRun
from explorer.lab.models import LAB_ARCHS

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lab"
GRID_CSV = ASSETS / "grid.csv"
MODELS_DIR = ASSETS / "models"
DATA_SIZES = (500, 1200, 3000, 7500, 20000, 60000)
SEEDS = (0, 1)
SWEEP_WIDTHS = (32, 48, 64, 96)  # ViT widths (depth 4, 16-dim heads) of the scaling view
SWEEP_SIZES = (3000, 20000, 60000)
KEEP_MODELS = {(arch, n) for arch in LAB_ARCHS for n in (1200, 60000)}  # seed 0, default size
COLUMNS = ("arch", "width", "depth", "params", "flops", "train_images", "steps", "batch",
           "seconds", "seed", "test_acc", "train_acc", "curve")


def grid_runs() -> list[LabRun]:
    """Seed 0 of the architecture grid, the size sweep, then seed 1 (so a partial grid is
    already a full picture)."""
    runs = [LabRun(a, n, 0) for n in DATA_SIZES for a in LAB_ARCHS]
    runs += [LabRun("vit", n, 0, width=w) for n in SWEEP_SIZES for w in SWEEP_WIDTHS]
    runs += [LabRun(a, n, s) for s in SEEDS[1:] for n in DATA_SIZES for a in LAB_ARCHS]
    unique, seen = [], set()
    for r in runs:
        if r.name not in seen:
            unique.append(r)
            seen.add(r.name)
    return unique


def run_name(row: dict) -> str:
    return LabRun(row["arch"], int(row["train_images"]), int(row["seed"]),
                  int(row["width"]), int(row["depth"])).name


def read_grid(path: Path = GRID_CSV) -> list[dict]:
    """The grid's rows, typed (``curve`` as a list of (step, accuracy))."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in ("width", "depth", "params", "flops", "train_images", "steps", "batch",
                      "seed"):
                row[k] = int(row[k])
            for k in ("seconds", "test_acc", "train_acc"):
                row[k] = float(row[k])
            row["curve"] = [tuple(p) for p in json.loads(row["curve"])]
            rows.append(row)
    return rows


def append_row(result: LabResult, path: Path = GRID_CSV) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    row = result.row()
    row["curve"] = json.dumps([[s, round(a, 4)] for s, a in row["curve"]])
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in COLUMNS})


def save_model(result: LabResult, run: LabRun, folder: Path = MODELS_DIR) -> Path:
    from safetensors.torch import save_file

    from explorer.lab.checkpoint import shipped_path
    folder.mkdir(parents=True, exist_ok=True)
    path = shipped_path(run, folder)
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, path, metadata={"arch": run.arch, "width": str(run.width),
                                     "depth": str(run.depth)})
    return path


def summary_markdown(rows: list[dict]) -> str:
    """The grid as BENCHMARKS.md tables: test accuracy per architecture and data size (mean
    of the seeds, their range), the size sweep, and what it cost."""
    from explorer.lab.analysis import compute_curves, error_vs_data
    from explorer.lab.models import ARCH_LABELS

    curves = error_vs_data(rows)
    sizes = sorted({p.train_images for pts in curves.values() for p in pts})
    out = ["| architecture | params | " + " | ".join(f"{n:,}" for n in sizes) + " |",
           "|---|---|" + "---|" * len(sizes)]
    for arch, points in curves.items():
        by_n = {p.train_images: p for p in points}
        params = next(r["params"] for r in rows if r["arch"] == arch)
        cells = [f"{100 * (1 - by_n[n].mean):.1f} ({100 * (1 - by_n[n].high):.1f}–"
                 f"{100 * (1 - by_n[n].low):.1f})" if n in by_n else "—" for n in sizes]
        out.append(f"| {ARCH_LABELS[arch]} | {params / 1e3:.0f}k | " + " | ".join(cells) + " |")
    sweep = compute_curves(rows)
    if sweep:
        sweep_sizes = sorted({c.train_images for c in sweep})
        out += ["", "| ViT width | params | train GFLOPs | " + " | ".join(
            f"{n:,}" for n in sweep_sizes) + " |", "|---|---|---|" + "---|" * len(sweep_sizes)]
        for w in sorted({c.width for c in sweep}):
            cs = {c.train_images: c for c in sweep if c.width == w}
            first = next(iter(cs.values()))
            cells = [f"{100 * (1 - cs[n].error[-1]):.1f}" if n in cs else "—"
                     for n in sweep_sizes]
            out.append(f"| {w} | {first.params / 1e3:.0f}k | {first.compute[-1] / 1e9:,.0f} | "
                       + " | ".join(cells) + " |")
    seconds = sum(r["seconds"] for r in rows)
    out += ["", f"{len(rows)} runs, {seconds / 3600:.2f} hours of training summed over runs "
                f"(two 1-thread workers in parallel)."]
    return "\n".join(out)


def _keep_model(run: LabRun) -> bool:
    default = LabRun(run.arch, run.train_images)
    return (run.arch, run.train_images) in KEEP_MODELS and run.seed == 0 and (
        run.width, run.depth) == (default.width, default.depth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--out", type=Path, default=GRID_CSV)
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--limit", type=int, default=None, help="train at most this many runs")
    parser.add_argument("--shard", default="0/1", help="i/N: train every N-th run from the i-th")
    parser.add_argument("--summary", action="store_true",
                        help="print the grid's tables (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary_markdown(read_grid(args.out)))
        return 0
    if args.workers > 1:  # one process per shard, one thread each
        cmd = [sys.executable, "-m", "explorer.lab.grid", "--out", str(args.out),
               "--steps", str(args.steps)] + (["--limit", str(args.limit)] if args.limit else [])
        procs = [subprocess.Popen(cmd + ["--workers", "1", "--shard", f"{i}/{args.workers}"])
                 for i in range(args.workers)]
        return max(p.wait() for p in procs)
    import torch
    torch.set_num_threads(1)
    from explorer.lab.engine import train
    shard, shards = (int(v) for v in args.shard.split("/"))
    budget = Budget(steps=args.steps)
    done = {run_name(r) for r in read_grid(args.out)}
    todo = [r for i, r in enumerate(grid_runs()) if i % shards == shard and r.name not in done]
    todo = todo[: args.limit]
    print(f"shard {args.shard}: {len(done)} runs done, {len(todo)} to train", flush=True)
    start = time.time()
    for run in todo:
        result = train(run, budget)
        append_row(result, args.out)  # one short append per row: shards share the file
        if _keep_model(run):
            save_model(result, run, args.out.parent / "models")
        print(f"{time.time() - start:7.0f}s {run.name}: test {result.test_acc:.4f} "
              f"train {result.train_acc:.4f} ({result.seconds:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
