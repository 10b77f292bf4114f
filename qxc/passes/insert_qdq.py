"""``insert-qdq``: static int8 quantization in QDQ form, calibrated on sample data, that onnxruntime fuses.

Activations get QuantizeLinear->DequantizeLinear pairs with ranges from calibration (min-max, percentile, entropy or
MSE); weights of Conv/ConvTranspose/MatMul/Gemm become per-channel symmetric int8 behind DequantizeLinear, biases
int32 with scale = input scale x weight scale. Relu/Clip are folded into their producer's range (no QDQ between
them; onnxruntime then drops the Relu, since a uint8 zero point of 0 clips at 0 anyway). Pooling, Resize, Gather and
shape ops share their input's scale so onnxruntime runs them on int8 directly. Graph inputs and outputs stay float.
Activations are uint8 on CPU and int8 symmetric for CUDA/TensorRT (``activations=auto``); nodes named in ``int16``
get 16-bit activations (opset 21). Works inside If branches and Loop bodies, with Constant-node weights after
fold-constants. With ``max-error``, the nodes whose quantization hurts the outputs most are kept in float (or int16)
until the outputs' relative RMS error is within the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.calibrate import Ranges, collect_ranges
from qxc.errors import UsageError
from qxc.graphs import (
    all_graphs,
    dequantize_weight,
    initializer,
    is_model_result,
    is_weight,
    nothing_to_do,
    unique_name,
    value_names,
)
from qxc.passes._weights import weight_rule
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.quant import Granularity, compute_params, qtype, quantize, quantize_tensor

COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ELEMENTWISE = ("Add", "Mul")
OWN_RANGE = ("AveragePool", "GlobalAveragePool", "Concat", "Softmax", "Sigmoid")
SHARE = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Gather")
FOLDED = ("Relu", "Clip")
DEFAULT_OPS = COMPUTE + ELEMENTWISE + OWN_RANGE + SHARE + FOLDED
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# ops whose graph-output results stay float (quantize-outputs=false): onnxruntime still runs MatMul/Gemm on int8
# inputs (MatMulIntegerToFloat, QGemm with float output), and the others are cheap in float; Conv and the pools
# keep their output QDQ, without which their QLinear kernels would not be used
FLOAT_OUT = ("MatMul", "Gemm", "Add", "Mul", "Softmax", "Sigmoid", "Concat")


@dataclass(frozen=True)
class InsertQdqOptions:
    method: Literal["minmax", "percentile", "entropy", "mse"] = opt(
        "minmax", "calibration method for activations: minmax, percentile (99.999), entropy (TensorRT's KL threshold; "
                  "it may clip a spiky tensor's real outliers, such as a ViT's class token, where mse weighs clipping "
                  "against rounding per tensor)")
    percentile: float = opt(99.999, "percentile kept by method=percentile")
    activations: Literal["auto", "uint8", "int8"] = opt(
        "auto", "activation type: uint8 asymmetric (CPU), int8 symmetric (CUDA/TensorRT); auto picks by provider")
    per_channel: bool = opt(True, "per-output-channel weight scales")
    ops: tuple[str, ...] = opt(DEFAULT_OPS, "op types to quantize")
    exclude: tuple[str, ...] = opt((), "node-name regexes kept in float")
    exclude_ops: tuple[str, ...] = opt((), "op types kept in float")
    int16: tuple[str, ...] = opt((), "node-name regexes whose activations use 16 bits (mixed precision, opset 21)")
    ranges: str = opt("", "load activation ranges from this JSON file instead of calibrating")
    save_ranges: str = opt("", "write the calibrated ranges to this JSON file")
    samples: int = opt(0, "calibrate on at most this many samples (0: all)")
    batch_size: int = opt(0, "calibration batch size (0: auto = 1 sample per run for models with If/Loop, whose "
                             "branches may depend on the whole batch; 64 otherwise)")
    quantize_outputs: bool = opt(False, "also round graph outputs made by MatMul/Gemm/Add/Mul/Softmax/Sigmoid/"
                                        "Concat/shape ops to 8 bits (onnxruntime's quantizer does; by default they "
                                        "stay float, which costs no fusion)")
    isolated: bool = opt(False, "also quantize ops with no Conv/ConvTranspose/MatMul/Gemm among their quantized "
                                "neighbours (by default they stay float: no integer kernel gains, only rounding)")
    max_error: float = opt(0.0, "keep the most harmful nodes out of int8 until output relative RMS error <= this")
    fallback: Literal["float", "int16"] = opt("float", "what max-error does with a harmful node")

    def __post_init__(self):
        if not self.ops:
            raise ValueError("ops is empty; give at least one op type")
        if not 50 < self.percentile <= 100:
            raise ValueError("percentile must be in (50, 100]")
        if self.batch_size < 0 or self.samples < 0 or self.max_error < 0:
            raise ValueError("batch-size, samples and max-error must be >= 0")
        for p in self.exclude + self.int16:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad regex {p!r}: {e}") from None


@dataclass
class _Plan:
    tensors: dict[ir.Value, str]  # activation tensors that get Q->DQ (sibling If branches may reuse a name)
    share: dict[str, str]  # tensor -> the tensor whose parameters it reuses
    wide: dict[str, str]  # tensor -> "int16" for mixed precision
    weights: list[tuple[ir.Node, int, int]]  # (node, input index, channel axis)
    biases: list[tuple[ir.Node, int, str, int]]  # (node, input index, activation input name, weight input index)
    consts: list[tuple[ir.Node, int]]  # constant inputs of Add/Mul/Gather quantized like activations
    nodes: list[str]  # quantized node names (for reports)
    skipped: list[dict]


def _float(v: ir.Value | None) -> bool:
    return v is not None and v.dtype in FLOATS


def _weight_axis(node: ir.Node, index: int, rank: int) -> int | None:
    """The axis of a weight's per-channel scales; None (one scale) for a MatMul's weight applied from the left,
    where onnxruntime's QLinearMatMul takes a per-tensor scale, and for a batched MatMul's weight of rank 3 or more,
    whose per-column scales onnxruntime's fused MatMulIntegerToFloat refuses at run time ("b zero point is not
    valid": it takes a weight's parameters per column only for a 2-D weight)."""
    if index == 0 or (node.op_type == "MatMul" and rank > 2):
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        t = node.attributes.get("transB")
        return 0 if (t is not None and t.value) else 1
    return rank - 1  # MatMul: output columns


