#!/usr/bin/env bash
# Install (idempotent) and start ViT Explorer on http://127.0.0.1:7860 with the offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh app
exec .venv/bin/python app.py "$@"
