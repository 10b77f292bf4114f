"""insert-qdq: fidelity against onnxruntime's quantize_static, the fusions onnxruntime achieves, subgraphs, options."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    MODELS,
    REFERENCE,
    as_half,
    feeds_for,
    left_weight_model,
    masked_attention_data,
    masked_attention_model,
    mlp_model,
    run,
    sqnr_db,
)
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir
from qxc.errors import UsageError


def _optimized_ops(model) -> collections.Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = f"{tmp}/o.onnx"
        ort.InferenceSession(qir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(f"{tmp}/o.onnx").graph.node)


def _accuracy(model, data, key="X"):
    with np.load(data) as z:
        outs = run(qir.to_proto(model) if not isinstance(model, str) else model, {key: z[key]})
        return float((outs[0] == z["labels"]).mean()) if outs[0].ndim == 1 else \
            float((outs[0].argmax(1) == z["labels"]).mean())


def test_digits_accuracy_and_full_fusion():
    result = compile_model(MODELS / "digits_mlp.onnx", "fold-constants,insert-qdq,cleanup",
                           data=MODELS / "digits_train.npz", verify_runtime=True)
    drop = _accuracy(str(MODELS / "digits_mlp.onnx"), MODELS / "digits_test.npz") - \
        _accuracy(result.model, MODELS / "digits_test.npz")
    assert drop <= 0.005
    ops = _optimized_ops(result.model)
    assert ops["QLinearMatMul"] == 3 and ops["QLinearAdd"] == 3 and "MatMul" not in ops


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_weights_applied_from_the_left_fuse_into_qlinear_matmul(tmp_path, activations):
    """``W @ x``: the weight is QLinearMatMul's input A, whose type onnxruntime requires to be the activations'
    (no (int8, uint8) pair fuses): uint8 beside uint8 activations, int8 beside int8; one scale (A's per-tensor)."""
    onnx.save(left_weight_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = compile_model(tmp_path / "m.onnx", f"insert-qdq{{activations={activations}}}", data=tmp_path / "d.npz",
                           verify_runtime=True)
    assert result.records[0].report["weights"] == 2
    weights = {n.inputs[0].name: n.inputs[0].const_value for n in result.model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None}
    assert {w.dtype.name.lower() for w in weights.values()} == {activations}
    if activations == "uint8":  # onnxruntime's CPU kernels (int8 activations are for CUDA/TensorRT)
        ops = _optimized_ops(result.model)
        assert ops["QLinearMatMul"] == 2 and "MatMul" not in ops
    assert sqnr_db(run(left_weight_model(), {"x": x})[0], run(qir.to_proto(result.model), {"x": x})[0]) > 30


def test_an_attention_masks_infinities_stay_float(tmp_path):
    """PyTorch's padding mask adds -inf to the scores of padded keys. Rounded to int8, -inf became the range's
    finite end, the padded keys got probability again and a tiny BERT fell to 7 dB; the tensors that held
    infinities on the calibration data stay float, with the reason, and the padded keys keep probability 0."""
    onnx.save(masked_attention_model(), tmp_path / "m.onnx")
    feeds = masked_attention_data()
    np.savez(tmp_path / "d.npz", **feeds)
    result = compile_model(tmp_path / "m.onnx", "insert-qdq", data=tmp_path / "d.npz", verify_runtime=True)
    report = result.records[0].report
    kept = {s["tensor"] for s in report["skipped"] if "infinities" in s.get("reason", "")}
    assert {"bias3", "masked"} <= kept
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert not quantized & {"bias", "bias3", "masked"} and {"scores", "probs"} <= quantized
    want, got = run(masked_attention_model(), feeds)[0], run(qir.to_proto(result.model), feeds)[0]
    assert sqnr_db(want, got) > 25
    from qxc.compare import unfused_nodes  # the masked Add cannot fuse, and compare does not call it a miss

    masked = [u for u in unfused_nodes(result.model) if u["node"] == "masked"]
    assert len(masked) == 1 and masked[0]["expected"] and "left float" in masked[0]["reason"]



def _causal_attention_model(d: int = 16, t: int = 6) -> onnx.ModelProto:
    """Self-attention whose causal mask is a constant, as PyTorch's dynamo exporter folds it: -inf above the
    diagonal, added to the scores."""
    m = masked_attention_model(d, t)
    g = m.graph
    keep = [n for n in g.node if n.name not in ("mask_bias", "bias3")]
    causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    g.initializer.append(numpy_helper.from_array(causal, "causal"))
    for n in keep:
        if n.name == "masked":
            n.input[1] = "causal"
    del g.node[:]
    g.node.extend(keep)
    del g.input[1:]
    return m


def test_a_constant_mask_with_infinities_stays_float(tmp_path):
    """A constant mask holding -inf (the dynamo export of a causal GPT) was rounded like any constant: its -inf
    became a finite code, every token attended to the future, and a small GPT's int8 logits fell from 30.7 to
    13.9 dB. It stays float, with the reason, and the outputs keep the float model's."""
    onnx.save(_causal_attention_model(), tmp_path / "m.onnx")
    feeds = {"x": masked_attention_data()["x"]}
    np.savez(tmp_path / "d.npz", **feeds)
    result = compile_model(tmp_path / "m.onnx", "insert-qdq", data=tmp_path / "d.npz", verify_runtime=True)
    assert {"tensor": "causal", "reason": "constant holds infinities or NaN (a mask's -inf): kept float"} in \
        result.records[0].report["skipped"]
    masked = next(n for n in result.model.graph if n.name == "masked")
    assert masked.inputs[1].name == "causal" and masked.inputs[1].const_value is not None
    want, got = run(_causal_attention_model(), feeds)[0], run(qir.to_proto(result.model), feeds)[0]
    assert sqnr_db(want, got) > 25

def test_cnn_fuses_conv_relu_pool_gemm_and_matches_quantize_static(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    path, test = REFERENCE["cnn_digits"]
    train = MODELS / "cnn_digits_train.npz"
    with np.load(train) as z:
        images = z["image"][:128]
    result = compile_model(path, "insert-qdq", data={"image": images})
    ops = _optimized_ops(result.model)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and "Relu" not in ops and "Conv" not in ops

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"image": images[i : i + 1]} for i in range(len(images)))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(path), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    feeds = feeds_for(path, test)
    ref = run(path, feeds)[0]
    theirs = sqnr_db(ref, run(tmp_path / "ort.onnx", feeds)[0])
    # like onnxruntime, with the logits rounded to 8 bits too: the same model within float noise
    same = compile_model(path, "insert-qdq{quantize-outputs=true}", data={"image": images})
    assert abs(sqnr_db(ref, run(qir.to_proto(same.model), feeds)[0]) - theirs) < 0.05
    # by default the logits stay float (QGemm computes them in float from int8 inputs, still fused): better
    ours = sqnr_db(ref, run(qir.to_proto(result.model), feeds)[0])
    assert ours > theirs + 0.1


def test_relu_is_folded_into_the_producer_range():
    result = compile_model(MODELS / "cnn_digits.onnx", "insert-qdq", data=MODELS / "cnn_digits_train.npz")
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert "c1" not in quantized and "r1" in quantized  # no QDQ between Conv and Relu
    r1_zp = next(n.inputs[2].const_value.numpy() for n in result.model.graph
                 if n.op_type == "QuantizeLinear" and n.inputs[0].name == "r1")
    assert r1_zp == 0  # uint8 zero point 0: the quantizer clips at 0 like Relu
    # MaxPool shares its input's scale
    scale = {n.inputs[0].name: float(n.inputs[1].const_value.numpy()) for n in result.model.graph
             if n.op_type == "QuantizeLinear"}
    assert scale["p1"] == scale["r1"]


def test_int8_symmetric_activations_for_gpu_providers():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz",
                               providers=("cuda", "cpu"))
    zps = [n.inputs[2].const_value for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype.name == "INT8" and int(z.numpy()) == 0 for z in zps)
    assert result.records[0].report["activation_type"] == "int8"


