"""Model statistics (inspect, reports, the pass manager's before/after figures) and the I/O signature."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from qxc import ir as qir

QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd",
    "QLinearMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
})


def value_info(value: ir.Value, hidden: dict[str, str] | None = None) -> dict[str, Any]:
    """Name, dtype and shape; ``hidden``: the types onnx-ir cannot hold (maps), by value name."""
    shape = None if value.shape is None else [d if isinstance(d, int) else getattr(d, "value", None)
                                               for d in value.shape]
    dtype = value.dtype.name.lower() if value.dtype is not None else (hidden or {}).get(value.name)
    return {"name": value.name, "dtype": dtype, "shape": shape}


def signature(model: ir.Model) -> tuple:
    """Names, dtypes and ranks of the graph inputs and outputs (what a pass must not change)."""
    def one(v: ir.Value):
        return (v.name, v.dtype.name if v.dtype is not None else None, None if v.shape is None else len(v.shape))
    init = set(model.graph.initializers)
    return (tuple(one(v) for v in model.graph.inputs if v.name not in init),
            tuple(one(v) for v in model.graph.outputs))


def _packed_weights(model: ir.Model) -> dict[ir.Value, tuple[int, str]]:
    """MatMulNBits' weight and zero points hold 8 / bits values per byte: their count of values and their type
    (an int4 weight of K x N values is K x N parameters, not the K x N / 2 bytes it is stored in)."""
    out = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
            continue
        attrs = node.attributes
        k, n, bits, block = (attrs.get_int(a, 0) for a in ("K", "N", "bits", "block_size"))
        if not (k and n and bits and block) or bits >= 8:
            continue
        label = f"uint{bits}"
        for index, count in ((1, k * n), (3, n * -(-k // block))):
            if index < len(node.inputs) and node.inputs[index] is not None:
                out[node.inputs[index]] = (count, label)
    return out


def model_stats(model: ir.Model) -> dict[str, Any]:
    ops: Counter[str] = Counter()
    subgraphs = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        ops[key] += 1
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs += 1
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs += len(attr.value)
    params = 0
    nbytes = 0
    by_dtype: Counter[str] = Counter()
    packed = _packed_weights(model)
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if t is None:
                continue
            count, dtype = packed.get(value, (t.size, t.dtype.name.lower()))
            params += count
            nbytes += t.nbytes
            by_dtype[dtype] += count
    init = set(model.graph.initializers)
    quant_nodes = sum(n for op, n in ops.items() if op.split("::")[-1] in QUANT_OPS)
    hidden = qir.hidden_types(model)
    return {
        "inputs": [value_info(v, hidden) for v in model.graph.inputs if v.name not in init],
        "outputs": [value_info(v, hidden) for v in model.graph.outputs],
        "opsets": dict(sorted(model.opset_imports.items())),
        "ir_version": model.ir_version,
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "parameters": params,
        "weight_bytes": nbytes,
        "parameters_by_dtype": dict(sorted(by_dtype.items())),
        "subgraphs": subgraphs,
        "quantized_nodes": quant_nodes,
        "quantized": quant_nodes > 0,
    }
