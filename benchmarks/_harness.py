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
    line = next(ln for ln in r.stdout.splitlines() if "__RESULT__" in ln)  # after a progress bar's \r, maybe
    return json.loads(line.split("__RESULT__", 1)[1])


def fresh(path: Path) -> str:
    """An imports-section snippet that deletes ``path`` and its ``.data`` before the timer: onnx appends external
    data to an existing file, so a side saved again each round would otherwise grow its own output."""
    return (f"import os\nfor _p in ({str(path)!r}, {str(path) + '.data'!r}):\n"
            "    if os.path.exists(_p):\n        os.remove(_p)\n")


def interleave(sides: dict[str, tuple[str, str]], rounds: int) -> dict[str, dict]:
    """Run every side once per round, alternating, and return per-side medians (and the last 'extra').

    Every other round runs the sides in reverse order: on this shared machine the first of two back-to-back fresh
    processes is often the faster one, and a fixed order would hand that edge to one side."""
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(rounds):
        order = list(sides.items())
        for name, (imports, body) in (order[::-1] if r % 2 else order):
            runs[name].append(measure(imports, body))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "import_mib": statistics.median(r["import_mib"] for r in rs),
            "extra": rs[-1]["extra"],
            "rounds": [r["seconds"] for r in rs],
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
    if not (folder / "ffn_calib.npz").exists():  # folders built before the calibration rows existed
        sys.path.insert(0, str(ROOT / "models"))
        import build

        build.build_ffn_calibration(folder, d_model)
    return path


def model_bytes(path: Path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def session(path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path, feeds: dict, batch: int = 256) -> list:
    import numpy as np

    sess = session(path, threads=2)
    n = len(next(iter(feeds.values())))
    parts = None
    for s in range(0, n, batch):
        outs = sess.run(None, {k: v[s : s + batch] for k, v in feeds.items()})
        parts = [[o] for o in outs] if parts is None else [p + [o] for p, o in zip(parts, outs)]
    return [np.concatenate(p) for p in parts]


def fidelity(ref, test) -> tuple[float, float]:
    """(SQNR dB, mean cosine over rows) of ``test`` against ``ref``."""
    import numpy as np

    r, t = ref.astype(np.float64).reshape(len(ref), -1), test.astype(np.float64).reshape(len(test), -1)
    noise = np.sum((r - t) ** 2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(r**2) / noise))
    cos = np.sum(r * t, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(t, axis=1) + 1e-30)
    return sqnr, float(np.mean(cos))


def latencies(paths: dict[str, Path], feed: dict, runs: int = 200, threads: int = 1) -> dict[str, float]:
    """Median single-call latency (ms) of each model, calls interleaved across models."""
    import time

    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    times = {k: [] for k in paths}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
