"""Progress reporting for long engine work, independent of who is watching.

The engine calls `bar(desc, total)`; a terminal sees a tqdm bar on stderr (never stdout, which
may carry JSON or a protocol), and a listener registered with `set_listener` (a worker's
status file, an MCP progress notification) gets (desc, done, total) on every update.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, int, int], None]
_listener: Listener | None = None


def set_listener(listener: Listener | None) -> None:
    global _listener
    _listener = listener


@contextmanager
def bar(desc: str, total: int) -> Iterator[Callable[[int], None]]:
    from tqdm.auto import tqdm

    hidden = os.environ.get("OML_PROGRESS", "1") == "0"
    done = 0
    with tqdm(total=total, desc=desc, file=sys.stderr, disable=hidden, leave=False,
              dynamic_ncols=True) as shown:
        def advance(n: int) -> None:
            nonlocal done
            done += n
            shown.update(n)
            if _listener:
                _listener(desc, done, total)
        yield advance
