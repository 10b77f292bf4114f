"""Small helpers over onnx-ir graphs shared by the passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def all_graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (If branches, Loop/Scan bodies), outermost first."""
    return [model.graph, *model.graph.subgraphs()]


def is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer() and not value.is_graph_input()


def unique_name(base: str, taken: set[str]) -> str:
    """A name not in ``taken`` (callers keep ``taken`` for the whole model), added to it."""
    name = base
    i = 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def value_names(model: ir.Model) -> set[str]:
    names = set()
    for graph in all_graphs(model):
        names.update(v.name for v in graph.inputs)
        names.update(graph.initializers)
        for node in graph:
            names.update(o.name for o in node.outputs if o.name)
    return names


def is_model_result(value: ir.Value) -> bool:
    """A graph output, or a value that only Identity nodes pass on to graph outputs (as skl2onnx exports do)."""
    if value.is_graph_output():
        return True
    uses = list(value.uses())
    return bool(uses) and all(u.node.op_type == "Identity" and is_model_result(u.node.outputs[0]) for u in uses)


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer holding ``array`` in ``graph``."""
    array = np.asarray(array)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def float_scale(graph: ir.Graph, name: str, scale: np.ndarray, taken: set[str]) -> ir.Value:
    """A float32 scale input: the initializer itself, or for float16 scales (half the bytes on disk) the initializer
    behind a Cast to float32 at the top of the graph, which onnxruntime folds into a constant when it loads."""
    scale = np.asarray(scale)
    if scale.dtype != np.float16:
        return initializer(graph, name, scale.astype(np.float32))
    half = initializer(graph, unique_name(f"{name}_f16", taken), scale)
    cast = ir.Node("", "Cast", [half], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=unique_name(f"{name}_Cast", taken))
    out = cast.outputs[0]
    out.name, out.type, out.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape(scale.shape)
    first = next(iter(graph), None)
    if first is None:
        graph.append(cast)
    else:
        graph.insert_before(first, cast)
    return out


def dequantize_weight(value: ir.Value, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, taken: set[str], *,
                      axis: int | None = None, block: int | None = None, opset: int = 0) -> ir.Value:
    """Replace the initializer ``value`` by integer ``q`` + DequantizeLinear (at the top of its graph); returns the
    value every former consumer now reads, of the weight's own type: a float16 weight with float16 scales is
    dequantized in float16 when the model's ``opset`` allows float16 scales (19); any other pair (float32 scales,
    a bfloat16 weight, an older opset) is dequantized in float32 and cast to the weight's type."""
    graph = value.graph
    base = value.name
    target = value.const_value.dtype
    qv = initializer(graph, unique_name(f"{base}_quantized", taken), q)
    name = unique_name(f"{base}_scale", taken)
    native = target == ir.DataType.FLOAT16 and np.asarray(scale).dtype == np.float16 and opset >= 19
    sv = initializer(graph, name, scale) if native else float_scale(graph, name, scale, taken)
    zv = initializer(graph, unique_name(f"{base}_zero_point", taken), zero_point)
    attrs = []
    if axis is not None and np.ndim(scale):
        attrs.append(ir.AttrInt64("axis", axis))
    if block is not None:
        attrs.append(ir.AttrInt64("block_size", block))
    dq = ir.Node("", "DequantizeLinear", [qv, sv, zv], attrs, name=unique_name(f"{base}_DequantizeLinear", taken))
    out = dq.outputs[0]
    dtype = target if native else ir.DataType.FLOAT
    out.name = unique_name(f"{base}_dequantized" + ("" if dtype == target else "_float"), taken)
    out.type, out.shape = ir.TensorType(dtype), value.shape
    first = next(iter(graph), None)
    if sv.producer() is not None:  # after the Cast of a float16 scale
        graph.insert_after(sv.producer(), dq)
    elif first is None:
        graph.append(dq)
    else:
        graph.insert_before(first, dq)
    if dtype != target:
        cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", target)], name=unique_name(f"{base}_Cast", taken))
        graph.insert_after(dq, cast)
        out = cast.outputs[0]
        out.name = unique_name(f"{base}_dequantized", taken)
        out.type, out.shape = ir.TensorType(target), value.shape
    value.replace_all_uses_with(out)
    del graph.initializers[value.name]
    return out


def nothing_to_do(model: ir.Model, ops: tuple[str, ...], what: str) -> str:
    """A warning for a pass that found none of ``ops`` in the model: what the model computes with instead."""
    from collections import Counter

    counts = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                     for g in all_graphs(model) for n in g if n.op_type not in ("Identity", "Cast", "Constant"))
    ranked = sorted(counts, key=lambda op: ("::" not in op, -counts[op]))  # other domains' ops (ai.onnx.ml) first
    top = ", ".join(ranked[:3]) or "no ops"
    return f"nothing to {what}: no {'/'.join(ops)} in the model (it computes with {top}); this pass leaves it as it was"
