"""quantize-weights: numerics checked through onnxruntime, layouts, selection and its report, subgraphs, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import MODELS, REFERENCE, as_half, embedding_lm, feeds_for, left_weight_model, mlp_model, run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir
from qxc.errors import ModelError, UsageError
from qxc.quant import Granularity, quantize_tensor


def _accuracy(model, data) -> float:
    with np.load(data) as z:
        x, y = z["X"], z["labels"]
    return float((run(model, {"X": x})[0] == y).mean())


def test_digits_int8_keeps_accuracy_and_shrinks_weights():
    path, data = REFERENCE["digits_mlp"]
    result = compile_model(path, "quantize-weights", verify_runtime=True)
    report = result.records[0].report
    assert report["weights_quantized"] == 3 and report["bytes_after"] < 0.27 * report["bytes_before"]
    assert result.stats_after["ops"]["DequantizeLinear"] == 3
    drop = _accuracy(path, data) - _accuracy(qir.to_proto(result.model), data)
    assert drop <= 0.003
    assert all(e["sqnr_db"] > 40 for e in report["quantized"])


def _fake_quant_outputs(path, feeds, bits, symmetric, block, granularity=None):
    """Reference: the float model with every MatMul weight replaced by our dequantized reconstruction."""
    m = onnx.load(path)
    weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    for t in m.graph.initializer:
        if t.name in weights:
            w = numpy_helper.to_array(t)
            qt = quantize_tensor(w, ("int4" if symmetric else "uint4") if bits == 4 else ("int8" if symmetric else "uint8"),
                                 symmetric=symmetric, granularity=granularity or Granularity(axis=0, block=block))
            t.CopyFrom(numpy_helper.from_array(qt.dequantized, t.name))
    return run(m, feeds)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["block", "channel", "tensor"])
def test_matmulnbits_layout_computes_our_reconstruction(tmp_path, bits, symmetric, granularity):
    """Blocks of 32, whole columns (one block of K rounded up to 64) or one scale for every column: MatMulNBits
    computes with exactly our reconstruction, and the report says which groups were used."""
    proto = mlp_model(sizes=(40, 24, 8), seed=3)  # K=40: a partial block of 8 after one of 32
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
    spec = (f"quantize-weights{{format=matmulnbits,bits={bits},symmetric={str(symmetric).lower()},method=rtn,"
            f"granularity={granularity}}}")
    result = compile_model(path, spec, verify_runtime=True)
    assert result.stats_after["ops"]["com.microsoft::MatMulNBits"] == 2
    g = {"block": Granularity(axis=0, block=32), "channel": Granularity(axis=1), "tensor": Granularity()}[granularity]
    # the second weight's K of 24 is one block of 24 per column: the report names the groups as they are
    assert [e["granularity"] for e in result.records[0].report["quantized"]] == (
        ["block32", "block24"] if granularity == "block" else [granularity] * 2)
    got = run(qir.to_proto(result.model), {"x": x})[0]
    want = _fake_quant_outputs(path, {"x": x}, bits, symmetric, 32, g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _gemm_model(trans_b: int, bias: bool, alpha: float = 1.0) -> onnx.ModelProto:
    """PyTorch's Linear (Gemm, transB=1, a bias) or its transB=0 twin: 48 -> 40 features."""
    rng = np.random.default_rng(9)
    w = rng.normal(0, 0.2, (40, 48) if trans_b else (48, 40)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + (
        [numpy_helper.from_array(rng.normal(0, 0.1, 40).astype(np.float32), "b")] if bias else [])
    node = helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"], transB=trans_b, alpha=alpha,
                            name="linear")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, True), (1, False)])
def test_gemm_weights_become_matmulnbits_with_the_bias_as_its_input(bits, symmetric, trans_b, bias):
    """PyTorch exports Linear as Gemm (transB=1: the weight is (N, K), MatMulNBits' own order). Left as
    DequantizeLinear -> Gemm, onnxruntime dequantized the int4 weight on every run (12x slower than float at batch
    1); as MatMulNBits with the bias as its input, it computes exactly our reconstruction of the same blocks along K.
    A Gemm that is more than a MatMul plus a bias (alpha 0.5) stays QDQ."""
    proto = _gemm_model(trans_b, bias)
    spec = f"quantize-weights{{format=matmulnbits,bits={bits},symmetric={str(symmetric).lower()},method=rtn}}"
    result = compile_model(qir.from_proto(proto), spec, verify_runtime=True)
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    entry = result.records[0].report["quantized"][0]
    assert (entry["format"], entry["op"], entry["granularity"]) == ("matmulnbits", "Gemm", "block32")
    ref = _gemm_model(trans_b, bias)
    w = ref.graph.initializer[0]
    qt = quantize_tensor(numpy_helper.to_array(w), ("int4" if symmetric else "uint4") if bits == 4 else "uint8",
                         symmetric=symmetric, granularity=Granularity(axis=1 if trans_b else 0, block=32))
    w.CopyFrom(numpy_helper.from_array(qt.dequantized, "w"))
    x = np.random.default_rng(2).normal(size=(5, 48)).astype(np.float32)
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"x": x})[0], run(ref, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
    scaled = compile_model(qir.from_proto(_gemm_model(trans_b, bias, alpha=0.5)), spec)
    assert [n.op_type for n in scaled.model.graph] == ["DequantizeLinear", "Gemm"]
    if bits == 4:  # the statistics count the packed weight's values (and zero points'), not its bytes
        packed = result.stats_after["parameters_by_dtype"].get("uint4", 0)
        assert packed == 48 * 40 + (0 if symmetric else 40 * 2)


def test_sensitivity_of_a_transposed_gemm_weight_is_measured_in_its_own_layout(tmp_path):
    """keep-sensitive swaps each weight's int4 reconstruction into the model: a transB=1 Gemm's, quantized as
    MatMulNBits' (K, N), goes back in as (N, K) (it failed in onnxruntime), and scores what QDQ's same blocks do."""
    onnx.save(_gemm_model(1, True), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).normal(size=(64, 48)).astype(np.float32))
    errors = {}
    for fmt in ("matmulnbits", "qdq"):
        result = compile_model(tmp_path / "m.onnx", f"quantize-weights{{bits=4,format={fmt},keep-sensitive=1}}",
                               data=tmp_path / "d.npz", verify_runtime=True)
        report = result.records[0].report
        assert [(e["format"], e["bits"]) for e in report["quantized"]] == [(fmt, 8)]
        errors[fmt] = report["sensitivity"]["w"]["int4_error"]
    assert errors["matmulnbits"] == pytest.approx(errors["qdq"], rel=1e-6)


def test_the_report_names_a_transposed_weights_blocks_along_k():
    """The CNN's classifier is Gemm(transB=1) with a (10, 64) weight: blocks of 32 along its 64 columns."""
    result = compile_model(MODELS / "cnn_digits.onnx", "quantize-weights{format=matmulnbits,bits=4}")
    entry = {e["weight"]: e for e in result.records[0].report["quantized"]}["fc.w"]
    assert (entry["format"], entry["shape"], entry["granularity"]) == ("matmulnbits", [10, 64], "block32")


