"""``fold-constants``: lift ``Constant`` nodes into initializers and fold constant subexpressions.

Exporters such as Paddle's keep every weight as a ``Constant`` node; later passes see weights only as initializers.
Folding evaluates every foldable node of a graph in one onnxruntime session (no optimizations), so folded values are
exactly what the runtime would compute. Random ops, quantize/dequantize nodes (kept as quantization structure),
nodes with subgraphs and results above ``max-elements`` are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qxc.graphs import all_graphs, is_weight
from qxc.pipeline import QxcPass, opt, register_pass

NOT_FOLDED = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant", "If", "Loop", "Scan",
    "SequenceConstruct", "SequenceEmpty", "Optional",
})


@dataclass(frozen=True)
class FoldConstantsOptions:
    lift: bool = opt(True, "turn Constant nodes into initializers")
    fold: bool = opt(True, "evaluate nodes whose inputs are all constant")
    max_elements: int = opt(1 << 22, "do not materialize a folded tensor with more elements than this")

    def __post_init__(self):
        if self.max_elements < 1:
            raise ValueError("max-elements must be >= 1")


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].value
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return ir.tensor(np.array(attrs[key].value, dtype=dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return ir.tensor(np.array(list(attrs[key].value), dtype=dtype))
    return None  # sparse_value / strings: left as nodes


def _lift(graph: ir.Graph) -> tuple[int, list[str]]:
    lifted, kept = 0, []
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        tensor = _constant_tensor(node)
        if tensor is None or out.is_graph_output():
            kept.append(f"{node.name or out.name}: " + ("graph output" if tensor is not None else "sparse/string value"))
            continue
        new = ir.Value(name=out.name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype),
                       const_value=tensor)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.register_initializer(new)
        lifted += 1
    return lifted, kept


def _foldable_nodes(graph: ir.Graph) -> list[ir.Node]:
    produced: set[ir.Value] = set()
    nodes = []
    for node in graph:
        if (node.domain not in ("", "ai.onnx") or node.op_type in NOT_FOLDED
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
                or any(o.is_graph_output() for o in node.outputs)):
            continue
        if all(v is None or v in produced or is_weight(v) for v in node.inputs):
            nodes.append(node)
            produced.update(node.outputs)
    return nodes


def _evaluate(model: ir.Model, nodes: list[ir.Node], boundary: list[ir.Value]) -> list[np.ndarray]:
    from qxc.runtime import make_session

    mapping: dict[ir.Value, ir.Value] = {}
    initializers = []

    def mapped(v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if v not in mapping:
            t = v.const_value
            mapping[v] = ir.Value(name=v.name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(t.dtype),
                                  const_value=t)
            initializers.append(mapping[v])
        return mapping[v]

    new_nodes = []
    for node in nodes:
        inputs = [mapped(v) for v in node.inputs]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        new = ir.Node(node.domain, node.op_type, inputs, attrs, num_outputs=len(node.outputs), version=node.version)
        for old, out in zip(node.outputs, new.outputs):
            out.name = old.name
            mapping[old] = out
        new_nodes.append(new)
    graph = ir.Graph([], [mapping[v] for v in boundary], nodes=new_nodes, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="fold")
    tmp = ir.Model(graph, ir_version=model.ir_version)
    session = make_session(tmp, optimization="none")
    return session.run(None, {})


@register_pass("fold-constants")
class FoldConstantsPass(QxcPass):
    """Lift Constant nodes into initializers and fold constant subexpressions with onnxruntime. Keeps semantics."""

    Options = FoldConstantsOptions
    exact = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        lifted, folded, kept = 0, 0, []
        too_large: list[str] = []
        for graph in all_graphs(model):
            if self.options.lift:
                n, k = _lift(graph)
                lifted += n
                kept += k
            if self.options.fold:
                folded += self._fold(model, graph, too_large)
        self.report = {"lifted": lifted, "folded_nodes": folded, "constants_kept": kept, "too_large": too_large}
        return ir.passes.PassResult(model, modified=bool(lifted or folded))

    def _fold(self, model: ir.Model, graph: ir.Graph, too_large: list[str]) -> int:
        """Evaluate every foldable node in one session; materialize only the values non-folded nodes read.

        A result above ``max-elements`` keeps its producer (and that producer's foldable ancestors) as nodes; their
        values are still computed inside the session so that small results downstream of them fold.
        """
        evaluable = _foldable_nodes(graph)
        if not evaluable:
            return 0
        blocked: set[ir.Node] = set()
        while True:
            kept = _with_ancestors(blocked)
            folded = [n for n in evaluable if n not in kept]
            inside = set(folded)
            boundary = [out for node in folded for out in node.outputs
                        if any(u.node not in inside for u in out.uses())]
            if not boundary:
                return 0
            results = _evaluate(model, evaluable, boundary)
            big = [v for v, r in zip(boundary, results) if r.size > self.options.max_elements]
            if not big:
                break
            for v in big:
                too_large.append(f"{v.name} ({v.producer().op_type})")
                blocked.add(v.producer())
        for value, array in zip(boundary, results):
            new = ir.Value(name=value.name, shape=ir.Shape(array.shape),
                           type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
            value.replace_all_uses_with(new)
            value.name = None
            graph.register_initializer(new)
        for node in reversed(folded):
            graph.remove(node, safe=True)
        return len(folded)


def _with_ancestors(nodes: set[ir.Node]) -> set[ir.Node]:
    out, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in out:
            continue
        out.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return out
