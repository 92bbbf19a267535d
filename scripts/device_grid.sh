#!/usr/bin/env bash
# The lab grid on a lent GPU, in few calls of the device tool (README, "The lab's grid on a
# lent GPU"). The device machine reaches no network and has no Fashion-MNIST, so the data
# travels in .device/, a folder git ignores:
#
#   here:    scripts/device_grid.sh pack
#   device:  run(command="scripts/device_grid.sh train 480 8", carry=[".device"], timeout_s=570)
#   here:    scripts/device_grid.sh unpack <files_at>/lab.tar     # then commit assets/lab/
#
# `train SECONDS WORKERS` trains the grid (`python -m explorer.lab.grid`, resuming from the
# committed checkpoints) for at most SECONDS, then stops it: every worker saves its run's
# checkpoint at the next step (SIGTERM), and assets/lab/ (rows, attempts, checkpoints, kept
# models) goes back as $OUT/lab.tar with the log. Another call resumes where this one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  pack)
    mkdir -p .device/fashion-mnist
    cp "${VIT_EXPLORER_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"/*.gz .device/fashion-mnist/
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"
    du -sh .device
    ;;
  train)
    seconds="${2:-480}" workers="${3:-8}"
    out="${OUT:?set OUT to the folder of files to bring back (the device tool sets it)}"
    export VIT_EXPLORER_FASHION_MNIST="$PWD/.device/fashion-mnist" PYTHONUNBUFFERED=1
    python="${PYTHON:-python3}"
    { nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$out/grid.log"
    # timeout signals the grid's whole process group: each worker saves, then exits
    # every phase: a sweep stage still to train (a re-run) trains first, finished ones pass
    timeout -s TERM -k 120 "$seconds" "$python" -m explorer.lab.grid --workers "$workers" \
      2>&1 | grep -v "flop_counter\|cpp_extension" | tee -a "$out/grid.log" || true
    "$python" -m explorer.lab.grid --status 2>&1 | grep -v flop_counter | tee -a "$out/grid.log"
    rm -f assets/lab/checkpoints/*.claim
    tar -cf "$out/lab.tar" assets/lab
    ;;
  unpack)
    tar -xf "${2:?the lab.tar the device call brought back}"
    rm -f assets/lab/checkpoints/*.claim
    "${PYTHON:-.venv/bin/python}" -m explorer.lab.grid --status
    ;;
  *)
    echo "usage: $0 pack | train SECONDS WORKERS | unpack LAB_TAR" >&2
    exit 2
    ;;
esac