def test_qdq_int4_blocked_matches_fake_quant_and_raises_opset(tmp_path):
    proto = mlp_model(sizes=(64, 32, 8), seed=1, opset=17)
    onnx.save(proto, tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", "quantize-weights{bits=4,method=rtn}")
    assert result.model.opset_imports[""] == 21 and result.records[0].report["opset_raised_to"] == 21
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    # without graph optimizations: onnxruntime otherwise fuses DQ(int4)->MatMul into MatMulNBits with its default
    # accuracy level 4, which quantizes the activations to int8 as well (faster, ~1 % off)
    got = run(qir.to_proto(result.model), {"x": x}, optimization=False)[0]
    want = _fake_quant_outputs(tmp_path / "m.onnx", {"x": x}, 4, True, 32)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gemm_transb_and_conv_use_output_channel_axes():
    result = compile_model(MODELS / "cnn_digits.onnx", "quantize-weights")
    dq_axes = {}
    for node in result.model.graph:
        if node.op_type == "DequantizeLinear":
            consumer = next(iter(node.outputs[0].uses())).node
            dq_axes[consumer.op_type] = node.attributes["axis"].value
            scale = node.inputs[1].const_value.numpy()
            out_channels = node.inputs[0].const_value.shape[node.attributes["axis"].value]
            assert scale.shape == (out_channels,)
    assert dq_axes == {"Conv": 0, "Gemm": 0}  # Gemm has transB=1: B is [N, K]
    feeds = feeds_for(*REFERENCE["cnn_digits"])
    assert sqnr_db(run(MODELS / "cnn_digits.onnx", feeds)[0], run(qir.to_proto(result.model), feeds)[0]) > 30


def _conv_stack() -> onnx.ModelProto:
    """An RGB stem (3 input channels), a depthwise Conv (1 per group) and a Conv of 16 input channels."""
    rng = np.random.default_rng(4)
    shapes = {"w_stem": (16, 3, 3, 3), "w_dw": (16, 1, 3, 3), "w_mix": (8, 16, 3, 3)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["a"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w_dw"], ["b"], pads=[1, 1, 1, 1], group=16, name="dw"),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w_mix"], ["y"], name="mix")]
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_int4_blocks_on_short_conv_axes_become_channels(tmp_path):
    """Blocks of 32 along 3 or 1 input channels would be groups of 3 or 1 weights (a scale and zero point per
    weight in the depthwise Conv: more bytes than float16). A channel holding no more than a block's weights is one
    group instead; a longer channel keeps blocks, as long as its axis allows, and the report says how long."""
    proto = _conv_stack()
    onnx.save(proto, tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", "quantize-weights{bits=4,method=rtn,symmetric=false}")
    report = {e["weight"]: e for e in result.records[0].report["quantized"]}
    assert {w: e["granularity"] for w, e in report.items()} == {"w_stem": "channel", "w_dw": "channel",
                                                               "w_mix": "block16"}
    assert all(e["bytes_after"] < 0.3 * e["bytes_before"] for w, e in report.items() if w != "w_mix")
    # onnxruntime computes with exactly these groups' reconstruction
    ref = onnx.load(tmp_path / "m.onnx")
    groups = {"w_stem": Granularity(axis=0), "w_dw": Granularity(axis=0), "w_mix": Granularity(axis=1, block=32)}
    for t in ref.graph.initializer:
        qt = quantize_tensor(numpy_helper.to_array(t), "uint4", symmetric=False, granularity=groups[t.name])
        t.CopyFrom(numpy_helper.from_array(qt.dequantized, t.name))
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"x": x}, optimization=False)[0], run(ref, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_applied_from_the_left_are_quantized_along_their_rows(tmp_path, bits):
    """``W @ x``: W's rows are the output channels and its columns the reduction (blocks run along them);
    MatMulNBits, whose weight is the second input, is not used for it. onnxruntime computes exactly the
    reconstruction of those groups."""
    onnx.save(left_weight_model(), tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", f"quantize-weights{{bits={bits},method=rtn,format=matmulnbits}}",
                           verify_runtime=True)
    report = {e["weight"]: e for e in result.records[0].report["quantized"]}
    assert set(report) == {"w1", "w2"} and all(e["format"] == "qdq" for e in report.values())
    # int4: blocks of 32 along W1's 64 columns; W2's rows hold 24 weights, one group each
    groups = ({"w1": Granularity(axis=1, block=32), "w2": Granularity(axis=0)} if bits == 4 else
              {"w1": Granularity(axis=0), "w2": Granularity(axis=0)})
    assert {w: e["granularity"] for w, e in report.items()} == (
        {"w1": "block32", "w2": "channel"} if bits == 4 else {"w1": "channel", "w2": "channel"})
    axes = {n.inputs[0].name: n.attributes.get_int("axis", 1) for n in result.model.graph
            if n.op_type == "DequantizeLinear"}
    assert axes == {"w1_quantized": 1 if bits == 4 else 0, "w2_quantized": 0}
    ref = left_weight_model()
    for t in ref.graph.initializer:
        g = groups[t.name]
        qt = quantize_tensor(numpy_helper.to_array(t), "int4" if bits == 4 else "int8", symmetric=True, granularity=g)
        t.CopyFrom(numpy_helper.from_array(qt.dequantized, t.name))
    x = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"x": x}, optimization=False)[0],
                               run(ref, {"x": x})[0], rtol=1e-4, atol=1e-5)


