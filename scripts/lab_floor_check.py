"""Train the sweep's floor stage (`sweep.floor_stage`) ahead of the grid's driver, one
architecture after another in one process: the augmentation stage's chosen run (3,000
images fit, 2,000 validate, seed 0) at ``--scale`` times the budget rule's steps, with the
rows in ``runs/floor_check.csv`` and a resumable checkpoint in ``runs/``. A run at scale k is
the floor stage's run at floor k (the same steps, batches and initial weights: with 3,000
fit images the floor binds), so ``--import`` appends its rows to `assets/lab/sweep.csv` as
floor-stage rows, where the driver finds them finished. Written for session 12, which had
these runs training before the stage existed; prints each beside the stage's own 1x run.

    nice -n 19 python scripts/lab_floor_check.py vit vit_rel --scale 2
    python scripts/lab_floor_check.py --import
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
    parser.add_argument("archs", nargs="*", help=f"any of {', '.join(LAB_ARCHS)}")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--import", dest="import_rows", action="store_true",
                        help="append the finished rows to sweep.csv as floor-stage rows")
    args = parser.parse_args(argv)
    if args.import_rows:
        return import_rows()
    if not args.archs or set(args.archs) - set(LAB_ARCHS):
        parser.error(f"name architectures among {', '.join(LAB_ARCHS)}")
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


def import_rows() -> int:
    """Append ``runs/floor_check.csv``'s rows to `assets/lab/sweep.csv` as the floor stage's
    (budget 1, floor = their scale), skipping those the sweep already has, and move the
    checkpoints of runs still training to where the driver's floor-stage workers resume
    them (stop this script's processes first)."""
    from dataclasses import asdict

    import torch

    from explorer.lab.engine import Hyper, run_steps

    have = {grid.row_key(r, with_hyper=True) for r in grid.read_grid(grid.SWEEP_CSV)}
    added = 0
    for r in grid.read_grid(OUT):
        run = replace(grid.LabRun.of(r), budget=1.0)
        hyper = replace(Hyper.of(r), floor=r["budget"])
        assert run == sweep.aug_run(r["arch"]) and r["steps"] == run_steps(
            run, sweep.AUG_RULE, hyper), f"not a floor-stage run: {grid.row_key(r)}"
        r = {**r, "budget": 1.0, "floor": hyper.floor}
        if grid.row_key(r, with_hyper=True) in have:
            continue
        result = grid.LabResult(**{k: r[k] for k in grid.COLUMNS})
        grid.append_row(result, grid.SWEEP_CSV)
        added += 1
        print(f"imported {grid.row_key(r, with_hyper=True)}: val {100 * r['val_acc']:.2f}%")
    for path in sorted(OUT.parent.glob("floor-*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        extra = state["extra"]
        run = replace(grid.LabRun(**extra["run"]), budget=1.0)
        hyper = replace(Hyper(**extra["hyper"]), floor=extra["run"]["budget"])
        assert run == sweep.aug_run(run.arch) and extra["steps"] == run_steps(
            run, sweep.AUG_RULE, hyper), f"not a floor-stage run: {path.name}"
        extra["run"], extra["hyper"] = asdict(run), asdict(hyper)
        target = grid.checkpoint_path(run, hyper)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
        path.unlink()
        print(f"moved {path.name} (step {state['step']:,}) to {target.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
