"""Shared benchmark plumbing: run a snippet in a fresh subprocess and read its time and peak RSS.

Each side runs in its own interpreter so that peak RSS belongs to that side alone; sides are interleaved over rounds
and medians are reported, since the machines are shared and noisy.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = """
import json, time, sys
def _hwm():  # VmHWM resets at exec, unlike ru_maxrss, which a child inherits from a large parent
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
{imports}
_rss0 = _hwm()
_t0 = time.perf_counter()
{body}
_t = time.perf_counter() - _t0
print("__RESULT__" + json.dumps({{"seconds": _t, "peak_mib": _hwm(),
                                  "import_mib": _rss0, "extra": globals().get("EXTRA", {{}})}}))
"""


def measure(imports: str, body: str, env: dict | None = None) -> dict:
    code = _RUNNER.format(imports=textwrap.dedent(imports), body=textwrap.dedent(body))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark side failed:\n{r.stderr[-3000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("__RESULT__"))
    return json.loads(line[len("__RESULT__"):])


def interleave(sides: dict[str, tuple[str, str]], rounds: int) -> dict[str, dict]:
    """Run every side once per round, alternating, and return per-side medians (and the last 'extra')."""
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, (imports, body) in sides.items():
            runs[name].append(measure(imports, body))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "import_mib": statistics.median(r["import_mib"] for r in rs),
            "extra": rs[-1]["extra"],
        }
    return out


def ensure_ffn(layers: int = 18, d_model: int = 512, d_ff: int = 2048) -> Path:
    """The reference FFN (37.8M parameters by default) in models/large/, built on first use."""
    folder = ROOT / "models" / "large" / (f"ffn_{layers}x{d_model}x{d_ff}")
    path = folder / "ffn.onnx"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "models"))
        import build

        build.build_ffn(folder, d_model, d_ff, layers)
    return path
