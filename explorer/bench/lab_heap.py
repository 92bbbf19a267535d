"""Does the grid worker's heap policy pay? The lab's training step with glibc's default heap
against `explorer.tuning.keep_freed_memory` (what every grid worker sets).

    python -m explorer.bench lab_heap [--archs vit_rel,cnn] [--steps 60] [--rounds 2]

glibc's heap policy is set for a whole process and cannot be put back, so each variant of
each round runs in a fresh process of its own (one torch thread, as a grid worker; the
step as the grid trains it: channels-last, compiled for `grid.COMPILED_ARCHS`), the
variants interleaved so that a load change hits both. Reports training images/s after five
warm-up steps and the process's minor page faults per timed step (each a page the kernel
maps and zeroes again).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from explorer.bench.machine import describe

VARIANTS = ("default", "keep")


def _child(arch: str, steps: int, variant: str) -> dict:
    import torch

    from explorer.bench.lab_step import _lab
    from explorer.lab.grid import COMPILED_ARCHS
    from explorer.tuning import keep_freed_memory

    torch.set_num_threads(1)
    if variant == "keep":
        assert keep_freed_memory(), "glibc refused the heap settings"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ips, _ = _lab(arch, 128, steps, arch in COMPILED_ARCHS, channels_last=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # faults over the warm-up and timed steps (compilation's included for a compiled arch)
    return {"ips": ips, "faults_per_step": faults / (steps + 5)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="vit_rel,cnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("ARCH", "STEPS", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        arch, steps, variant = args.child
        print(json.dumps(_child(arch, int(steps), variant)))
        return
    print(f"machine: {describe()}; 1 torch thread, batch 128, {args.steps} timed steps, median "
          f"of {args.rounds} interleaved rounds, each variant a fresh process")
    print("| arch | default img/s | keep img/s | keep / default | default faults/step | "
          "keep faults/step |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        out: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                cmd = [sys.executable, "-m", "explorer.bench", "lab_heap", "--child", arch,
                       str(args.steps), v]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                out[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
        med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for v, rs in out.items()}
        print(f"| {arch} | {med['default']['ips']:.0f} | {med['keep']['ips']:.0f} | "
              f"{med['keep']['ips'] / med['default']['ips']:.2f} | "
              f"{med['default']['faults_per_step']:,.0f} | "
              f"{med['keep']['faults_per_step']:,.0f} |", flush=True)
