"""Where the lab keeps what it ships, in one place: the grid's rows, the sweep's rows and
choice, the kept models, and the checkpoints of runs still training."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "lab"
GRID_CSV = ASSETS / "grid.csv"
SWEEP_CSV = ASSETS / "sweep.csv"
ATTEMPTS_CSV = ASSETS / "attempts.csv"  # runs that had not converged and were retrained longer
SUPERSEDED_CSV = ASSETS / "superseded.csv"  # rows trained with a choice the sweep has replaced
HYPER_JSON = ASSETS / "hyper.json"  # the sweep's choice per architecture
MODELS_DIR = ASSETS / "models"
CHECKPOINTS_DIR = ASSETS / "checkpoints"  # runs in progress (committed: a session may stop)
