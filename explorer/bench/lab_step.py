"""How fast does the lab train? The lab's step against a plain PyTorch loop, by batch size,
with and without `torch.compile`.

    python -m explorer.bench lab_step [--archs vit,cnn] [--batches 64,128,256] [--steps 40]
                                      [--rounds 3] [--compile] [--channels-last]
                                      [--keep-freed-memory] [--threads 1]

Each variant trains the same freshly built model (seed 0) on the same in-memory Fashion-MNIST
batches, one torch thread (as a grid worker beside another; ``--threads 2``: as the grid's one
worker on a 2-core machine): "lab" is `explorer.lab.engine`'s data path
(`train_batch`: seeded indices, 2-px shifts, flips, normalisation) on the shared loop core
(`explorer.training.TrainLoop`: accelerate, AdamW, schedule); "plain" is a textbook loop on
the same batches prepared beforehand (so it pays for no data path at all); "compiled" is the
lab's step with the loop core's ``compile=True`` (``torch.compile``), as the grid's workers
train. Rounds interleave the variants, so a load change on the shared machine hits all of
them; the table gives training images/s after five warm-up steps ("compile s": those five
steps of the compiled variant, compilation included; inductor's on-disk cache makes all but
the first compile of a process short).
"""

from __future__ import annotations

import argparse
import statistics
import time

from explorer.bench.machine import describe


def _lab(arch: str, batch: int, steps: int, compiled: bool,
         channels_last: bool = False) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from explorer.lab.engine import Budget, Hyper, LabRun, run_data, train_batch
    from explorer.lab.models import build
    from explorer.training import Recipe, TrainLoop

    run, budget, hyper = LabRun(arch, 60000, 0), Budget(batch=batch), Hyper()
    fit_x, fit_y, _, _ = run_data(run, budget)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build(run.spec, seed=0).to(memory_format=layout)
    loop = TrainLoop(model, Recipe(lr=1e-3, total_steps=10**6, warmup_steps=100),
                     compile=compiled)

    def batches():
        step = 0
        while True:
            x, y = train_batch(step, fit_x, fit_y, run, budget, hyper)
            yield x.contiguous(memory_format=layout), y
            step += 1

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    warm = 5
    marks = []
    start = time.perf_counter()
    for event in loop.fit(batches(), loss_fn, until=warm + steps):
        marks.append(time.perf_counter())
        if event.step == warm:
            warm_s = marks[-1] - start
    return batch * steps / (marks[-1] - marks[warm - 1]), warm_s


def _plain(arch: str, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from explorer.lab.engine import Budget, Hyper, LabRun, run_data, train_batch
    from explorer.lab.models import build

    run, budget = LabRun(arch, 60000, 0), Budget(batch=batch)
    fit_x, fit_y, _, _ = run_data(run, budget)
    data = [train_batch(s, fit_x, fit_y, run, budget, Hyper()) for s in range(steps + 5)]
    model = build(run.spec, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for i, (x, y) in enumerate(data):
        if i == 5:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="vit,cnn,vit_rel,coatnet")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the compiled variant")
    parser.add_argument("--channels-last", action="store_true",
                        help="add the lab's step (and compiled step) in channels-last layout")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the grid worker's heap policy (`tuning.keep_freed_memory`)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a grid worker's)")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from explorer.tuning import keep_freed_memory
        assert keep_freed_memory(), "glibc refused the heap settings"
    print(f"machine: {describe()}; {args.threads} torch thread(s); {args.steps} timed steps per variant, "
          f"median of {args.rounds} interleaved rounds"
          + ("; the grid worker's heap policy" if args.keep_freed_memory else ""))
    cols = ["plain", "lab"] + (["compiled"] if args.compile else [])
    if args.channels_last:
        cols += ["lab CL"] + (["compiled CL"] if args.compile else [])
    print("| arch | batch | " + " | ".join(f"{c} img/s" for c in cols)
          + " | best / lab | best | compile s |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    variants = {"plain": lambda a, b: _plain(a, b, args.steps),
                "lab": lambda a, b: _lab(a, b, args.steps, False)[0],
                "compiled": lambda a, b: _lab(a, b, args.steps, True),
                "lab CL": lambda a, b: _lab(a, b, args.steps, False, True)[0],
                "compiled CL": lambda a, b: _lab(a, b, args.steps, True, True)}
    for arch in args.archs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            speeds: dict[str, list[float]] = {c: [] for c in cols}
            warm: list[float] = []
            for _ in range(args.rounds):  # interleaved: a load change hits every variant
                for c in cols:
                    out = variants[c](arch, batch)
                    if isinstance(out, tuple):  # a compiled variant: its warm-up seconds too
                        out, w = out
                        warm.append(w)
                    speeds[c].append(out)
            med = {c: statistics.median(v) for c, v in speeds.items()}
            best = max((c for c in cols if c != "plain"), key=med.get)
            print(f"| {arch} | {batch} | " + " | ".join(f"{med[c]:.0f}" for c in cols)
                  + f" | {med[best] / med['lab']:.2f} | {best} | "
                  + (f"{statistics.median(warm):.0f}" if warm else "–") + " |", flush=True)
