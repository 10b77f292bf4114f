"""Run a model over sample data through the instrument pass and fold every batch into per-tensor observers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc.calibrate.observers import Histogram, MinMax
from qxc.calibrate.ranges import Ranges
from qxc.data import Dataset
from qxc.runtime.progress import progress

CalibrationMethod = Literal["minmax", "percentile", "entropy", "mse"]


class TapRunner:
    """One onnxruntime session over the instrumented model; yields {tensor name: array} per batch."""

    def __init__(self, model: ir.Model, tensors: Iterable[str] | None = None, providers: Sequence[str] = ("cpu",)):
        from qxc.passes.instrument import InstrumentOptions, InstrumentPass
        from qxc.runtime import make_session

        names = None if tensors is None else sorted(set(tensors))
        pattern = "" if names is None else "^(" + "|".join(_escape(n) for n in names) + ")$"
        inst = InstrumentPass(InstrumentOptions(names=pattern))
        result = inst(model)
        self.manifest = inst.manifest
        self.session = make_session(result.model, providers=providers, prepacking=False)
        self.outputs = [t.output for t in self.manifest.taps]

    def run(self, feed: dict[str, np.ndarray], only: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """{tensor: array} for every tap, or for the tensors in ``only`` (onnxruntime then computes only what
        they need)."""
        from qxc.runtime.session import run

        taps = self.manifest.taps
        if only is not None:
            wanted = set(only)
            taps = [t for t in taps if t.tensor in wanted]
        arrays = run(self.session, [t.output for t in taps], feed)
        out: dict[str, np.ndarray] = {}
        for t, a in zip(taps, arrays):
            if a is None or (t.kind == "if-branch" and a.size == 0):
                continue  # the branch not taken on this batch
            out[t.tensor] = a
        return out


TAP_BYTES_PER_BATCH = 8 << 20


def _schedule(runner: TapRunner, data: Dataset, batch_size: int, only: Iterable[str] | None = None):
    """Row ranges of the batches: ``batch_size`` at most, fewer when the taps (or those in ``only``) of one row are
    large, so that the tensors onnxruntime hands back for one batch stay around TAP_BYTES_PER_BATCH (per-sample
    data: one row each)."""
    n = len(data)
    if data.stacked is None:
        yield from ((i, i + 1) for i in range(n))
        return
    probe = max(1, min(batch_size, 4, n))
    taps = runner.run(next(data.slice(0, probe).batches(probe)), only=only)
    per_row = sum(np.asarray(a).nbytes for a in taps.values()) / probe
    size = int(max(1, min(batch_size, TAP_BYTES_PER_BATCH // max(1, per_row))))
    yield from ((s, min(n, s + size)) for s in range(0, n, size))


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def collect_ranges(model: ir.Model, data: Dataset, *, tensors: Iterable[str] | None = None,
                   method: CalibrationMethod = "minmax", percentile: float = 99.999, bins: int = 2048,
                   batch_size: int = 64, providers: Sequence[str] = ("cpu",), activation_type: str = "uint8",
                   symmetric: bool = False, keep_minmax: Iterable[str] = ()) -> Ranges:
    """Ranges of the model's float tensors (or ``tensors``) on ``data``.

    ``keep_minmax`` names tensors that keep their min/max range whatever the method (model outputs, say).
    """
    runner = TapRunner(model, tensors, providers)
    mm: dict[str, MinMax] = {}
    batches = list(_schedule(runner, data, batch_size))
    for start, stop in progress(batches, desc="calibrating (min/max)"):
        for name, arr in runner.run(next(data.slice(start, stop).batches(stop - start))).items():
            mm.setdefault(name, MinMax()).update(np.asarray(arr))
    seen = {k: v for k, v in mm.items() if v.seen}
    ranges = {k: (v.lo, v.hi) for k, v in seen.items()}
    if method != "minmax":
        hists = {k: Histogram(v.lo, v.hi, bins) for k, v in seen.items()}
        for start, stop in progress(batches, desc=f"calibrating ({method} histograms)"):
            for name, arr in runner.run(next(data.slice(start, stop).batches(stop - start))).items():
                if name in hists:
                    hists[name].update(np.asarray(arr))
        keep = set(keep_minmax)
        for name, h in hists.items():
            if name in keep:
                continue
            if method == "percentile":
                ranges[name] = h.percentile(percentile)
            elif method == "entropy":
                ranges[name] = h.entropy()
            elif method == "mse":
                ranges[name] = h.mse(activation_type, symmetric)
    settings = {"batch_size": batch_size, "bins": bins}
    if method == "percentile":
        settings["percentile"] = percentile
    return Ranges(method, ranges, len(data), settings, {k for k, v in mm.items() if v.infinite})
