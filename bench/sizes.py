"""Install size of a runtime: the files of a distribution and of everything it requires.

Run with the Python of the venv to measure (``python sizes.py numpy onnxruntime pillow``): it walks
``importlib.metadata`` requirements (markers evaluated, extras not followed) from the given
distributions and sums the sizes of the files each installed distribution's RECORD lists, so the
number is what ``pip install`` puts into site-packages for that runtime, not a guess.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

def closure(roots: list[str]) -> list[metadata.Distribution]:
    """Return the installed distributions ``roots`` need, themselves included."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def size_mb(dist: metadata.Distribution) -> float:
    """Sum of the sizes of the files a distribution installed, in MB (10^6 bytes)."""
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total / 1e6


def main() -> None:
    """Print ``{"total": MB, "packages": {name: MB}}`` for the closure of the arguments."""
    dists = closure(sys.argv[1:])
    sizes = {d.metadata["Name"]: round(size_mb(d), 1) for d in dists}
    print(json.dumps({"total": round(sum(sizes.values()), 1), "packages": sizes}))


if __name__ == "__main__":
    main()
