"""Run one system in a child process and measure it from the outside.

The child runs under ``/usr/bin/time -v`` (peak RSS of the whole process) and its stdout is read
line by line, each line stamped on arrival, so every system is timed by the same clock and parser:
wall time from just before the process starts to its exit, time to the first ``1: Loss is`` line,
steps/s between the first and the last step line, and the final validation accuracy. A system
may also report a part it timed itself as a ``bench: NAME=SECONDS`` line (e.g. ``compile_s``:
torch.compile's compile time; ``backbone_s``: the floor's inference over pre-decoded images).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

STEP = re.compile(r"^(\d+): Loss is ")
VALIDATION = re.compile(r"^accuracy on validation data = (\S+)")
PEAK_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
REPORTED = re.compile(r"^bench: (\w+)=(\S+)")


@dataclass
class Run:
    """What one child process did, as seen from outside."""

    wall: float                       # seconds, process start to exit
    peak_rss_mb: float                # MB, /usr/bin/time -v
    first_step: float | None = None   # seconds from start to the first step line
    step_times: list[float] = field(default_factory=list)  # arrival of each step line
    validation: float | None = None
    tail: float = 0.0                 # seconds from the last step line to exit
    reported: dict[str, float] = field(default_factory=dict)  # `bench: NAME=VALUE` lines

    @property
    def steps(self) -> int:
        """Number of step lines printed."""
        return len(self.step_times)

    @property
    def steps_per_s(self) -> float | None:
        """Steps per second between the first and the last step (evaluations included)."""
        if self.steps < 2:
            return None
        return (self.steps - 1) / (self.step_times[-1] - self.step_times[0])


def run(cmd: list[str], env: dict[str, str] | None = None, label: str = "",
        cwd: str | os.PathLike | None = None) -> Run:
    """Run ``cmd`` to completion and measure it.

    Args:
        cmd: The child's argument list (no shell).
        env: Extra environment variables for the child.
        label: Shown in the progress line on stderr.
        cwd: The child's working directory (default: this process's).

    Returns:
        The measurements. Raises ``RuntimeError`` with the child's stderr tail if it fails, so a
        broken system is never reported as a fast one.
    """
    with tempfile.TemporaryDirectory(prefix="bench-time-") as tmp:
        timing = os.path.join(tmp, "time.txt")
        errors = os.path.join(tmp, "stderr.txt")
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(errors, "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", timing, *cmd], env=child_env, cwd=cwd,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            stamps: list[float] = []
            validation = None
            reported: dict[str, float] = {}
            for line in proc.stdout:
                now = time.monotonic() - start
                if STEP.match(line):
                    stamps.append(now)
                    if len(stamps) % 100 == 0:
                        print(f"  {label}: step {len(stamps)}", file=sys.stderr, flush=True)
                elif m := VALIDATION.match(line):
                    validation = float(m.group(1))
                elif m := REPORTED.match(line):
                    reported[m.group(1)] = float(m.group(2))
            code = proc.wait()
            wall = time.monotonic() - start
        if code != 0:
            with open(errors, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"{label} exited with {code}:\n{tail}")
        with open(timing, encoding="utf-8") as f:
            rss_kb = int(PEAK_RSS.search(f.read()).group(1))
    return Run(wall=wall, peak_rss_mb=rss_kb / 1024, first_step=stamps[0] if stamps else None,
               step_times=stamps, validation=validation,
               tail=wall - stamps[-1] if stamps else 0.0, reported=reported)


def median(values: list[float | None]) -> float | None:
    """Median of the values that exist."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    """Format a number for the table; missing values show as an em dash."""
    return "—" if value is None else f"{value:.{digits}f}"
