"""``prune-channels``: remove whole output channels/neurons, so the matrices really shrink.

A layer's output channels (MatMul/Gemm/Conv/ConvTranspose) are followed through channel-wise ops — constants
broadcast per channel or as scalars (bias Add, Mul, Sub, Div, PRelu, Pow), BatchNormalization, elementwise
activations (also com.microsoft Gelu/FastGelu/BiasGelu/QuickGelu), Cast, Dropout, pooling, reductions over
other axes (``x.mean(dim=(2, 3))``), Flatten before a Gemm/MatMul — to every layer that reads them. The ops may form a DAG: an exported erf-Gelu reads its input twice, a
SiLU is x * Sigmoid(x), and a SwiGLU multiplies two layers' outputs (gate * up), which ties those two layers' channels
into one group that shrinks together. The channels with the smallest L1/L2 weight norm (summed over tied layers,
each scaled to mean 1) are removed from every writer's weight and bias, from every per-channel constant on the way,
and from every reader's input channels. Anything else that touches the channels — a graph output, a residual Add
with a tensor from outside the group (LayerNorm, an embedding), attention's MatMul of two computed tensors,
Reshape, Softmax — keeps the layer whole, and the report says which and why. A Concat along the channels (a U-Net's
skip connection, an Inception block's) does not tie its inputs: each input's channels keep their place in the output's
channel space, and the readers lose their rows at that offset; past a Concat only channel-wise ops with constants
and readers may follow. With ``sensitivity=true`` and data,
per-group fractions come from measured output error (the readers' input rows are zeroed, which is exactly
equivalent to removal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.graphs import is_weight, nothing_to_do
from qxc.passes._weights import select_weights, weight_rule
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.sparsity import allocate, channel_norms, keep_channels

UNARY = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Gelu", "Mish", "HardSigmoid",
         "HardSwish", "ThresholdedRelu", "Clip", "Identity", "Abs", "Neg", "Erf", "Exp", "Log", "Sqrt",
         "Reciprocal", "Softsign", "Sin", "Cos", "Cast", "Dropout")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")
BINARY = ("Add", "Mul", "Sub", "Div", "PRelu", "Pow")
MS_UNARY = ("Gelu", "QuickGelu", "FastGelu", "BiasGelu")  # com.microsoft: x [, per-channel bias]
LAYERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2")  # over other axes
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
        other = [op for op in self.ops if op not in LAYERS]
        if other:
            raise ValueError(f"ops: prune-channels does not shrink {other[0]} layers; use {', '.join(LAYERS)}")


@dataclass
class _Layer:
    node: ir.Node
    weight: ir.Value
    axis: int  # the weight's axis that runs over the group's channels
    block: int = 1  # consumers after a Flatten: each channel is this many consecutive features
    bias: ir.Value | None = None  # producers: a per-channel bias input (Gemm, Conv)
    offset: int = 0  # consumers after a Concat: where the group's channels start among the ones read


@dataclass
class _Group:
    """Layers whose output channels are tied (one channel space) and everything that must shrink with them."""

    channels: int
    producers: list[_Layer] = field(default_factory=list)
    consumers: list[_Layer] = field(default_factory=list)
    consts: list[tuple[ir.Value, int, int]] = field(default_factory=list)  # per-channel constant, axis, offset
    values: list[ir.Value] = field(default_factory=list)  # values whose shapes change


class _Untied(Exception):
    """The channels reach something that cannot shrink with them (the message says what)."""


def _const_axis(shape: tuple[int, ...], neg: int, channels: int) -> int | None:
    """Axis of a constant broadcast against a tensor whose channels run along its axis ``neg`` (counted from the
    end): None for a scalar-like constant (nothing to slice), -1 for one that is not per-channel."""
    size = int(np.prod(shape)) if shape else 1
    if size == 1:
        return None
    pos = len(shape) + neg  # numpy broadcasting aligns from the right
    return pos if 0 <= pos < len(shape) and shape[pos] == channels and size == channels else -1


def _out_neg_axis(node: ir.Node, weight: np.ndarray) -> int:
    """Where a layer's output channels are, counted from the end of its output."""
    return 1 - weight.ndim if node.op_type in ("Conv", "ConvTranspose") else -1