def test_if_branches_with_constant_weights_are_quantized():
    path, data = REFERENCE["if_constants"]
    result = compile_model(path, "fold-constants,insert-qdq,cleanup", data=data, verify_runtime=True)
    branches = list(result.model.graph.subgraphs())
    for g in branches:
        ops = collections.Counter(n.op_type for n in g)
        assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 4, ops
    feeds = feeds_for(path, data)
    assert sqnr_db(run(path, feeds)[0], run(qir.to_proto(result.model), feeds)[0]) > 25


def test_exclusions_int16_and_saved_ranges(tmp_path):
    ranges = tmp_path / "ranges.json"
    spec = f'insert-qdq{{exclude=[fc],exclude-ops=[MaxPool],int16=[conv2],save-ranges="{ranges}"}}'
    result = compile_model(MODELS / "cnn_digits.onnx", spec, data=MODELS / "cnn_digits_train.npz")
    report = result.records[0].report
    assert {"node": "fc", "op": "Gemm", "reason": "excluded"} in report["skipped"]
    assert result.model.opset_imports[""] == 21 and "r2" in report["int16_tensors"]
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].producer() is None  # fc weight left in float
    doc = json.loads(ranges.read_text())
    assert doc["schema"] == "qxc.ranges/1" and "r1" in doc["ranges"]
    # the saved ranges reproduce the model without data
    again = compile_model(MODELS / "cnn_digits.onnx", spec.replace("save-ranges", "ranges"))
    assert qir.fingerprint(again.model) == qir.fingerprint(result.model)


