"""How every command reports a user mistake: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from edgetune.errors import UserError


def run_guarded(body: Callable[[], int | None], prog: str) -> int:
    """Run a command body; user mistakes become `prog: error: ...` on stderr and exit 2.

    Bugs (any other exception) still show their traceback: hiding them would hide our mistakes.
    """
    from edgetune.runtime.format import TodError  # numpy only; cheap

    try:
        return body() or 0
    except (UserError, TodError, OSError) as e:  # OSError: missing file, no permission, full disk
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