_LEFT = "{} '{}' applies its weight from the left (W @ x): its channels are the output's rows"


class _Tracer:
    """Follows one layer's output channels forward and backward through channel-wise ops (a DAG: an erf Gelu, a
    SiLU's x * sigmoid(x), a SwiGLU's gate * up) to every layer that writes them and every layer that reads them."""

    def __init__(self, start: ir.Node, weight: ir.Value, axis: int, selected: set[ir.Node]):
        self.graph = start.graph
        self.selected = selected
        self.group = _Group(weight.const_value.shape[axis])
        # value -> (channel axis from the end, block, offset, width): past a Concat the group's channels are
        # [offset, offset + channels) of the value's ``width`` channels
        self.where: dict[ir.Value, tuple[int, int, int, int]] = {}
        self.concat_via: dict[ir.Node, ir.Value] = {}  # a Concat visited: the input it was reached from
        self.done: set[ir.Node] = set()
        self.by: dict[ir.Value, tuple[ir.Node, ir.Value] | None] = {}
        self.writes: dict[ir.Node, bool] = {}  # a layer met: True if it writes the channels, False if it reads them
        self.queue: list[tuple[ir.Node, ir.Value | None]] = []  # (node, the region value it was reached from)
        self._producer(start, weight, axis)

    def trace(self) -> _Group:
        while self.queue:
            node, via = self.queue.pop()
            if node in self.writes and self.writes[node] != (via is None):
                raise _Untied(f"'{node.name}' both reads and writes the channels")
            if node in self.concat_via and via is not None and via is not self.concat_via[node]:
                raise _Untied(f"Concat '{node.name}' joins the channels to themselves")
            if node not in self.done:
                self.done.add(node)
                self._visit(node, via)
        for v in self.where:
            if v.is_graph_output():
                raise _Untied(f"'{v.name}' is a graph output")
        self.group.values = list(self.where)
        return self.group

    def _private(self, v: ir.Value) -> bool:
        return len(list(v.uses())) == 1

    def _producer(self, node: ir.Node, weight: ir.Value, axis: int) -> None:
        c = self.group.channels
        if weight_rule(node)[0] == 0:
            raise _Untied(_LEFT.format(node.op_type, node.name))
        if node not in self.selected:
            raise _Untied(f"its channels are tied to '{node.name}', which is not selected")
        w = weight.const_value
        if w.shape[axis] != c:
            raise _Untied(f"'{node.name}' writes {w.shape[axis]} channels into the same tensor, not {c}")
        if not self._private(weight):
            raise _Untied(f"weight '{weight.name}' of '{node.name}' is shared")
        if node.op_type.startswith("Conv") and node.attributes.get_int("group", 1) != 1:
            raise _Untied(f"'{node.name}' is a grouped convolution")
        layer = _Layer(node, weight, axis)
        if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = node.inputs[2]
            if not is_weight(b) or b.const_value.size != c or not self._private(b):
                raise _Untied(f"bias of '{node.name}' is not a private per-channel constant")
            layer.bias = b
        self.group.producers.append(layer)
        self.done.add(node)
        self.writes[node] = True
        self._join(node.outputs[0], _out_neg_axis(node, w.numpy()), 1)

    def _join(self, v: ir.Value, neg: int, block: int, by: tuple[ir.Node, ir.Value] | None = None,
              span: tuple[int, int] | None = None) -> None:
        """``v`` carries the channels: every node that reads it, and the node that makes it, must keep them (``by``:
        where a tensor from outside the channels' path was combined with them, and that tensor, for the report;
        ``span``: past a Concat, (offset, width) of the channels among the value's)."""
        place = (neg, block, *(span or (0, self.group.channels)))
        if v in self.where:
            if self.where[v] != place:
                raise _Untied(f"'{v.name}' carries the channels along two different axes")
            return
        self.where[v] = place
        self.by[v] = by
        for use in v.uses():
            if use.node.graph is not self.graph:
                raise _Untied(f"'{v.name}' is read inside a subgraph")
            self.queue.append((use.node, v))
        p = v.producer()
        if p is None:
            raise _Untied(self._combined(v, None))
        self.queue.append((p, None))

    def _visit(self, n: ir.Node, via: ir.Value | None) -> None:
        op, name = n.op_type, n.name
        if n.domain == "com.microsoft" and op in MS_UNARY:
            self._elementwise(n, inputs=n.inputs[:2])
            return
        if n.domain not in ("", "ai.onnx"):
            raise _Untied(f"consumed by {n.domain}::{op} '{name}'")
        if op in LAYERS:
            rule = weight_rule(n)
            if rule[0] == 0:
                raise _Untied(_LEFT.format(op, name))
            wv = n.inputs[rule[0]] if rule[0] < len(n.inputs) else None
            if via is not None and via is not n.inputs[0]:
                raise _Untied(f"{op} '{name}' reads the channels as its weight")
            if wv is None or not is_weight(wv):
                raise _Untied(f"{op} '{name}' multiplies two computed tensors")
            if via is None:  # reached from its output: it writes the channels
                self._producer(n, wv, rule[1] % len(wv.const_value.shape))
            else:
                self._consumer(n, wv, via)
            return
        if op in BINARY:
            if op == "Pow" and (n.inputs[0] is not via and via is not None):
                raise _Untied(f"Pow '{name}' raises to a power that carries the channels")
            self._elementwise(n, inputs=n.inputs)
        elif op in UNARY or op in POOLS:
            if op == "Clip" and any(i is not None and not is_weight(i) for i in n.inputs[1:]):
                raise _Untied(f"Clip '{name}' has computed bounds")
            if len(n.outputs) > 1 and any(o is not None and list(o.uses()) for o in n.outputs[1:]):
                raise _Untied(f"{op} '{name}' has a second output in use")
            self._elementwise(n, inputs=n.inputs[:1])
        elif op == "BatchNormalization":
            self._batchnorm(n)
        elif op == "Flatten" and via is n.inputs[0]:
            self._flatten(n, via)
        elif op in REDUCE and via is n.inputs[0]:
            self._reduce(n, via)
        elif op in ("Resize", "Upsample") and (via is None or via is n.inputs[0]):
            self._resize(n)
        elif op == "Concat" and via is not None:
            self._concat(n, via)
        elif via is None:
            raise _Untied(self._combined(n.outputs[0], f"{op} '{name}'"))
        else:
            raise _Untied(f"consumed by {op} '{name}'")

    def _combined(self, v: ir.Value, source: str | None) -> str:
        """Why a tensor from outside the channels' path (from ``source``, a node; None: a graph input) ties them."""
        by = self.by.get(v)
        node, joined = by if by is not None else (None, v)
        if joined is v:
            origin = f"graph input '{v.name}'" if source is None else f"'{v.name}' from {source}"
        else:
            origin = f"'{joined.name}', which comes from " + (f"graph input '{v.name}'" if source is None else source)
        where = "it meets" if node is None else f"{node.op_type} '{node.name}' combines it with"
        return f"{where} {origin} (a residual: shapes are tied)"

    def _elementwise(self, n: ir.Node, inputs) -> None:
        out = n.outputs[0]
        by = self.by.get(out) if out in self.where else None  # reached from its output: who joined that
        carried = [self.where[i] for i in inputs if i in self.where] + (
            [self.where[n.outputs[0]]] if n.outputs[0] in self.where else [])
        neg, block, off, width = carried[0]
        for i in inputs:
            if i is None or i in self.where:
                continue
            if is_weight(i):
                self._constant(n, i, neg, block, off, width)
            else:
                if n.op_type == "Pow":
                    raise _Untied(f"Pow '{n.name}' raises to a computed power")
                if width != self.group.channels:
                    raise _Untied(f"{n.op_type} '{n.name}' combines the channels, among others after a Concat, "
                                  f"with '{i.name}'")
                self._join(i, neg, block, by=by or (n, i), span=(off, width))
        self._join(n.outputs[0], neg, block, span=(off, width))

    def _constant(self, n: ir.Node, c: ir.Value, neg: int, block: int, off: int, width: int) -> None:
        ax = _const_axis(tuple(c.const_value.shape), neg, width * block)
        if ax is None:
            return
        if ax == -1 or block > 1:
            raise _Untied(f"constant '{c.name}' of {n.op_type} '{n.name}' is not per-channel")
        if not self._private(c):
            raise _Untied(f"constant '{c.name}' is shared")
        self.group.consts.append((c, ax, off))

    def _rank(self, v: ir.Value) -> int | None:
        return None if v.shape is None else len(v.shape)

    def _batchnorm(self, n: ir.Node) -> None:
        x = n.inputs[0]
        if x not in self.where:
            raise _Untied(f"BatchNormalization '{n.name}' is reached from its parameters")
        neg, block, off, width = self.where[x]
        if block != 1 or self._rank(x) is None or neg != 1 - self._rank(x):
            raise _Untied(f"BatchNormalization '{n.name}' normalises another axis than the channels")
        for p in n.inputs[1:5]:
            if p is None or not is_weight(p) or p.const_value.size != width or not self._private(p):
                raise _Untied(f"BatchNormalization '{n.name}' parameters are not private per-channel constants")
            self.group.consts.append((p, 0, off))
        self._join(n.outputs[0], neg, 1, span=(off, width))

    def _flatten(self, n: ir.Node, x: ir.Value) -> None:
        neg, block, off, width = self.where[x]
        rank = self._rank(x)
        if (block != 1 or n.attributes.get_int("axis", 1) != 1 or rank is None or neg != 1 - rank
                or any(not isinstance(d, int) for d in list(x.shape)[2:])):
            raise _Untied(f"Flatten '{n.name}' needs axis 1 over the channels and static spatial dims")
        self._join(n.outputs[0], -1, int(np.prod(list(x.shape)[2:])) if rank > 2 else 1, span=(off, width))

    def _reduce(self, n: ir.Node, x: ir.Value) -> None:
        """A reduction over other axes than the channels (PyTorch's ``x.mean(dim=(2, 3))``) keeps them; with
        keepdims=0 they move as many places towards the end as reduced axes follow them."""
        neg, block, off, width = self.where[x]
        rank = self._rank(x)
        axes = n.attributes.get_ints("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1] is not None:
            axes = n.inputs[1].const_value.numpy().reshape(-1).tolist() if is_weight(n.inputs[1]) else None
        if rank is None or block != 1 or not axes:
            raise _Untied(f"{n.op_type} '{n.name}' needs constant axes and a known rank to keep the channels")
        axes = {a % rank for a in axes}
        channel = rank + neg
        if channel in axes:
            raise _Untied(f"{n.op_type} '{n.name}' reduces over the channels")
        if n.attributes.get_int("keepdims", 1) == 0:
            neg += sum(a > channel for a in axes)
        self._join(n.outputs[0], neg, 1, span=(off, width))

    def _resize(self, n: ir.Node) -> None:
        """Resize/Upsample by constant scales (an FPN's or a U-Net's upsampling) keep the channels when their
        scale is 1; output ``sizes`` count the channels, so they keep the layer whole."""
        x, out = n.inputs[0], n.outputs[0]
        neg, block, off, width = self.where[x] if x in self.where else self.where[out]
        rank = self._rank(x) or self._rank(out)
        scales = n.attributes.get_floats("scales")  # Upsample before opset 9
        if scales is None:  # inputs: Upsample-9/Resize-10 (X, scales); Resize-11+ (X, roi, scales, sizes)
            at = 1 if n.op_type == "Upsample" or len(n.inputs) == 2 else 2
            if len(n.inputs) > 3 and n.inputs[3] is not None:
                raise _Untied(f"{n.op_type} '{n.name}' sets output sizes, which count the channels")
            c = n.inputs[at] if len(n.inputs) > at else None
            scales = c.const_value.numpy().reshape(-1).tolist() if is_weight(c) else None
        if rank is None or block != 1 or not scales or len(scales) != rank or scales[rank + neg] != 1:
            raise _Untied(f"{n.op_type} '{n.name}' needs constant scales of 1 on the channels")
        self._join(x, neg, 1, span=(off, width))
        self._join(out, neg, 1, span=(off, width))

    def _concat(self, n: ir.Node, via: ir.Value) -> None:
        """A Concat along the channels places them in a wider channel space (at the offset of ``via`` among its
        inputs) without tying the other inputs: their channels stay whole. Along another axis it ties the others."""
        neg, block, off, width = self.where[via]
        rank = self._rank(via)
        axis = n.attributes.get_int("axis", 0)
        if rank is None or block != 1 or axis % rank != rank + neg:
            raise _Untied(f"consumed by Concat '{n.name}' along another axis than the channels")
        sizes = [None if i is None or i.shape is None else i.shape[rank + neg] for i in n.inputs]
        if any(not isinstance(c, int) for c in sizes):
            raise _Untied(f"Concat '{n.name}' needs its inputs' channel counts known")
        self.concat_via[n] = via
        at = list(n.inputs).index(via)
        self._join(n.outputs[0], neg, 1, span=(off + sum(sizes[:at]), sum(sizes)))

    def _consumer(self, n: ir.Node, wv: ir.Value, via: ir.Value) -> None:
        op, name = n.op_type, n.name
        self.writes[n] = False
        if not self._private(wv):
            raise _Untied(f"next layer '{name}' has no private constant weight")
        neg, block, off, width = self.where[via]
        rank = self._rank(via)
        if op in ("Conv", "ConvTranspose"):
            if n.attributes.get_int("group", 1) != 1:
                raise _Untied(f"next layer '{name}' is a grouped convolution")
            reads_channels = rank is not None and neg == 1 - rank
        else:
            reads_channels = neg == -1 and not (op == "Gemm" and n.attributes.get_int("transA", 0))
        if not reads_channels:
            raise _Untied(f"next layer '{name}' reduces over another axis than the channels")
        in_axis = weight_rule(n)[2] % len(wv.const_value.shape)
        if wv.const_value.shape[in_axis] != width * block:
            raise _Untied(f"next layer '{name}' reads {wv.const_value.shape[in_axis]} features, not {width * block}")
        self.group.consumers.append(_Layer(n, wv, in_axis, block, offset=off))


def _rows(channels: np.ndarray, block: int = 1, offset: int = 0) -> np.ndarray:
    """The indices along a tensor's axis of ``channels`` placed at ``offset``, each ``block`` consecutive entries."""
    return ((channels[:, None] + offset) * block + np.arange(block)[None, :]).reshape(-1)


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
        selected = {use.nodes[0] for use in sel.weights if len(use.nodes) == 1}
        groups, kept, grouped = [], list(sel.skipped), set()
        for use in sel.weights:
            node = use.nodes[0]
            if len(use.nodes) > 1:
                kept.append({"node": node.name, "reason": "weight shared by several nodes"})
                continue
            if node in grouped:
                continue
            try:
                group = _Tracer(node, use.value, use.channel_axis, selected).trace()
            except _Untied as why:
                kept.append({"node": node.name, "reason": str(why)})
                continue
            grouped.update(p.node for p in group.producers)
            groups.append(group)
        fractions = [o.sparsity] * len(groups)
        if o.sensitivity and groups:
            fractions = self._guided(model, groups)
        layers, removed = [], 0
        drops: dict[tuple[ir.Value, int], list[np.ndarray]] = {}  # (tensor, axis) -> indices to delete
        shapes: dict[ir.Value, list[int]] = {}  # each marked tensor's shape once the marked rows are gone

        def drop(value: ir.Value, axis: int, rows: np.ndarray) -> int:
            """Mark ``rows`` of ``value`` along ``axis`` for deletion (a reader after a Concat loses rows for each
            of its groups, at their offsets: all are deleted at once, in the original indices); the parameters
            they hold, once the rows marked before are gone (a layer reading one group and writing another)."""
            drops.setdefault((value, axis), []).append(rows)
            shape = shapes.setdefault(value, list(value.const_value.shape))
            params = len(rows) * int(np.prod(shape)) // shape[axis]
            shape[axis] -= len(rows)
            return params

        for group, frac in zip(groups, fractions):
            keep = self._keep(group, frac)
            if len(keep) == group.channels:
                continue
            gone = np.setdiff1d(np.arange(group.channels), keep)
            params = 0
            for p in group.producers:
                params += drop(p.weight, p.axis, gone)
                if p.bias is not None:
                    drop(p.bias, 0, gone)
            for const, ax, off in group.consts:
                drop(const, ax, _rows(gone, 1, off))
            for c in group.consumers:
                params += drop(c.weight, c.axis, _rows(gone, c.block, c.offset))
            for v in group.values:
                v.shape = None  # re-inferred below
            removed += params
            entry = {"node": group.producers[0].node.name, "next": [c.node.name for c in group.consumers],
                     "channels": group.channels, "kept": int(len(keep)),
                     "fraction_removed": round(1 - len(keep) / group.channels, 4),
                     "parameters_removed": int(params)}
            concat = [c.node.name for c in group.consumers
                      if c.weight.const_value.shape[c.axis] != group.channels * c.block]
            if concat:  # readers of a Concat: they lose the group's rows at its offset
                entry["through_concat"] = concat
            if len(group.producers) > 1:
                entry["tied"] = [p.node.name for p in group.producers[1:]]
            layers.append(entry)
        for (value, axis), parts in drops.items():  # a layer both reads one group and writes another: two axes
            _set(value, np.delete(value.const_value.numpy(), np.concatenate(parts), axis=axis))
        if layers:
            qir.infer_shapes(model)
        else:
            qir.undo_inference(inferred)  # nothing pruned: leave the model exactly as it was
        self.report = {"layers": layers, "kept_whole": kept, "parameters_removed": int(removed)}
        if not sel.weights and not sel.skipped:
            self.report["warnings"] = [nothing_to_do(model, o.ops, "prune")]
        elif not layers and kept:  # every candidate kept whole: the model leaves as it came, say why
            first = kept[0]
            self.report["warnings"] = [f"no layer's channels could be removed ({len(kept)} kept whole; the first, "
                                       f"'{first['node']}': {first['reason']}); the model is unchanged, see the "
                                       "report's kept_whole, or prune without removing channels (prune-magnitude, "
                                       "prune-nm)"]
        if getattr(self, "sensitivity", None):
            self.report["sensitivity"] = self.sensitivity
        return ir.passes.PassResult(model, modified=bool(layers))

    def _keep(self, group: _Group, fraction: float) -> np.ndarray:
        """The channels kept: by weight norm, each writer's norms scaled to mean 1 and summed (tied writers, e.g. a
        SwiGLU's gate and up projections, vote equally)."""
        score = np.zeros(group.channels)
        for p in group.producers:
            norms = channel_norms(p.weight.const_value.numpy(), p.axis, self.options.norm)
            score += norms / norms.mean() if norms.mean() > 0 else norms
        return keep_channels(score, fraction)

    def _guided(self, model: ir.Model, groups: list[_Group]) -> list[float]:
        from qxc.errors import UsageError
        from qxc.passes._sensitivity import WeightSwapEvaluator

        if self.context.data is None:
            raise UsageError(f"pass '{self.name}': sensitivity=true needs sample data; pass --data")
        ev = WeightSwapEvaluator(model, self.context.data, list({c.weight: 0 for g in groups for c in g.consumers}))
        errors = np.zeros((len(groups), len(LEVELS)))

        def zeroed(pairs) -> dict[ir.Value, np.ndarray]:
            """The next layers' weights with each (group, fraction)'s removed channels' rows zeroed: exactly the
            removal's output (a reader after a Concat loses the rows of every group it reads)."""
            swaps: dict[ir.Value, np.ndarray] = {}
            for group, frac in pairs:
                drop = np.setdiff1d(np.arange(group.channels), self._keep(group, frac))
                for c in group.consumers:
                    w = swaps[c.weight] if c.weight in swaps else c.weight.const_value.numpy().copy()
                    np.moveaxis(w, c.axis, 0)[_rows(drop, c.block, c.offset)] = 0
                    swaps[c.weight] = w
            return swaps

        for i, group in enumerate(groups):
            for j, s in enumerate(LEVELS):
                errors[i, j] = ev.error(zeroed([(group, s)]))
        sizes = np.array([sum(m.weight.const_value.size for m in g.producers + g.consumers) for g in groups])
        alloc = allocate(errors, LEVELS, sizes, self.options.sparsity)
        err_guided = ev.error(zeroed(zip(groups, alloc)))
        err_uniform = ev.error(zeroed((g, self.options.sparsity) for g in groups))
        self.sensitivity = {"allocation": {g.producers[0].node.name: round(float(f), 4)
                                           for g, f in zip(groups, alloc)},
                            "joint_error": {"guided": round(err_guided, 6), "uniform": round(err_uniform, 6)}}
        return list(alloc) if err_guided <= err_uniform else [self.options.sparsity] * len(groups)