def _drop_isolated(plan: _Plan, members: dict[ir.Node, set[ir.Value]], links: list[tuple[ir.Node, ir.Node]]) -> None:
    """Leave in float every group of planned nodes (joined by the tensors they quantize, and folded Relu/Clip to
    their producers) with no Conv/ConvTranspose/MatMul/Gemm: around a Concat of raw features, a Reshape or an Add
    alone, QDQ is rounding that no integer kernel pays for (onnxruntime's quantizer likewise leaves Reshape,
    Transpose and pools alone unless their input is quantized)."""
    parent = {n: n for n in members}

    def find(n: ir.Node) -> ir.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner: dict[ir.Value, ir.Node] = {}
    for node, values in members.items():
        for v in values:
            if v in owner:
                parent[find(node)] = find(owner[v])
            else:
                owner[v] = node
    for a, b in links:
        if b in parent:
            parent[find(a)] = find(b)
    has_compute = {find(n) for n in members if n.op_type in COMPUTE}
    drop = {n for n in members if find(n) not in has_compute}
    if not drop:
        return
    gone = {v.name for v, n in owner.items() if n in drop}
    plan.tensors = {v: name for v, name in plan.tensors.items() if owner.get(v) not in drop}
    plan.wide = {k: v for k, v in plan.wide.items() if k not in gone}
    plan.share = {k: v for k, v in plan.share.items() if k not in gone}
    plan.consts = [(n, i) for n, i in plan.consts if n not in drop]
    plan.nodes = [n.name or n.op_type for n in members if n not in drop]  # members: every planned node, in order
    plan.skipped += [{"node": n.name or n.op_type, "op": n.op_type,
                      "reason": "no Conv/MatMul/Gemm among its quantized neighbours: int8 would only round it "
                                "(isolated=true quantizes it anyway)"} for n in members if n in drop]


