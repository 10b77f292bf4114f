"""Progress bars: on a terminal only, never with -q or QXC_PROGRESS=0, and the loop's items unchanged."""

from __future__ import annotations

import io

from qxc.runtime import progress as p


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_where_someone_watches(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(p.sys, "stderr", io.StringIO())  # a pipe or a log: the iterable itself
    assert p.progress(items) is items
    tty = _Tty()
    monkeypatch.setattr(p.sys, "stderr", tty)
    monkeypatch.delenv("QXC_PROGRESS", raising=False)
    assert list(p.progress(items, desc="calibrating")) == items and "calibrating" in tty.getvalue()
    monkeypatch.setenv("QXC_PROGRESS", "0")
    assert p.progress(items) is items
    monkeypatch.delenv("QXC_PROGRESS")
    p.set_quiet(True)
    try:
        assert p.progress(items) is items
    finally:
        p.set_quiet(False)
