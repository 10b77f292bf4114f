import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_FIGURES: list[str] = []


@pytest.fixture
def figure():
    """Tests call ``figure("...")`` for a line that belongs in the CI log (printed after the test summary)."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.write_sep("-", "qxc figures from the tests")
        for line in _FIGURES:
            terminalreporter.write_line(line)
