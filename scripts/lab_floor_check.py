"""Does the budget rule's step floor under-train a lab architecture? A check that chooses
nothing by itself: it trains the sweep's augmentation-stage run (`sweep.aug_run`: 3,000
images fit, 2,000 validate, seed 0, the architecture's chosen hyperparameters) with
``--scale`` times the rule's steps, and prints its validation accuracy beside the stage's own
run at 1× (same images, same initial weights, same validation split), read from
`assets/lab/sweep.csv`. Rows go to ``runs/floor_check.csv``; a stopped run resumes from its
checkpoint in ``runs/``.

    nice -n 19 python scripts/lab_floor_check.py vit vit_rel --scale 2
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.lab import grid, sweep  # noqa: E402
from explorer.lab.models import LAB_ARCHS  # noqa: E402

OUT = ROOT / "runs" / "floor_check.csv"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="+", choices=LAB_ARCHS)
    parser.add_argument("--scale", type=float, default=2.0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: grid.STOP.set())
    chosen = sweep.read_choice()
    sweep_rows = grid.read_grid(grid.SWEEP_CSV)
    OUT.parent.mkdir(exist_ok=True)
    for arch in args.archs:
        hyper = chosen[arch]
        base = sweep.aug_run(arch)
        run = replace(base, budget=base.budget * args.scale)
        done = [r for r in grid.read_grid(OUT) if grid.row_key(r) == run.name] if OUT.exists() \
            else []
        if not done:
            result = grid._train_one(run, hyper, sweep.AUG_RULE,
                                     OUT.parent / f"floor-{run.name}.pt")
            if result is None:
                print(f"{run.name}: stopped, checkpoint saved")
                return 0
            grid.append_row(result, OUT)
            done = [result.row()]
        ref = [r for r in sweep._rows_of(sweep_rows, base)
               if grid.Hyper.of(r) == hyper]
        for label, r in [(f"{base.budget:g}x (sweep)", ref[-1] if ref else None),
                         (f"{run.budget:g}x", done[-1])]:
            if r is not None:
                print(f"{arch} {label}: {r['steps']} steps, val {100 * r['val_acc']:.2f}% "
                      f"train {100 * r['train_acc']:.2f}% test {100 * r['test_acc']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