def test_methods_change_ranges_and_errors_are_named():
    base = compile_model(MODELS / "cnn_digits.onnx", "insert-qdq", data=MODELS / "cnn_digits_train.npz")
    ent = compile_model(MODELS / "cnn_digits.onnx", "insert-qdq{method=entropy}", data=MODELS / "cnn_digits_train.npz")
    assert qir.fingerprint(base.model) != qir.fingerprint(ent.model)
    with pytest.raises(UsageError, match="needs sample data"):
        compile_model(MODELS / "cnn_digits.onnx", "insert-qdq")
    with pytest.raises(UsageError, match="exclude pattern 'nope' matched no node"):
        compile_model(MODELS / "cnn_digits.onnx", "insert-qdq{exclude=[nope]}", data=MODELS / "cnn_digits_train.npz")


def test_max_error_budget_is_met_by_falling_back():
    spec = "insert-qdq{max-error=0.01,fallback=float}"
    result = compile_model(MODELS / "cnn_digits.onnx", spec, data=MODELS / "cnn_digits_train.npz")
    budget = result.records[0].report["budget"]
    assert budget["history"][0]["error"] > 0.01 >= budget["history"][-1]["error"]
    assert budget["history"][-1]["float"]
    assert budget["met"] and budget["achieved"] == budget["history"][-1]["error"]
    assert "warnings" not in result.records[0].report


def test_already_quantized_model_is_left_alone():
    first = compile_model(MODELS / "cnn_digits.onnx", "insert-qdq", data=MODELS / "cnn_digits_train.npz")
    again = compile_model(first.model, "insert-qdq", data=MODELS / "cnn_digits_train.npz")
    assert not again.modified and "already holds QuantizeLinear" in again.records[0].report["skipped_model"]


def test_graph_outputs_stay_float_even_behind_identity_and_are_more_accurate():
    """skl2onnx's MLP: Softmax -> Identity -> 'probabilities'. The Softmax result is the model's output: by default it
    is not rounded to 8 bits (1/255 steps in probability), which costs nothing in speed."""
    path, test = REFERENCE["digits_mlp"]
    feeds = feeds_for(path, test)
    ref = run(path, feeds)[1]
    got = {}
    for flag in ("true", "false"):
        result = compile_model(path, f"insert-qdq{{quantize-outputs={flag}}}", data=MODELS / "digits_train.npz")
        softmax = next(n for n in result.model.graph if n.op_type == "Softmax")
        users = {u.node.op_type for u in softmax.outputs[0].uses()}
        assert ("QuantizeLinear" in users) == (flag == "true")
        got[flag] = sqnr_db(ref, run(qir.to_proto(result.model), feeds)[1])
    assert got["false"] > got["true"] + 0.5