def _einsum_attention_projections() -> onnx.ModelProto:
    """Keras' EinsumDense as tf2onnx exports a MultiHeadAttention's projections: ``abc,cde->abde`` into 4 heads of
    8, ``abcd,cde->abe`` back to 64 features; and an Einsum of two activations (the scores)."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (64, 4, 8)).astype(np.float32), "wq"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4, 8, 64)).astype(np.float32), "wo")]
    nodes = [helper.make_node("Einsum", ["x", "wq"], ["q"], equation="abc,cde->abde", name="query"),
             helper.make_node("Einsum", ["q", "q"], ["s"], equation="abcd,aecd->acbe", name="scores"),
             helper.make_node("Relu", ["q"], ["qr"]),
             helper.make_node("Einsum", ["qr", "wo"], ["y"], equation="abcd,cde->abe", name="output")]
    g = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5, 64]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 4, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_einsum_dense_weights_are_quantized(tmp_path, bits):
    """The weight's last subscript kept in the output is its channel axis (e, in both projections), its last
    summed subscript the block axis (c of the query's; the output's d holds 8, and its channels 4 x 8 weights: one
    group each); the scores' Einsum has no weight."""
    onnx.save(_einsum_attention_projections(), tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", f"quantize-weights{{bits={bits},method=rtn}}", verify_runtime=True)
    report = result.records[0].report
    assert {e["weight"]: e["granularity"] for e in report["quantized"]} == (
        {"wq": "block32", "wo": "channel"} if bits == 4 else {"wq": "channel", "wo": "channel"})
    assert report["skipped"] == []
    groups = ({"wq": Granularity(axis=0, block=32), "wo": Granularity(axis=2)} if bits == 4 else
              {"wq": Granularity(axis=2), "wo": Granularity(axis=2)})
    ref = _einsum_attention_projections()
    for t in ref.graph.initializer:
        qt = quantize_tensor(numpy_helper.to_array(t), "int4" if bits == 4 else "int8", symmetric=True,
                             granularity=groups[t.name])
        t.CopyFrom(numpy_helper.from_array(qt.dequantized, t.name))
    x = np.random.default_rng(1).normal(size=(3, 5, 64)).astype(np.float32)
    got = run(qir.to_proto(result.model), {"x": x}, optimization=False)
    np.testing.assert_allclose(got[0], run(ref, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert sqnr_db(run(_einsum_attention_projections(), {"x": x})[0], got[0]) > (15 if bits == 4 else 35)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_reads_einsum_dense_weights_as_matrices_of_their_summed_axes(bits):
    """The query's (64, 4, 8) weight is a 64 x 32 matrix of the rows of x; the output projection's (4, 8, 64) a
    32 x 64 matrix of the rows of qr's last two axes (heads x head size; blocks of its 8-long d restart at each
    head). onnxruntime runs the codes, closer to float than mse's on held-out rows."""
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(6, 64))

    def rows(n):
        return (np.maximum(rng.normal(size=(n, 5, 6)) @ mix, 0) + 0.05 * rng.normal(size=(n, 5, 64))).astype(
            np.float32)

    x, held_out = rows(200), rows(100)
    ref = run(_einsum_attention_projections(), {"x": held_out})[0]
    got, fits = {}, {}
    for method in ("gptq", "mse"):
        result = compile_model(qir.from_proto(_einsum_attention_projections()),
                               f"quantize-weights{{bits={bits},method={method}}}", data={"x": x}, verify_runtime=True)
        fits[method] = {e["weight"]: (e["method"], e["granularity"], e.get("method_reason"))
                        for e in result.records[0].report["quantized"]}
        got[method] = sqnr_db(ref, run(qir.to_proto(result.model), {"x": held_out})[0])
    # per channel, the query's channels (e) span 4 of its 32 columns (d x e): it stays mse, and says so
    assert fits["gptq"] == {"wo": ("gptq", "channel", None), "wq": ("gptq", "block32", None) if bits == 4 else (
        "mse", "channel", "gptq takes an Einsum weight per channel only with one kept subscript")}
    assert got["gptq"] > got["mse"] + 1.0


@pytest.mark.parametrize("equation", ["bi,ij", "ij,bi"])
def test_an_einsum_with_an_implicit_output_reads_its_weight_as_numpy_does(equation):
    """Without '->' the output is the subscripts that appear once, in alphabetical order (bj): the weight's i is
    summed (its blocks) and its j kept."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32), "w")
    node = helper.make_node("Einsum", ["x", "w"] if equation.startswith("b") else ["w", "x"], ["y"],
                            equation=equation, name="dense")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], [w])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(qir.from_proto(proto), "quantize-weights{bits=4,method=rtn}", verify_runtime=True)
    assert [(e["weight"], e["granularity"]) for e in result.records[0].report["quantized"]] == [("w", "block32")]
    dq = next(n for n in result.model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes.get_int("axis") == 0 and dq.attributes.get_int("block_size") == 32


def test_an_einsum_weight_of_another_form_is_reported():
    w = numpy_helper.from_array(np.ones((64, 64, 4), np.float32), "wq")
    node = helper.make_node("Einsum", ["x", "wq"], ["y"], equation="abc,cce->abe", name="query")  # W's diagonal
    g = helper.make_graph([node], "diag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5, 4])], [w])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(qir.from_proto(proto), "quantize-weights{ops=[Einsum]}")
    assert result.records[0].report["skipped"] == [
        {"node": "query", "reason": "Einsum 'abc,cce->abe': not an activation times a weight with subscripts both "
                                    "kept and summed"}]


def _shared_model(extra_use: bool):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])]
    if extra_use:
        nodes.append(helper.make_node("Add", ["x", "w"], ["z"], name="add"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [8, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])], outputs, [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return qir.from_proto(m)


def test_shared_weight_is_quantized_once():
    result = compile_model(_shared_model(False), "quantize-weights")
    report = result.records[0].report
    assert result.stats_after["ops"]["DequantizeLinear"] == 1
    assert report["quantized"][0]["nodes"] == ["mm1", "mm2"]


def test_weight_shared_with_an_unselected_node_is_skipped_with_the_reason():
    result = compile_model(_shared_model(True), "quantize-weights")
    assert not result.modified
    assert result.records[0].report["skipped"] == [
        {"weight": "w", "nodes": ["mm1", "mm2"], "reason": "shared with unselected node 'add' (Add)"}]


def test_selectors_are_checked_and_reported():
    path = MODELS / "fixtures" / "ffn_small.onnx"
    result = compile_model(path, "quantize-weights{exclude=[fc2$],include=[layer0]}")
    report = result.records[0].report
    assert sorted(e["nodes"][0] for e in report["quantized"]) == ["layer0.fc1"]
    assert report["skipped"] == [{"node": "layer0.fc2", "reason": "excluded by 'fc2$'"}]
    with pytest.raises(UsageError, match="pattern 'layer9' matched no MatMul"):
        compile_model(path, "quantize-weights{include=[layer9]}")


def test_constant_node_weights_need_fold_constants_and_then_quantize_inside_if_branches():
    path, data = REFERENCE["if_constants"]
    result = compile_model(path, "quantize-weights")
    assert not result.modified
    assert {s["reason"] for s in result.records[0].report["skipped"]} == {
        "weight is a Constant node: run fold-constants first"}
    result = compile_model(path, "fold-constants,quantize-weights{min-elements=16}")
    report = result.records[1].report
    assert sorted(e["weight"] for e in report["quantized"]) == ["else.w1", "else.w2", "then.w1", "then.w2"]
    branch_ops = [n.op_type for g in result.model.graph.subgraphs() for n in g]
    assert branch_ops.count("DequantizeLinear") == 4
    feeds = feeds_for(path, data)
    assert sqnr_db(run(path, feeds)[0], run(qir.to_proto(result.model), feeds)[0]) > 35


def test_already_quantized_models_are_left_alone():
    result = compile_model(MODELS / "digits_mlp.onnx", "quantize-weights")
    again = compile_model(result.model, "quantize-weights")
    assert not again.modified
    assert {s["reason"] for s in again.records[0].report["skipped"]} == {
        "already quantized (produced by DequantizeLinear)"}
    nbits = compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{format=matmulnbits,bits=4}")
    assert not compile_model(nbits.model, "quantize-weights{format=matmulnbits,bits=4}").modified


def test_int4_beyond_the_runtime_opset_is_refused():
    with pytest.raises(UsageError, match="int4 QDQ weights need opset 21 but max-opset=17; use format=matmulnbits"):
        compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{bits=4,max-opset=17}")
    ok = compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{bits=4,max-opset=17,format=matmulnbits}")
    assert ok.model.opset_imports[""] == 17


def test_nan_weights_fail_naming_the_tensor():
    m = mlp_model()
    arr = numpy_helper.to_array(m.graph.initializer[0]).copy()
    arr[0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, "w0"))
    with pytest.raises(ModelError, match="tensor 'w0' holds 1 NaN/Inf"):
        compile_model(qir.from_proto(m), "quantize-weights")


def test_keep_sensitive_promotes_the_most_sensitive_weight_to_int8():
    path, data = REFERENCE["digits_mlp"]
    result = compile_model(path, "quantize-weights{bits=4,keep-sensitive=1}", data=data)
    report = result.records[0].report
    sens = report["sensitivity"]
    worst = max(sens, key=lambda k: sens[k]["int4_error"])
    assert {e["weight"]: e["bits"] for e in report["quantized"]}[worst] == 8
    assert sorted(e["bits"] for e in report["quantized"]) == [4, 4, 8]
    budget = compile_model(path, "quantize-weights{bits=4,max-error=0.02}", data=data).records[0].report
    plain = compile_model(path, "quantize-weights{bits=4}").records[0].report
    assert sum(e["bits"] == 8 for e in budget["quantized"]) >= 1
    assert sum(e["bits"] == 8 for e in plain["quantized"]) == 0


def test_keep_sensitive_without_data_is_a_usage_error():
    with pytest.raises(UsageError, match="need sample data; pass --data"):
        compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{bits=4,keep-sensitive=1}")


def test_gptq_without_data_is_a_usage_error():
    with pytest.raises(UsageError, match="method=gptq needs sample data; pass --data, or use method=mse"):
        compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{bits=4,method=gptq}")


def _held_out_sqnr(path, result, data) -> float:
    feeds = feeds_for(path, data)
    return sqnr_db(run(path, feeds)[1], run(qir.to_proto(result.model), feeds)[1])


def test_gptq_fit_on_the_train_split_beats_mse_on_the_test_split():
    """digits: int4 blocks of 32, GPTQ fit on the 1,347 training rows, judged on the 450 test rows it never saw
    (measured 38.8 dB against mse's 31.6, float32 scales). QDQ and MatMulNBits store the same codes: onnxruntime agrees."""
    path, test = REFERENCE["digits_mlp"]
    train = MODELS / "digits_train.npz"
    base = "quantize-weights{bits=4,symmetric=false,block-size=32"
    mse = compile_model(path, base + ",method=mse}")
    outs = {}
    for fmt in ("qdq", "matmulnbits"):
        result = compile_model(path, f"{base},method=gptq,format={fmt}}}", data=train, verify_runtime=True)
        assert [e["method"] for e in result.records[0].report["quantized"]] == ["gptq"] * 3
        assert _held_out_sqnr(path, result, test) > _held_out_sqnr(path, mse, test) + 4.0
        outs[fmt] = run(qir.to_proto(result.model), feeds_for(path, test))[1]
    np.testing.assert_allclose(outs["qdq"], outs["matmulnbits"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_gptq_weights_of_every_granularity_run_in_onnxruntime(granularity, fmt):
    """Per tensor (a 0-d scale), per channel or per block, in the layouts QDQ and MatMulNBits store."""
    for trans_b in (0, 1):
        model = qir.from_proto(_gemm_model(trans_b, True))
        x = np.random.default_rng(6).normal(size=(64, 48)).astype(np.float32)
        result = compile_model(model, f"quantize-weights{{bits=4,method=gptq,granularity={granularity},format={fmt}}}",
                               data={"x": x}, verify_runtime=True)
        entry = result.records[0].report["quantized"][0]
        assert (entry["method"], entry["granularity"]) == ("gptq", "block32" if granularity == "block" else granularity)
        ref = run(_gemm_model(trans_b, True), {"x": x})[0]
        assert sqnr_db(ref, run(qir.to_proto(result.model), {"x": x})[0]) > 10


def test_gptq_on_weights_applied_from_the_left_reads_the_columns_they_multiply():
    """``W @ x^T``: the rows GPTQ weighs are the columns of the MatMul's second input (x's rows, transposed in)."""
    rng = np.random.default_rng(8)
    mix = rng.normal(size=(5, 64))

    def rows(n):
        return (np.maximum(rng.normal(size=(n, 5)) @ mix, 0) + 0.05 * rng.normal(size=(n, 64))).astype(np.float32)

    x, held_out = rows(300), rows(200)
    ref = run(left_weight_model(), {"x": held_out})[0]
    got = {}
    for method in ("gptq", "mse"):
        result = compile_model(qir.from_proto(left_weight_model()), f"quantize-weights{{bits=4,method={method}}}",
                               data={"x": x}, verify_runtime=True)
        assert {e["weight"]: e["method"] for e in result.records[0].report["quantized"]} == dict.fromkeys(
            ("w1", "w2"), method)
        got[method] = sqnr_db(ref, run(qir.to_proto(result.model), {"x": held_out})[0])
    assert got["gptq"] > got["mse"] + 1.0


def test_gptq_on_a_transposed_gemm_weight_quantizes_along_k_in_both_formats(tmp_path):
    """PyTorch's Linear stores its weight (N, K): GPTQ runs on the (K, N) view, and QDQ gets the codes back in the
    stored layout, MatMulNBits in its own; both compute the same outputs, closer to float than mse's on held-out
    rows of correlated inputs."""
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(6, 48))

    def rows(n):
        return (np.maximum(rng.normal(size=(n, 6)) @ mix, 0) + 0.05 * rng.normal(size=(n, 48))).astype(np.float32)

    onnx.save(_gemm_model(1, True), tmp_path / "m.onnx")
    np.savez(tmp_path / "train.npz", x=rows(300))
    np.savez(tmp_path / "test.npz", x=rows(300))
    x = np.load(tmp_path / "test.npz")["x"]
    ref = run(tmp_path / "m.onnx", {"x": x})[0]
    got = {}
    for method, fmt in (("mse", "qdq"), ("gptq", "qdq"), ("gptq", "matmulnbits")):
        result = compile_model(tmp_path / "m.onnx", f"quantize-weights{{bits=4,method={method},format={fmt}}}",
                               data=tmp_path / "train.npz")
        entry = result.records[0].report["quantized"][0]
        assert (entry["granularity"], entry["method"]) == ("block32", method)
        got[method, fmt] = run(qir.to_proto(result.model), {"x": x})[0]
    np.testing.assert_allclose(got["gptq", "qdq"], got["gptq", "matmulnbits"], rtol=1e-4, atol=1e-5)
    assert sqnr_db(ref, got["gptq", "qdq"]) > sqnr_db(ref, got["mse", "qdq"]) + 3.0


def test_gptq_inside_if_branches_and_its_rows_and_damping_in_the_report():
    """The If fixture's branch weights (Constant nodes, folded first) take their inputs from the branch taps; the
    report says how many rows each Gram summed and the damping they led to (K / rows, at most 1). The samples
    never take the else branch: its second weight's inputs are never seen (no rows: plain rounding), its first
    reads the outer input x, which every sample has."""
    path, data = REFERENCE["if_constants"]
    result = compile_model(path, "fold-constants,quantize-weights{bits=4,method=gptq,samples=24}", data=data,
                           verify_runtime=True)
    fits = {e["weight"]: (e["method"], e["gptq"]["rows"], e["gptq"]["damp"])
            for e in result.records[1].report["quantized"]}
    assert fits == {"then.w1": ("gptq", 24, pytest.approx(4 / 24, abs=1e-6)),
                    "then.w2": ("gptq", 24, pytest.approx(8 / 24, abs=1e-6)),
                    "else.w1": ("gptq", 24, pytest.approx(4 / 24, abs=1e-6)), "else.w2": ("gptq", 0, 1.0)}


def test_gptq_with_keep_sensitive_scores_and_quantizes_every_weight_by_gptq():
    """The sensitivity sweeps (int4 and int8 of every weight) and the final one each collect the inputs again."""
    path, _ = REFERENCE["digits_mlp"]
    result = compile_model(path, "quantize-weights{bits=4,method=gptq,keep-sensitive=1}",
                           data=MODELS / "digits_train.npz")
    report = result.records[0].report
    assert sorted(e["bits"] for e in report["quantized"]) == [4, 4, 8]
    assert {e["method"] for e in report["quantized"]} == {"gptq"}


def test_gptq_falls_back_to_mse_where_the_samples_hold_infinities():
    """log(relu(x)) is -inf wherever x <= 0: the first weight's Gram is not finite, the second one's is."""
    w = np.random.default_rng(2).normal(size=(2, 16, 16)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Log", ["r"], ["l"]),
             helper.make_node("MatMul", ["l", "w0"], ["h"], name="fc0"),
             helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("MatMul", ["t", "w1"], ["y"], name="fc1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 16]) for n in ("h", "y")],
                          [numpy_helper.from_array(w[0], "w0"), numpy_helper.from_array(w[1], "w1")])
    model = qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    report = compile_model(model, "quantize-weights{bits=4,method=gptq}", data={"x": x}).records[0].report
    assert [(e["weight"], e["method"], e.get("method_reason")) for e in report["quantized"]] == [
        ("w0", "mse", "its inputs hold inf or NaN on the sample data"), ("w1", "gptq", None)]


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_gptq_on_conv_weights_through_their_patches_beats_mse_held_out(granularity):
    """The CNN: conv1 (8 x 1 x 3 x 3) is one group per output channel, conv2 (16 x 8 x 3 x 3) blocks of its 8 input
    channels at each kernel position (or per channel), the classifier a transposed Gemm. QDQ stores GPTQ's codes in
    each weight's own layout (tests/quant/test_gptq.py checks that layout); onnxruntime runs it, closer to float
    than mse on the test split."""
    path, test = REFERENCE["cnn_digits"]
    spec = f"quantize-weights{{bits=4,granularity={granularity},method=%s}}"
    result = compile_model(path, spec % "gptq", data=MODELS / "cnn_digits_train.npz", verify_runtime=True)
    report = result.records[0].report
    assert {e["op"]: e["method"] for e in report["quantized"]} == {"Conv": "gptq", "Gemm": "gptq"}
    assert [e["granularity"] for e in report["quantized"]] == (
        ["channel", "block8", "block32"] if granularity == "block" else ["channel"] * 3)
    feeds = feeds_for(path, test)
    ref = run(path, feeds)[0]
    gptq = sqnr_db(ref, run(qir.to_proto(result.model), feeds)[0])
    mse = sqnr_db(ref, run(qir.to_proto(compile_model(path, spec % "mse").model), feeds)[0])
    assert gptq > mse + 1.0


def _grouped_convs(rng) -> ir.Model:
    """A depthwise Conv (group 4), a grouped one (group 2, 2 x 2 channels), then a ConvTranspose."""
    nodes = [helper.make_node("Conv", ["x", "dw"], ["d"], group=4, pads=[1, 1, 1, 1], name="depthwise"),
             helper.make_node("Conv", ["d", "gw"], ["e"], group=2, pads=[1, 1, 1, 1], name="grouped"),
             helper.make_node("ConvTranspose", ["e", "up"], ["y"], strides=[2, 2], name="up")]
    mix = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 12, 12])],
                          [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "dw"),
                           numpy_helper.from_array(mix[:, :2], "gw"),
                           numpy_helper.from_array(rng.normal(size=(4, 2, 2, 2)).astype(np.float32), "up")])
    return qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_gptq_on_grouped_convs_uses_each_groups_own_inputs_and_conv_transposes_their_convs():
    """Each group's output channels are fit on the patches of that group's input channels only (a depthwise Conv:
    one channel's 3 x 3 patches each), a ConvTranspose on its equivalent Conv's; onnxruntime runs the result,
    closer to float than mse on held-out rows."""
    rng = np.random.default_rng(5)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(400, 4, 6, 6)), axis=2), axis=3)  # neighbours correlate
    x, held_out = smooth[:200].astype(np.float32), smooth[200:].astype(np.float32)
    ref = run(qir.to_proto(_grouped_convs(np.random.default_rng(5))), {"x": held_out})[0]
    got, methods = {}, {}
    for method in ("gptq", "mse"):
        result = compile_model(_grouped_convs(np.random.default_rng(5)), f"quantize-weights{{bits=4,method={method}}}",
                               data={"x": x}, verify_runtime=True)
        methods[method] = {e["weight"]: (e["method"], e.get("method_reason"))
                           for e in result.records[0].report["quantized"]}
        got[method] = sqnr_db(ref, run(qir.to_proto(result.model), {"x": held_out})[0])
    assert methods["gptq"] == {"dw": ("gptq", None), "gw": ("gptq", None), "up": ("gptq", None)}
    assert got["gptq"] > got["mse"] + 1.0


