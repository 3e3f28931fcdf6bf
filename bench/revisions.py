"""One command under two git revisions of this checkout, side by side: what an engine change did.

    python bench/revisions.py --old REV --new REV [--reps 3] -- COMMAND [ARGS...]

Each revision is checked out (detached) into a temporary `git worktree`, removed afterwards. The
command runs in that worktree with `PYTHONPATH` pointing at it, so `python -m edgetune.cli.net_runner`
or a bench script given by a relative path runs that revision's code with this environment's
packages. Runs alternate old, new, new, old, ... (ABBA), so a drift of the machine's speed during
the run falls on both. Each run is a child measured from outside (`bench/measure.py`): wall time,
time to the first `1: Loss is` line, the median interval between consecutive step lines (one
training step, wherever no evaluation or checkpoint falls between them), peak RSS and the
validation accuracy it prints. The table shows the medians over `--reps` runs of each revision and
new / old; the accuracies must be equal when the change is meant to be bit-identical.

Give net_runner no `-q`: its step lines are what the first-step and step columns time. The
checkpoints it writes next to its model are overwritten by the next run, which still starts from
the file named, not from a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from bench import measure  # noqa: E402
from bench.measure import fmt, median  # noqa: E402


@contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """`rev` checked out into a new worktree at `path`, removed on exit (also after an error)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def step_ms(run: measure.Run) -> float | None:
    """The median interval between consecutive step lines, in ms: one step where nothing else ran between."""
    gaps = [b - a for a, b in zip(run.step_times, run.step_times[1:])]
    return 1000 * statistics.median(gaps) if gaps else None


def order(reps: int) -> list[str]:
    """old, new, new, old, old, new, ...: each revision as often first as second."""
    pairs = [("old", "new") if r % 2 == 0 else ("new", "old") for r in range(reps)]
    return [side for pair in pairs for side in pair]


def table(runs: dict[str, list[measure.Run]], revs: dict[str, str]) -> str:
    """Markdown: the medians of each revision and new / old."""
    def column(side: str) -> list[float | None]:
        rs = runs[side]
        return [median([r.wall for r in rs]), median([r.first_step for r in rs]), median([step_ms(r) for r in rs]),
                median([r.peak_rss_mb for r in rs])]

    old, new = column("old"), column("new")
    ratio = [None if o is None or n is None or o == 0 else n / o for o, n in zip(old, new)]
    accuracy = {side: sorted({r.validation for r in runs[side]}, key=str) for side in runs}
    lines = ["| revision | wall s | first step s | step ms | peak RSS MB | validation acc |",
             "|---|---:|---:|---:|---:|---|"]
    for side, values in (("old", old), ("new", new)):
        acc = " / ".join("—" if a is None else f"{a:g}" for a in accuracy[side])
        lines.append(f"| {side} {revs[side]} | " + " | ".join(fmt(v) for v in values) + f" | {acc} |")
    lines.append("| new / old | " + " | ".join(fmt(v, 2) + "x" if v is not None else "—" for v in ratio) + " | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the revision before the change (any git revision)")
    p.add_argument("--new", default="HEAD", help="the revision with it (default HEAD: committed work only)")
    p.add_argument("--reps", type=int, default=3, help="runs of each revision (default 3)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command after --")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    revs = {}
    for side, rev in (("old", args.old), ("new", args.new)):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"not a revision of this checkout: {rev}")
        revs[side] = out.stdout.strip()
    program = shutil.which(args.command[0])  # found from here, not from inside a worktree
    if program is None:
        raise SystemExit(f"no such program: {args.command[0]} (give a path, e.g. .venv/bin/python -m ...)")
    command = [os.path.abspath(program), *args.command[1:]]
    runs: dict[str, list[measure.Run]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp, \
            worktree(revs["old"], Path(tmp, "old")) as old_tree, worktree(revs["new"], Path(tmp, "new")) as new_tree:
        trees = {"old": old_tree, "new": new_tree}
        for i, side in enumerate(order(args.reps)):
            # in the worktree, a relative script path names the revision's own file
            run = measure.run(command, {"PYTHONPATH": str(trees[side])}, label=f"{side} {revs[side]}",
                              cwd=trees[side])
            runs[side].append(run)
            print(f"run {i + 1}/{2 * args.reps} {side} {revs[side]}: {run.wall:.1f} s, step "
                  f"{fmt(step_ms(run))} ms, {run.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)
    runs_word = "run" if args.reps == 1 else "runs"
    print(f"`{shlex.join(args.command)}`: {args.reps} {runs_word} of each revision, alternating (ABBA); medians")
    print(table(runs, revs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
