"""Pruning passes: exact sparsity, verified 2:4, channels removed end to end, guided allocation, recipes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import MODELS, REFERENCE, feeds_for, left_weight_model, run
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir
from qxc.errors import UsageError
from qxc.sparsity import nm_holds


def _weights(model):
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}


def test_magnitude_layer_and_global_sparsity_are_exact():
    for scope in ("layer", "global"):
        result = compile_model(MODELS / "fixtures/ffn_small.onnx", f"prune-magnitude{{sparsity=0.6,scope={scope}}}")
        layers = result.records[0].report["layers"]
        total = sum(x["elements"] for x in layers)
        zeros = sum(x["zeros"] for x in layers)
        if scope == "layer":
            assert all(x["zeros"] == round(0.6 * x["elements"]) for x in layers)
        else:
            assert zeros == round(0.6 * total)


def test_two_of_four_holds_on_every_group_and_respects_transb():
    result = compile_model(MODELS / "cnn_digits.onnx", "prune-nm")
    w = _weights(result.model)
    assert nm_holds(w["fc.w"], 2, 4, axis=1)  # Gemm transB=1: reduction axis is 1
    assert nm_holds(w["conv2.w"], 2, 4, axis=1)
    skipped = result.records[0].report["skipped"]
    assert skipped == [{"weight": "conv1.w", "reason": "reduction axis of 1 is not a multiple of 4"}]


def test_weights_applied_from_the_left_prune_along_their_columns():
    """``W @ x`` sums over W's columns: 2:4 groups run along them; prune-channels keeps such a layer whole, naming
    why (its channels are the output's rows)."""
    model = qir.from_proto(left_weight_model())
    result = compile_model(model, "prune-nm")
    layers = {e["weight"]: e for e in result.records[0].report["layers"]}
    assert set(layers) == {"w1", "w2"}
    for name, e in layers.items():
        assert e["pattern"] == "2:4 along axis 1 (verified)"
        w = next(v for v in result.model.graph.initializers.values() if v.name == name).const_value.numpy()
        assert nm_holds(w, 2, 4, axis=1) and not nm_holds(w, 2, 4, axis=0)
    result = compile_model(qir.from_proto(left_weight_model()), "prune-channels")
    kept = result.records[0].report["kept_whole"]
    assert {k["node"] for k in kept if "applies its weight from the left" in k["reason"]} == {"fc1", "fc2"}
    # nothing could shrink: a warning (printed even with -q) says so, naming the first layer and why
    assert not result.modified and result.records[0].report["warnings"] == [
        f"no layer's channels could be removed ({len(kept)} kept whole; the first, '{kept[0]['node']}': "
        f"{kept[0]['reason']}); the model is unchanged, see the report's kept_whole, or prune without removing "
        "channels (prune-magnitude, prune-nm)"]


def test_channels_shrink_matrices_and_the_model_runs(tmp_path):
    path, data = REFERENCE["ffn_small"]
    result = compile_model(path, "prune-channels{sparsity=0.5}", verify_runtime=True)
    w = _weights(result.model)
    assert w["layer0.w1"].shape == (32, 32) and w["layer0.b1"].shape == (32,) and w["layer0.w2"].shape == (32, 32)
    kept = result.records[0].report["kept_whole"]
    assert {k["node"] for k in kept} == {"layer0.fc2", "layer1.fc2", "head"} and "warnings" not in result.records[0].report
    assert all("residual" in k["reason"] or "graph output" in k["reason"] for k in kept)
    onnx.checker.check_model(qir.to_proto(result.model), full_check=True)
    feeds = feeds_for(path, data)
    assert run(qir.to_proto(result.model), feeds)[0].shape == run(path, feeds)[0].shape


def test_channels_through_relu_pool_flatten_into_gemm():
    path, data = REFERENCE["cnn_digits"]
    result = compile_model(path, "prune-channels{sparsity=0.5}", verify_runtime=True)
    w = _weights(result.model)
    assert w["conv1.w"].shape == (4, 1, 3, 3) and w["conv2.w"].shape == (8, 4, 3, 3)
    assert w["fc.w"].shape == (10, 32)  # 8 channels x 2x2 spatial after Flatten
    # removing channels with zero next-layer weight changes nothing: check against a zeroed copy
    m = onnx.load(path)
    feeds = feeds_for(path, data, rows=50)
    assert run(qir.to_proto(result.model), feeds)[0].shape == (50, 10)
    del m


def test_removal_equals_zeroing_the_next_layer_rows():
    path, data = REFERENCE["ffn_small"]
    pruned = compile_model(path, "prune-channels{sparsity=0.5,include=[layer0.fc1]}").model
    keep_cols = pruned.graph.initializers["layer0.w1"].const_value.numpy()
    m = onnx.load(path)
    w1 = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "layer0.w1"))
    kept = [int(np.where((w1 == keep_cols[:, j:j + 1]).all(axis=0))[0][0]) for j in range(keep_cols.shape[1])]
    w2 = next(t for t in m.graph.initializer if t.name == "layer0.w2")
    a = onnx.numpy_helper.to_array(w2).copy()
    a[np.setdiff1d(np.arange(64), kept)] = 0
    w2.CopyFrom(onnx.numpy_helper.from_array(a, "layer0.w2"))
    feeds = feeds_for(path, data)
    np.testing.assert_allclose(run(qir.to_proto(pruned), feeds)[0], run(m, feeds)[0], rtol=1e-5, atol=1e-5)


