"""Does a live run in the lab tab land on its shipped grid point, and what does training it
in a child process (`explorer.trainer_process`) buy over the app's own process?

    python -m explorer.bench lab_live [--runs vit:500:0,cnn:500:1] [--where child,app]
        [--rounds 2]

Starts the real app (tuned as ``python app.py`` tunes it: its heap trimmed every 0.25 s),
trains each run through the ``/lab_train`` endpoint with `gradio_client` (the live budget,
as a visitor would), and prints its test accuracy beside the shipped grid's for the same run
and the spread of the grid's seeds; its wall seconds (the process's start, data, training and
evaluation); and how far the app's resident memory rose above where it stood before the
run. ``--where`` trains each run in a child (the default) and/or in the app's process, the
two interleaved in each round.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import replace

from explorer.bench.calls import PeakMemory
from explorer.bench.machine import describe


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="vit:500:0",
                        help="comma-separated arch:train_images:seed")
    parser.add_argument("--where", default="child", help="child, app or child,app")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    import psutil
    from gradio_client import Client

    import app
    from explorer import settings as app_settings
    from explorer import tuning
    from explorer.lab import analysis, grid
    from explorer.settings import Settings

    rows = grid.read_grid()
    settings = Settings.from_env()
    demo = app.build_demo(settings)
    tuning.tune(settings)  # as `python app.py` does
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    client = Client(demo.local_url, verbose=False)
    print(f"machine: {describe()}; torch threads per request: "
          f"{__import__('torch').get_num_threads()}; heap trimmed every "
          f"{settings.malloc_trim_s} s")
    print("| run | trained in | live test acc | shipped (same seed) | shipped seeds span | "
          "live seconds | app memory rise (MB) |")
    print("|---|---|---|---|---|---|---|")
    try:
        for _ in range(args.rounds):
            for spec in args.runs.split(","):
                for where in args.where.split(","):
                    app_settings.install(replace(settings, train_in_child=where == "child"))
                    arch, n, seed = spec.split(":")
                    before = psutil.Process().memory_info().rss
                    peak = PeakMemory(every=0.1)
                    start = time.perf_counter()
                    status, _live, _plot = client.predict(arch, int(n), int(seed),
                                                          api_name="/lab_train")
                    seconds = time.perf_counter() - start
                    rise_mb = (max(peak.stop(), before) - before) / 2**20
                    live = float(re.search(r"test accuracy ([\d.]+)%", status).group(1))
                    seeds = analysis.seed_runs(rows, arch, int(n))
                    same = [r for r in seeds if r["seed"] == int(seed)]
                    spread = [100 * r["test_acc"] for r in seeds]
                    shipped = f"{100 * same[0]['test_acc']:.2f}%" if same else "—"
                    span = f"{min(spread):.2f}–{max(spread):.2f}%" if spread else "—"
                    print(f"| {arch} n={n} seed {seed} | {where} | {live:.2f}% | {shipped} | "
                          f"{span} | {seconds:.0f} | {rise_mb:.0f} |", flush=True)
    finally:
        client.close()
        demo.close()
