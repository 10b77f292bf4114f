"""``prune-magnitude``: zero the smallest-|w| weights, exactly to the requested sparsity.

Per layer (every weight to the target) or global (one threshold across layers: exactly round(target * total) weights
go). With ``sensitivity=true`` and data, each layer is pruned alone at ten levels and the output error measured
(onnxruntime, weights swapped in one session); per-layer sparsities are then allocated to meet the global target at
minimum summed error, and the allocation is kept only if its measured joint error beats the uniform one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc.graphs import nothing_to_do
from qxc.passes._weights import select_weights
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.sparsity import allocate, global_counts, magnitude_prune

LEVELS = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])


@dataclass(frozen=True)
class PruneMagnitudeOptions:
    sparsity: float = opt(0.5, "fraction of weights set to zero")
    scope: Literal["layer", "global"] = opt("layer", "every layer to the target, or one threshold across layers")
    sensitivity: bool = opt(False, "allocate per-layer sparsity from measured output error (needs --data)")
    ops: tuple[str, ...] = opt(("MatMul", "Gemm", "Conv"), "op types whose weights are pruned")
    include: tuple[str, ...] = opt((), "only nodes whose name matches one of these regexes")
    exclude: tuple[str, ...] = opt((), "skip nodes whose name matches one of these regexes")
    min_elements: int = opt(0, "leave weights with fewer elements dense")

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")


def layer_stats(name: str, before: np.ndarray, after: np.ndarray) -> dict:
    zeros = int(np.count_nonzero(after == 0))
    return {"weight": name, "shape": list(after.shape), "elements": int(after.size), "zeros": zeros,
            "sparsity": round(zeros / max(1, after.size), 6),
            "removed_l2_fraction": round(float(np.linalg.norm(before - after) / (np.linalg.norm(before) or 1)), 6)}


def set_weight(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)


@register_pass("prune-magnitude")
class PruneMagnitudePass(QxcPass):
    """Zero the smallest-magnitude weights of MatMul/Gemm/Conv: exact per-layer or global sparsity, or guided."""

    Options = PruneMagnitudeOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        sel = select_weights(model, self.name, o.ops, o.include, o.exclude, o.min_elements)
        weights = [u.value for u in sel.weights]
        arrays = [v.const_value.numpy() for v in weights]
        self.report = {"skipped": sel.skipped, "target": o.sparsity, "scope": o.scope}
        if not sel.weights and not sel.skipped:
            self.report["warnings"] = [nothing_to_do(model, o.ops, "prune")]
        if o.sensitivity and weights:  # nothing selected (a tree ensemble, say): nothing to allocate
            counts = self._guided_counts(model, weights, arrays)
        elif o.scope == "global":
            counts = global_counts(arrays, o.sparsity)
        else:
            counts = [int(round(o.sparsity * a.size)) for a in arrays]
        layers, modified = [], False
        for v, a, k in zip(weights, arrays, counts):
            pruned = magnitude_prune(a, k)
            layers.append(layer_stats(v.name, a, pruned))
            if not np.array_equal(pruned, a):
                set_weight(v, pruned)
                modified = True
        total = sum(x["elements"] for x in layers)
        self.report.update({"layers": layers, "sparsity": round(sum(x["zeros"] for x in layers) / max(1, total), 6)})
        return ir.passes.PassResult(model, modified=modified)

    def _guided_counts(self, model: ir.Model, weights: list[ir.Value], arrays: list[np.ndarray]) -> list[int]:
        from qxc.errors import UsageError
        from qxc.passes._sensitivity import WeightSwapEvaluator

        if self.context.data is None:
            raise UsageError(f"pass '{self.name}': sensitivity=true needs sample data; pass --data")
        ev = WeightSwapEvaluator(model, self.context.data, weights)
        errors = np.zeros((len(weights), len(LEVELS)))
        for i, (v, a) in enumerate(zip(weights, arrays)):
            for j, s in enumerate(LEVELS):
                errors[i, j] = ev.error({v: magnitude_prune(a, int(round(s * a.size)))})
        sizes = np.array([a.size for a in arrays])
        alloc = allocate(errors, LEVELS, sizes, self.options.sparsity)
        guided = [int(round(s * a.size)) for s, a in zip(alloc, arrays)]
        # meet the global count exactly (rounding per layer may be off by a few weights)
        guided[int(np.argmax(sizes))] += int(round(self.options.sparsity * sizes.sum())) - sum(guided)
        uniform = global_counts(arrays, self.options.sparsity)
        err_guided = ev.error({v: magnitude_prune(a, k) for v, a, k in zip(weights, arrays, guided)})
        err_uniform = ev.error({v: magnitude_prune(a, k) for v, a, k in zip(weights, arrays, uniform)})
        self.report["sensitivity"] = {
            "levels": LEVELS.tolist(), "errors": {v.name: np.round(errors[i], 6).tolist() for i, v in enumerate(weights)},
            "allocation": {v.name: round(float(s), 4) for v, s in zip(weights, alloc)},
            "joint_error": {"guided": round(err_guided, 6), "uniform_global": round(err_uniform, 6)},
            "chosen": "guided" if err_guided <= err_uniform else "uniform_global"}
        return guided if err_guided <= err_uniform else uniform
