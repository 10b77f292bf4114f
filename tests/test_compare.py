"""qxc compare: output/per-layer error, first diverging node, unfused nodes, providers, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import MODELS, iris_classifier, masked_attention_data, masked_attention_model

from qxc import compile_model
from qxc import ir as qir
from qxc.cli import main
from qxc.compare import ErrorSums, compare_models
from qxc.data import load_data


def test_compare_quantized_cnn(tmp_path):
    result = compile_model(MODELS / "cnn_digits.onnx", "insert-qdq", data=MODELS / "cnn_digits_train.npz")
    ref = qir.load(MODELS / "cnn_digits.onnx")
    data = load_data(MODELS / "cnn_digits_test.npz", ref)
    cmp = compare_models(ref, result.model, data).to_json()
    out = cmp["outputs"]["logits"]
    assert 25 < out["sqnr_db"] < 60 and out["cosine"] > 0.99
    assert cmp["accuracy"]["reference"] > 0.9 and abs(cmp["accuracy"]["candidate"] - cmp["accuracy"]["reference"]) < 0.02
    layers = {e["tensor"]: e for e in cmp["layers"]}
    # r1 is compared with its dequantized value; c1 (before the folded Relu) with itself
    assert layers["r1"]["compared_with"] == "r1_dequantized" and layers["c1"]["compared_with"] == "c1"
    assert cmp["first_jump"]["tensor"] == "c1"  # the first conv loses > 6 dB against its quantized input
    assert cmp["largest_drop"]["tensor"] in layers and cmp["largest_drop"]["drop_db"] != "inf"
    assert cmp["unfused"] == []


def test_compare_cli_json_and_fail_below(tmp_path, capsys):
    q = tmp_path / "q.onnx"
    assert main(["compile", str(MODELS / "digits_mlp.onnx"), "-o", str(q), "-p", "insert-qdq", "-q",
                 "--data", str(MODELS / "digits_train.npz")]) == 0
    assert main(["compare", str(MODELS / "digits_mlp.onnx"), str(q), "--data", str(MODELS / "digits_test.npz"),
                 "--json", str(tmp_path / "c.json")]) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["outputs"]["probabilities"]["sqnr_db"] > 30
    # the Softmax computing the model's probabilities stays float on purpose: listed as such, not as a missed fusion
    assert [(u["op"], u["expected"]) for u in doc["unfused"]] == [("Softmax", True)]
    assert main(["compare", str(MODELS / "digits_mlp.onnx"), str(q), "--data", str(MODELS / "digits_test.npz"),
                 "--fail-below", "80", "--no-layers"]) == 6
    assert "fidelity below threshold" in capsys.readouterr().err


def test_same_model_on_two_providers_is_exact():
    import warnings

    ref = qir.load(MODELS / "diabetes_mlp.onnx")
    data = load_data(MODELS / "diabetes_test.npz", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda falls back to cpu here
        cmp = compare_models(ref, ref, data, ref_providers=["cpu"], cand_providers=["cuda"]).to_json()
    assert cmp["outputs"]["variable"]["sqnr_db"] == "inf"


def test_integer_tensors_are_compared_in_float64():
    from qxc.compare import ErrorSums

    s = ErrorSums()
    s.update(np.array([250, 3], np.uint8), np.array([251, 2], np.uint8))  # uint8 subtraction would wrap to 255
    assert s.max_abs == 1.0 and s.to_json()["sqnr_db"] > 40


def test_bench_cli(capsys):
    assert main(["bench", str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_mlp.onnx"), "--runs", "5",
                 "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["models"]) == 2 and all(m["median_ms"] > 0 for m in doc["models"])


def test_bench_says_the_batch_it_ran(tmp_path, capsys):
    """A model whose batch dimension is fixed at 1 runs one row, whatever --batch asks."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert main(["bench", str(tmp_path / "m.onnx"), "--batch", "8", "--runs", "3"]) == 0
    assert capsys.readouterr().out.startswith("batch 1 (asked 8;")