def test_sensitivity_guided_beats_or_matches_uniform():
    path = MODELS / "digits_mlp.onnx"
    result = compile_model(path, "prune-magnitude{sparsity=0.8,sensitivity=true}", data=MODELS / "digits_train.npz")
    sens = result.records[0].report["sensitivity"]
    assert sens["joint_error"][sens["chosen"]] <= sens["joint_error"]["uniform_global"]
    assert result.records[0].report["sparsity"] == pytest.approx(0.8, abs=1e-4)
    ch = compile_model(path, "prune-channels{sparsity=0.5,sensitivity=true}", data=MODELS / "digits_train.npz")
    js = ch.records[0].report["sensitivity"]["joint_error"]
    assert min(js.values()) <= js["uniform"]


def test_pruning_needs_data_for_sensitivity_and_checks_patterns():
    with pytest.raises(UsageError, match="needs sample data"):
        compile_model(MODELS / "digits_mlp.onnx", "prune-magnitude{sensitivity=true}")
    with pytest.raises(UsageError, match="pattern 'nothing' matched no"):
        compile_model(MODELS / "digits_mlp.onnx", "prune-channels{include=[nothing]}")
    for name in ("prune-magnitude", "prune-nm", "prune-channels"):
        with pytest.raises(UsageError, match=f"pass '{name}': ops is empty"):
            compile_model(MODELS / "digits_mlp.onnx", f"{name}{{ops=[]}}")
    with pytest.raises(UsageError, match="prune-channels does not shrink LSTM layers"):
        compile_model(MODELS / "digits_mlp.onnx", "prune-channels{ops=[MatMul,LSTM]}")


def test_prune_then_quantize_recipe_keeps_digits_accuracy():
    result = compile_model(MODELS / "digits_mlp.onnx", str(MODELS.parent / "passes/prune50-int8.toml"),
                           data=MODELS / "digits_train.npz")
    with np.load(MODELS / "digits_test.npz") as z:
        x, y = z["X"], z["labels"]
    base = float((run(MODELS / "digits_mlp.onnx", {"X": x})[0] == y).mean())
    acc = float((run(qir.to_proto(result.model), {"X": x})[0] == y).mean())
    assert base - acc <= 0.01


def test_sensitivity_is_measured_on_zipmap_probabilities():
    """skl2onnx's default classifier: string labels and ZipMap probabilities (a list of dicts). The error was
    measured on no output at all (0 at every level), so the allocation was arbitrary."""
    from helpers import iris_classifier

    proto, x, labels = iris_classifier("mlp")
    data = {"X": x}
    guided = compile_model(proto, "prune-magnitude{sparsity=0.5,sensitivity=true}", data=data)
    sens = guided.records[0].report["sensitivity"]
    assert all(max(errs) > 0 for errs in sens["errors"].values())
    assert sens["joint_error"]["guided"] <= sens["joint_error"]["uniform_global"]
    uniform = compile_model(proto, "prune-magnitude{sparsity=0.5}")

    def accuracy(model):
        return float(np.mean(run(qir.to_proto(model), data)[0] == labels))

    assert accuracy(guided.model) >= accuracy(uniform.model) - 0.02


