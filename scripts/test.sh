#!/usr/bin/env bash
# Install (idempotent) what the tests need, then lint and run the whole suite
# (unit, integration on the real offline models, and browser tests in Debian's Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
