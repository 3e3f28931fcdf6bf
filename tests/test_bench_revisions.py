"""bench/revisions.py: a command runs in each revision's own worktree, alternating, and no worktree is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import revisions  # noqa: E402

# The child prints two step lines and a validation line, and says where it ran: its working
# directory must be the worktree that PYTHONPATH names, a checkout of edgetune.
CHILD = ("import os, pathlib; cwd = os.getcwd(); "
         "assert os.environ['PYTHONPATH'] == cwd and pathlib.Path(cwd, 'edgetune/__init__.py').is_file(); "
         "print('1: Loss is 1.0'); print('2: Loss is 0.5'); print('accuracy on validation data = 0.25')")


def _worktrees() -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.startswith("worktree ")]


def test_order_puts_each_revision_first_as_often_as_second() -> None:
    assert revisions.order(1) == ["old", "new"]
    assert revisions.order(4) == ["old", "new", "new", "old", "old", "new", "new", "old"]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_runs_in_each_worktree_and_removes_them(capsys: pytest.CaptureFixture[str]) -> None:
    before = _worktrees()
    assert revisions.main(["--old", "HEAD", "--new", "HEAD", "--reps", "2", "--", sys.executable, "-c", CHILD]) == 0
    out = capsys.readouterr()
    assert _worktrees() == before
    assert out.err.count(" s, step ") == 4  # four runs, each reported
    rows = [line for line in out.out.splitlines() if line.startswith("| old") or line.startswith("| new")]
    assert len(rows) == 3 and all(row.endswith("| 0.25 |") for row in rows[:2]), out.out


def test_a_missing_command_or_revision_is_refused() -> None:
    with pytest.raises(SystemExit):
        revisions.main(["--old", "HEAD"])
    with pytest.raises(SystemExit, match="not a revision"):
        revisions.main(["--old", "no-such-revision-xyz", "--", "true"])
    with pytest.raises(SystemExit, match="no such program: no-such-program-xyz"):
        revisions.main(["--old", "HEAD", "--", "no-such-program-xyz"])  # refused before any worktree is made
