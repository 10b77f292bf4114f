"""``quantize-weights``: weight-only int8/int4 quantization (QDQ or onnxruntime's MatMulNBits).

Weights of MatMul (``x @ W``, or ``W @ x`` when only the first input is constant), Gemm (``transB`` respected),
Conv/ConvTranspose (per output channel), Einsum of an activation and a weight (Keras' EinsumDense) and, on request,
Gather embeddings and LSTM/GRU matrices become integer initializers followed by ``DequantizeLinear``; with
``format=matmulnbits`` 2-D MatMul weights, and Gemm weights with their bias (PyTorch's Linear), become
``com.microsoft.MatMulNBits`` (4 or 8 bits, blocked), onnxruntime's fast weight-only kernels, and 4-bit embeddings
``com.microsoft.GatherBlockQuantized``. The opset is raised when the chosen form needs it (per-axis 13, blocked/int4
21).
A weight shared by several selected nodes is quantized once. Every weight considered is reported, quantized or
skipped with the reason; include/exclude patterns that match no node are errors.

``method=gptq`` (with data) rounds MatMul (either side), Gemm, Einsum, Conv and ConvTranspose weights by GPTQ on
the Gram of their inputs (a Conv's through its input's patches, a grouped Conv's per group, a ConvTranspose's
through the patches of the Conv that computes it), see :mod:`qxc.quant.gptq`.

With data, ``keep-sensitive=K`` keeps the K weights whose int4 quantization alone hurts the outputs most at int8, and
``max-error=E`` promotes weights to int8, most sensitive first, until the outputs' relative RMS error is <= E.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.calibrate.hessian import GramCache, Source
from qxc.errors import UsageError
from qxc.graphs import (
    all_graphs,
    dequantize_weight,
    float_scale,
    initializer,
    is_weight,
    nothing_to_do,
    unique_name,
    value_names,
)
from qxc.passes._weights import einsum_terms, weight_rule
from qxc.pipeline import QxcPass, opt, register_pass
from qxc.quant import Granularity, QuantizedTensor, quantize_tensor
from qxc.quant.gptq import (
    auto_damp,
    conv_from_kn,
    conv_kn,
    conv_transpose_as_conv,
    conv_transpose_from_conv,
    gptq_quantize,
    inverse_cholesky,
    reshaped,
    stack_directions,
    stack_output_channels,
    transposed,
    transposed_groups,
)
from qxc.quant.numerics import pack_uint4
from qxc.runtime.threads import serial_blas

# op type -> (weight input index, channel axis, reduction axis) for a weight of rank r; axes may depend on attrs
DEFAULT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")
OPTIONAL_OPS = ("Gather", "LSTM", "GRU")


@dataclass(frozen=True)
class QuantizeWeightsOptions:
    bits: Literal[4, 8] = opt(8, "bit width of the integer weights")
    symmetric: bool = opt(True, "symmetric ranges (zero point 0) instead of min/max ranges")
    granularity: Literal["auto", "tensor", "channel", "block"] = opt(
        "auto", "scale per tensor, per output channel or per block along the reduction axis (auto: 8 bits channel, "
                "4 bits block; MatMulNBits weights: block); an output channel of no more than block-size weights "
                "(an RGB stem's or a depthwise Conv's) is one group instead of blocks shorter than asked")
    block_size: int = opt(32, "block length along the reduction axis for granularity=block (power of two >= 16)")
    method: Literal["rtn", "mse", "gptq"] = opt(
        "mse", "round-to-nearest on min/max, a clipping search minimising the weights' MSE, or (with --data) GPTQ: "
               "mse's scales with each row's rounding error compensated in the rows after it, minimising the "
               "layer's output error on the samples (MatMul, Gemm, Einsum, Conv and ConvTranspose weights; others "
               "get mse)")
    damp: float = opt(0.0, "method=gptq: damping added to the inputs' Gram diagonal, as a fraction of its mean "
                           "(0: auto, K / rows between 0.01 and 1: few rows need more, or GPTQ fits them)")
    samples: int = opt(0, "method=gptq: use at most this many sample rows (0: all)")
    format: Literal["qdq", "matmulnbits"] = opt(
        "qdq", "DequantizeLinear nodes, or onnxruntime's kernels: MatMulNBits for 2-D MatMul and Gemm weights, "
               "GatherBlockQuantized for 4-bit Gather embeddings")
    scale_dtype: Literal["float32", "float16"] = opt(
        "float32", "storage of the scales: float16 halves their bytes (int4 block 32: 0.146x instead of 0.161x of fp32); "
                   "a weight whose scales leave float16's range keeps float32")
    accuracy_level: int = opt(0, "MatMulNBits accuracy_level (0: fp32 compute, 4: int8 compute, faster)")
    ops: tuple[str, ...] = opt(DEFAULT_OPS, f"op types whose weights are quantized (also: {', '.join(OPTIONAL_OPS)})")
    include: tuple[str, ...] = opt((), "only nodes whose name matches one of these regexes")
    exclude: tuple[str, ...] = opt((), "skip nodes whose name matches one of these regexes")
    min_elements: int = opt(0, "leave weights with fewer elements in float")
    max_opset: int = opt(0, "the highest opset the target runtime runs (0: no limit)")
    keep_sensitive: int = opt(0, "with --data and bits=4: keep this many most output-sensitive weights at int8")
    max_error: float = opt(0.0, "with --data and bits=4: promote weights to int8 until output relative RMS error <= this")

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block-size must be a power of two >= 16, got {self.block_size}")
        if not self.ops:
            raise ValueError("ops is empty; give at least one op type")
        unknown = [o for o in self.ops if o not in DEFAULT_OPS + OPTIONAL_OPS]
        if unknown:
            raise ValueError(f"ops: '{unknown[0]}' has no weight rule; use {', '.join(DEFAULT_OPS + OPTIONAL_OPS)}")
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r}: {e}") from None
        if self.min_elements < 0 or self.keep_sensitive < 0 or self.max_error < 0 or self.samples < 0:
            raise ValueError("min-elements, keep-sensitive, max-error and samples must be >= 0")
        if not (self.damp >= 0 and math.isfinite(self.damp)):
            raise ValueError(f"damp must be a number >= 0 (0: auto), got {self.damp}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError("accuracy-level must be 0..4")


@dataclass
class _Use:
    node: ir.Node
    index: int  # input index of the weight
    channel_axis: int
    reduction_axis: int


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _required_opset(bits: int, g: Granularity, fmt: str) -> int:
    if fmt == "matmulnbits":
        return 0
    if bits == 4 or g.block is not None:
        return 21
    if g.axis is not None:
        return 13
    return 10


@register_pass("quantize-weights")
class QuantizeWeightsPass(QxcPass):
    """Weight-only quantization to int8/int4 (per tensor, channel or block) as QDQ or MatMulNBits."""

    Options = QuantizeWeightsOptions

    # ------------------------------------------------------------------ selection
    def _granularity(self, use: _Use, shape: tuple[int, ...]) -> Granularity:
        """The weight's groups. Blocks run along the reduction axis; where that axis is shorter than a block (a
        Conv's input channels: 3 in an RGB stem, 1 in a depthwise Conv) each block would shrink to that length, down
        to a scale and zero point per weight. When a whole output channel holds no more than a block's weights,
        the channel is the group instead: the group nearest the block size asked for."""
        o = self.options
        rank = len(shape)
        kind = o.granularity if o.granularity != "auto" else ("channel" if o.bits == 8 else "block")
        if kind == "tensor":
            return Granularity()
        channel, reduction = use.channel_axis % rank, use.reduction_axis % rank
        if kind == "channel":
            return Granularity(axis=channel)
        if shape[reduction] < o.block_size and math.prod(shape) // max(1, shape[channel]) <= o.block_size:
            return Granularity(axis=channel)
        return Granularity(axis=reduction, block=o.block_size)

    def _select(self, model: ir.Model) -> tuple[dict[ir.Value, list[_Use]], list[dict]]:
        o = self.options
        matched = {p: False for p in o.include + o.exclude}
        uses: dict[ir.Value, list[_Use]] = {}
        skipped: list[dict] = []
        self._unselected: dict[ir.Value, list[ir.Node]] = {}
        for graph in all_graphs(model):
            for node in graph:
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type not in o.ops:
                    self._note_unselected(node)
                    continue
                rule = weight_rule(node)
                if rule is None and not (node.op_type == "Einsum" and any(map(is_weight, node.inputs))):
                    continue
                name = node.name or ""
                if o.include:
                    hits = [p for p in o.include if re.search(p, name)]
                    for p in hits:
                        matched[p] = True
                    if not hits:
                        continue
                excl = [p for p in o.exclude if re.search(p, name)]
                for p in excl:
                    matched[p] = True
                if excl:
                    skipped.append({"node": name, "reason": f"excluded by '{excl[0]}'"})
                    continue
                if rule is None:
                    equation = node.attributes.get_string("equation")
                    skipped.append({"node": name, "reason": f"Einsum '{equation}': not an activation times a weight "
                                    "with subscripts both kept and summed"})
                    continue
                idx, ch, red = rule
                for i in _weight_inputs(node, idx):
                    uses.setdefault(node.inputs[i], []).append(_Use(node, i, ch, red))
        unmatched = [p for p, hit in matched.items() if not hit]
        if unmatched:
            raise UsageError(f"pass 'quantize-weights': pattern '{unmatched[0]}' matched no "
                             f"{'/'.join(o.ops)} node; check the node names with `qxc inspect --json`")
        return uses, skipped

    def _note_unselected(self, node: ir.Node) -> None:
        """Remember the float weight of a node whose op type has a weight rule but is not in ``ops`` (an embedding
        under the default ops): it stays float, and the report says how many bytes that keeps."""
        if node.op_type not in DEFAULT_OPS + OPTIONAL_OPS:
            return
        rule = weight_rule(node)
        if rule is None:
            return
        for i in _weight_inputs(node, rule[0]):
            value = node.inputs[i]
            t = value.const_value
            if (value.producer() is None and t is not None and len(t.shape) >= 2
                    and t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)):
                self._unselected.setdefault(value, []).append(node)

    def _left_float(self, model: ir.Model, uses: dict) -> tuple[list[dict], list[str]]:
        """The float weights of op types not in ``ops`` that the pass did not quantize through another node, and a
        note naming the largest of them when together they hold at least a tenth of the weight bytes the pass leaves."""
        left = []
        for value, nodes in self._unselected.items():
            t = value.const_value
            if value in uses or t is None:  # also read by a selected node: reported as quantized or skipped
                continue
            ops = sorted({n.op_type for n in nodes})
            left.append({"weight": value.name, "nodes": [n.name for n in nodes], "op": ops[0], "bytes": t.nbytes,
                         "reason": f"{'/'.join(ops)} not in ops"})
        left.sort(key=lambda e: -e["bytes"])
        total = sum(v.const_value.nbytes for g in all_graphs(model) for v in g.initializers.values()
                    if v.const_value is not None)
        kept = sum(e["bytes"] for e in left)
        notes = []
        if left and kept >= 0.1 * max(1, total):
            ops = "/".join(sorted({e["op"] for e in left}))
            named = ", ".join(f"'{e['weight']}' ({_mib(e['bytes'])})" for e in left[:3])
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            notes.append(f"{len(left)} {ops} weight{'s' if len(left) > 1 else ''} not quantized ({ops} is not in ops), "
                         f"{100 * kept / total:.0f} % of the weight bytes after this pass: {named}{more}; add {ops} to "
                         f"ops to quantize {'them' if len(left) > 1 else 'it'} (ops=[{', '.join(self.options.ops)}, "
                         f"{ops.replace('/', ', ')}])")
        return left, notes

    def _eligible(self, value: ir.Value, value_uses: list[_Use]) -> str | None:
        """Why this weight is left alone, or None when it can be quantized."""
        producer = value.producer()
        if producer is not None:
            if producer.op_type == "Constant":
                return "weight is a Constant node: run fold-constants first"
            if producer.op_type == "DequantizeLinear":
                return "already quantized (produced by DequantizeLinear)"
            return f"not a constant (produced by {producer.op_type})"
        if value.const_value is None:
            return "not a constant (graph input or outer value)"
        if value.is_graph_input():
            return "initializer is also a graph input (can be overridden at run time)"
        if value.is_graph_output():
            return "initializer is a graph output"
        t = value.const_value
        if t.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            if t.dtype.is_integer():
                return f"already integer ({t.dtype.name.lower()})"
            return (f"dtype {t.dtype.name}: DequantizeLinear yields float32, float16 or bfloat16 only (export the "
                    "model in float32)" if t.dtype == ir.DataType.DOUBLE else f"dtype {t.dtype.name}")
        if t.size < max(1, self.options.min_elements):
            return f"{t.size} elements < min-elements={self.options.min_elements}"
        if len(t.shape) < 2 and any(u.node.op_type != "Gather" for u in value_uses):
            return f"rank {len(t.shape)} weight"
        selected = {id(u.node) for u in value_uses}
        others = [u.node for u in value.uses() if id(u.node) not in selected]
        if others:
            n = others[0]
            return f"shared with unselected node '{n.name or n.op_type}' ({n.op_type})"
        axes = {(u.channel_axis % len(t.shape), u.reduction_axis % len(t.shape)) for u in value_uses}
        if len(axes) > 1:
            return "shared by nodes that read it along different axes"
        return None

    # ------------------------------------------------------------------ main
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        plan = self._plan(model)
        needed = max([p["opset"] for p in plan.values()], default=0)
        current = model.opset_imports.get("", 1)
        if o.max_opset and needed > o.max_opset:
            form = "int4" if o.bits == 4 else ("blocked" if o.granularity == "block" else "per-channel")
            raise UsageError(f"pass 'quantize-weights': {form} QDQ weights need opset {needed} but max-opset="
                             f"{o.max_opset}; use format=matmulnbits, bits=8 or granularity=tensor")
        upgraded = False
        if needed > current:
            qir.upgrade_opset(model, needed)
            upgraded = True
        uses, skipped = self._select(model)
        todo = []
        for value, value_uses in uses.items():
            reason = self._eligible(value, value_uses)
            if reason is not None:
                skipped.append({"weight": value.name, "nodes": [u.node.name for u in value_uses], "reason": reason})
                continue
            todo.append((value, value_uses))
        self._grams = self._gram_cache(model, todo) if o.method == "gptq" else None
        bits_for = self._bits_per_weight(model, todo)
        taken = value_names(model)
        opset = model.opset_imports.get("", 1)
        quantized, mapped = [], []
        if self._grams is not None:
            self._grams.last_sweep = True  # the weights may be unmapped once their inputs are collected
        for (value, value_uses), (bits, g, qt, layout) in zip(todo, self._quantize_all(todo, bits_for)):
            fmt = self._format_for(value, value_uses, bits)
            t = value.const_value
            entry = {"weight": value.name, "nodes": [u.node.name for u in value_uses],
                     "op": value_uses[0].node.op_type, "shape": list(t.shape), "bits": bits,
                     "granularity": "tensor" if g.axis is None else ("channel" if g.block is None else
                                                                    f"block{min(g.block, qt.codes.shape[g.axis])}"),
                     "format": fmt, "scale_dtype": self._scale_storage(qt, fmt, opset), "sqnr_db": round(qt.sqnr, 3),
                     "bytes_before": t.nbytes, **self._method_for(value)}
            if fmt != "qdq" and t.dtype == ir.DataType.FLOAT16 and qt.scale_dtype != "float16":
                kernel = "MatMulNBits" if fmt == "matmulnbits" else "GatherBlockQuantized"
                raise UsageError(f"pass 'quantize-weights': float16 weight '{value.name}' needs scales outside "
                                 f"float16's range, and {kernel} keeps its scales in the activations' type; use "
                                 "format=qdq or exclude its node")
            if fmt == "matmulnbits":
                k = t.shape[1] if _transposed(value_uses[0].node) else t.shape[0]
                entry["bytes_after"] = self._emit_nbits(value, value_uses, layout, bits, _nbits_block(g, k), taken)
            elif fmt == "gatherblockquantized":
                entry["bytes_after"] = self._emit_gather(value, value_uses, qt, g, taken)
            else:
                entry["bytes_after"] = self._emit_qdq(value, qt, g, taken, opset)
            # unmap the float weight: its pages no longer count against us (a session that shares them, gptq's,
            # keeps them mapped until it closes: those are tried again with the next weights)
            mapped = qir.release_weights(model, [*mapped, t])
            quantized.append(entry)
        self._grams = None  # the inputs' Grams and, if still open, their session
        if quantized and any(e["format"] != "qdq" for e in quantized):
            model.opset_imports.setdefault("com.microsoft", 1)
        self.report = {"quantized": quantized, "skipped": skipped, "opset_raised_to": needed if upgraded else None,
                       "weights_quantized": len(quantized), "weights_skipped": len(skipped),
                       "bytes_before": sum(e["bytes_before"] for e in quantized),
                       "bytes_after": sum(e["bytes_after"] for e in quantized)}
        left, notes = self._left_float(model, uses)
        if left:
            self.report["left_float"] = left
        if notes:
            self.report["notes"] = notes
        if not uses and not skipped:
            self.report["warnings"] = [nothing_to_do(model, o.ops, "quantize")]
        elif not quantized and skipped:
            first = skipped[0]
            self.report["warnings"] = [f"nothing quantized ({len(skipped)} skipped); the first, "
                                       f"'{first.get('weight') or first.get('node')}': {first['reason']}"]
        if getattr(self, "sensitivity", None):
            self.report["sensitivity"] = self.sensitivity
        budget = getattr(self, "budget", None)
        if budget:
            self.report["max_error"] = budget
            if not budget["met"]:
                self.report["warnings"] = [f"max-error {budget['target']:g} not reached: the outputs' relative RMS "
                                           f"error is {budget['achieved']:g} with every weight at int8"]
        return ir.passes.PassResult(model, modified=bool(quantized) or upgraded)

    def _plan(self, model: ir.Model) -> dict[ir.Value, dict]:
        """What each eligible weight needs (opset), decided before any upgrade replaces the graph."""
        uses, _ = self._select(model)
        plan = {}
        for value, value_uses in uses.items():
            if self._eligible(value, value_uses) is not None:
                continue
            g = self._granularity(value_uses[0], tuple(value.const_value.shape))
            bits = 8 if (self.options.keep_sensitive or self.options.max_error) else self.options.bits
            fmt = self._format_for(value, value_uses, bits)
            plan[value] = {"opset": max(_required_opset(bits, g, fmt), _required_opset(self.options.bits, g, fmt))}
        return plan

    def _format_for(self, value: ir.Value, value_uses: list[_Use], bits: int | None = None) -> str:
        """qdq, or with format=matmulnbits onnxruntime's weight-only kernels: MatMulNBits for MatMul and Gemm
        weights, GatherBlockQuantized for 4-bit embeddings (a Gather of rows: only the rows looked up are
        dequantized, where DequantizeLinear -> Gather dequantized the whole table on every run)."""
        if self.options.format != "matmulnbits":
            return "qdq"
        t = value.const_value
        if ((bits or self.options.bits) == 4 and len(t.shape) == 2
                and t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                and all(u.node.op_type == "Gather" and u.index == 0 and u.node.attributes.get_int("axis", 0) == 0
                        for u in value_uses)):
            return "gatherblockquantized"
        if (all(u.index == 1 and (u.node.op_type == "MatMul" or _nbits_gemm(u.node)) for u in value_uses)
                and len(t.shape) == 2 and t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)):  # its types
            return "matmulnbits"
        return "qdq"

    def _quantize_one(self, value: ir.Value, value_uses: list[_Use], bits: int, keep: bool = False):
        o = self.options
        t = value.const_value
        fmt = self._format_for(value, value_uses, bits)
        nbits = fmt == "matmulnbits"
        g = (self._nbits_granularity() if nbits else Granularity(axis=1, block=o.block_size)
             if fmt == "gatherblockquantized" else self._granularity(value_uses[0], tuple(t.shape)))
        qt_name = ("int4" if o.symmetric else "uint4") if bits == 4 else ("int8" if o.symmetric else "uint8")

        def unmap():  # the float weight was copied: unmap it before the heavy part
            qir.release_weights(None, [t])

        nbits_rows = nbits and _transposed(value_uses[0].node)  # quantized as (K, N), MatMulNBits' groups
        qt = None
        if self._grams is not None and value in self._gptq_parts:
            qt = self._gptq(value, value_uses, g, nbits, qt_name, keep)
        if qt is None:
            qt = quantize_tensor(lambda: np.asarray(t.numpy(), dtype=np.float32).T if nbits_rows else
                                 np.asarray(t.numpy(), dtype=np.float32), qt_name, symmetric=o.symmetric,
                                 granularity=g, method="mse" if o.method == "gptq" else o.method, name=value.name,
                                 keep_dequantized=keep, on_copied=None if keep else unmap,
                                 scale_dtype="float16" if t.dtype == ir.DataType.FLOAT16 else o.scale_dtype)
        if not keep:
            unmap()
        elif nbits_rows:  # the reconstruction in the weight's own (N, K) layout, as the sensitivity runs swap it in
            qt.dequantized = np.ascontiguousarray(qt.dequantized.T)
        layout = None
        if not keep and nbits:
            layout = self._nbits_layout(qt, bits)  # here, on the worker thread, not on the graph-editing one
        return bits, g, qt, layout

    # ------------------------------------------------------------------ gptq
    def _gram_cache(self, model: ir.Model, todo) -> GramCache:
        """The input Grams of the weights GPTQ applies to; its session is built here, before the graph is edited."""
        data = self.context.data
        if data is None:
            raise UsageError("pass 'quantize-weights': method=gptq needs sample data; pass --data, or use method=mse")
        if self.options.samples:
            data = data.head(self.options.samples)
        wanted, self._gptq_skipped, self._gptq_parts, self._gptq_fit = {}, {}, {}, {}
        for value, value_uses in todo:
            parts = _gptq_inputs(value, value_uses)
            shape = tuple(value.const_value.shape)
            g = self._granularity(value_uses[0], shape)
            if isinstance(parts, str):
                pass
            elif value_uses[0].node.op_type in ("LSTM", "GRU") and shape[0] > 1 and g.block is None:
                parts = ("gptq takes a bidirectional layer's weights per block: a scale per channel or per tensor "
                         "would span both directions")
            elif len(parts) > 1 and g.axis is None:
                parts = "gptq takes a grouped Conv's weight per channel or block, not per tensor"
            elif (value_uses[0].node.op_type == "Einsum" and g.axis is not None and g.block is None
                  and len(shape) != parts[0][0][0].axes + 1):  # a channel spans several of the matrix's columns
                parts = "gptq takes an Einsum weight per channel only with one kept subscript"
            if isinstance(parts, str):
                self._gptq_skipped[value] = parts
                continue
            self._gptq_parts[value] = len(parts)
            wanted.update({(value, i): part for i, part in enumerate(parts)})
        return GramCache(model, data, wanted)

    def _gptq(self, value: ir.Value, value_uses: list[_Use], g: Granularity, nbits: bool, qt_name: str,
              keep: bool) -> QuantizedTensor | None:
        """GPTQ on the (K, N) view of the weight; the result in the layout quantize_tensor gives the caller, or None
        (with the reason noted) where the samples give no usable Gram."""
        o = self.options
        t = value.const_value
        stored_nk = _stored_nk(value_uses[0])  # Gemm transB, W @ x: the weight is stored (N, K)
        w = np.asarray(t.numpy(), dtype=np.float32)
        flip = stored_nk and not nbits  # MatMulNBits' groups are already given in (K, N)
        parts = self._gptq_parts[value]
        factors = []
        for i in range(parts):  # one Gram per group of a grouped Conv; one for any other weight
            hessian, rows = self._grams.get((value, i))
            if not np.isfinite(hessian).all():  # inf/NaN inputs on the samples (an attention mask's -inf, say)
                self._gptq_skipped[value] = "its inputs hold inf or NaN on the sample data"
                return None
            try:
                damp = o.damp or auto_damp(hessian.shape[0], rows)
                factors.append(inverse_cholesky(hessian, damp))
                self._gptq_fit[value] = {"rows": rows, "damp": round(damp, 6)}
            except np.linalg.LinAlgError as e:
                raise UsageError(f"pass 'quantize-weights': weight '{value.name}': {e}") from None
            del hessian  # K x K: not kept through the loop
        scale_dtype = "float16" if t.dtype == ir.DataType.FLOAT16 else o.scale_dtype
        # a Conv's or an Einsum's groups on its (K, N) matrix: blocks along K, channels as columns, or per tensor
        g_kn = Granularity() if g.axis is None else Granularity(axis=1) if g.block is None else Granularity(0, g.block)
        if value_uses[0].node.op_type == "Conv":  # (M, C, *kernel) as the (P * C, M) matrix of its patches
            # blocks along C (axis 1) are runs of C rows, one per kernel position, cut in blocks. A grouped Conv:
            # each group's output channels on their own Gram.
            per = w.shape[0] // parts
            pieces = [conv_from_kn(gptq_quantize(conv_kn(w[i * per : (i + 1) * per]), None, qt_name,
                                                 symmetric=o.symmetric, factor=factor, name=value.name,
                                                 granularity=g_kn, segment=w.shape[1] if g.block else None,
                                                 keep_dequantized=keep, scale_dtype=scale_dtype),
                                   (per, *w.shape[1:]), g) for i, factor in enumerate(factors)]
            return pieces[0] if parts == 1 else stack_output_channels(pieces, w)
        if value_uses[0].node.op_type in ("LSTM", "GRU"):  # direction d: x @ W[d].T, W[d] stored (N, K)
            g_dir = Granularity() if g.axis is None else Granularity(axis=g.axis - 1, block=g.block)
            pieces = [transposed(gptq_quantize(w[d].T, None, qt_name, symmetric=o.symmetric,
                                               factor=factors[d if parts > 1 else 0],
                                               granularity=transposed_groups(g_dir), name=value.name,
                                               keep_dequantized=keep, scale_dtype=scale_dtype))
                      for d in range(w.shape[0])]
            return stack_directions(pieces, w, g)
        factor = factors[0]
        if value_uses[0].node.op_type == "ConvTranspose":  # as the Conv computing it: (M, C, *kernel flipped)
            wc = conv_transpose_as_conv(w)
            g_conv = Granularity() if g.axis is None else Granularity(axis=0) if g.block is None else \
                Granularity(1, g.block)
            qt = gptq_quantize(conv_kn(wc), None, qt_name, symmetric=o.symmetric, factor=factor, name=value.name,
                               granularity=g_kn, segment=wc.shape[1] if g.block else None, keep_dequantized=keep,
                               scale_dtype=scale_dtype)
            return conv_transpose_from_conv(conv_from_kn(qt, wc.shape, g_conv), g)
        if value_uses[0].node.op_type == "Einsum":  # the weight as (K = its leading summed axes, N = the rest)
            summed = self._grams.wanted[(value, 0)][0][0].axes
            k = math.prod(w.shape[:summed])
            qt = gptq_quantize(w.reshape(k, -1), None, qt_name, symmetric=o.symmetric, factor=factor,
                               granularity=g_kn, segment=w.shape[summed - 1] if g.block else None, name=value.name,
                               keep_dequantized=keep, scale_dtype=scale_dtype)
            return reshaped(qt, w.shape, g)
        qt = gptq_quantize(w.T if stored_nk else w, None, qt_name, symmetric=o.symmetric, factor=factor,
                           granularity=transposed_groups(g) if flip else g, name=value.name, keep_dequantized=keep, scale_dtype=scale_dtype)
        return transposed(qt) if flip else qt

    def _method_for(self, value: ir.Value) -> dict:
        """The report's word on how a weight was rounded (gptq falls back to mse where it does not apply)."""
        if self.options.method != "gptq":
            return {"method": self.options.method}
        if value in self._gptq_skipped:
            return {"method": "mse", "method_reason": self._gptq_skipped[value]}
        return {"method": "gptq", "gptq": self._gptq_fit[value]}

    def _quantize_all(self, todo, bits_for) -> Iterator[tuple[int, Granularity, QuantizedTensor, list | None]]:
        """Quantize on two threads (numpy releases the GIL), yielding in order with at most two in flight; weights
        above 64 MiB go one at a time, so that two float copies of huge matrices are never resident together."""
        largest = max((v.const_value.nbytes for v, _ in todo), default=0)
        workers = 1 if largest > 64 << 20 else 2
        with ThreadPoolExecutor(max_workers=workers) as pool, serial_blas(self._grams is not None and workers > 1):
            pending = []
            for item in todo:
                pending.append(pool.submit(self._quantize_one, item[0], item[1], bits_for[item[0]]))
                if len(pending) >= workers:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    # ------------------------------------------------------------------ emitters
    def _scale_storage(self, qt: QuantizedTensor, fmt: str, opset: int) -> str:
        """The dtype the scales are stored in: a float16 weight's scales are float16 values, stored as float32 in
        DequantizeLinear before opset 19 (which brought float16 scales) unless float16 storage was asked for."""
        if fmt == "qdq" and opset < 19 and self.options.scale_dtype == "float32":
            return "float32"
        return qt.scale_dtype

    def _emit_qdq(self, value: ir.Value, qt: QuantizedTensor, g: Granularity, taken: set[str], opset: int) -> int:
        scale = qt.scale.astype(self._scale_storage(qt, "qdq", opset))
        dequantize_weight(value, qt.q, scale, qt.zero_point, taken, axis=g.axis, block=g.block, opset=opset)
        return _stored_bytes(qt.codes.size, qt.qtype.bits) + scale.nbytes + _stored_bytes(qt.zero_points.size,
                                                                                          qt.qtype.bits)

    def _nbits_granularity(self) -> Granularity:
        """A (K, N) MatMul weight's groups in MatMulNBits: blocks along K (``auto``, ``block``), whole columns
        (``channel``: one block of K rounded up to a power of two) or one scale repeated for every column
        (``tensor``)."""
        kind = self.options.granularity
        if kind == "tensor":
            return Granularity()
        if kind == "channel":
            return Granularity(axis=1)
        return Granularity(axis=0, block=self.options.block_size)

    def _nbits_layout(self, qt: QuantizedTensor, bits: int) -> list[tuple[str, np.ndarray]]:
        """MatMulNBits' initializers: B (N, blocks, packed block), scales (N*blocks) and zero points when asymmetric."""
        o = self.options
        k, n = qt.codes.shape
        g = qt.granularity
        bs = _nbits_block(g, k)
        nb = -(-k // bs)
        offset = (8 if bits == 4 else 128) if o.symmetric else 0  # MatMulNBits stores unsigned codes
        codes = qt.codes.T  # (n, k): contiguous when the codes were computed in this block layout
        if g.block is not None:
            zp, scale = qt.zero_points.T, qt.scale.T  # (n, nb)
        else:  # one group per column (channel) or one for all (tensor): a single block per column
            zp = np.broadcast_to(qt.zero_points.reshape(-1, 1), (n, 1))
            scale = np.broadcast_to(qt.scale.reshape(-1, 1), (n, 1))
        if offset:
            codes = (codes.astype(np.int16) + offset).astype(np.uint8)
            zp = (zp.astype(np.int16) + offset).astype(np.uint8)
        pad = nb * bs - k
        if pad:  # the partial last block is padded with its zero point (dequantizes to 0)
            codes = np.concatenate([codes, np.repeat(zp[:, -1:], pad, axis=1).astype(codes.dtype)], axis=1)
        blocks = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, nb, bs)
        packed = pack_uint4(blocks) if bits == 4 else blocks
        out = [("B", packed), ("scales", np.ascontiguousarray(scale).reshape(-1).astype(qt.scale_dtype))]
        if not o.symmetric:
            zpt = np.ascontiguousarray(zp, dtype=np.uint8)  # (n, nb)
            out.append(("zero_points", (pack_uint4(zpt) if bits == 4 else zpt).reshape(-1)))
        return out

    def _emit_nbits(self, value: ir.Value, value_uses: list[_Use], layout: list[tuple[str, np.ndarray]], bits: int,
                    block_size: int, taken: set[str]) -> int:
        o = self.options
        k, n = value.const_value.shape
        if _transposed(value_uses[0].node):  # Gemm's transB: the weight is (N, K), MatMulNBits' own order
            k, n = n, k
        graph = value.graph
        half = value.const_value.dtype == ir.DataType.FLOAT16  # the scales are of the activations' type
        vals = []
        for suffix, arr in layout:
            name = unique_name(f"{value.name}_{suffix}", taken)
            vals.append(float_scale(graph, name, arr, taken) if suffix == "scales" and not half
                        else initializer(graph, name, arr))
        for use in value_uses:
            node = use.node
            attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                     ir.AttrInt64("block_size", block_size)]
            if o.accuracy_level:
                attrs.append(ir.AttrInt64("accuracy_level", o.accuracy_level))
            inputs = [node.inputs[0], *vals]
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                inputs += [None] * (5 - len(inputs)) + [node.inputs[2]]  # the bias (after zero points, g_idx)
            _replace(node, ir.Node("com.microsoft", "MatMulNBits", inputs, attrs,
                                   name=unique_name(f"{node.name or value.name}_nbits", taken)))
        del graph.initializers[value.name]
        return sum(arr.nbytes for _, arr in layout)

    def _emit_gather(self, value: ir.Value, value_uses: list[_Use], qt: QuantizedTensor, g: Granularity,
                     taken: set[str]) -> int:
        """Each Gather of the (rows, features) table becomes com.microsoft.GatherBlockQuantized over the int4/uint4
        table, blocks along the features; its scales are of the output's type."""
        graph = value.graph
        half = value.const_value.dtype == ir.DataType.FLOAT16  # the scales are of the output's type
        scale = qt.scale.astype(qt.scale_dtype)
        data = initializer(graph, unique_name(f"{value.name}_quantized", taken), qt.q)
        name = unique_name(f"{value.name}_scale", taken)
        sv = initializer(graph, name, scale) if half else float_scale(graph, name, scale, taken)
        zv = initializer(graph, unique_name(f"{value.name}_zero_point", taken), qt.zero_point)
        for use in value_uses:
            node = use.node
            attrs = [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                     ir.AttrInt64("block_size", g.block), ir.AttrInt64("bits", 4)]
            _replace(node, ir.Node("com.microsoft", "GatherBlockQuantized", [data, node.inputs[1], sv, zv], attrs,
                                   name=unique_name(f"{node.name or value.name}_gbq", taken)))
        del graph.initializers[value.name]
        return _stored_bytes(qt.codes.size, 4) + scale.nbytes + _stored_bytes(qt.zero_points.size, 4)

    # ------------------------------------------------------------------ sensitivity
    def _bits_per_weight(self, model: ir.Model, todo) -> dict[ir.Value, int]:
        o = self.options
        bits = {value: o.bits for value, _ in todo}
        if o.bits != 4 or not (o.keep_sensitive or o.max_error):
            return bits
        data = self.context.data
        if data is None:
            raise UsageError("pass 'quantize-weights': keep-sensitive/max-error need sample data; pass --data")
        from qxc.passes._sensitivity import WeightSwapEvaluator

        ev = WeightSwapEvaluator(model, data, [value for value, _ in todo])
        fake4 = {value: self._quantize_one(value, uses, 4, keep=True)[2].dequantized for value, uses in todo}
        fake8 = {value: self._quantize_one(value, uses, 8, keep=True)[2].dequantized for value, uses in todo}
        scores = {value: ev.error({value: fake4[value]}) for value, _ in todo}
        order = sorted(scores, key=lambda v: (-scores[v], v.name))
        promoted = set(order[: o.keep_sensitive])
        if o.max_error:
            def error() -> float:
                return ev.error({v: (fake8[v] if v in promoted else fake4[v]) for v, _ in todo})

            achieved = error()
            for value in order:  # most sensitive first, until the outputs' error is within the budget
                if achieved <= o.max_error:
                    break
                promoted.add(value)
                achieved = error()
            self.budget = {"target": o.max_error, "achieved": round(achieved, 6), "met": achieved <= o.max_error}
        for v in promoted:
            bits[v] = 8
        self.sensitivity = {v.name: {"int4_error": round(s, 6), "bits": bits[v]} for v, s in scores.items()}
        return bits


