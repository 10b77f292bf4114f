"""Which constant weights a node reads, along which axes, and selection by op type and node name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir

from qxc.errors import UsageError
from qxc.graphs import all_graphs, is_weight


def _constant(value: ir.Value | None) -> bool:
    """An initializer, or a ``Constant`` node's output (which fold-constants makes one)."""
    if value is None:
        return False
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def weight_rule(node: ir.Node) -> tuple[int, int, int] | None:
    """(input index, output-channel axis, reduction axis) of the weight ``node`` reads, or None. A MatMul reads its
    weight second (``x @ W``), or first when only the first is constant (``W @ x``: a weight applied to column
    vectors, as PyTorch exports ``torch.matmul(W, x)``): then W's rows are the output rows and its columns the
    reduction."""
    op = node.op_type
    if op == "MatMul":
        if len(node.inputs) > 1 and _constant(node.inputs[0]) and not _constant(node.inputs[1]):
            return 0, -2, -1
        return 1, -1, -2
    if op == "Gemm":
        trans_b = node.attributes.get("transB")
        return (1, 0, 1) if trans_b is not None and trans_b.value else (1, 1, 0)
    if op == "Conv":
        return 1, 0, 1
    if op == "ConvTranspose":
        return 1, 1, 0
    if op == "Gather":
        return 0, 0, 1
    if op in ("LSTM", "GRU"):
        return 1, 1, 2
    if op == "Einsum":
        return einsum_rule(node)
    return None


def einsum_terms(node: ir.Node) -> tuple[list[str], str]:
    """An Einsum's operand subscripts and its output's; without '->' the output is the subscripts that appear once,
    in alphabetical order (as numpy reads it)."""
    equation = (node.attributes.get_string("equation") or "").replace(" ", "")
    operands, _, output = equation.partition("->")
    terms = operands.split(",")
    if "->" not in equation:
        letters = "".join(terms).replace(".", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, output


def einsum_rule(node: ir.Node) -> tuple[int, int, int] | None:
    """An Einsum of an activation and a constant weight (Keras' EinsumDense, ``abc,cde->abde``, in every
    tf2onnx-exported MultiHeadAttention): the weight's last subscript kept in the output is its channel axis, its
    last subscript summed over the reduction axis. None for another form (two activations, ellipses in the weight,
    a repeated subscript, no subscript kept or none summed)."""
    if len(node.inputs) != 2:
        return None
    terms, output = einsum_terms(node)
    constant = [_constant(v) for v in node.inputs]
    if len(terms) != 2 or constant[0] == constant[1]:
        return None
    index = 1 if constant[1] else 0
    term = terms[index]
    if not term.isalpha() or len(set(term)) != len(term):
        return None
    kept = [i for i, c in enumerate(term) if c in output]
    summed = [i for i, c in enumerate(term) if c not in output]
    if not kept or not summed:
        return None
    return index, kept[-1], summed[-1]


@dataclass
class WeightUse:
    value: ir.Value
    nodes: list[ir.Node]
    channel_axis: int
    reduction_axis: int


@dataclass
class Selection:
    weights: list[WeightUse] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def select_weights(model: ir.Model, pass_name: str, ops: tuple[str, ...], include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = (), min_elements: int = 0) -> Selection:
    """Constant float weights of the selected nodes; patterns that match no node are UsageErrors."""
    if not ops:
        raise UsageError(f"pass '{pass_name}': ops is empty; give at least one op type")
    matched = {p: False for p in include + exclude}
    found: dict[ir.Value, WeightUse] = {}
    sel = Selection()
    for graph in all_graphs(model):
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
                continue
            rule = weight_rule(node)
            if rule is None or rule[0] >= len(node.inputs):
                continue
            name = node.name or ""
            hits = [p for p in include if re.search(p, name)]
            for p in hits:
                matched[p] = True
            if include and not hits:
                continue
            excl = [p for p in exclude if re.search(p, name)]
            for p in excl:
                matched[p] = True
            if excl:
                sel.skipped.append({"node": name, "reason": f"excluded by '{excl[0]}'"})
                continue
            v = node.inputs[rule[0]]
            if v is None:
                continue
            if not is_weight(v):
                reason = "weight is a Constant node: run fold-constants first" if (
                    v.producer() is not None and v.producer().op_type == "Constant") else "not a constant initializer"
                sel.skipped.append({"node": name, "weight": v.name, "reason": reason})
                continue
            if v.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
                sel.skipped.append({"node": name, "weight": v.name, "reason": f"dtype {v.const_value.dtype.name}"})
                continue
            if v.const_value.size < max(1, min_elements):
                sel.skipped.append({"node": name, "weight": v.name, "reason": f"fewer than {min_elements} elements"})
                continue
            rank = len(v.const_value.shape)
            use = found.setdefault(v, WeightUse(v, [], rule[1] % rank, rule[2] % rank))
            use.nodes.append(node)
    unmatched = [p for p, hit in matched.items() if not hit]
    if unmatched:
        raise UsageError(f"pass '{pass_name}': pattern '{unmatched[0]}' matched no {'/'.join(ops)} node")
    for use in found.values():
        others = [u.node for u in use.value.uses() if u.node not in use.nodes]
        if others:
            sel.skipped.append({"weight": use.value.name, "reason": f"shared with unselected node "
                                f"'{others[0].name or others[0].op_type}' ({others[0].op_type})"})
            continue
        sel.weights.append(use)
    return sel