def test_sensitivity_needs_a_float_output():
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("ArgMax", ["m"], ["y"], axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [None, 1])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    with pytest.raises(UsageError, match="float outputs, and this model has none"):
        compile_model(proto, "prune-magnitude{sensitivity=true}", data={"x": x})


def _ffn(kind: str, d: int = 16, f: int = 48, seed: int = 0) -> onnx.ModelProto:
    """A transformer block's feed-forward half as exporters write it, with a residual around it: ``erf-gelu``
    (torch.nn.GELU before opset 20: Div, Erf, Add, Mul, Mul, the bias Add with the bias first), ``swiglu`` (LLaMA:
    down(silu(gate(x)) * up(x)), SiLU as x * Sigmoid(x)) and ``ms-gelu`` (onnxruntime's fused com.microsoft
    FastGelu with its bias)."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(0, shape[0] ** -0.5, shape).astype(np.float32), name)

    inits = [w("w1", d, f), w("w2", f, d), w("b1", f), w("wg", d, f), w("wu", d, f)]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5))]
    mk = helper.make_node
    if kind == "erf-gelu":
        body = [mk("MatMul", ["x", "w1"], ["h0"], name="fc1"), mk("Add", ["b1", "h0"], ["h"], name="fc1.bias"),
                mk("Div", ["h", "sqrt2"], ["g0"]), mk("Erf", ["g0"], ["g1"]), mk("Add", ["g1", "one"], ["g2"]),
                mk("Mul", ["h", "g2"], ["g3"]), mk("Mul", ["g3", "half"], ["a"]),
                mk("MatMul", ["a", "w2"], ["y0"], name="fc2")]
    elif kind == "swiglu":
        body = [mk("MatMul", ["x", "wg"], ["g"], name="gate"), mk("MatMul", ["x", "wu"], ["u"], name="up"),
                mk("Sigmoid", ["g"], ["gs"]), mk("Mul", ["g", "gs"], ["silu"]),
                mk("Mul", ["silu", "u"], ["a"], name="glu"), mk("MatMul", ["a", "w2"], ["y0"], name="down")]
    else:
        body = [mk("MatMul", ["x", "w1"], ["h0"], name="fc1"),
                mk("FastGelu", ["h0", "b1"], ["a"], name="gelu", domain="com.microsoft"),
                mk("MatMul", ["a", "w2"], ["y0"], name="fc2")]
    body.append(mk("Add", ["x", "y0"], ["y"], name="residual"))
    graph = helper.make_graph(body, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _kept_columns(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Which columns of ``before`` survive in ``after`` (their order kept)."""
    return np.array([int(np.flatnonzero((before == after[:, [j]]).all(axis=0))[0]) for j in range(after.shape[1])])


def _removal_reference(proto: onnx.ModelProto, name: str, axis: int, kept: np.ndarray) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializer ``name`` has every slice along ``axis`` outside ``kept`` zeroed: what
    the model must compute once those channels are removed."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    tensor = next(t for t in ref.graph.initializer if t.name == name)
    array = onnx.numpy_helper.to_array(tensor).copy()
    np.moveaxis(array, axis, 0)[np.setdiff1d(np.arange(array.shape[axis]), kept)] = 0
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, name))
    return ref


