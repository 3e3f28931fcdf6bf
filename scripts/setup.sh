#!/usr/bin/env bash
# Set up a fresh machine for edgetune: system packages, the .venv virtual environment, and the
# edgetune + net_runner commands in it. Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# the demo's data; sshd for the ssh deploy test; qemu-user + mmdebstrap run package-arm64/ under
# emulation (tests/test_arm64_emulated.py). --no-install-recommends keeps qemu-user-binfmt out:
# nothing is registered with the kernel's binfmt_misc, the test calls qemu-aarch64 itself.
APT_PACKAGES="dataset-fashion-mnist openssh-server qemu-user mmdebstrap"
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
  echo "== installing edgetune[host,device,dev] into .venv (torch==2.13.0 CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[host,device,dev]'
  touch "$stamp"
fi
echo "== set-up done: $(.venv/bin/edgetune --version)"