@register_pass("insert-qdq")
class InsertQdqPass(QxcPass):
    """Static int8 activation+weight quantization in QDQ form, calibrated on --data (min-max/percentile/entropy/MSE)."""

    Options = InsertQdqOptions

    def _activation_type(self) -> tuple[str, bool]:
        kind = self.options.activations
        if kind == "auto":
            gpu = any(p.lower() in ("cuda", "tensorrt", "trt", "cudaexecutionprovider", "tensorrtexecutionprovider")
                      for p in self.context.providers)
            kind = "int8" if gpu else "uint8"
        return kind, kind == "int8"

    # ------------------------------------------------------------------ planning
    def _selected(self, node: ir.Node, excluded: set[str]) -> bool:
        o = self.options
        if node.domain not in ("", "ai.onnx") or node.op_type not in o.ops or node.op_type in o.exclude_ops:
            return False
        name = node.name or ""
        return name not in excluded and not any(re.search(p, name) for p in o.exclude)

    def _plan(self, model: ir.Model, excluded: set[str], wide_nodes: set[str]) -> _Plan:
        o = self.options
        plan = _Plan({}, {}, {}, [], [], [], [], [])
        for p in o.exclude:
            if not any(re.search(p, n.name or "") for n in ir.traversal.RecursiveGraphIterator(model.graph)):
                raise UsageError(f"pass 'insert-qdq': exclude pattern '{p}' matched no node")
        for p in o.int16:
            if not any(re.search(p, n.name or "") for n in ir.traversal.RecursiveGraphIterator(model.graph)):
                raise UsageError(f"pass 'insert-qdq': int16 pattern '{p}' matched no node")

        def wide(node: ir.Node) -> bool:
            return (node.name or "") in wide_nodes or any(re.search(p, node.name or "") for p in o.int16)

        members: dict[ir.Node, set[ir.Value]] = {}  # each planned node's quantized tensors
        links: list[tuple[ir.Node, ir.Node]] = []  # a folded Relu/Clip and its producer

        kept_float: set[str] = set()  # tensors no node may quantize (a float16 Concat's output)

        def add(v: ir.Value | None, *nodes: ir.Node) -> None:
            if v is None or not _float(v) or is_weight(v) or not v.name or v.name in kept_float:
                return
            plan.tensors[v] = v.name
            members.setdefault(nodes[0], set()).add(v)
            if any(wide(n) for n in nodes):
                plan.wide[v.name] = "int16"

        for graph in all_graphs(model):
            for node in graph:
                op = node.op_type
                if op in ("QuantizeLinear", "DequantizeLinear"):
                    continue
                if not self._selected(node, excluded):
                    if node.domain in ("", "ai.onnx") and op in DEFAULT_OPS and node.name:
                        plan.skipped.append({"node": node.name, "op": op, "reason": "excluded"})
                    continue
                tensors = [v for v in (*node.inputs, *node.outputs) if v is not None]
                if not any(_float(v) for v in tensors):  # nothing QuantizeLinear takes (int shapes, float64)
                    if any(v.dtype == ir.DataType.DOUBLE for v in tensors):
                        plan.skipped.append({"node": node.name or op, "op": op, "reason": "float64: QuantizeLinear "
                                             "takes float32 and float16 only (export the model in float32)"})
                    continue
                if op == "Concat" and any(v.dtype == ir.DataType.FLOAT16 for v in node.outputs):
                    # onnxruntime fuses DQ -> Concat -> Q into QLinearConcat, which takes float32 scales only: a
                    # float16 model with one fails to load. Its output stays float (nothing fuses then).
                    kept_float.update(v.name for v in node.outputs if v.name)
                    plan.skipped.append({"node": node.name or op, "op": op, "reason": "float16: onnxruntime's "
                                         "QLinearConcat takes float32 scales only; kept float"})
                    continue
                if op in FOLDED:
                    producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
                    if producer is None or not self._selected(producer, excluded):
                        add(node.inputs[0], node)  # a lone Relu/Clip: quantize its input and output
                        add(node.outputs[0], node)
                    else:
                        add(node.outputs[0], node, producer)  # folded: carries the producer's precision
                        links.append((node, producer))
                    members.setdefault(node, set())
                    plan.nodes.append(node.name or op)
                    continue
                if op in SHARE:
                    data = node.inputs[0]
                    if op == "Gather" and is_weight(data) and _float(data):
                        plan.consts.append((node, 0))
                    elif not _float(data):
                        continue
                    else:
                        add(data, node)
                    out = node.outputs[0]
                    if _float(out) and (o.quantize_outputs or not is_model_result(out)):
                        add(out, node)
                        plan.share[out.name] = data.name
                    members.setdefault(node, set())
                    plan.nodes.append(node.name or op)
                    continue
                # compute, elementwise, own-range ops
                for i, v in enumerate(node.inputs):
                    if v is None or not _float(v):
                        continue
                    if is_weight(v):
                        if op in COMPUTE and i == weight_rule(node)[0]:
                            plan.weights.append((node, i, _weight_axis(node, i, len(v.const_value.shape))))
                        elif op in ("Conv", "ConvTranspose", "Gemm") and i == 2 and len(v.const_value.shape) == 1:
                            plan.biases.append((node, i, node.inputs[0].name if node.inputs[0] else "", 1))
                        elif op in ELEMENTWISE or op == "Concat":
                            plan.consts.append((node, i))
                        continue
                    if op in COMPUTE and i >= 2:
                        continue  # a computed bias stays float
                    add(v, node)
                for out in node.outputs:
                    if not _float(out):
                        continue
                    if not o.quantize_outputs and op in FLOAT_OUT and is_model_result(out):
                        continue  # the model's result is not rounded to 8 bits (see FLOAT_OUT)
                    users = [u.node for u in out.uses()]
                    if (len(users) == 1 and users[0].op_type in FOLDED and self._selected(users[0], excluded)
                            and not out.is_graph_output()):
                        continue  # folded: the Relu/Clip output carries the range
                    add(out, node)
                members.setdefault(node, set())
                plan.nodes.append(node.name or op)
        if not o.isolated:
            _drop_isolated(plan, members, links)
        # a tensor that shares parameters must share with a quantized tensor
        names = set(plan.tensors.values())
        plan.share = {k: v for k, v in plan.share.items() if v in names}
        return plan

    # ------------------------------------------------------------------ main
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        if model_is_quantized(model):
            self.report = {"skipped_model": "the model already holds QuantizeLinear nodes; left alone"}
            return ir.passes.PassResult(model, modified=False)
        present = {n.op_type for g in all_graphs(model) for n in g if n.domain in ("", "ai.onnx")}
        if not present & set(COMPUTE) and not o.isolated:  # nothing an integer kernel runs: no calibration, no
            self.report = {"quantized_nodes": 0,     # opset upgrade, the model as it was
                           "warnings": [nothing_to_do(model, COMPUTE, "quantize")]}
            return ir.passes.PassResult(model, modified=False)
        if not o.ranges and self.context.ranges is None and self.context.data is None:
            raise UsageError("pass 'insert-qdq' needs sample data to calibrate; pass --data (or ranges=FILE)")
        needed = 21 if (o.int16 or o.fallback == "int16" and o.max_error) else 13
        if _holds_float16(model):
            needed = max(needed, 19)  # float16 activations are quantized with float16 scales, new in opset 19
        upgraded = model.opset_imports.get("", 1) < needed
        if upgraded:
            qir.upgrade_opset(model, needed)
        inferred = qir.infer_shapes(model)
        excluded: set[str] = set()
        wide_nodes: set[str] = set()
        plan = self._plan(model, excluded, wide_nodes)
        ranges = self._ranges(model, plan)
        qir.release_weights(model)  # calibration touched every weight page; read them again one at a time
        report_extra: dict = {}
        if o.max_error:
            excluded, wide_nodes, report_extra = self._budget(model, ranges)
            plan = self._plan(model, excluded, wide_nodes)
            budget = report_extra["budget"]
            if not budget["met"]:
                report_extra["warnings"] = [f"max-error {o.max_error:g} not reached: the outputs' relative RMS error "
                                            f"is {budget['achieved']:g} with every quantized node taken out in turn"]
        inserted = self._apply(model, plan, ranges)
        changed = upgraded or any(inserted[k] for k in ("activations", "weights", "biases", "constants"))
        if not changed:
            qir.undo_inference(inferred)
        skipped = plan.skipped + inserted["skipped"]
        if not changed and skipped:
            first = skipped[0]
            report_extra.setdefault("warnings", []).append(
                f"nothing quantized ({len(skipped)} skipped); the first, "
                f"'{first.get('node') or first.get('tensor')}': {first['reason']}")
        self.report = {
            "activation_type": self._activation_type()[0], "method": ranges.method, "samples": ranges.samples,
            "quantized_nodes": len(plan.nodes), "activation_qdq": inserted["activations"],
            "weights": inserted["weights"], "biases": inserted["biases"], "constants": inserted["constants"],
            "skipped": skipped, "opset_raised_to": needed if upgraded else None,
            "int16_tensors": sorted(plan.wide), **report_extra,
        }
        return ir.passes.PassResult(model, modified=changed)

    def _ranges(self, model: ir.Model, plan: _Plan) -> Ranges:
        o = self.options
        # every planned tensor, shared ones too: a later plan (max-error) may cut a sharing chain
        needed = sorted(set(plan.tensors.values()))
        if not needed and not o.save_ranges:  # nothing to calibrate: no run over the data
            return Ranges(o.method)
        if o.ranges or self.context.ranges is not None:
            ranges = Ranges.load(o.ranges) if o.ranges else self.context.ranges
            missing = [t for t in needed if t not in ranges and t not in plan.share]
            if missing:
                raise UsageError(f"pass 'insert-qdq': the ranges have no entry for tensor '{missing[0]}' "
                                 f"({len(missing)} missing); recalibrate with --data")
        else:
            data = self.context.data
            if o.samples:
                data = data.head(o.samples)
            act, sym = self._activation_type()
            outputs = {v.name for g in all_graphs(model) for v in g.outputs}
            control_flow = any(n.op_type in ("If", "Loop") for n in model.graph)
            batch = o.batch_size or (1 if control_flow else 64)
            ranges = collect_ranges(model, data, tensors=needed, method=o.method, percentile=o.percentile,
                                    batch_size=batch, providers=self.context.providers, activation_type=act,
                                    symmetric=sym, keep_minmax=outputs)
        if o.save_ranges:
            ranges.save(o.save_ranges)
        return ranges

    # ------------------------------------------------------------------ rewriting
    def _params(self, lo: float, hi: float, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
        act, sym = self._activation_type()
        qt = {"int16": "int16" if sym else "uint16"}.get(kind, act)
        s, z = compute_params(np.array([lo]), np.array([hi]), qt, sym)
        return s[0:1].reshape(()).astype(np.float32), z[0:1].reshape(()).astype(qtype(qt).storage), qt

    def _apply(self, model: ir.Model, plan: _Plan, ranges: Ranges) -> dict:
        taken = value_names(model)
        params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        skipped = []
        # union ranges over scale-sharing groups so the shared scale covers every member
        root = {}
        for t in set(plan.tensors.values()):
            r = t
            while r in plan.share:
                r = plan.share[r]
            root[t] = r
        group_range: dict[str, tuple[float, float]] = {}
        infinite = {r for t, r in root.items() if t in ranges.infinite or r in ranges.infinite}
        for t, r in root.items():
            if t not in ranges and t not in plan.share:
                continue
            lo, hi = ranges[t] if t in ranges else ranges[r]
            glo, ghi = group_range.get(r, (lo, hi))
            group_range[r] = (min(glo, lo), max(ghi, hi))
        activations = 0
        for value, name in plan.tensors.items():
            r = root[name]
            if r in infinite:  # an attention mask's -inf: rounded, it would become the range's finite end
                skipped.append({"tensor": name, "reason": "holds infinities on the calibration data (a mask's "
                                "-inf): kept float"})
                continue
            if r not in group_range:
                skipped.append({"tensor": name, "reason": "never computed on the calibration data (branch not taken)"})
                continue
            kind = "int16" if (name in plan.wide or r in plan.wide) else "8"
            s, z, _ = self._params(*group_range[r], kind)
            params[name] = (s, z)
            self._insert_qdq(value, s, z, taken)
            activations += 1
        weights = 0
        for node, i, axis in plan.weights:
            v = node.inputs[i]
            if v is None or not is_weight(v):
                continue  # shared weight already rewired
            g = Granularity(axis=axis) if self.options.per_channel else Granularity()
            t = v.const_value
            half = t.dtype == ir.DataType.FLOAT16
            # a weight applied from the left is QLinearMatMul's input A, which must share the activations' type
            # (onnxruntime fuses no (int8, uint8) pair): uint8 beside uint8 activations
            unsigned = i == 0 and self._activation_type()[0] == "uint8"
            qt = quantize_tensor(np.asarray(t.numpy(), dtype=np.float32), "uint8" if unsigned else "int8",
                                 symmetric=not unsigned, granularity=g, name=v.name, keep_dequantized=False,
                                 scale_dtype="float16" if half else "float32")
            dequantize_weight(v, qt.q, qt.scale.astype(qt.scale_dtype), qt.zero_point, taken, axis=g.axis,
                              opset=model.opset_imports.get("", 1))
            qir.release_weights(model, [t])  # unmap the float weight: its pages no longer count against us
            weights += 1
        biases = 0
        for node, i, act_name, wi in plan.biases:
            b = node.inputs[i]
            w_dq = node.inputs[wi].producer() if node.inputs[wi] is not None else None
            if b is None or not is_weight(b) or act_name not in params or w_dq is None \
                    or w_dq.op_type != "DequantizeLinear":
                continue
            s_x = float(params[act_name][0])
            s_w = w_dq.inputs[1].const_value.numpy().astype(np.float64)
            scale = (s_x * s_w).astype(np.float32)
            if scale.ndim == 0:
                scale = np.full(b.const_value.shape, scale, np.float32)
            bq = np.clip(np.rint(b.const_value.numpy().astype(np.float64) / scale), -2**31, 2**31 - 1).astype(np.int32)
            dequantize_weight(b, bq, scale, np.zeros(scale.shape, np.int32), taken, axis=0 if scale.ndim else None)
            biases += 1
        constants = 0
        for node, i in plan.consts:
            v = node.inputs[i]
            if v is None or not is_weight(v):
                continue
            arr = v.const_value.numpy().astype(np.float32)
            if not np.isfinite(arr).all():  # a constant attention mask's -inf: rounding would make it finite
                skipped.append({"tensor": v.name, "reason": "constant holds infinities or NaN (a mask's -inf): "
                                "kept float"})
                continue
            s, z, qt = self._params(float(arr.min()), float(arr.max()), "8")
            q = quantize(arr, s, z.astype(np.int64), qt).astype(z.dtype)
            dequantize_weight(v, q, s, z, taken)
            constants += 1
        return {"activations": activations, "weights": weights, "biases": biases, "constants": constants,
                "skipped": skipped}

    def _insert_qdq(self, value: ir.Value, scale: np.ndarray, zp: np.ndarray, taken: set[str]) -> None:
        graph = value.graph if value.producer() is None else value.producer().graph
        base = value.name
        if value.dtype == ir.DataType.FLOAT16:  # the scale is of the quantized tensor's type (opset 19)
            scale = np.maximum(scale, np.float32(2.0**-24)).astype(np.float16)
        s = initializer(graph, unique_name(f"{base}_scale", taken), scale)
        z = initializer(graph, unique_name(f"{base}_zero_point", taken), zp)
        q = ir.Node("", "QuantizeLinear", [value, s, z], name=unique_name(f"{base}_QuantizeLinear", taken))
        q.outputs[0].name = unique_name(f"{base}_quantized", taken)
        q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(zp.dtype))
        q.outputs[0].shape = value.shape
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], name=unique_name(f"{base}_DequantizeLinear", taken))
        out = dq.outputs[0]
        out.type, out.shape = value.type, value.shape
        users = [(u.node, u.idx) for u in value.uses() if u.node is not q]
        producer = value.producer()
        if producer is None:
            first = next(iter(graph), None)
            if first is None:
                graph.extend([q, dq])
            else:
                graph.insert_before(first, [q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        for node, idx in users:
            node.replace_input_with(idx, out)
        if value.is_graph_output():
            g = value.graph if value.graph is not None else graph
            idx = [i for i, v in enumerate(g.outputs) if v is value]
            name = value.name
            value.name = unique_name(f"{base}_prequant", taken)
            out.name = name
            for i in idx:
                g.outputs[i] = out
        else:
            out.name = unique_name(f"{base}_dequantized", taken)

    # ------------------------------------------------------------------ error budget
    def _budget(self, model: ir.Model, ranges: Ranges) -> tuple[set[str], set[str], dict]:
        """Greedy: quantize everything, find the node after which error jumps most, take it out, repeat."""
        from qxc.passes._sensitivity import OutputErrorMeter

        o = self.options
        meter = OutputErrorMeter(model, self.context.data, max_rows=256)
        excluded: set[str] = set()
        wide: set[str] = set()
        history = []
        candidates = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph)
                      if n.name and self._selected(n, set())]
        scores = None
        for _ in range(2 * len(candidates) + 1):
            trial = qir.clone(model)
            plan = self._plan(trial, excluded, wide)
            self._apply(trial, plan, ranges)
            err = meter.error(trial)
            history.append({"float": sorted(excluded), "int16": sorted(wide), "error": round(err, 6)})
            if err <= o.max_error:
                break
            if scores is None:  # one pass: each node quantized alone
                scores = {}
                for name in candidates:
                    single = qir.clone(model)
                    others = {c for c in candidates if c != name}
                    p = self._plan(single, others, set())
                    self._apply(single, p, ranges)
                    scores[name] = meter.error(single)
            remaining = [c for c in candidates if c not in excluded and c not in wide]
            if remaining:
                worst = max(remaining, key=lambda c: (scores[c], c))
                (wide if o.fallback == "int16" else excluded).add(worst)
            else:  # int16 everywhere is not enough: move the worst int16 nodes on to float
                in16 = [c for c in candidates if c in wide]
                if not in16:
                    break
                worst = max(in16, key=lambda c: (scores[c], c))
                wide.discard(worst)
                excluded.add(worst)
        achieved = history[-1]["error"]
        return excluded, wide, {"budget": {"max_error": o.max_error, "achieved": achieved,
                                           "met": achieved <= o.max_error, "history": history,
                                           "node_errors": {k: round(v, 6) for k, v in sorted((scores or {}).items())}}}


def _holds_float16(model: ir.Model) -> bool:
    """Whether any graph input, initializer or typed node output is float16."""
    for graph in all_graphs(model):
        values = [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
        if any(v.dtype == ir.DataType.FLOAT16 for v in values):
            return True
    return False


def model_is_quantized(model: ir.Model) -> bool:
    return any(n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear")
               for n in ir.traversal.RecursiveGraphIterator(model.graph))
