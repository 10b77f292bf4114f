"""Per-layer activation statistics from the instrumented graph, streamed batch by batch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qxc.data import Dataset


def activation_stats(model: ir.Model, data: Dataset, *, batch_size: int = 256, providers=("cpu",)) -> list[dict]:
    from qxc.calibrate.collect import TapRunner

    runner = TapRunner(model, None, providers)
    sums: dict[str, list[float]] = {}
    for feed in data.batches(batch_size):
        for name, arr in runner.run(feed).items():
            a = np.asarray(arr, np.float64).reshape(-1)
            s = sums.setdefault(name, [0.0, 0.0, np.inf, -np.inf, 0.0, 0.0, 0])
            missing = np.isnan(a)
            if missing.any():  # missing values (NaN) are counted, not averaged in
                s[6] += int(missing.sum())
                a = a[~missing]
            if a.size == 0:
                continue
            s[0] += a.sum()
            s[1] += (a * a).sum()
            s[2] = min(s[2], a.min())
            s[3] = max(s[3], a.max())
            s[4] += np.count_nonzero(a == 0)
            s[5] += a.size
    out = []
    for tap in runner.manifest.taps:
        if tap.tensor not in sums:
            continue
        total, sq, lo, hi, zeros, n, missing = sums[tap.tensor]
        if n == 0:
            continue
        mean = total / n
        out.append({"tensor": tap.tensor, "node": tap.node, "op": tap.op, "mean": mean,
                    "std": float(np.sqrt(max(sq / n - mean * mean, 0.0))), "min": lo, "max": hi,
                    "zero_fraction": zeros / n, "elements": int(n), **({"missing": missing} if missing else {})})
    return out