@pytest.mark.parametrize("kind", ["erf-gelu", "swiglu", "ms-gelu"])
def test_channels_shrink_exported_feed_forward_blocks(kind):
    """The feed-forward block of every transformer export shrinks: the erf-Gelu reads its input twice and the SwiGLU
    ties two layers' channels (both shrink, with the same channels). The pruned model computes exactly what the
    original does with the removed channels' rows of the down projection zeroed, on onnxruntime."""
    proto = _ffn(kind)
    result = compile_model(proto, "prune-channels{sparsity=0.5}", verify_runtime=True)
    report = result.records[0].report
    writers = ["gate", "up"] if kind == "swiglu" else ["fc1"]
    assert [(x["node"], x.get("tied", []), x["kept"]) for x in report["layers"]] == [(writers[0], writers[1:], 24)]
    assert [k["node"] for k in report["kept_whole"]] == [report["layers"][0]["next"][0]]  # the residual's writer
    assert "residual" in report["kept_whole"][0]["reason"]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = _weights(result.model)
    first = "wg" if kind == "swiglu" else "w1"
    kept = _kept_columns(before[first], after[first])
    for name in ("wg", "wu") if kind == "swiglu" else ("w1", "b1"):
        np.testing.assert_array_equal(after[name], before[name][..., kept])
    assert after["w2"].shape == (24, 16)
    zeroed = _removal_reference(proto, "w2", 0, kept)
    x = {"x": np.random.default_rng(1).normal(size=(32, 5, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(qir.to_proto(result.model), x)[0], run(zeroed, x)[0], rtol=1e-5, atol=1e-5)


def test_channels_through_reversed_operands_and_prelu():
    """Conv -> Sub(per-channel constant, y) -> PRelu(per-channel slope) -> Conv: a constant first operand and a
    per-channel slope shrink with the channels."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("k1", rng.normal(size=(8, 3, 3, 3))), ("c", rng.normal(size=(8, 1, 1))),
              ("slope", rng.uniform(0, 0.3, (8, 1, 1))), ("k2", rng.normal(size=(4, 8, 1, 1))))]
    nodes = [helper.make_node("Conv", ["x", "k1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sub", ["c", "a"], ["b"]), helper.make_node("PRelu", ["b", "slope"], ["p"]),
             helper.make_node("Conv", ["p", "k2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(proto, "prune-channels{sparsity=0.5,include=[conv1]}", verify_runtime=True)
    after = _weights(result.model)
    assert after["k1"].shape == (4, 3, 3, 3) and after["c"].shape == (4, 1, 1) and after["slope"].shape == (4, 1, 1)
    assert after["k2"].shape == (4, 4, 1, 1)
    kept = _kept_columns(numpy_helper.to_array(inits[0]).reshape(8, -1).T, after["k1"].reshape(4, -1).T)
    ref = _removal_reference(proto, "k2", 1, kept)
    x = {"x": rng.normal(size=(4, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(qir.to_proto(result.model), x)[0], run(ref, x)[0], rtol=1e-4, atol=1e-4)


def test_channels_report_why_attention_stays_whole():
    """Attention's projections meet MatMuls of two computed tensors (and a Transpose); the report names them."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("wq", "wk", "wv")]
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "wq"], ["q"], name="q_proj"), mk("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             mk("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             mk("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
             mk("MatMul", ["q", "kt"], ["s"], name="scores"), mk("Softmax", ["s"], ["p"], axis=-1),
             mk("MatMul", ["p", "v"], ["y"], name="attend")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8])], inits)
    result = compile_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "prune-channels")
    reasons = {k["node"]: k["reason"] for k in result.records[0].report["kept_whole"]}
    assert reasons == {"q_proj": "MatMul 'scores' multiplies two computed tensors",
                       "k_proj": "consumed by Transpose 'k_t'",
                       "v_proj": "MatMul 'attend' reads the channels as its weight",
                       "scores": "not a constant initializer", "attend": "not a constant initializer"}
    assert not result.modified


