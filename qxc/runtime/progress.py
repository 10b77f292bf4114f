"""Progress bars (tqdm, on stderr) for the loops over the user's data: calibration and compare batches.

Shown only where someone watches: stderr is a terminal, ``-q`` was not given, and ``QXC_PROGRESS`` is not ``0``.
Pipes, CI logs and tests see nothing, so the one-line error contract and byte-stable outputs hold.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``-q`` on the command line: no bars."""
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and os.environ.get("QXC_PROGRESS", "1") != "0" and sys.stderr.isatty()


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", unit: str = "batch") -> Iterable:
    """``iterable``, with a bar that disappears when done where :func:`enabled`."""
    if not enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
