#!/usr/bin/env bash
# The demo, from a fresh clone to a printed validation accuracy: set up (scripts/setup.sh), then the
# seed's whole flow with `edgetune prepare-and-run -t x86`: Fashion-MNIST prepared (100 images per
# class), EfficientNet-Lite0 exported + converted to a .tod (class names from the dataset), a
# package-x86/ with an offline runtime bundle, and eval_untrained.sh / train.sh / eval.sh run in a
# fresh venv made from that bundle. Then the check (untrained ~chance, trained >= 0.80) and a plot.
# Everything it writes is in package-x86/ (and .venv/ from the set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
.venv/bin/edgetune prepare-and-run -D fashion-mnist -t x86 -o package-x86 "$@" | tee "$log"
cat "$log" > package-x86/demo.log

.venv/bin/python - package-x86/demo.log package-x86/train.jsonl package-x86/train.png <<'PY'
import re
import sys

from edgetune.cli.net_runner import read_log, save_plot

log, jsonl, png = sys.argv[1:]
found = re.findall(r"^accuracy on validation data = (\S+)$", open(log, encoding="utf-8").read(), re.M)
print(f"plot: {save_plot(read_log(jsonl), png)}")
if len(found) != 3:
    sys.exit(f"demo check FAILED: expected 3 validation lines, found {len(found)}")
untrained, trained, evaluated = map(float, found)
if untrained > 0.3 or trained < 0.80 or evaluated != trained:
    sys.exit(f"demo check FAILED: untrained {untrained:g} (want <= 0.3), trained {trained:g} (want >= 0.80), "
             f"eval.sh {evaluated:g} (want = trained)")
print(f"demo check passed: validation accuracy {untrained:g} untrained -> {trained:g} trained (>= 0.80)")
PY
