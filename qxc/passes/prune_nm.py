"""``prune-nm``: N:M semi-structured sparsity (2:4 by default) along each weight's reduction axis.

Of every M consecutive weights along the axis the kernel sums over (MatMul's K, Gemm's K whatever ``transB``,
Conv's input channels), the N largest by magnitude are kept; the pattern is verified on every group afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qxc.errors import PassError
from qxc.graphs import nothing_to_do
from qxc.passes._weights import select_weights
from qxc.passes.prune_magnitude import layer_stats, set_weight
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.sparsity import nm_holds, nm_prune


@dataclass(frozen=True)
class PruneNmOptions:
    n: int = opt(2, "weights kept per group")
    m: int = opt(4, "group length along the reduction axis")
    ops: tuple[str, ...] = opt(("MatMul", "Gemm", "Conv"), "op types whose weights are pruned")
    include: tuple[str, ...] = opt((), "only nodes whose name matches one of these regexes")
    exclude: tuple[str, ...] = opt((), "skip nodes whose name matches one of these regexes")

    def __post_init__(self):
        if not 0 < self.n < self.m:
            raise ValueError("need 0 < n < m")


@register_pass("prune-nm")
class PruneNmPass(QxcPass):
    """N:M semi-structured sparsity (default 2:4) along the reduction axis, verified on every group."""

    Options = PruneNmOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        sel = select_weights(model, self.name, o.ops, o.include, o.exclude)
        layers, modified = [], False
        for use in sel.weights:
            a = use.value.const_value.numpy()
            if a.shape[use.reduction_axis] % o.m:
                sel.skipped.append({"weight": use.value.name, "reason": f"reduction axis of {a.shape[use.reduction_axis]}"
                                                                        f" is not a multiple of {o.m}"})
                continue
            pruned = nm_prune(a, o.n, o.m, use.reduction_axis)
            if not nm_holds(pruned, o.n, o.m, use.reduction_axis):
                raise PassError(f"pass 'prune-nm': {o.n}:{o.m} pattern does not hold on '{use.value.name}'")
            stats = layer_stats(use.value.name, a, pruned)
            stats["pattern"] = f"{o.n}:{o.m} along axis {use.reduction_axis} (verified)"
            layers.append(stats)
            if (pruned != a).any():
                set_weight(use.value, pruned)
                modified = True
        self.report = {"layers": layers, "skipped": sel.skipped}
        if not sel.weights and not sel.skipped:
            self.report["warnings"] = [nothing_to_do(model, o.ops, "prune")]
        return ir.passes.PassResult(model, modified=modified)