def _upsampler(group: int = 1, auto_pad: str | None = None) -> ir.Model:
    """A ConvTranspose as PyTorch's ConvTranspose2d(16, 8, 4, stride=2, padding=1) exports it (or grouped, or with
    auto_pad)."""
    w = np.random.default_rng(12).normal(size=(16, 8 // group, 4, 4)).astype(np.float32)
    attrs = {"strides": [2, 2], "group": group}
    attrs.update({"auto_pad": auto_pad} if auto_pad else {"pads": [1, 1, 1, 1]})
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 12, 12])],
                          [numpy_helper.from_array(w, "w")])
    return qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_gptq_on_a_conv_transpose_beats_mse_held_out(granularity):
    """A U-Net's upsampler: GPTQ on the patches of the Conv that computes it (its input with zeros between
    samples), in the ConvTranspose's own layout; onnxruntime runs it, closer to float than mse on rows it never
    saw."""
    rng = np.random.default_rng(13)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(300, 16, 6, 6)), axis=2), axis=3)  # neighbours correlate
    smooth += rng.normal(size=(300, 16, 1, 1)) * 4  # and channels carry offsets
    x, held_out = smooth[:150].astype(np.float32), smooth[150:].astype(np.float32)
    ref = run(qir.to_proto(_upsampler()), {"x": held_out})[0]
    got = {}
    for method in ("gptq", "mse"):
        result = compile_model(_upsampler(), f"quantize-weights{{bits=4,granularity={granularity},method={method}}}",
                               data={"x": x}, verify_runtime=True)
        entry = result.records[0].report["quantized"][0]
        assert (entry["method"], entry["granularity"]) == (method, "block16" if granularity == "block" else "channel")
        got[method] = sqnr_db(ref, run(qir.to_proto(result.model), {"x": held_out})[0])
    assert got["gptq"] > got["mse"] + 1.0


