#!/usr/bin/env bash
# The lab grid on a lent GPU, in few calls of the device tool (README, "The lab's grid on a
# lent GPU"). The device machine reaches no network and has no Fashion-MNIST, so the data
# travels in .device/, a folder git ignores:
#
#   here:    scripts/device_grid.sh pack
#   device:  run(command="scripts/device_grid.sh train 480 12", carry=[".device"], timeout_s=595)
#   here:    scripts/device_grid.sh unpack <files_at>     # then commit assets/lab/
#
# The tool's limits shape this script (measured 2026-12-04, when a first GPU call trained
# 480 s and lost it all): the tree that travels (tracked files + carried ones) must stay
# under 64 MiB, and at most 8 files of at most 16 MiB each come back.
#  - `pack` compresses the data with xz (31 → 27 MB) and leaves behind what the grid does not
#    need (the screenshots, the iGPT weights: 26 MB) by taking them out of git's index for
#    the call; `unpack` (or `restore`, if no call came back) puts them back. Until then
#    `git status` shows them as deleted: commit only named paths (`git commit -- assets/lab`).
#  - `train` sends back only the grid files that changed, in 15 MiB parts, with the list of
#    every file the grid keeps (a finished run deletes its checkpoint; `unpack` does too).
#
# `train SECONDS WORKERS` trains the grid (`python -m explorer.lab.grid`, resuming from the
# committed checkpoints) for at most SECONDS, then stops it: every worker saves its run's
# checkpoint at the next step (SIGTERM). Another call resumes where this one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

LEAVE_BEHIND=(docs assets/igpt)   # tracked, large, and not read by the grid
LIMIT=$((64 << 20))
PART=15M

exclude_file() { git rev-parse --git-path info/exclude; }

restore() {
  local exclude; exclude="$(exclude_file)"
  git reset -q -- "${LEAVE_BEHIND[@]}"
  for p in "${LEAVE_BEHIND[@]}"; do
    grep -vx "/$p/" "$exclude" > "$exclude.tmp" || true
    mv "$exclude.tmp" "$exclude"
  done
  git status --short -- "${LEAVE_BEHIND[@]}" | head -3
}

case "${1:-}" in
  pack)
    # the call's rows and checkpoints replace these at unpack: nothing may train here meanwhile
    if pgrep -f "explorer.lab.grid --(workers|phase)" > /dev/null; then
      echo "a grid trains here: stop it first (pkill -TERM -f 'explorer.lab.grid --workers')" >&2
      exit 1
    fi
    src="${VIT_EXPLORER_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
    rm -rf .device/fashion-mnist && mkdir -p .device/fashion-mnist
    for f in "$src"/*.gz; do
      zcat "$f" | xz -9 -T0 > ".device/fashion-mnist/$(basename "$f" .gz).xz"
    done
    exclude="$(exclude_file)"
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"
    for p in "${LEAVE_BEHIND[@]}"; do
      git rm -r -q --cached --ignore-unmatch -- "$p"
      grep -qx "/$p/" "$exclude" || echo "/$p/" >> "$exclude"
    done
    travels=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null
                 find .device -type f -printf '%s\n'; } | awk '{s += $1} END {print s}')
    echo "travels: $((travels >> 20)) MiB of at most $((LIMIT >> 20)) MiB (left behind until" \
         "unpack or restore: ${LEAVE_BEHIND[*]})"
    if (( travels >= LIMIT )); then
      restore
      echo "too large for the device tool: nothing packed" >&2
      exit 1
    fi
    ;;
  train)
    seconds="${2:-480}" workers="${3:-12}"
    out="${OUT:?set OUT to the folder of files to bring back (the device tool sets it)}"
    data=/tmp/fashion-mnist
    mkdir -p "$data"
    for f in .device/fashion-mnist/*.xz; do
      xz -dc "$f" | gzip -1 > "$data/$(basename "$f" .xz).gz"
    done
    export VIT_EXPLORER_FASHION_MNIST="$data" PYTHONUNBUFFERED=1
    python="${PYTHON:-python3}"
    { nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$out/grid.log"
    "$python" -m explorer.lab.grid --status 2>&1 | grep -v flop_counter | tee -a "$out/grid.log"
    start=/tmp/device-grid.start
    touch "$start"
    sleep 1
    # timeout signals the grid's whole process group: each worker saves, then exits
    # every phase: a sweep stage still to train (a re-run) trains first, finished ones pass
    timeout -s TERM -k 60 "$seconds" "$python" -m explorer.lab.grid --workers "$workers" \
      2>&1 | grep -v "flop_counter\|cpp_extension" >> "$out/grid.log" || true
    "$python" -m explorer.lab.grid --status 2>&1 | grep -v flop_counter | tee -a "$out/grid.log"
    rm -f assets/lab/checkpoints/*.claim
    find assets/lab -type f | sort > "$out/lab-files.txt"
    find assets/lab -type f -newer "$start" | sort > /tmp/changed.txt
    tar -cf - -T /tmp/changed.txt | split -b "$PART" -d - "$out/lab.tar.part"
    ls -l "$out"
    ;;
  unpack)
    from="${2:?the folder the device call brought back (files_at)}"
    [[ -f "$from/lab-files.txt" ]] || { echo "no lab-files.txt in $from: the call came back without the grid" >&2; exit 1; }
    cat "$from"/lab.tar.part* | tar -xf -
    # a run finished there deleted its checkpoint: so do we
    comm -23 <(find assets/lab -type f | sort) <(sort "$from/lab-files.txt") | while read -r f; do
      rm -v -- "$f"
    done
    rm -f assets/lab/checkpoints/*.claim
    restore
    "${PYTHON:-.venv/bin/python}" -m explorer.lab.grid --status
    ;;
  restore)
    restore
    ;;
  *)
    echo "usage: $0 pack | train SECONDS WORKERS | unpack FILES_AT | restore" >&2
    exit 2
    ;;
esac
