"""instrument: functional copy with taps (main graph, If branches, Loop bodies) and an honest manifest."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import REFERENCE, feeds_for, iris_classifier, run
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir
from qxc.passes.instrument import InstrumentOptions, InstrumentPass


def _taps(model, **opts):
    p = InstrumentPass(InstrumentOptions(**opts))
    result = p(model)
    return p.manifest, result.model


def test_every_float_tensor_is_exposed_and_values_match_the_model():
    path, data = REFERENCE["cnn_digits"]
    model = qir.load(path)
    before = qir.fingerprint(model)
    manifest, inst = _taps(model)
    assert qir.fingerprint(model) == before  # functional
    assert [t.tensor for t in manifest.taps] == ["image", "c1", "r1", "p1", "c2", "r2", "p2", "features", "logits"]
    assert manifest.by_tensor()["r1"].op == "Relu" and manifest.by_tensor()["r1"].node == "relu1"
    feeds = feeds_for(path, data, rows=5)
    outs = dict(zip([o.name for o in qir.to_proto(inst).graph.output], run(qir.to_proto(inst), feeds)))
    np.testing.assert_array_equal(outs["logits"], run(path, feeds)[0])
    np.testing.assert_array_equal(outs["r1"], np.maximum(outs["c1"], 0))


def test_filters_by_op_and_name():
    model = qir.load(REFERENCE["cnn_digits"][0])
    manifest, _ = _taps(model, ops=("Relu",), inputs=False)
    assert [t.tensor for t in manifest.taps] == ["r1", "r2"]
    manifest, _ = _taps(model, names="^c[12]$", inputs=False)
    assert [t.tensor for t in manifest.taps] == ["c1", "c2"]


def test_if_branch_tensors_come_out_of_the_branch_taken():
    path, data = REFERENCE["if_constants"]
    model = qir.load(path)
    manifest, inst = _taps(model, ops=("Relu",))
    taps = {t.tensor: t for t in manifest.taps}
    assert taps["then.a"].kind == "if-branch" and taps["then.a"].graph == "branch/then_branch"
    x = np.abs(feeds_for(path, data)["x"][:4])  # sum > 0: the then branch
    outs = dict(zip([o.name for o in qir.to_proto(inst).graph.output], run(qir.to_proto(inst), {"x": x})))
    assert outs[taps["then.a"].output].shape == (4, 8) and outs[taps["else.a"].output].size == 0
    if_node = next(n for n in onnx.load(path).graph.node if n.op_type == "If")
    then_g = next(a.g for a in if_node.attribute if a.name == "then_branch")
    w1 = next(n for n in then_g.node if n.output[0] == "then.w1").attribute[0].t
    np.testing.assert_allclose(outs[taps["then.a"].output], np.maximum(x @ numpy_helper.to_array(w1), 0), rtol=1e-5)


def test_loop_body_tensors_come_out_per_iteration():
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "two"], ["doubled"], name="double"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Relu", ["doubled"], ["acc_out"], name="relu")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(2, np.float32), "two")])
    g = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    manifest, inst = _taps(qir.from_proto(m))
    taps = {t.tensor: t for t in manifest.taps if t.kind == "loop-scan"}
    assert set(taps) == {"doubled", "acc_out"}
    feeds = {"x": np.array([1.0, -1.0], np.float32), "n": np.array(3, np.int64)}
    outs = dict(zip([o.name for o in qir.to_proto(inst).graph.output], run(qir.to_proto(inst), feeds)))
    np.testing.assert_array_equal(outs[taps["doubled"].output], [[2, -2], [4, 0], [8, 0]])
    np.testing.assert_array_equal(outs["y"], [8, 0])


def test_instrumented_copy_keeps_a_zipmap_output():
    proto, x, _ = iris_classifier("mlp")
    result = compile_model(proto, "instrument", verify_runtime=True)
    out = qir.to_proto(result.model)
    assert out.graph.output[1].type.HasField("sequence_type")  # the held-aside type came along with the copy
    got = run(out, {"X": x[:4]})
    assert len(got) > 2 and isinstance(got[1][0], dict)