@pytest.mark.parametrize("group,auto_pad", [(2, None), (1, "SAME_UPPER")])
def test_gptq_leaves_grouped_or_auto_padded_conv_transposes_to_mse(group, auto_pad):
    x = np.random.default_rng(14).normal(size=(20, 16, 6, 6)).astype(np.float32)
    result = compile_model(_upsampler(group, auto_pad), "quantize-weights{bits=4,method=gptq}", data={"x": x},
                           verify_runtime=True)
    entry = result.records[0].report["quantized"][0]
    assert (entry["method"], entry["method_reason"]) == (
        "mse", "gptq takes a ConvTranspose of one group with explicit pads (no auto_pad or output_shape)")


def test_gather_and_lstm_weights_on_request():
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.normal(size=(1, 32, 16)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.normal(size=(1, 32, 8)).astype(np.float32), "R")
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
         helper.make_node("LSTM", ["e", "W", "R"], ["y"], name="lstm", hidden_size=8)],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])], [emb, w, r])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    result = compile_model(qir.from_proto(m), "quantize-weights{ops=[Gather,LSTM]}", verify_runtime=True)
    assert sorted(e["weight"] for e in result.records[0].report["quantized"]) == ["R", "W", "emb"]
    left = compile_model(qir.from_proto(m), "quantize-weights{ops=[Gather]}").records[0].report["left_float"]
    assert [(e["weight"], e["op"]) for e in left] == [("W", "LSTM"), ("R", "LSTM")]  # the recurrence's too
    ids = np.array([[1], [7], [3], [49], [0]], np.int64)
    assert sqnr_db(run(m, {"ids": ids})[0], run(qir.to_proto(result.model), {"ids": ids})[0]) > 30



