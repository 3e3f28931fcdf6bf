#!/usr/bin/env bash
# The seed's prepare_and_run.sh, now a thin wrapper: `edgetune prepare-and-run` does the work.
# Example: ./prepare_and_run.sh -D fashion-mnist -t x86   (see --help for adb/ssh and export options)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
edgetune="$here/.venv/bin/edgetune"
[ -x "$edgetune" ] || edgetune=edgetune
exec "$edgetune" prepare-and-run "$@"
