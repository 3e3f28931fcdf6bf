#!/usr/bin/env bash
# Set up a fresh machine for edgetune: system packages, the .venv virtual environment, and the
# edgetune + net_runner commands in it. Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# the demo's data; fonts-dejavu-core for the glyph dataset test; sshd for the ssh deploy test; qemu-user + mmdebstrap run package-arm64/ under
# emulation (tests/test_arm64_emulated.py). --no-install-recommends keeps qemu-user-binfmt out:
# nothing is registered with the kernel's binfmt_misc, the test calls qemu-aarch64 itself.
APT_PACKAGES="dataset-fashion-mnist openssh-server fonts-dejavu-core qemu-user mmdebstrap"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "== installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
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
  echo "== installing edgetune[host,device,dev,bench,federated] into .venv ($torch, the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # The pin must resolve to a CPU build: PyPI's own Linux wheel of a torch release is the CUDA
  # build (triton and a dozen nvidia-* packages, gigabytes). Machines of this project have the
  # 2.13.0 CPU wheel where pip finds it first; elsewhere, point pip at PyTorch's CPU wheel index
  # (PIP_EXTRA_INDEX_URL) before running this. The check below refuses to go on with a CUDA build.
  .venv/bin/python -m pip install -q "$torch"
  .venv/bin/python -m pip install -q -e '.[host,device,dev,bench,federated]'
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
    echo "set-up: $torch resolved to a CUDA build; install its CPU build first (see the comment above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "== set-up done: $(.venv/bin/edgetune --version)"
