"""``cleanup``: Identity elimination, dead nodes and initializers, duplicate weights, topological order.

Works on the main graph and every subgraph. onnx-ir's own IdentityEliminationPass renames outer-scope values from
inside If branches; this one only rewires values owned by the graph that holds the Identity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qxc.graphs import all_graphs
from qxc.pipeline import QxcPass, opt, register_pass


@dataclass(frozen=True)
class CleanupOptions:
    identity: bool = opt(True, "remove Identity nodes (kept where they separate a graph input from an output)")
    dead: bool = opt(True, "remove nodes and initializers nothing uses")
    dedup: bool = opt(True, "merge initializers with identical dtype, shape and bytes")
    sort: bool = opt(True, "topologically sort every graph (stable)")


def _eliminate_identities(graph: ir.Graph) -> int:
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None:
            continue
        if y.is_graph_output():
            producer = x.producer()
            if producer is None or producer.graph is not graph or x.is_graph_output():
                continue  # y renames a graph input, an initializer, an outer value or another output: keep
            name, dtype, shape = y.name, y.type, y.shape
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            x.name = name
            x.type = dtype if dtype is not None else x.type  # the graph output keeps its declared signature
            x.shape = shape if shape is not None else x.shape
        else:
            y.replace_all_uses_with(x)
            graph.remove(node, safe=True)
        removed += 1
    return removed


def _detach_subgraphs(node: ir.Node) -> None:
    """Drop the uses a dead node's branches hold on outer values, so those values can go in the same run."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                for i in range(len(inner.inputs)):
                    inner.replace_input_with(i, None)


def _remove_dead(graph: ir.Graph) -> tuple[int, int]:
    nodes = 0
    for node in reversed(list(graph)):
        if any(o.is_graph_output() or o.uses() for o in node.outputs):
            continue
        _detach_subgraphs(node)
        graph.remove(node, safe=True)
        nodes += 1
    inits = 0
    inputs = set(graph.inputs)
    for name, value in list(graph.initializers.items()):
        if value.uses() or value.is_graph_output() or value in inputs:
            continue
        del graph.initializers[name]
        inits += 1
    return nodes, inits


def _dedup(graph: ir.Graph) -> int:
    """Merge identical initializers: group by dtype/shape, then a 4 KiB prefix, then a full digest."""
    inputs = set(graph.inputs)
    groups: dict[tuple, list[ir.Value]] = {}
    for value in graph.initializers.values():
        t = value.const_value
        if t is None or value in inputs or value.is_graph_output():
            continue
        groups.setdefault((t.dtype, tuple(t.shape)), []).append(value)
    merged = 0
    for values in groups.values():
        if len(values) < 2:
            continue
        by_prefix: dict[bytes, list[ir.Value]] = {}
        for v in values:
            arr = v.const_value.numpy().reshape(-1)
            by_prefix.setdefault(np.ascontiguousarray(arr[:1024]).tobytes(), []).append(v)
        for same_prefix in by_prefix.values():
            if len(same_prefix) < 2:
                continue
            by_digest: dict[str, ir.Value] = {}
            for v in same_prefix:
                digest = hashlib.sha256(np.ascontiguousarray(v.const_value.numpy()).view(np.uint8).data).hexdigest()
                keep = by_digest.setdefault(digest, v)
                if keep is not v:
                    v.replace_all_uses_with(keep)
                    del graph.initializers[v.name]
                    merged += 1
    return merged


@register_pass("cleanup")
class CleanupPass(QxcPass):
    """Remove Identity nodes, dead nodes/initializers and duplicate weights; sort topologically. Keeps semantics."""

    Options = CleanupOptions
    exact = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        counts = {"identities": 0, "dead_nodes": 0, "dead_initializers": 0, "merged_initializers": 0,
                  "reordered_graphs": 0}
        for graph in reversed(all_graphs(model)):  # innermost first: a branch's dead nodes free outer values
            if o.identity:
                counts["identities"] += _eliminate_identities(graph)
            if o.dedup:
                counts["merged_initializers"] += _dedup(graph)
            if o.dead:
                n, i = _remove_dead(graph)
                counts["dead_nodes"] += n
                counts["dead_initializers"] += i
        if o.sort:
            before = {id(g): list(g) for g in all_graphs(model)}
            model.graph.sort()
            counts["reordered_graphs"] = sum(1 for g in all_graphs(model) if list(g) != before[id(g)])
        self.report = counts
        return ir.passes.PassResult(model, modified=any(counts.values()))
