"""Progress on stderr, drawn by tqdm: a live bar with rate and time left on a terminal, sparse lines in logs.

On a terminal tqdm redraws one line at most 10 times a second. Anywhere else (a log file, CI, a
pipe) a redrawn line would pile up carriage returns, so the state is written as its own line at
each tenth of the work instead: `prepare dataset: 300/1000 [00:02<00:04, 151.32img/s]`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class Progress:
    """A progress bar for `total` steps of `label`.

    Args:
        label: what is being counted.
        total: how many steps make 100%.
        stream: where to write (stderr by default, so stdout stays for results).
        unit: what one step is, shown in the rate.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None, unit: str = "img") -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        if self.tty:
            self.bar = tqdm(total=total, desc=label, file=self.stream, unit=unit, mininterval=0.1, dynamic_ncols=True)
        else:
            self.bar = tqdm(total=total, desc=label, file=_Lines(self.stream), unit=unit, mininterval=0,
                            miniters=max(1, total // 10), bar_format=LOG_FORMAT, leave=False)

    @property
    def done(self) -> int:
        """Steps counted so far."""
        return self.bar.n

    def update(self, n: int = 1) -> None:
        """Count `n` more steps (the bar redraws when it is worth it)."""
        self.bar.update(n)

    def note(self, message: str) -> None:
        """Print a message on its own line without garbling the bar."""
        self.bar.write(message, file=self.stream)

    def close(self) -> None:
        """End the bar; in a log, make sure the last count has its line."""
        if not self.tty and self.bar.last_print_n < self.bar.n:
            self.bar.refresh()
        self.bar.close()


class _Lines:
    """The stream tqdm draws on when stderr is not a terminal: each redraw becomes one plain line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:  # tqdm's clearing writes are blanks
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
