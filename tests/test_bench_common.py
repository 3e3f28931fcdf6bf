"""bench/common.py: the baselines draw their batches in exactly the order edgetune's Trainer does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgetune.runtime import Context, TrainSession
from edgetune.runtime.trainer import Trainer
from tests.fixtures_runtime import RecordingSplit, TinySplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402 - bench/ is a folder of scripts, not a package


@pytest.mark.parametrize("n, batch, steps, seed", [(10, 4, 9, 3), (8, 4, 7, 0), (3, 4, 5, 1), (13, 5, 11, 7)])
def test_batch_order_is_the_trainers(tiny_tod, n, batch, steps, seed):
    """Epoch ends with a partial tail (10/4), exact multiples (8/4), a split smaller than a batch (3/4)."""
    split = RecordingSplit(TinySplit(n))
    # no cache and a feature batch larger than any train batch: one images() call per step, the batch itself
    session = TrainSession.create(tiny_tod(batch_size=batch), Context(cache=False, feature_batch=64))
    Trainer(session, split, seed=seed, test_every=0, target_accuracy=None).fit(steps)
    expected = [b.tolist() for b in common.batch_order(n, batch, steps, seed)]
    assert split.calls == expected
    assert len(expected) == steps and all(len(b) == min(batch, n) for b in expected)


def test_results_sections_replace_only_themselves(tmp_path) -> None:
    """bench/results.py: each script rewrites its own section of RESULTS.md; hand-written text is kept."""
    import results

    path = tmp_path / "RESULTS.md"
    path.write_text("# edgetune benchmark\n\nintro\n\n## Issue 12 (by hand)\n\nkeep me\n", encoding="utf-8")
    results.write_section(path, "run", "## Run\n\nfirst")
    results.write_section(path, "scaling", "## Scaling\n\nsecond")
    results.write_section(path, "run", "## Run\n\nthird")
    text = path.read_text(encoding="utf-8")
    assert text == ("# edgetune benchmark\n\nintro\n\n"
                    "<!-- section: run -->\n## Run\n\nthird\n<!-- end: run -->\n\n"
                    "<!-- section: scaling -->\n## Scaling\n\nsecond\n<!-- end: scaling -->\n\n"
                    "## Issue 12 (by hand)\n\nkeep me\n")
