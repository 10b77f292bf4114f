"""``prune-channels``: remove whole output channels/neurons, so the matrices really shrink.

For each MatMul/Gemm/Conv whose output reaches exactly one next layer through channel-wise ops only (bias Add/Mul/
Sub/Div with constants, BatchNormalization, elementwise activations, pooling, Flatten before a Gemm/MatMul), the
channels with the smallest L1/L2 weight norm are removed from its weight and bias, from every channel-wise constant
on the way, and from the next layer's input channels. Anything else that touches the channels — a graph output, a
residual Add between two computed tensors, Concat, Reshape, a value with several consumers — keeps the layer whole,
and the report says which and why. With ``sensitivity=true`` and data, per-layer fractions come from measured
output error (the next layer's input rows are zeroed, which is exactly equivalent to removal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.graphs import is_weight
from qxc.passes._weights import select_weights, weight_rule
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.sparsity import allocate, channel_norms, keep_channels

UNARY = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus", "Gelu", "HardSigmoid", "HardSwish",
         "Clip", "Identity", "Abs", "Neg", "Erf", "Exp", "Softsign")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")
ARITH = ("Add", "Mul", "Sub", "Div")
LEVELS = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


@dataclass(frozen=True)
class PruneChannelsOptions:
    sparsity: float = opt(0.5, "fraction of each prunable layer's output channels removed")
    norm: Literal["l1", "l2"] = opt("l1", "channel ranking norm")
    sensitivity: bool = opt(False, "allocate per-layer fractions from measured output error (needs --data)")
    ops: tuple[str, ...] = opt(("MatMul", "Gemm", "Conv"), "op types whose output channels may be removed")
    include: tuple[str, ...] = opt((), "only nodes whose name matches one of these regexes")
    exclude: tuple[str, ...] = opt((), "skip nodes whose name matches one of these regexes")

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")


@dataclass
class _Chain:
    producer: ir.Node
    weight: ir.Value
    axis: int  # output-channel axis of the producer's weight
    channels: int
    bias: ir.Value | None = None
    consts: list[tuple[ir.Value, int]] = field(default_factory=list)  # constant + its channel axis
    values: list[ir.Value] = field(default_factory=list)  # values whose shapes change
    consumer: ir.Node | None = None
    consumer_weight: ir.Value | None = None
    consumer_axis: int = 0
    block: int = 1  # Flatten: each channel becomes this many consecutive features


def _channel_axis_of(value_rank: int | None, producer: ir.Node) -> int:
    if producer.op_type in ("Conv", "Gemm", "ConvTranspose"):
        return 1
    return -1 if value_rank is None else value_rank - 1


def _const_axis(c: np.ndarray, y_rank: int | None, y_axis: int, channels: int) -> int | None:
    """Axis of a broadcast constant that runs along the channel axis of y; None if it is a scalar-like constant."""
    if c.size == 1:
        return None
    if y_rank is None:
        y_rank = max(c.ndim, 2)
    pos = y_axis % y_rank - (y_rank - c.ndim)  # numpy broadcasting aligns from the right
    if 0 <= pos < c.ndim and c.shape[pos] == channels and c.size == channels:
        return pos
    return -1  # a constant that is not per-channel: cannot slice consistently


def trace_chain(node: ir.Node, weight: ir.Value, axis: int) -> tuple[_Chain | None, str]:
    w = weight.const_value
    chain = _Chain(node, weight, axis, w.shape[axis])
    c = chain.channels
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        if not is_weight(b) or b.const_value.size != c:
            return None, "bias is not a per-channel constant"
        chain.bias = b
    if node.op_type == "Conv" and node.attributes.get("group") is not None and node.attributes["group"].value != 1:
        return None, "grouped convolution"
    v = node.outputs[0]
    y_rank = len(v.shape) if v.shape is not None else None
    y_axis = _channel_axis_of(y_rank, node)
    while True:
        chain.values.append(v)
        if v.is_graph_output():
            return None, f"'{v.name}' is a graph output"
        uses = list(v.uses())
        if len(uses) != 1:
            return None, f"'{v.name}' feeds {len(uses)} nodes"
        n, idx = uses[0].node, uses[0].idx
        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            return None, f"consumed by {n.domain}::{op} '{n.name}'"
        if op in ARITH:
            other = n.inputs[1 - idx]
            if other is None or not is_weight(other):
                return None, f"{op} '{n.name}' combines it with a computed tensor (residual): shapes are tied"
            if op in ("Sub", "Div") and idx == 1:
                return None, f"{op} '{n.name}' uses it as the second operand"
            ax = _const_axis(other.const_value.numpy(), y_rank, y_axis, c)
            if ax == -1:
                return None, f"constant '{other.name}' of {op} '{n.name}' is not per-channel"
            if ax is not None:
                if len(list(other.uses())) != 1:
                    return None, f"constant '{other.name}' is shared"
                chain.consts.append((other, ax))
            v = n.outputs[0]
            continue
        if op == "BatchNormalization" and idx == 0:
            for p in n.inputs[1:5]:
                if p is None or not is_weight(p) or p.const_value.size != c or len(list(p.uses())) != 1:
                    return None, f"BatchNormalization '{n.name}' parameters are not private per-channel constants"
                chain.consts.append((p, 0))
            v = n.outputs[0]
            continue
        if op in UNARY or op in POOLS:
            if op == "Clip" and any(i is not None and not is_weight(i) for i in n.inputs[1:]):
                return None, f"Clip '{n.name}' has computed bounds"
            v = n.outputs[0]
            continue
        if op == "Flatten" and y_axis % max(1, y_rank or 2) == 1:
            ax = n.attributes.get("axis")
            if (ax.value if ax is not None else 1) != 1 or v.shape is None or any(
                    not isinstance(d, int) for d in list(v.shape)[2:]):
                return None, f"Flatten '{n.name}' needs axis 1 and static spatial dims"
            chain.block = int(np.prod(list(v.shape)[2:])) if len(v.shape) > 2 else 1
            v = n.outputs[0]
            y_rank, y_axis = 2, 1
            continue
        if op in ("MatMul", "Gemm", "Conv") and idx == 0:
            rule = weight_rule(n)
            wv = n.inputs[rule[0]] if rule and rule[0] < len(n.inputs) else None
            if wv is None or not is_weight(wv) or len(list(wv.uses())) != 1:
                return None, f"next layer '{n.name}' has no private constant weight"
            if op == "Conv" and (n.attributes.get("group") is not None and n.attributes["group"].value != 1):
                return None, f"next layer '{n.name}' is a grouped convolution"
            in_axis = rule[2] % len(wv.const_value.shape)
            if wv.const_value.shape[in_axis] != c * chain.block:
                return None, f"next layer '{n.name}' reads {wv.const_value.shape[in_axis]} features, not {c}"
            chain.consumer, chain.consumer_weight, chain.consumer_axis = n, wv, in_axis
            return chain, ""
        return None, f"consumed by {op} '{n.name}'"


def _take(a: np.ndarray, keep: np.ndarray, axis: int, block: int = 1) -> np.ndarray:
    if block > 1:
        keep = (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return np.take(a, keep, axis=axis)


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


@register_pass("prune-channels")
class PruneChannelsPass(QxcPass):
    """Structured removal of the weakest output channels, propagated through to the next layer (tensors shrink)."""

    Options = PruneChannelsOptions
    idempotent = False  # 50 % of what is left is removed again

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        inferred = qir.infer_shapes(model)
        sel = select_weights(model, self.name, o.ops, o.include, o.exclude)
        chains, kept = [], list(sel.skipped)
        for use in sel.weights:
            node = use.nodes[0]
            if len(use.nodes) > 1:
                kept.append({"node": node.name, "reason": "weight shared by several nodes"})
                continue
            chain, why = trace_chain(node, use.value, use.channel_axis)
            if chain is None:
                kept.append({"node": node.name, "reason": why})
            else:
                chains.append(chain)
        fractions = [o.sparsity] * len(chains)
        if o.sensitivity and chains:
            fractions = self._guided(model, chains)
        layers, removed = [], 0
        for chain, frac in zip(chains, fractions):
            w = chain.weight.const_value.numpy()
            keep = keep_channels(channel_norms(w, chain.axis, o.norm), frac)
            if len(keep) == chain.channels:
                continue
            before = w.size + chain.consumer_weight.const_value.size
            _set(chain.weight, _take(w, keep, chain.axis))
            if chain.bias is not None:
                _set(chain.bias, _take(chain.bias.const_value.numpy(), keep, 0))
            for const, ax in chain.consts:
                _set(const, _take(const.const_value.numpy(), keep, ax))
            cw = chain.consumer_weight
            _set(cw, _take(cw.const_value.numpy(), keep, chain.consumer_axis, chain.block))
            for v in chain.values:
                v.shape = None  # re-inferred below
            after = chain.weight.const_value.size + cw.const_value.size
            removed += before - after
            layers.append({"node": chain.producer.name, "next": chain.consumer.name, "channels": chain.channels,
                           "kept": int(len(keep)), "fraction_removed": round(1 - len(keep) / chain.channels, 4),
                           "parameters_removed": int(before - after)})
        if layers:
            qir.infer_shapes(model)
        else:
            qir.undo_inference(inferred)  # nothing pruned: leave the model exactly as it was
        self.report = {"layers": layers, "kept_whole": kept, "parameters_removed": int(removed)}
        if getattr(self, "sensitivity", None):
            self.report["sensitivity"] = self.sensitivity
        return ir.passes.PassResult(model, modified=bool(layers))

    def _guided(self, model: ir.Model, chains: list[_Chain]) -> list[float]:
        from qxc.errors import UsageError
        from qxc.passes._sensitivity import WeightSwapEvaluator

        if self.context.data is None:
            raise UsageError(f"pass '{self.name}': sensitivity=true needs sample data; pass --data")
        ev = WeightSwapEvaluator(model, self.context.data, [c.consumer_weight for c in chains])
        errors = np.zeros((len(chains), len(LEVELS)))

        def zeroed(chain: _Chain, frac: float) -> np.ndarray:
            keep = keep_channels(channel_norms(chain.weight.const_value.numpy(), chain.axis, self.options.norm), frac)
            drop = np.setdiff1d(np.arange(chain.channels), keep)
            cw = chain.consumer_weight.const_value.numpy().copy()
            idx = (drop[:, None] * chain.block + np.arange(chain.block)[None, :]).reshape(-1)
            np.moveaxis(cw, chain.consumer_axis, 0)[idx] = 0
            return cw

        for i, chain in enumerate(chains):
            for j, s in enumerate(LEVELS):
                errors[i, j] = ev.error({chain.consumer_weight: zeroed(chain, s)})
        sizes = np.array([c.weight.const_value.size + c.consumer_weight.const_value.size for c in chains])
        alloc = allocate(errors, LEVELS, sizes, self.options.sparsity)
        err_guided = ev.error({c.consumer_weight: zeroed(c, f) for c, f in zip(chains, alloc)})
        err_uniform = ev.error({c.consumer_weight: zeroed(c, self.options.sparsity) for c in chains})
        self.sensitivity = {"allocation": {c.producer.name: round(float(f), 4) for c, f in zip(chains, alloc)},
                                   "joint_error": {"guided": round(err_guided, 6), "uniform": round(err_uniform, 6)}}
        return list(alloc) if err_guided <= err_uniform else [self.options.sparsity] * len(chains)
