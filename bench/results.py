"""bench/RESULTS.md is shared by several scripts: each one replaces only its own marked section.

A section is the text between ``<!-- section: NAME -->`` and ``<!-- end: NAME -->``. Writing a
section that is not in the file yet inserts it before the first ``## `` heading that belongs to
no section (so the benchmark's own sections stay together at the top), or appends it. Everything
outside the markers (hand-written sections, other scripts' tables) is kept byte for byte.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgetune.runtime.atomic import write_atomic  # noqa: E402  (the repository's one crash-safe writer)

TITLE = "# edgetune benchmark\n"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or add) section ``name`` of ``path`` with ``text``, atomically."""
    begin, end = f"<!-- section: {name} -->", f"<!-- end: {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        heading = _free_heading(old)
        new = (old[:heading] + block + "\n\n" + old[heading:]) if heading is not None else (
            old.rstrip("\n") + "\n\n" + block + "\n")
    write_atomic(os.fspath(path), new.encode("utf-8"))


def _free_heading(text: str) -> int | None:
    """Offset of the first ``## `` heading outside every section, if any."""
    inside = 0
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("<!-- section: "):
            inside += 1
        elif line.startswith("<!-- end: "):
            inside -= 1
        elif line.startswith("## ") and inside == 0:
            return offset
        offset += len(line)
    return None
