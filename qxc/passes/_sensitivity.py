"""Output error of a model when some of its weights are replaced: one onnxruntime session, weights fed per run.

The chosen weights are presented as graph inputs (qxc.ir.skeleton), so trying another value for a weight (int4 vs
int8 reconstruction, a pruned copy) costs one run, not a new session. Used by quantize-weights (keep-sensitive,
max-error) and the pruning passes' sensitivity allocation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.data import Dataset
from qxc.errors import UsageError
from qxc.runtime.session import normalize_output


class WeightSwapEvaluator:
    def __init__(self, model: ir.Model, data: Dataset, weights: Iterable[ir.Value], max_rows: int = 256):
        from qxc.runtime import make_session

        main = set(model.graph.initializers)
        self.weights = {v.name: v for v in weights if v.name in main}
        self.originals = {n: v.const_value.numpy() for n, v in self.weights.items()}
        with qir.skeleton(model, only=set(self.weights)):
            self.session = make_session(model, optimization="basic", prepacking=False)
        self.feeds = list(data.head(max_rows).batches(256))
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.reference = self.run({})

    def run(self, replacements: dict[ir.Value, np.ndarray]) -> list[np.ndarray]:
        weights = dict(self.originals)
        for value, array in replacements.items():
            if value.name in weights:
                weights[value.name] = np.asarray(array, dtype=self.originals[value.name].dtype)
        outs: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for feed in self.feeds:
            for i, y in enumerate(self.session.run(self.outputs, {**feed, **weights})):
                outs[i].append(normalize_output(y))
        return _joined(outs)

    def error(self, replacements: dict[ir.Value, np.ndarray]) -> float:
        return relative_error(self.reference, self.run(replacements))


def _joined(outs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each output's batches as one array; an output with no float values to measure (labels) is a usage error
    when no output has any."""
    joined = [np.concatenate(o) if o[0].ndim else np.stack(o) for o in outs]
    if not any(y.dtype.kind == "f" for y in joined):
        raise UsageError("sensitivity is measured on the model's float outputs, and this model has none "
                         f"(its outputs are {', '.join(str(y.dtype) for y in joined)}); leave sensitivity off")
    return joined


def relative_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Relative RMS error over every float output (skl2onnx's ZipMap probabilities as a float matrix):
    sqrt(sum (y - y0)^2 / sum y0^2)."""
    num = den = 0.0
    for ref, y in zip(reference, got):
        if ref.dtype.kind != "f":
            continue
        r = ref.astype(np.float64)
        num += float(np.sum((r - y.astype(np.float64)) ** 2))
        den += float(np.sum(r**2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


class OutputErrorMeter:
    """Outputs of a reference model on sample rows, and the error of any candidate model against them."""

    def __init__(self, model: ir.Model, data: Dataset, max_rows: int = 256):
        self.feeds = list(data.head(max_rows).batches(256))
        self.reference = self._run(model)

    def _run(self, model: ir.Model) -> list[np.ndarray]:
        from qxc.runtime import make_session

        session = make_session(model, prepacking=False)
        outs: list[list[np.ndarray]] = []
        for feed in self.feeds:
            for i, y in enumerate(session.run(None, feed)):
                if len(outs) <= i:
                    outs.append([])
                outs[i].append(normalize_output(y))
        return _joined(outs)

    def error(self, candidate: ir.Model) -> float:
        return relative_error(self.reference, self._run(candidate))
