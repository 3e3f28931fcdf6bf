#!/usr/bin/env bash
# Set up a fresh machine for edgetune: system packages, the .venv virtual environment, and the
# edgetune + net_runner commands in it. Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="dataset-fashion-mnist openssh-server"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "== installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.edgetune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  torch=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')  # the host extra's pin
  echo "== installing edgetune[host,device,dev] into .venv ($torch, the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # PyPI's Linux torch wheel is the CUDA build: it pulls triton and a dozen nvidia-* packages
  # (gigabytes). PyTorch's CPU index has the same release as <version>+cpu (754 MB installed for
  # 2.13.0); installed first, it satisfies the pin, so the editable install below keeps it.
  .venv/bin/python -m pip install -q "$torch" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
  .venv/bin/python -m pip install -q -e '.[host,device,dev]'
  touch "$stamp"
fi
echo "== set-up done: $(.venv/bin/edgetune --version)"