def test_float_weights_of_ops_left_out_are_reported_with_a_note():
    """An embedding under the default ops stays float: the report lists it with its bytes, and a note (which the CLI
    prints) says how much of the model it keeps in float and how to include it; with Gather in ops, nothing is
    left."""
    result = compile_model(qir.from_proto(embedding_lm(False)), "quantize-weights{bits=4}")
    report = result.records[0].report
    assert [e["weight"] for e in report["quantized"]] == ["head_w"]
    assert report["left_float"] == [{"weight": "table", "nodes": ["embed"], "op": "Gather", "bytes": 400 * 32 * 4,
                                     "reason": "Gather not in ops"}]
    left = 400 * 32 * 4 / (400 * 32 * 4 + report["bytes_after"])
    assert report["notes"] == [
        f"1 Gather weight not quantized (Gather is not in ops), {100 * left:.0f} % of the weight bytes after this "
        "pass: 'table' (50 KiB); add Gather to ops to quantize it (ops=[MatMul, Gemm, Conv, ConvTranspose, Einsum, "
        "Gather])"]
    every = compile_model(qir.from_proto(embedding_lm(False)), "quantize-weights{bits=4,ops=[MatMul,Gather]}")
    assert "left_float" not in every.records[0].report and "notes" not in every.records[0].report


def test_a_tied_weight_read_by_an_unselected_gather_is_reported_once():
    """A table shared by the head (selected) and the embedding (not) is skipped with the reason, not also listed as
    left in float."""
    report = compile_model(qir.from_proto(embedding_lm(True)), "quantize-weights{bits=4}").records[0].report
    assert report["skipped"] == [{"weight": "table", "nodes": ["head"],
                                  "reason": "shared with unselected node 'embed' (Gather)"}]
    assert "left_float" not in report

def _embedding(dtype=np.float32) -> onnx.ModelProto:
    """A (300, 80) embedding table looked up by token ids: blocks of 32 along its 80 features (the last one of 16)."""
    table = np.random.default_rng(7).normal(size=(300, 80)).astype(dtype)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 7])],
                          [helper.make_tensor_value_info("e", elem, [None, 7, 80])],
                          [numpy_helper.from_array(table, "table")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("symmetric,scale_dtype,dtype", [(False, "float32", np.float32), (True, "float32", np.float32),
                                                        (False, "float16", np.float32), (True, "float16", np.float16)])
def test_int4_embeddings_become_gather_block_quantized(symmetric, scale_dtype, dtype):
    """With format=matmulnbits a 4-bit embedding is onnxruntime's GatherBlockQuantized: only the rows looked up are
    dequantized (DequantizeLinear -> Gather dequantized the whole table on every run), to exactly the
    reconstruction of the same blocks; at 8 bits it stays QDQ."""
    spec = (f"quantize-weights{{bits=4,ops=[Gather],format=matmulnbits,method=rtn,symmetric={str(symmetric).lower()},"
            f"scale-dtype={scale_dtype}}}")
    result = compile_model(qir.from_proto(_embedding(dtype)), spec, verify_runtime=True)
    assert [n.op_type for n in result.model.graph if n.op_type != "Cast"] == ["GatherBlockQuantized"]
    entry = result.records[0].report["quantized"][0]
    assert (entry["format"], entry["granularity"]) == ("gatherblockquantized", "block32")
    assert entry["bytes_after"] < 0.2 * entry["bytes_before"] * (2 if dtype == np.float16 else 1)
    ref = _embedding(dtype)
    t = ref.graph.initializer[0]
    qt = quantize_tensor(numpy_helper.to_array(t).astype(np.float32), "int4" if symmetric else "uint4",
                         symmetric=symmetric, granularity=Granularity(axis=1, block=32), scale_dtype=scale_dtype)
    t.CopyFrom(numpy_helper.from_array(qt.dequantized.astype(dtype), "table"))
    ids = np.random.default_rng(3).integers(0, 300, (4, 7))
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"ids": ids})[0], run(ref, {"ids": ids})[0],
                               rtol=1e-3 if dtype == np.float16 else 1e-6, atol=1e-6)
    eight = compile_model(qir.from_proto(_embedding()), "quantize-weights{bits=8,ops=[Gather],format=matmulnbits}")
    assert [n.op_type for n in eight.model.graph] == ["DequantizeLinear", "Gather"]