def _gptq_inputs(value: ir.Value, value_uses: list[_Use]) -> list[tuple[list[Source], int]] | str:
    """Where the rows multiplying a weight come from, and their length K, when GPTQ applies (``x @ W`` in a MatMul
    or a Gemm without transA; a Conv, through its input's patches: one part per group of a grouped Conv, each with
    its own Gram); otherwise why not."""
    shape = tuple(value.const_value.shape)
    sources, groups = set(), 1
    for use in value_uses:
        node, attrs = use.node, use.node.attributes
        if node.op_type in ("LSTM", "GRU") and use.index in (1, 2) and len(value_uses) == 1:
            return _recurrent_inputs(node, use.index, shape)
        if node.op_type in ("Conv", "ConvTranspose") and use.index == 1:
            groups = attrs.get_int("group", 1)
            r = len(shape) - 2
            conv = (shape[2:], tuple(attrs.get_ints("pads", ())), attrs.get_string("auto_pad", "NOTSET"),
                    tuple(attrs.get_ints("strides", (1,) * r)), tuple(attrs.get_ints("dilations", (1,) * r)))
            if node.op_type == "Conv":
                sources.add(Source(node.inputs[0].name, conv))
                continue
            if groups > 1 or conv[2] not in ("", "NOTSET") or "output_shape" in attrs:
                return "gptq takes a ConvTranspose of one group with explicit pads (no auto_pad or output_shape)"
            sources.add(Source(node.inputs[0].name, (conv[0], conv[1] or (0,) * (2 * r), *conv[2:]),
                               output_padding=tuple(attrs.get_ints("output_padding", (0,) * r))))
        elif node.op_type == "Einsum":
            summed = _einsum_summed(node, use.index)
            if isinstance(summed, str):
                return summed
            sources.add(Source(node.inputs[1 - use.index].name, axes=summed))
        elif node.op_type == "MatMul" and use.index == 0 and len(shape) == 2:  # W @ x: rows of x's columns
            sources.add(Source(node.inputs[1].name, columns=True))
        elif use.index != 1 or node.op_type not in ("MatMul", "Gemm") or attrs.get_int("transA", 0):
            return (f"gptq needs x @ W (a MatMul, Gemm or Einsum weight) or a Conv's or ConvTranspose's, not "
                    f"{node.op_type} input {use.index}")
        elif len(shape) != 2:
            return f"gptq needs a 2-D weight, this MatMul's is rank {len(shape)}"
        else:
            sources.add(Source(node.inputs[0].name))
    ordered = sorted(sources, key=str)
    if value_uses[0].node.op_type == "Einsum":
        if len({s.axes for s in sources}) > 1:
            return "gptq takes an Einsum weight summed the same way in every use"
        return [(ordered, math.prod(shape[: ordered[0].axes]))]
    op = value_uses[0].node.op_type
    if op not in ("Conv", "ConvTranspose"):  # K: W's rows, or its columns when stored (N, K) (transB, W @ x)
        return [(ordered, shape[1] if _stored_nk(value_uses[0]) else shape[0])]
    if len({s.output_padding is None for s in sources}) > 1:
        return "gptq takes a weight read by a Conv or by a ConvTranspose, not both"
    if op == "ConvTranspose":  # (C, M, *kernel): K = C * P, as its equivalent Conv's
        return [(ordered, shape[0] * math.prod(shape[2:]))]
    if len(sources) > 1 and groups > 1:
        return "gptq takes a grouped Conv's weight in one Conv only"
    c = shape[1]  # input channels per group
    return [([Source(s.tensor, s.conv, (i * c, (i + 1) * c) if groups > 1 else None) for s in ordered],
             c * math.prod(shape[2:])) for i in range(groups)]


