"""A dependency-free progress line on stderr for long preparation runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`label: i/N` on one rewritten line on a terminal; every 10% on its own line otherwise (logs, CI).

    Args:
        label: what is being counted.
        total: how many steps make 100%.
        stream: where to write (stderr by default, so stdout stays for results).
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_time, self.last_tenth = 0.0, -1

    def update(self, n: int = 1) -> None:
        """Count `n` more steps and redraw when it is worth it (at most 10 times a second on a tty)."""
        self.done += n
        now = time.monotonic()
        tenth = 10 * self.done // max(self.total, 1)
        if self.tty and (now - self.last_time > 0.1 or self.done >= self.total):
            self.stream.write(f"\r{self.label}: {self.done}/{self.total}")
            self.stream.flush()
            self.last_time = now
        elif not self.tty and tenth != self.last_tenth:
            self.stream.write(f"{self.label}: {self.done}/{self.total}\n")
            self.last_tenth = tenth

    def note(self, message: str) -> None:
        """Print a message on its own line without garbling the progress line."""
        self.stream.write(("\n" if self.tty and self.done else "") + message + "\n")
        self.last_time = 0.0  # redraw the progress line on the next update

    def close(self) -> None:
        """End the progress line."""
        if self.tty:
            self.stream.write(f"\r{self.label}: {self.done}/{self.total}\n")
            self.stream.flush()
