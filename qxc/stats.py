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
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if t is None:
                continue
            params += t.size
            nbytes += t.nbytes
            by_dtype[t.dtype.name.lower()] += t.size
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