def _recurrent_inputs(node: ir.Node, index: int, shape: tuple[int, ...]) -> list[tuple[list[Source], int]] | str:
    """An LSTM's or a GRU's (directions, gates * hidden, K) weight: each direction d computes ``x_t @ W[d].T`` for W
    (input 1), over the rows of X, every step's, shared by the directions; and ``h_(t-1) @ R[d].T`` for R (input 2),
    over direction d's hidden states, read from the output Y (h_1..h_T: the last step stands in for the initial
    state, one row in T)."""
    if node.attributes.get_int("layout", 0):
        return f"gptq reads the rows in onnxruntime, which runs {node.op_type}s of layout 0 only (this one is batch first)"
    if index == 1:
        return [([Source(node.inputs[0].name)], shape[2])]
    y = node.outputs[0] if node.outputs else None
    if y is None or not y.name:
        return (f"gptq reads the rows of {node.op_type}'s R from its output Y (the hidden states), which this node "
                "does not give")
    if node.op_type == "GRU" and not node.attributes.get_int("linear_before_reset", 0):
        return "gptq takes a GRU's R with linear_before_reset=1 only (else its new gate's rows multiply r * h)"
    return [([Source(y.name, select=(1, d))], shape[2]) for d in range(shape[0])]  # Y: (T, D, batch, H)


