"""Property tests: random small MLP/CNN graphs, with and without If, through every pass and the main recipes."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import ROOT, mlp_model, run, wrap_in_if
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir
from qxc.pipeline import registered_passes

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlps(draw):
    sizes = draw(st.lists(st.integers(4, 24), min_size=2, max_size=4))
    act = draw(st.sampled_from(["Relu", "Sigmoid", None]))
    seed = draw(st.integers(0, 2**16))
    m = mlp_model(tuple(sizes), seed=seed, act=act)
    if draw(st.booleans()):
        m = wrap_in_if(m)
    return m, {"x": np.random.default_rng(seed + 1).normal(size=(32, sizes[0])).astype(np.float32)}


@st.composite
def cnns(draw):
    c1, c2 = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (c2, c1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(0, 0.1, c2).astype(np.float32), "cb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (5, c2 * 16)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["img", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [None, c1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if draw(st.booleans()):
        m = wrap_in_if(m)
    return m, {"img": rng.normal(size=(16, c1, 8, 8)).astype(np.float32)}


PIPELINES = [
    "cleanup", "fold-constants", "quantize-weights{method=rtn}", "quantize-weights{bits=4,method=mse}",
    "quantize-weights{bits=4,format=matmulnbits,symmetric=false}", "insert-qdq", "insert-qdq{method=entropy}",
    "prune-magnitude{sparsity=0.6}", "prune-nm", "prune-channels{sparsity=0.5}",
    str(ROOT / "passes/int8-qdq.toml"), str(ROOT / "passes/prune50-int8.toml"), str(ROOT / "passes/int4-weights.toml"),
]


def _check(proto: onnx.ModelProto, feeds: dict, pipeline: str) -> None:
    ref = run(proto, feeds)
    result = compile_model(qir.from_proto(proto), pipeline, data=feeds, verify_runtime=True)
    out = qir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    got = run(out, feeds)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert all(np.all(np.isfinite(g)) for g in got)
    names = [s.name for s in result.records]
    if all(registered_passes()[n].exact for n in names):
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)
    for rec in result.records:
        if rec.name == "prune-magnitude":  # sparsity exact: per layer, or in total when allocated
            layers, target = rec.report["layers"], rec.report["target"]
            if "sensitivity" in rec.report:
                total = sum(x["elements"] for x in layers)
                assert sum(x["zeros"] for x in layers) >= round(target * total)
            else:
                for layer in layers:
                    assert layer["zeros"] >= round(target * layer["elements"])
        if rec.name == "quantize-weights" and "rtn" in pipeline:
            _check_quantization_bound(proto, result.model)


def _check_quantization_bound(original: onnx.ModelProto, model) -> None:
    """Every reconstructed weight lies within half a quantization step of the original (RTN, no clipping)."""
    weights = {t.name: numpy_helper.to_array(t) for g in [original.graph, *_subgraphs(original.graph)]
               for t in g.initializer}
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "DequantizeLinear" or not node.outputs[0].name.endswith("_dequantized"):
            continue
        base = node.outputs[0].name[: -len("_dequantized")]
        if base not in weights:
            continue
        q = node.inputs[0].const_value.numpy().astype(np.float64)
        s = node.inputs[1].const_value.numpy().astype(np.float64)
        z = node.inputs[2].const_value.numpy().astype(np.float64)
        axis = node.attributes["axis"].value if "axis" in node.attributes else None
        w = weights[base].astype(np.float64)
        if axis is None or s.ndim == 0:
            deq, step = (q - z) * s, np.full(w.shape, float(s))
        else:
            shape = [1] * w.ndim
            shape[axis] = -1
            deq, step = (q - z.reshape(shape)) * s.reshape(shape), np.broadcast_to(s.reshape(shape), w.shape)
        assert np.all(np.abs(w - deq) <= step / 2 + 1e-6 * np.abs(w).max()), base


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)


@SETTINGS
@given(mlps(), st.sampled_from(PIPELINES))
def test_random_mlps_through_every_pipeline(case, pipeline):
    _check(*case, pipeline)


@SETTINGS
@given(cnns(), st.sampled_from(PIPELINES))
def test_random_cnns_through_every_pipeline(case, pipeline):
    _check(*case, pipeline)