def test_compare_and_inspect_a_string_label_classifier_with_zipmap(tmp_path, capsys):
    """skl2onnx's defaults: string labels are compared as predictions, the ZipMap probabilities as numbers."""
    import onnx

    proto, x, labels = iris_classifier("mlp")
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=x, labels=labels)
    q = compile_model(tmp_path / "m.onnx", "insert-qdq", data=tmp_path / "d.npz")
    qir.save(q.model, tmp_path / "q.onnx")
    res = compare_models(qir.load(tmp_path / "m.onnx"), qir.load(tmp_path / "q.onnx"),
                         load_data(tmp_path / "d.npz", q.model)).to_json()
    assert list(res["outputs"]) == ["output_probability"]  # the labels are strings: no SQNR for them
    assert res["outputs"]["output_probability"]["sqnr_db"] > 25
    acc = res["accuracy"]
    assert acc["agreement"] > 0.95 and acc["reference"] == np.mean(_labels_of(tmp_path / "m.onnx", x) == labels)
    assert main(["inspect", str(tmp_path / "q.onnx")]) == 0
    assert "output_probability: seq(map(string,tensor(float)))" in capsys.readouterr().out


def _labels_of(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["output_label"], {"X": x})[0]


def test_compare_a_multi_output_regressor_with_its_targets(tmp_path):
    """Two-column regression targets are not class labels: no accuracy (it crashed broadcasting them)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype(np.float32), np.stack([y, np.sqrt(y) * 10], axis=1)
    model = qir.from_proto(to_onnx(LinearRegression().fit(x, y), x[:1]))  # a (rows, 2) output
    res = compare_models(model, qir.clone(model), load_data({"X": x, "labels": y}, model)).to_json()
    assert not res["accuracy"] and res["outputs"]["variable"]["sqnr_db"] == "inf"


def test_bench_without_data_refuses_string_inputs_and_names_onnxruntime_failures(tmp_path, capsys):
    """Random inputs cannot make up categories: a string input asks for --data, and a model that fails on the
    made-up integers (an encoder meeting category 0) is a named model error, not an internal one."""
    import onnx
    from helpers import mixed_pipeline
    from onnx import TensorProto, helper

    onnx.save(mixed_pipeline()[0], tmp_path / "strings.onnx")
    assert main(["bench", str(tmp_path / "strings.onnx"), "--runs", "3"]) == 2
    assert "input 'cat' takes strings" in capsys.readouterr().err
    enc = helper.make_node("OneHotEncoder", ["x"], ["y"], domain="ai.onnx.ml", cats_int64s=[1, 2], zeros=0)
    graph = helper.make_graph([enc], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [None, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]),
              tmp_path / "ints.onnx")
    assert main(["bench", str(tmp_path / "ints.onnx"), "--runs", "3"]) == 3
    err = capsys.readouterr().err
    assert "ints.onnx: onnxruntime failed on random inputs" in err and "pass --data" in err


def test_data_the_model_cannot_run_is_a_one_line_data_error(tmp_path, capfd):
    """Token ids past the embedding table: onnxruntime fails; compare and explain say so in one line, exit 5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), "emb")
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
                               helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0, axes=[1])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", ids=np.full((12, 3), 50, np.int64))
    for argv in (["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")], ["explain", str(tmp_path / "m.onnx")]):
        assert main([*argv, "--data", str(tmp_path / "d.npz")]) == 5
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qxc: error: onnxruntime failed on the sample data:")
        assert "Gather node" in err[0] and "embed" in err[0]