def _weight_inputs(node: ir.Node, index: int) -> list[int]:
    """The inputs of ``node`` holding its weights: ``index``, and an LSTM's or a GRU's recurrence weight R."""
    indices = [index] + ([2] if node.op_type in ("LSTM", "GRU") else [])
    return [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def _stored_nk(use: _Use) -> bool:
    """Whether the weight is stored (N, K): a Gemm's with transB, a MatMul's applied from the left (``W @ x``)."""
    return _transposed(use.node) or (use.node.op_type == "MatMul" and use.index == 0)


def _einsum_summed(node: ir.Node, index: int) -> int | str:
    """How many leading axes of an Einsum's weight (input ``index``) are summed, when GPTQ can read it as the (K, N)
    matrix ``W.reshape(K, -1)`` of the other input's rows: its summed subscripts come first in the weight and last
    in the activation, in the same order (``abc,cde->abde``, ``abcd,cde->abe``); otherwise why not."""
    terms, output = einsum_terms(node)
    weight, act = terms[index], terms[1 - index]
    summed = "".join(c for c in weight if c not in output)
    if not (weight.startswith(summed) and act.endswith(summed)):
        return (f"gptq takes an Einsum whose weight's summed subscripts come first and end the activation's, not "
                f"'{node.attributes.get_string('equation')}'")
    return len(summed)


def _replace(node: ir.Node, new: ir.Node) -> None:
    """Put ``new`` in ``node``'s place: its output takes the old output's name, type, shape and every use."""
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1


def _nbits_gemm(node: ir.Node) -> bool:
    """A Gemm that is a MatMul plus a bias (PyTorch's Linear): alpha 1, A not transposed, C absent or a constant
    [N] vector added as it is (beta 1); MatMulNBits computes it, the bias as its input."""
    attrs = node.attributes
    if node.op_type != "Gemm" or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_int("transA", 0) != 0:
        return False
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return True
    w = node.inputs[1].const_value
    n = w.shape[0 if _transposed(node) else 1] if w is not None and len(w.shape) == 2 else None
    return (attrs.get_float("beta", 1.0) == 1.0 and is_weight(c) and len(c.const_value.shape) == 1
            and c.const_value.shape[0] == n)


def _nbits_block(g: Granularity, k: int) -> int:
    """MatMulNBits' block_size for groups ``g`` of a (K, N) weight: the block, or K rounded up to a power of two
    (at least 16) when each column is one group; the padding codes are the zero point and dequantize to 0."""
    return g.block if g.block is not None else max(16, 1 << (k - 1).bit_length())


def _stored_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8

