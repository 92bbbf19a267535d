"""Does a live run in the lab tab land on its shipped grid point?

    python -m explorer.bench lab_live [--runs vit:500:0,cnn:500:1]

Starts the real app, trains each run through the ``/lab_train`` endpoint with
`gradio_client` (the grid's full budget, as a visitor would), and prints its test accuracy
beside the shipped grid's for the same run and the spread of the grid's seeds.
"""

from __future__ import annotations

import argparse
import re
import time

from explorer.bench.machine import describe


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="vit:500:0",
                        help="comma-separated arch:train_images:seed")
    args = parser.parse_args(argv)

    from gradio_client import Client

    import app
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
          f"{__import__('torch').get_num_threads()}")
    print("| run | live test acc | shipped (same seed) | shipped seeds span | live seconds |")
    print("|---|---|---|---|---|")
    try:
        for spec in args.runs.split(","):
            arch, n, seed = spec.split(":")
            start = time.perf_counter()
            status, _live, _plot = client.predict(arch, int(n), int(seed), api_name="/lab_train")
            seconds = time.perf_counter() - start
            live = float(re.search(r"test accuracy ([\d.]+)%", status).group(1))
            seeds = analysis.seed_runs(rows, arch, int(n))
            same = [r for r in seeds if r["seed"] == int(seed)]
            spread = [100 * r["test_acc"] for r in seeds]
            shipped = f"{100 * same[0]['test_acc']:.2f}%" if same else "—"
            span = f"{min(spread):.2f}–{max(spread):.2f}%" if spread else "—"
            print(f"| {arch} n={n} seed {seed} | {live:.2f}% | {shipped} | {span} | "
                  f"{seconds:.0f} |", flush=True)
    finally:
        client.close()
        demo.close()
