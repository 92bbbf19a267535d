"""The grid as BENCHMARKS.md tables (`python -m explorer.lab.grid --summary`): the sweep, test
accuracy per architecture and data size (original and scrambled), the convergence check of
every run, the ViT size sweep against compute, and what it cost."""

from __future__ import annotations

from explorer.lab.analysis import compute_curves, convergence, error_vs_data
from explorer.lab.engine import Hyper, LabRun, on_cpu_alone
from explorer.lab.models import ARCH_LABELS


def _accuracy_table(rows: list[dict], variant: str) -> list[str]:
    curves = error_vs_data(rows, variant)
    if not curves:
        return [f"*No {variant} runs yet.*"]
    sizes = sorted({p.train_images for pts in curves.values() for p in pts})
    out = ["| architecture | params | " + " | ".join(f"{n:,}" for n in sizes) + " |",
           "|---|---|" + "---|" * len(sizes)]
    for arch, points in curves.items():
        by_n = {p.train_images: p for p in points}
        params = next(r["params"] for r in rows if r["arch"] == arch)

        out.append(f"| {ARCH_LABELS[arch]} | {params / 1e3:.0f}k | "
                   + " | ".join(_cell(by_n.get(n)) for n in sizes) + " |")
    return out


def _cell(p) -> str:
    """Accuracy (%) of one data size: the mean of its seeds, their range when several."""
    if p is None:
        return "—"
    if p.seeds == 1:
        return f"{100 * (1 - p.mean):.1f}"
    return f"{100 * (1 - p.mean):.1f} ({100 * (1 - p.high):.1f}–{100 * (1 - p.low):.1f})"


def _sweep_table(sweep_rows: list[dict]) -> list[str]:
    """The sweep's runs, each stage's (a quarter of the steps, then the full budget; the
    augmentation stage on 300, then on 2,000 validation images; the floor stage at twice and
    four times the steps; the weight-decay stage at the chosen steps) apart."""
    out = ["| architecture | images (validating) | steps | lr | weight decay | augmentation | "
           "val acc | train acc |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(sweep_rows, key=lambda r: (r["arch"], r["val_images"], r["steps"],
                                               -r["shift"], r["lr"], r["weight_decay"])):
        aug = Hyper.of(r).augmentation()
        out.append(f"| {ARCH_LABELS[r['arch']]} | {r['train_images']:,} ({r['val_images']:,}) "
                   f"| {r['steps']:,} | {r['lr']:g} | {r['weight_decay']:g} | {aug} | "
                   f"{100 * r['val_acc']:.1f} | {100 * r['train_acc']:.1f} |")
    return out


def _convergence_table(rows: list[dict]) -> list[str]:
    out = ["| run | attempt | steps | epochs | test acc | val gain, last 20% (pts) | "
           "train − test (pts) | converged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = convergence(r)
        name = f"{r['arch']} w{r['width']} n{r['train_images']:,} s{r['seed']} {r['variant']}"
        name += f" b{r['budget']:g}" if r["budget"] != 1.0 else ""
        out.append(f"| {name} | {r.get('attempt', 0) + 1} | {r['steps']:,} | {r['epochs']:g} | "
                   f"{100 * r['test_acc']:.2f} | {100 * c.late_gain:+.2f} | "
                   f"{100 * c.train_minus_test:+.1f} | {_verdict(r, c.converged)} |")
    return out


def _verdict(row: dict, converged: bool) -> str:
    if not LabRun.of(row).in_arch_grid:  # the size sweep's budgets: short on purpose
        return "fixed budget"
    return "yes" if converged else "**no**"


def _examples_per_s(rows: list[dict]) -> float:
    """Training examples per second of training over ``rows``, summed."""
    return sum(r["steps"] * r["batch"] for r in rows) / sum(r["seconds"] for r in rows)


def _time_lines(rows: list[dict], attempts: list[dict]) -> list[str]:
    """The hours the runs took and a CPU worker's speed, overall and by architecture."""
    seconds = sum(r["seconds"] for r in rows)
    on_gpu = [r for r in rows if not on_cpu_alone(r)]
    where = (f" ({len(on_gpu)} of the runs trained partly or wholly on a GPU, "
             f"{sum(r['seconds'] for r in on_gpu) / 3600:.2f} hours of it)" if on_gpu else "")
    cpu = [r for r in rows if on_cpu_alone(r)]  # a CPU worker's speed is theirs alone
    speed = (f", {_examples_per_s(cpu):,.0f} training examples/s per CPU worker on average"
             if cpu else "")
    lines = [f"{len(rows)} runs, {seconds / 3600:.2f} hours of training summed over runs"
             f"{where}{speed}."]
    timed = [r for r in rows + attempts if on_cpu_alone(r)]
    speeds = []
    for arch in ARCH_LABELS:
        mine = [r for r in timed if r["arch"] == arch]
        if mine:
            speeds.append(f"{ARCH_LABELS[arch]} {_examples_per_s(mine):,.0f}")
    if speeds:
        lines.append(f"By architecture (finished runs and attempts on a CPU, examples/s per "
                     f"worker): {', '.join(speeds)}.")
    return lines


def summary_markdown(rows: list[dict], sweep_rows: list[dict] | None = None,
                     attempts: list[dict] | None = None) -> str:
    """The tables; ``attempts``: runs that had not converged and were retrained longer."""
    out: list[str] = []
    if sweep_rows:
        out += ["Hyperparameter sweep (validation split):", ""] + _sweep_table(sweep_rows) + [""]
    out += ["Test accuracy (%), original Fashion-MNIST, mean of seeds (range):", ""]
    out += _accuracy_table(rows, "original")
    out += ["", "Test accuracy (%), scrambled Fashion-MNIST:", ""]
    out += _accuracy_table(rows, "scrambled")
    sweep = compute_curves(rows, attempts or [])
    if sweep:
        out += ["", "ViT size sweep: test accuracy (%) at each budget (training GFLOPs):", "",
                "| width | params | runs |", "|---|---|---|"]
        for c in sweep:
            cells = ", ".join(f"{100 * (1 - e):.1f} ({x / 1e9:,.0f})"
                              for x, e in zip(c.compute, c.error, strict=True))
            out.append(f"| {c.width} | {c.params / 1e3:.0f}k | {cells} |")
    if rows:
        out += ["", "Convergence check of every run:", ""] + _convergence_table(rows)
        out += [""] + _time_lines(rows, attempts or [])
    if attempts:
        out += ["", "Attempts that had not converged (each retrained from scratch with twice "
                    "the steps; not in the tables above):", ""] + _convergence_table(attempts)
    return "\n".join(out)