def test_bad_options_are_named():
    for text, match in [("quantize-weights{bits=3}", "not one of 4, 8"),
                        ("quantize-weights{block-size=24}", "power of two"),
                        ("quantize-weights{ops=[Softmax]}", "'Softmax' has no weight rule"),
                        ("quantize-weights{exclude=[(]}", "bad regex"),
                        ("quantize-weights{method=gptq,damp=-0.5}", "damp must be a number >= 0")]:
        with pytest.raises(UsageError, match=match):
            compile_model(MODELS / "digits_mlp.onnx", text)


def test_ir_model_is_changed_in_place():
    model = qir.load(MODELS / "digits_mlp.onnx")
    result = compile_model(model, "quantize-weights")
    assert result.model is model and isinstance(model, ir.Model)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_float16_scales_shrink_the_file_and_onnxruntime_computes_the_same(tmp_path, fmt):
    proto = mlp_model(sizes=(256, 128, 8), seed=2)
    onnx.save(proto, tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(16, 256)).astype(np.float32)
    base = f"quantize-weights{{bits=4,symmetric=false,method=rtn,format={fmt}"
    full = compile_model(tmp_path / "m.onnx", base + "}", verify_runtime=True)
    half = compile_model(tmp_path / "m.onnx", base + ",scale-dtype=float16}", verify_runtime=True)
    rep = half.records[0].report
    assert {e["scale_dtype"] for e in rep["quantized"]} == {"float16"}
    assert rep["bytes_after"] < full.records[0].report["bytes_after"]
    assert half.stats_after["weight_bytes"] < full.stats_after["weight_bytes"]
    dtypes = {v.const_value.dtype for v in half.model.graph.initializers.values() if "scale" in v.name}
    assert dtypes == {ir.DataType.FLOAT16}
    # the float16 scales reach the kernel as float32 through a Cast that onnxruntime folds at load
    ref = run(proto, {"x": x})[0]
    got_full = run(qir.to_proto(full.model), {"x": x}, optimization=False)[0]
    got_half = run(qir.to_proto(half.model), {"x": x}, optimization=False)[0]
    assert sqnr_db(ref, got_half) > sqnr_db(ref, got_full) - 0.1
    assert sqnr_db(ref, got_half) > 15
    if fmt == "matmulnbits":  # at load, onnxruntime folds the Casts: the kernels get constant float32 scales
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(qir.to_proto(half.model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(tmp_path / "opt.onnx")
        assert [n.op_type for n in opt.graph.node].count("Cast") == 0
        inits = {t.name for t in opt.graph.initializer}
        assert all(n.input[2] in inits for n in opt.graph.node if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("pipeline", ["quantize-weights", "quantize-weights{bits=8,granularity=tensor}",
                                      "quantize-weights{bits=4}", "quantize-weights{bits=4,symmetric=false}",
                                      "quantize-weights{bits=4,format=matmulnbits}",
                                      "quantize-weights{bits=8,format=matmulnbits,symmetric=false}"])
def test_float16_models_are_dequantized_to_float16(pipeline, opset):
    proto = as_half(mlp_model(sizes=(64, 32, 8), seed=3, opset=opset))
    x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float16)
    ref = run(proto, {"x": x})[0]
    result = compile_model(proto, pipeline, verify_runtime=True)
    got = run(qir.to_proto(result.model), {"x": x})[0]
    assert got.dtype == np.float16  # every consumer still reads float16
    assert sqnr_db(ref, got) > (30 if "bits=4" not in pipeline else 14)
    ops = result.stats_after["ops"]
    # float16 scales need opset 19 in DequantizeLinear; below it, float32 scales and a Cast back to float16
    native = "matmulnbits" in pipeline or result.model.opset_imports[""] >= 19
    assert ops.get("Cast", 0) == (0 if native else 2)
    scales = {v.const_value.dtype for g in [result.model.graph] for v in g.initializers.values() if "scale" in v.name}
    assert scales == {ir.DataType.FLOAT16 if native else ir.DataType.FLOAT}
    assert {e["scale_dtype"] for e in result.records[0].report["quantized"]} == {"float16" if native else "float32"}


def test_bfloat16_weights_are_dequantized_in_float32_and_cast_back():
    """onnxruntime's CPU runs no bfloat16 MatMul: onnx's reference evaluator checks the numbers."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    proto = as_half(mlp_model(sizes=(64, 8), seed=4, opset=21), TensorProto.BFLOAT16)
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(ml_dtypes.bfloat16)
    ref = ReferenceEvaluator(proto).run(None, {"x": x})[0].astype(np.float32)
    for pipeline in ("quantize-weights", "quantize-weights{bits=4,format=matmulnbits}"):
        out = qir.to_proto(compile_model(proto, pipeline).model)
        onnx.checker.check_model(out, full_check=True)
        assert [n.op_type for n in out.graph.node][:2] == ["DequantizeLinear", "Cast"]  # no bfloat16 MatMulNBits
        got = ReferenceEvaluator(out).run(None, {"x": x})[0]
        assert got.dtype == ml_dtypes.bfloat16
        assert sqnr_db(ref, got.astype(np.float32)) > (30 if "bits=4" not in pipeline else 14)


def test_float16_weights_too_small_for_float16_scales():
    """Scales below float16's precision: QDQ falls back to float32 scales; MatMulNBits, whose scales must be of the
    activations' type, is refused naming the weight."""
    proto = as_half(mlp_model(sizes=(64, 8), seed=6, opset=21))
    w = proto.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(w) * np.float16(1e-4)).astype(np.float16), w.name))
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float16)
    result = compile_model(proto, "quantize-weights{bits=4}", verify_runtime=True)
    assert [e["scale_dtype"] for e in result.records[0].report["quantized"]] == ["float32"]
    assert run(qir.to_proto(result.model), {"x": x})[0].dtype == np.float16
    with pytest.raises(UsageError, match="float16 weight 'w0'.*MatMulNBits.*format=qdq"):
        compile_model(proto, "quantize-weights{bits=4,format=matmulnbits}")
    emb = _embedding(np.float16)
    t = emb.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * np.float16(1e-4)).astype(np.float16), t.name))
    with pytest.raises(UsageError, match="float16 weight 'table'.*GatherBlockQuantized.*format=qdq"):
        compile_model(qir.from_proto(emb), "quantize-weights{bits=4,ops=[Gather],format=matmulnbits}")