def test_infinities_agree_where_both_models_hold_them():
    """A padding mask's -inf in both models is no error (and no numpy warning); where one model lost it, the error
    is infinite and the mismatches are counted."""
    import warnings

    ref = np.array([[-np.inf, 1.0, 2.0], [np.nan, 4.0, -1.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = ErrorSums()
        same.update(ref, np.array([[-np.inf, 1.0, 2.1], [np.nan, 4.0, -1.0]], np.float32))
        lost = ErrorSums()
        lost.update(ref, np.array([[-5.0, 1.0, 2.0], [np.nan, 4.0, -1.0]], np.float32))
    got = same.to_json()
    assert got["sqnr_db"] == pytest.approx(10 * np.log10(22 / 0.01), rel=1e-4) and "nonfinite_mismatches" not in got
    assert lost.to_json() == {"sqnr_db": "-inf", "cosine": 1.0, "max_abs": "inf", "elements": 6,
                              "nonfinite_mismatches": 1, "nonfinite_reference": 2}
    assert got["nonfinite_reference"] == 2  # the reference's own infinities and NaN, counted


def test_an_output_of_nothing_but_nan_says_its_figures_compare_nothing(tmp_path, capsys):
    """Activations that overflow in both models (a deep residual stack) make every output value NaN: an SQNR of inf
    and a cosine of 1 then compare nothing, and the output line says so."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Div", ["x", "zero"], ["r"]), helper.make_node("Sub", ["r", "r"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    import onnx

    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((3, 4), np.float32))  # x / 0 = inf, inf - inf = NaN
    assert main(["compare", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--no-layers"]) == 0
    out = capsys.readouterr().out
    assert ("output y: SQNR inf dB, cosine 1.000000, max abs 0; the reference holds 12 infinities or NaN of 12 "
            "values (the figures compare none)") in out
    assert "agreement" not in out  # rows of NaN scores predict no class (argmax named the first NaN: 1.0000)
    from qxc.compare import _predictions

    pred, valid = _predictions([np.array([[0.2, 0.8], [np.nan, 0.1], [0.9, 0.1]], np.float32)])
    assert pred[[0, 2]].tolist() == [1, 0] and valid.tolist() == [True, False, True]
    from qxc.report import build_report, write_report

    model = qir.load(tmp_path / "m.onnx")
    fidelity = compare_models(model, model, load_data(tmp_path / "d.npz", model), layers=False).to_json()
    page = write_report(build_report(title="m", fidelity=fidelity), tmp_path / "r.html").read_text()
    assert "the original model gives 12 infinities or NaN of 12 values: the figures above compare none." in page


def test_compare_names_the_first_tensor_that_lost_its_infinities(tmp_path, capsys):
    """A candidate whose padding mask became finite (what rounding -inf to int8 did) is pointed at the tensor where
    the infinities were first lost; the reference against itself has none."""
    import onnx

    ref = masked_attention_model()
    cand = masked_attention_model()
    neg = next(t for t in cand.graph.initializer if t.name == "neg_inf")
    neg.CopyFrom(onnx.numpy_helper.from_array(np.array(-5.0, np.float32), "neg_inf"))
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    np.savez(tmp_path / "d.npz", **masked_attention_data())
    data = load_data(tmp_path / "d.npz", qir.from_proto(ref))
    result = compare_models(qir.from_proto(ref), qir.from_proto(cand), data).to_json()
    assert result["first_nonfinite"]["tensor"] == "bias" and result["first_nonfinite"]["sqnr_db"] == "-inf"
    assert compare_models(qir.from_proto(ref), qir.from_proto(ref), data).to_json()["first_nonfinite"] is None
    assert main(["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--data",
                 str(tmp_path / "d.npz")]) == 0
    assert "infinities or NaN first lost: bias (Where mask_bias)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--data",
                 str(tmp_path / "d.npz"), "--json", str(tmp_path / "c.json")]) == 0
    assert main(["report", str(tmp_path / "c.json"), "-o", str(tmp_path / "c.html")]) == 0
    assert "Infinities or NaN first lost at <code>bias</code> (Where)" in (tmp_path / "c.html").read_text()