@pytest.mark.parametrize("pipeline", ["insert-qdq", "insert-qdq{int16=fc1}"])
def test_float16_models_get_float16_scales_at_opset_19(pipeline):
    proto = as_half(mlp_model(sizes=(32, 64, 8), seed=5, opset=17))
    x = np.random.default_rng(0).normal(size=(128, 32)).astype(np.float16)
    ref = run(proto, {"x": x})[0]
    result = compile_model(proto, pipeline, data={"x": x}, verify_runtime=True)
    assert result.model.opset_imports[""] == (21 if "int16" in pipeline else 19)
    got = run(qir.to_proto(result.model), {"x": x})[0]
    assert got.dtype == np.float16
    assert sqnr_db(ref, got) > 25
    quant = [n for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert quant and all(n.inputs[1].const_value.dtype.name == "FLOAT16" for n in quant)


def test_ops_without_a_quantized_compute_neighbour_stay_float():
    """A table pipeline's only float ops are a Concat of raw features and a Reshape: QDQ there would be rounding
    that no integer kernel pays for (here 8 points of accuracy: the concave-points column, 0 to 0.2, rounded in the
    radius column's steps of 0.11). The model is left as it was, with a warning, unless isolated=true. (An isolated
    op next to a quantized MatMul elsewhere is reported per node: see the unnamed-Relu test.)"""
    from helpers import mixed_pipeline

    proto, feeds, y = mixed_pipeline(per_column=True)
    data = {k: v.astype(object) if v.dtype.kind == "U" else v for k, v in feeds.items()}
    kept = compile_model(proto, "insert-qdq", data=data)
    report = kept.records[0].report
    assert not kept.modified and report["quantized_nodes"] == 0
    assert report["warnings"][0].startswith("nothing to quantize: no Conv/ConvTranspose/MatMul/Gemm in the model")
    forced = compile_model(proto, "insert-qdq{isolated=true}", data=data)
    assert forced.modified and forced.records[0].report["quantized_nodes"] == 3
    assert np.mean(run(qir.to_proto(forced.model), data)[0] != run(proto, data)[0]) > 0.05  # the rounding shows
    # next to a MatMul the same ops are quantized: digits' QDQ count is what it was
    digits = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz")
    assert not [s for s in digits.records[0].report["skipped"] if "no Conv/MatMul/Gemm" in s["reason"]]


def test_compute_after_an_onnxruntime_contrib_op_is_quantized():
    """An onnxruntime-optimized FFN: MatMul -> com.microsoft FastGelu -> MatMul. ONNX's shape inference stops at
    the contrib op; the second MatMul's input still gets its QDQ (it was left float, untyped), and onnxruntime
    fuses both MatMuls."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("w1", rng.normal(0, 0.25, (16, 64))), ("b1", rng.normal(0, 0.1, 64)), ("w2", rng.normal(0, 0.125, (64, 8))))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("FastGelu", ["h", "b1"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.normal(size=(256, 16)).astype(np.float32)
    result = compile_model(proto, "insert-qdq", data={"x": x})
    model = qir.to_proto(result.model)
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert "g_quantized" in quantized
    assert _optimized_ops(result.model)["MatMulIntegerToFloat"] + _optimized_ops(result.model)["QLinearMatMul"] == 2
    assert sqnr_db(run(proto, {"x": x})[0], run(model, {"x": x})[0]) > 25


def test_isolated_filter_counts_unnamed_nodes_by_identity():
    """Two unnamed Relus: one folded into a MatMul's range (quantized), one alone on a graph input (left float).
    Both are called 'Relu' in reports; the count must still be right."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Relu", ["m"], ["y1"]),
         helper.make_node("Relu", ["x2"], ["y2"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 4]) for n in ("x", "x2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 4]) for n in ("y1", "y2")], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {n: np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32) for n in ("x", "x2")}
    report = compile_model(proto, "insert-qdq", data=data).records[0].report
    assert report["quantized_nodes"] == 2
    assert [(s["op"], "no Conv/MatMul/Gemm" in s["reason"]) for s in report["skipped"]] == [("Relu", True)]


def test_a_model_with_nothing_to_quantize_says_so_and_is_not_calibrated(capsys, tmp_path):
    """A tree ensemble has no Conv/MatMul/Gemm: both quantizers warn, naming what the model computes with, and
    insert-qdq runs no calibration over the data."""
    from qxc.cli import main

    qdq = compile_model(MODELS / "breast_cancer_gb.onnx", "insert-qdq", data=MODELS / "breast_cancer_train.npz")
    report = qdq.records[0].report
    assert not qdq.modified and "samples" not in report  # no calibration run
    assert report["warnings"] == ["nothing to quantize: no Conv/ConvTranspose/MatMul/Gemm in the model (it computes "
                                  "with ai.onnx.ml::TreeEnsembleClassifier); this pass leaves it as it was"]
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_iris(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=3, max_depth=2, random_state=0).fit(x.astype(np.float32), y)
    old = to_onnx(forest, x[:1].astype(np.float32), target_opset={"": 11, "ai.onnx.ml": 1})
    kept = compile_model(old, "insert-qdq", data={"X": x.astype(np.float32)})
    assert not kept.modified and kept.model.opset_imports[""] == 11  # not raised to 13 for nothing
    weights = compile_model(MODELS / "breast_cancer_gb.onnx", "quantize-weights")
    assert "TreeEnsembleClassifier" in weights.records[0].report["warnings"][0]
    digits = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz")
    assert "warnings" not in digits.records[0].report
    assert main(["compile", str(MODELS / "breast_cancer_gb.onnx"), "-o", str(tmp_path / "o.onnx"), "-p",
                 "int4-weights", "-q"]) == 0
    assert "qxc: warning: pass 'quantize-weights': nothing to quantize" in capsys.readouterr().err


def test_a_batched_matmuls_weight_of_rank_three_takes_one_scale_and_runs_in_onnxruntime(tmp_path):
    """Per-column scales of a (heads, K, N) weight are valid ONNX, but onnxruntime fuses the QDQ MatMul into
    MatMulIntegerToFloat, which takes per-column parameters of a 2-D weight only and failed at run time ("b zero
    point is not valid"): such a weight gets one scale."""
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 10, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 10, 48])],
                          [numpy_helper.from_array(rng.normal(size=(4, 64, 48)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    feeds = {"x": rng.normal(size=(16, 4, 10, 64)).astype(np.float32)}
    result = compile_model(qir.from_proto(m), "insert-qdq", data=feeds)
    dq = next(n for n in result.model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    assert dq.inputs[1].const_value.numpy().ndim == 0
    out = ort.InferenceSession(qir.to_proto(result.model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert sqnr_db(run(m, feeds)[0], out) > 30


def test_a_float16_models_concat_stays_float_so_onnxruntime_loads_it():
    """onnxruntime fuses DQ -> Concat -> Q into QLinearConcat, which takes float32 scales only: a float16 U-Net's
    int8 model failed to load. The Concat and its output stay float, with the reason; the Convs are quantized."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 4, 3, 3)), ("w2", (8, 4, 3, 3)), ("w3", (4, 16, 1, 1)))]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="left"),
                           helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1], name="right"),
                           helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="cat"),
                           helper.make_node("Conv", ["ab", "w3"], ["y"], name="mix")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    half = as_half(m)
    feeds = {"x": rng.normal(size=(16, 4, 8, 8)).astype(np.float16)}
    result = compile_model(qir.from_proto(half), "insert-qdq", data=feeds)  # runs the first sample in onnxruntime
    report = result.records[0].report
    assert {"node": "cat", "op": "Concat", "reason": "float16: onnxruntime's QLinearConcat takes float32 scales only; "
            "kept float"} in report["skipped"]
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert {"x", "a", "b"} <= quantized and "ab" not in quantized
    out = ort.InferenceSession(qir.to_proto(result.model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert sqnr_db(run(half, feeds)[0].astype(np.float32), out.astype(np.float32)) > 25


def test_a_float64_model_is_left_as_it_was_with_the_reason_and_modified_false():
    """skl2onnx exports a float64 pipeline on request: QuantizeLinear and DequantizeLinear take no float64, so both
    quantizers leave it unchanged, say why, and do not claim a change (insert-qdq used to count the MatMul as
    quantized and report the model modified while inserting nothing)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    model = to_onnx(LinearRegression().fit(x, y), x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    before = qir.to_proto(qir.from_proto(model)).SerializeToString()  # as qxc writes it, unchanged
    qdq = compile_model(model, "insert-qdq", data={"X": x})
    report = qdq.records[0].report
    assert not qdq.modified and not qdq.records[0].modified and report["activation_qdq"] == 0
    assert "float64: QuantizeLinear takes float32 and float16 only" in report["warnings"][0]
    assert {s["op"] for s in report["skipped"]} >= {"MatMul"}
    assert qir.to_proto(qdq.model).SerializeToString() == before
    weights = compile_model(model, "quantize-weights{min-elements=1}")
    assert not weights.modified
    assert weights.records[0].report["warnings"] == [
        "nothing quantized (1 skipped); the first, 'coef': dtype DOUBLE: DequantizeLinear yields float32, float16 or "
        "bfloat16 only (export the model in float32)"]