def test_an_unreachable_max_error_is_reported_and_warned(tmp_path, capsys):
    from qxc.cli import main

    path, data = REFERENCE["ffn_small"]
    ok = compile_model(path, "quantize-weights{bits=4,max-error=0.05}", data=data).records[0].report
    assert ok["max_error"]["met"] and ok["max_error"]["achieved"] <= 0.05 and "warnings" not in ok
    spec = "quantize-weights{bits=4,max-error=0.000001}"
    report = compile_model(path, spec, data=data).records[0].report
    assert not report["max_error"]["met"] and report["max_error"]["achieved"] > 1e-6
    assert all(e["bits"] == 8 for e in report["quantized"])  # every weight promoted, still above the budget
    assert main(["compile", str(path), "-p", spec, "--data", str(data), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0
    assert "warning: pass 'quantize-weights': max-error 1e-06 not reached" in capsys.readouterr().err


def test_ir3_weights_listed_as_inputs_are_quantized():
    """IR 3 had to list every initializer as a graph input; such weights are constants (IR >= 4 keeps them as
    overridable inputs, and they are skipped with that reason)."""
    proto = mlp_model(sizes=(16, 8, 4), opset=8)
    proto.ir_version = 3
    proto.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in proto.graph.initializer)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    result = compile_model(proto, "quantize-weights", verify_runtime=True)
    assert result.records[0].report["weights_quantized"] == 2 and "IR version raised from 3 to 4" in result.notes[0]
    out = qir.to_proto(result.model)
    assert [i.name for i in out.graph.input] == ["x"]
    unchanged = compile_model(proto, "fold-constants")  # nothing to fold, but the inputs did change
    assert not unchanged.records[0].modified and unchanged.modified
    assert sqnr_db(run(proto, {"x": x})[0], run(out, {"x": x})[0]) > 30
    proto.ir_version = 4  # the same listing in IR 4: deliberate, overridable inputs
    report = compile_model(proto, "quantize-weights").records[0].report
    assert report["weights_quantized"] == 0 and "also a graph input" in report["skipped"][0]["reason"]


def test_gptq_leaves_a_grouped_convs_per_tensor_scale_to_mse():
    x = np.random.default_rng(6).normal(size=(16, 4, 6, 6)).astype(np.float32)
    report = compile_model(_grouped_convs(np.random.default_rng(5)),
                           "quantize-weights{bits=8,method=gptq,granularity=tensor}", data={"x": x}).records[0].report
    reasons = {e["weight"]: e.get("method_reason") for e in report["quantized"]}
    assert reasons["dw"] == reasons["gw"] == "gptq takes a grouped Conv's weight per channel or block, not per tensor"


def _recurrent(op: str, direction: str = "forward", layout: int = 0, linear_before_reset: int = 1) -> ir.Model:
    """An LSTM or a GRU (hidden 16) over 24 input features, as PyTorch exports them (a GRU with
    linear_before_reset=1), its every hidden state Y the output; layout 1 is batch first."""
    d, gates = (2 if direction == "bidirectional" else 1), (4 if op == "LSTM" else 3)
    rng = np.random.default_rng(31)
    w = (rng.normal(size=(d, gates * 16, 24)) / np.sqrt(24)).astype(np.float32)
    r = (rng.normal(size=(d, gates * 16, 16)) / np.sqrt(16)).astype(np.float32)
    attrs = {"hidden_size": 16, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    x_shape, y_shape = ([None, 10, 24], [None, 10, d, 16]) if layout else ([10, None, 24], [10, d, None, 16])
    g = helper.make_graph([helper.make_node(op, ["x", "W", "R"], ["y"], name="rnn", **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    return qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _sequences(n: int, layout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, correlated feature sequences (an audio front end's): as a batch for onnxruntime, (n, 10 steps, 24) or
    (10, n, 24); and as qxc's data, the batch itself or (layout 0, batch on axis 1) n separate (10, 1, 24) samples."""
    rng, mix = np.random.default_rng(seed), np.random.default_rng(30).normal(size=(6, 24))  # one mix for every seed
    z = rng.normal(size=(n, 10, 6)).cumsum(axis=1) / 3 @ mix + 0.1 * rng.normal(size=(n, 10, 24))
    z = z.astype(np.float32)
    return (z, z) if layout else (np.ascontiguousarray(z.transpose(1, 0, 2)), z[:, :, None, :])


@pytest.mark.parametrize("op,direction", [("LSTM", "bidirectional"), ("GRU", "forward")])
def test_gptq_on_recurrent_weights_reads_the_inputs_and_hidden_states_and_beats_mse_held_out(op, direction):
    """W multiplies every step's input (X's rows, shared by the directions), R each direction's previous hidden
    state (read from Y): both are GPTQ'd per direction on those rows, in the weight's own layout; onnxruntime runs
    the result, closer to float than mse on sequences it never saw."""
    x, held_out = _sequences(200, 0, 1)[1], _sequences(200, 0, 2)[0]
    ref = run(qir.to_proto(_recurrent(op, direction)), {"x": held_out})[0]
    got = {}
    for method in ("gptq", "mse"):
        result = compile_model(_recurrent(op, direction),
                               f"quantize-weights{{bits=4,block-size=16,method={method},ops=[{op}]}}", data={"x": x},
                               verify_runtime=True)
        report = result.records[0].report["quantized"]
        assert {e["weight"]: (e["method"], e["granularity"]) for e in report} == {
            "W": (method, "block16"), "R": (method, "block16")}
        if method == "gptq":
            assert {e["weight"]: e["gptq"]["rows"] for e in report} == {"W": 2000, "R": 2000}  # 200 x 10 steps
        got[method] = sqnr_db(ref, run(qir.to_proto(result.model), {"x": held_out})[0])
    assert got["gptq"] > got["mse"] + 5.0  # 27.9 against 19.0 (LSTM), 28.5 against 19.9 (GRU)


def test_gptq_leaves_recurrent_weights_it_cannot_read_to_mse_with_the_reason(tmp_path):
    """A GRU with linear_before_reset=0 multiplies R's new-gate rows by r * h, no tensor of the graph; a
    bidirectional layer's per-channel scale would span both directions; onnxruntime runs no batch-first layer, so
    no rows can be read from one (mse needs no session; the compile's own onnxruntime check of the result is
    dropped with a warning, as onnxruntime cannot run the input model either)."""
    x = _sequences(50, 0, 3)[1]
    gru = compile_model(_recurrent("GRU", linear_before_reset=0), "quantize-weights{bits=4,method=gptq,ops=[GRU]}",
                        data={"x": x}, verify_runtime=True)
    assert {e["weight"]: (e["method"], e.get("method_reason")) for e in gru.records[0].report["quantized"]} == {
        "W": ("gptq", None),
        "R": ("mse", "gptq takes a GRU's R with linear_before_reset=1 only (else its new gate's rows multiply r * h)")}
    both = compile_model(_recurrent("LSTM", "bidirectional"),
                         "quantize-weights{bits=8,granularity=channel,method=gptq,ops=[LSTM]}", data={"x": x})
    assert {e["method_reason"] for e in both.records[0].report["quantized"]} == {
        "gptq takes a bidirectional layer's weights per block: a scale per channel or per tensor would span both "
        "directions"}
    path = qir.save(_recurrent("LSTM", layout=1), tmp_path / "batch_first.onnx")
    batch_first = compile_model(path, "quantize-weights{bits=4,method=gptq,ops=[LSTM]}",
                                data={"x": _sequences(20, 1, 3)[1]})
    assert {e["method_reason"] for e in batch_first.records[0].report["quantized"]} == {
        "gptq reads the rows in onnxruntime, which runs LSTMs of layout 0 only (this one is batch first)"}
    assert len(batch_first.warnings) == 1 and batch_first.warnings[0].startswith(
        "onnxruntime cannot check the compiled model: the input model: onnxruntime cannot load the model")
