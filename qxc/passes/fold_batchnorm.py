"""``fold-batchnorm``: fold inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

PyTorch exports ``Conv -> BatchNormalization`` in eval mode. onnxruntime fuses the pair when it loads a float model,
but not once QDQ sits between them (insert-qdq): the BatchNormalization then runs in float between
DequantizeLinear and QuantizeLinear, the Relu after it no longer folds into the Conv's range, and two extra rounding
steps cost accuracy. Folding first, as onnxruntime's ``quant_pre_process`` does, removes it. Weight-only
quantization and pruning then also see the weights the model really applies. With ``s = gamma / sqrt(var + eps)``
per output channel, ``W' = W * s`` and ``b' = (b - mean) * s + beta``, computed in float64 and stored in the weight's
dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qxc.graphs import all_graphs, initializer, is_weight, unique_name, value_names
from qxc.pipeline import QxcPass, register_pass


def _private(v: ir.Value) -> bool:
    return len(list(v.uses())) == 1 and not v.is_graph_output()


def _why_not(bn: ir.Node) -> tuple[ir.Node | None, str]:
    """The layer ``bn`` folds into, or None and the reason it cannot."""
    if bn.attributes.get_int("training_mode", 0):
        return None, "training_mode=1"
    if any(o is not None and list(o.uses()) or (o is not None and o.is_graph_output()) for o in bn.outputs[1:]):
        return None, "its running statistics outputs are used"
    if len(bn.inputs) < 5 or not all(is_weight(p) for p in bn.inputs[1:5]):
        return None, "its scale, bias, mean and variance are not all constants"
    x = bn.inputs[0]
    layer = x.producer() if x is not None else None
    if layer is None or layer.graph is not bn.graph or layer.domain not in ("", "ai.onnx"):
        return None, "its input is not made by a Conv, ConvTranspose or Gemm in the same graph"
    if layer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return None, f"its input comes from {layer.op_type} '{layer.name}'"
    if not _private(x):
        return None, f"'{x.name}' is also read elsewhere"
    w = layer.inputs[1] if len(layer.inputs) > 1 else None
    if w is None or not is_weight(w) or not _private(w):
        return None, f"'{layer.name}' has no private constant weight"
    bias = layer.inputs[2] if len(layer.inputs) > 2 else None
    if bias is not None and (not is_weight(bias) or not _private(bias)):
        return None, f"'{layer.name}' has no private constant bias"
    if layer.op_type == "ConvTranspose" and layer.attributes.get_int("group", 1) != 1:
        return None, f"'{layer.name}' is a grouped transposed convolution"
    if layer.op_type == "Gemm" and (layer.attributes.get_float("alpha", 1.0) != 1.0 or layer.attributes.get_float("beta", 1.0) != 1.0):
        return None, f"Gemm '{layer.name}' scales by alpha/beta"
    channels = bn.inputs[1].const_value.size
    axis = _out_axis(layer)
    if w.const_value.shape[axis] != channels:
        return None, f"'{layer.name}' has {w.const_value.shape[axis]} output channels, the BatchNormalization {channels}"
    if bias is not None and bias.const_value.size not in (1, channels):
        return None, f"the bias of '{layer.name}' is not per channel"
    return layer, ""


def _out_axis(layer: ir.Node) -> int:
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    return 0 if layer.attributes.get_int("transB", 0) else 1  # Gemm


@register_pass("fold-batchnorm")
class FoldBatchnormPass(QxcPass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm before it (new weights and bias)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded, kept = [], []
        taken = value_names(model)
        for graph in all_graphs(model):
            for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
                layer, why = _why_not(bn)
                if layer is None:
                    kept.append({"node": bn.name, "reason": why})
                    continue
                self._fold(graph, bn, layer, taken)
                folded.append({"node": bn.name, "into": layer.name})
        self.report = {"folded": folded, "kept": kept}
        return ir.passes.PassResult(model, modified=bool(folded))

    @staticmethod
    def _fold(graph: ir.Graph, bn: ir.Node, layer: ir.Node, taken: set[str]) -> None:
        gamma, beta, mean, var = (p.const_value.numpy().astype(np.float64).reshape(-1) for p in bn.inputs[1:5])
        s = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
        w = layer.inputs[1]
        wa = w.const_value.numpy()
        axis = _out_axis(layer)
        shape = [1] * wa.ndim
        shape[axis] = len(s)
        w.const_value = ir.tensor((wa.astype(np.float64) * s.reshape(shape)).astype(wa.dtype), name=w.name)
        bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        b = np.zeros(len(s)) if bias is None else np.broadcast_to(
            bias.const_value.numpy().astype(np.float64).reshape(-1), (len(s),))
        new_b = ((b - mean) * s + beta).astype(wa.dtype)
        if bias is None:
            bias = initializer(graph, unique_name(f"{layer.name or w.name}_bias", taken), new_b)
            if len(layer.inputs) < 3:
                layer.resize_inputs(3)
            layer.replace_input_with(2, bias)
        else:
            bias.const_value = ir.tensor(new_b, name=bias.name)
            bias.shape = ir.Shape(new_b.shape)
        x, y = layer.outputs[0], bn.outputs[0]
        name, dtype, shape_y = y.name, y.type, y.shape
        output = y.is_graph_output()
        params = list(bn.inputs[1:5])
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        for p in params:  # now unused (they were constants that only this node read, or shared ones still read)
            if not list(p.uses()) and p.name in graph.initializers and not p.is_graph_input():
                graph.initializers.pop(p.name)
        # the layer's output now holds what the BatchNormalization made, under its name (per-layer comparisons
        # match tensors by name: the old name would pair the folded output with the unnormalized one)
        x.name = name
        if output:  # the graph output keeps its declared signature
            x.type = dtype if dtype is not None else x.type
            x.shape = shape_y if shape_y is not None else x.shape