def test_channels_of_a_transposed_convolution_and_into_one():
    """ConvTranspose writes its channels along its weight's axis 1 and reads them along axis 0."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
             (("k1", (8, 3, 3, 3)), ("b1", (8,)), ("kt", (8, 6, 2, 2)), ("k3", (4, 6, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "k1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "kt"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["ru"]), helper.make_node("Conv", ["ru", "k3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 12, 12])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(proto, "prune-channels{sparsity=0.5,ops=[Conv,ConvTranspose]}", verify_runtime=True)
    after = _weights(result.model)
    assert {n: a.shape for n, a in after.items()} == {"k1": (4, 3, 3, 3), "b1": (4,), "kt": (4, 3, 2, 2),
                                                       "k3": (4, 3, 1, 1)}
    only_up_model = compile_model(proto, "prune-channels{sparsity=0.5,ops=[ConvTranspose]}").model
    only_up = _weights(only_up_model)
    kt = numpy_helper.to_array(inits[2])
    kept = _kept_columns(np.moveaxis(kt, 1, 0).reshape(6, -1).T, np.moveaxis(only_up["kt"], 1, 0).reshape(3, -1).T)
    ref = _removal_reference(proto, "k3", 1, kept)
    x = {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(qir.to_proto(only_up_model), x)[0], run(ref, x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["prune-magnitude", "prune-nm", "prune-channels"])
def test_pruning_a_model_without_matrices_warns(name):
    result = compile_model(MODELS / "breast_cancer_gb.onnx", name)
    assert not result.modified
    assert result.records[0].report["warnings"] == [
        "nothing to prune: no MatMul/Gemm/Conv in the model (it computes with ai.onnx.ml::TreeEnsembleClassifier); "
        "this pass leaves it as it was"]


@pytest.mark.parametrize("opset", [17, 18])
def test_channels_through_a_mean_over_the_spatial_axes(opset):
    """PyTorch's ``x.mean(dim=(2, 3))`` between a Conv and a Linear: ReduceMean with keepdims=0 (axes an attribute
    before opset 18, an input from it) keeps the channels, which move to the last axis. Over the channels, it ties."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "w")]

    def model(axes):
        reduce = (helper.make_node("ReduceMean", ["r"], ["m"], keepdims=0, axes=axes) if opset < 18 else
                  helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0))
        extra = [] if opset < 18 else [numpy_helper.from_array(np.array(axes, np.int64), "axes")]
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), reduce,
             helper.make_node("Gemm", ["m", "w"], ["y"], name="fc", transB=1)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])], inits + extra)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    proto = model([2, 3])
    result = compile_model(proto, "prune-channels{sparsity=0.5}", verify_runtime=True)
    after = _weights(result.model)
    assert after["k"].shape == (4, 3, 3, 3) and after["w"].shape == (5, 4)
    kept = _kept_columns(numpy_helper.to_array(inits[0]).reshape(8, -1).T, after["k"].reshape(4, -1).T)
    ref = _removal_reference(proto, "w", 1, kept)
    x = {"x": rng.normal(size=(4, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(qir.to_proto(result.model), x)[0], run(ref, x)[0], rtol=1e-4, atol=1e-4)
    over = helper.make_graph(  # a mean over the channels, into a 1-channel Conv
        [helper.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["c"], ["m"], name="mean", keepdims=1, axes=[1]),
         helper.make_node("Conv", ["m", "k1"], ["y"], name="conv1x1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5, 6, 6])],
        [inits[0], numpy_helper.from_array(np.ones((5, 1, 1, 1), np.float32), "k1")])
    kept = compile_model(helper.make_model(over, opset_imports=[helper.make_opsetid("", 17)]),
                         "prune-channels{include=[conv$]}").records[0].report["kept_whole"]
    assert kept == [{"node": "conv", "reason": "ReduceMean 'mean' reduces over the channels"}]


@pytest.mark.parametrize("form", ["resize-13", "upsample-8", "resize-sizes"])
def test_channels_through_an_upsampling(form):
    """An FPN's or a U-Net's Resize (Upsample before opset 10) scales the spatial axes only: the Conv before it
    shrinks, and the model computes what the original does with the next Conv's removed input channels zeroed.
    Output sizes count the channels: that Resize keeps the layer whole."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "k2")]
    if form == "upsample-8":
        up, opset = helper.make_node("Upsample", ["r"], ["u"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0]), 8
    elif form == "resize-13":
        up, opset = helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest", name="up"), 13
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    else:
        up, opset = helper.make_node("Resize", ["r", "", "", "sizes"], ["u"], mode="nearest", name="up"), 13
        inits.append(numpy_helper.from_array(np.array([2, 8, 12, 12], np.int64), "sizes"))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]), up,
         helper.make_node("Conv", ["u", "k2"], ["y"], name="conv1x1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 12, 12])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    result = compile_model(proto, "prune-channels{include=[conv$]}", verify_runtime=True)
    report = result.records[0].report
    if form == "resize-sizes":
        assert report["kept_whole"] == [{"node": "conv",
                                         "reason": "Resize 'up' sets output sizes, which count the channels"}]
        return
    after = _weights(result.model)
    assert after["k"].shape == (4, 3, 3, 3) and after["k2"].shape == (4, 4, 1, 1)
    kept = _kept_columns(numpy_helper.to_array(inits[0]).reshape(8, -1).T, after["k"].reshape(4, -1).T)
    x = {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    ref = _removal_reference(proto, "k2", 1, kept)
    np.testing.assert_allclose(run(qir.to_proto(result.model), x)[0], run(ref, x)[0], rtol=1e-4, atol=1e-4)


def _unet(concat_axis: int = 1, twice: bool = False) -> onnx.ModelProto:
    """A U-Net level: enc = relu(conv1 x) [8 channels]; down = relu(conv2 maxpool(enc)) [16], upsampled by 2;
    conv3 reads concat(up, enc) [24 channels] (or, with ``twice``, concat(enc, relu(enc)): 16 channels, or 8 along
    the height); conv4 gives 3.
    Each producer's bias is distinct per channel, so the kept channels can be read back from the biases."""
    rng = np.random.default_rng(40)

    def conv(name, m, c):
        return [numpy_helper.from_array((rng.normal(size=(m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), f"{name}.w"),
                numpy_helper.from_array((0.05 + 0.01 * np.arange(m)).astype(np.float32), f"{name}.b")]

    reads = 24 if not twice else 16 if concat_axis == 1 else 8
    nodes = [helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["enc"], name="relu1"),
             helper.make_node("MaxPool", ["enc"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p", "conv2.w", "conv2.b"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Relu", ["c2"], ["down"], name="relu2"),
             helper.make_node("Resize", ["down", "", "scales"], ["up"], mode="nearest", name="up"),
             helper.make_node("Relu", ["enc"], ["enc2"], name="relu_twice"),
             helper.make_node("Concat", ["enc", "enc2"] if twice else ["up", "enc"], ["cat"], axis=concat_axis,
                              name="skip"),
             helper.make_node("Conv", ["cat", "conv3.w", "conv3.b"], ["c3"], pads=[1] * 4, name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("Conv", ["r3", "conv4.w", "conv4.b"], ["y"], pads=[1] * 4, name="conv4")]
    inits = [*conv("conv1", 8, 2), *conv("conv2", 16, 8), *conv("conv3", 12, reads), *conv("conv4", 3, 12),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    g = helper.make_graph(nodes, "unet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_through_a_concat_skip_connection_shrink_its_reader_at_each_inputs_offset():
    """A U-Net's skip connection: conv1's channels reach conv2 and, through the Concat, conv3 at offset 16; conv2's
    reach conv3 at offset 0. Both shrink, conv3 loses each group's rows at its offset, and the result equals the
    original model with the removed channels zeroed at their producers (relu(0) = 0: they carry nothing)."""
    proto = _unet()
    result = compile_model(proto, "prune-channels{sparsity=0.5}", verify_runtime=True)
    layers = {e["node"]: e for e in result.records[0].report["layers"]}
    assert set(layers) == {"conv1", "conv2", "conv3"}
    assert sorted(layers["conv1"]["next"]) == ["conv2", "conv3"] and layers["conv1"]["through_concat"] == ["conv3"]
    assert layers["conv2"]["through_concat"] == ["conv3"]
    w = _weights(result.model)
    assert w["conv1.w"].shape == (4, 2, 3, 3) and w["conv2.w"].shape == (8, 4, 3, 3)
    assert w["conv3.w"].shape == (6, 12, 3, 3) and w["conv4.w"].shape == (3, 6, 3, 3)
    reference = onnx.load_from_string(proto.SerializeToString())
    for name in ("conv1", "conv2", "conv3"):
        full = {t.name: t for t in reference.graph.initializer}
        b = numpy_helper.to_array(full[f"{name}.b"])
        gone = ~np.isin(b, w[f"{name}.b"])
        for part in ("w", "b"):
            a = numpy_helper.to_array(full[f"{name}.{part}"]).copy()
            a[gone] = 0
            full[f"{name}.{part}"].CopyFrom(numpy_helper.from_array(a, f"{name}.{part}"))
    x = np.random.default_rng(41).normal(size=(5, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"x": x})[0], run(reference, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    guided = compile_model(_unet(), "prune-channels{sparsity=0.5,sensitivity=true}", data={"x": x})
    assert guided.records[0].report["sensitivity"]["joint_error"]["guided"] <= \
        guided.records[0].report["sensitivity"]["joint_error"]["uniform"]


@pytest.mark.parametrize("concat_axis,twice,reason", [
    (2, True, "consumed by Concat 'skip' along another axis than the channels"),
    (1, True, "Concat 'skip' joins the channels to themselves")])
def test_a_concat_along_another_axis_or_of_the_channels_with_themselves_keeps_them_whole(concat_axis, twice, reason):
    result = compile_model(_unet(concat_axis, twice), "prune-channels{sparsity=0.5}")
    kept = {e["node"]: e["reason"] for e in result.records[0].report["kept_whole"]}
    assert kept["conv1"] == reason


def test_channels_through_nested_concats_and_batchnorms_equal_zeroing_the_readers_rows():
    """A dense block: every layer reads the concatenation of all before it, normalised (BatchNormalization over the
    concatenation: its parameters lose each group's entries at its offset). Removal equals the original model with
    the readers' rows of the removed channels zeroed, at each group's offset in each reader."""
    rng = np.random.default_rng(42)
    inits, nodes = [], []

    def conv(name, m, c, x):
        inits.extend([numpy_helper.from_array((rng.normal(size=(m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32),
                                              f"{name}.w"),
                      numpy_helper.from_array((0.05 + 0.01 * np.arange(m)).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], pads=[1] * 4, name=name))

    def bn_relu(name, c, x):
        params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)]
        inits.extend(numpy_helper.from_array(p.astype(np.float32), f"{name}.{k}") for p, k in zip(params, "sbmv"))
        nodes.extend([helper.make_node("BatchNormalization", [x] + [f"{name}.{k}" for k in "sbmv"], [f"{name}.n"],
                                       name=name),
                      helper.make_node("Relu", [f"{name}.n"], [f"{name}.r"], name=f"{name}.relu")])
        return f"{name}.r"

    conv("s", 4, 2, "x")
    conv("a", 3, 4, bn_relu("bn1", 4, "s"))
    nodes.append(helper.make_node("Concat", ["s", "a"], ["cat1"], axis=1, name="cat1"))
    conv("b", 3, 7, bn_relu("bn2", 7, "cat1"))
    nodes.append(helper.make_node("Concat", ["cat1", "b"], ["cat2"], axis=1, name="cat2"))
    conv("y", 2, 10, bn_relu("bn3", 10, "cat2"))
    g = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 6, 6])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(onnx.load_from_string(proto.SerializeToString()), "prune-channels{sparsity=0.5}",
                           verify_runtime=True)
    w = _weights(result.model)
    full = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dropped = {n: np.flatnonzero(~np.isin(full[f"{n}.b"], w[f"{n}.b"])) for n in "sab"}
    assert [len(d) for d in dropped.values()] == [2, 1, 1] and w["y.w"].shape == (2, 6, 3, 3)
    assert w["bn3.s"].shape == (6,)  # 10 channels: s loses 2 of its 4, a and b 1 of their 3
    reference = onnx.load_from_string(proto.SerializeToString())
    offsets = {"a": {"s": 0}, "b": {"s": 0, "a": 4}, "y": {"s": 0, "a": 4, "b": 7}}  # reader -> group -> offset
    for t in reference.graph.initializer:
        reader = t.name.split(".")[0]
        if t.name.endswith(".w") and reader in offsets:
            a = numpy_helper.to_array(t).copy()
            for group, off in offsets[reader].items():
                a[:, dropped[group] + off] = 0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    x = rng.normal(size=(5, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(qir.to_proto(result.model), {"x": x})[0], run(reference, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
