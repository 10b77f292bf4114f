"""fold-batchnorm: the folded model computes what the original does (onnxruntime, optimizations off), and QDQ
after folding is fused without a float BatchNormalization in between."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

from qxc import compile_model
from qxc import ir as qir


def _bn(prefix: str, c: int, rng) -> tuple[list, list[str]]:
    names = [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")]
    arrays = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2, c)]
    return [numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip(names, arrays)], names


def _model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> ConvTranspose -> BN -> Relu -> GAP -> Flatten -> Gemm -> BN (the graph output), the way
    PyTorch exports Conv2d/ConvTranspose2d/Linear followed by BatchNorm in eval mode."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("k1", rng.normal(0, 0.3, (8, 3, 3, 3))), ("kt", rng.normal(0, 0.2, (8, 6, 2, 2))),
              ("wf", rng.normal(0, 0.3, (5, 6))), ("bf", rng.normal(0, 0.1, 5)))]
    nodes = []
    for prefix, c in (("bn1", 8), ("bn2", 6), ("bn3", 5)):
        params, names = _bn(prefix, c, rng)
        inits += params
        nodes.append(names)
    mk = helper.make_node
    graph = helper.make_graph(
        [mk("Conv", ["x", "k1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         mk("BatchNormalization", ["c1", *nodes[0]], ["n1"], name="bn1"), mk("Relu", ["n1"], ["r1"]),
         mk("ConvTranspose", ["r1", "kt"], ["c2"], name="up", strides=[2, 2]),
         mk("BatchNormalization", ["c2", *nodes[1]], ["n2"], name="bn2", epsilon=1e-3), mk("Relu", ["n2"], ["r2"]),
         mk("GlobalAveragePool", ["r2"], ["p"]), mk("Flatten", ["p"], ["f"]),
         mk("Gemm", ["f", "wf", "bf"], ["g"], name="fc", transB=1),
         mk("BatchNormalization", ["g", *nodes[2]], ["y"], name="bn3")],
        "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folded_model_computes_the_same_and_keeps_its_signature():
    proto = _model()
    result = compile_model(proto, "fold-batchnorm", verify_runtime=True)
    model = qir.to_proto(result.model)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 0
    assert result.records[0].report["folded"] == [{"node": "bn1", "into": "conv1"}, {"node": "bn2", "into": "up"},
                                                  {"node": "bn3", "into": "fc"}]
    assert [o.name for o in model.graph.output] == ["y"]
    assert not any(i.name.startswith("bn") for i in model.graph.initializer)  # the statistics are gone
    x = {"x": np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(model, x, optimization=False)[0], run(proto, x, optimization=False)[0],
                               rtol=1e-5, atol=1e-5)
    assert not compile_model(model, "fold-batchnorm").modified  # nothing left to fold


def test_batchnorm_that_cannot_fold_is_kept_with_the_reason():
    proto = _model()
    g = proto.graph
    g.node.append(helper.make_node("Add", ["c1", "c1"], ["c1_twice"]))  # c1 read elsewhere too
    g.output.append(helper.make_tensor_value_info("c1_twice", TensorProto.FLOAT, ["n", 8, 8, 8]))
    result = compile_model(proto, "fold-batchnorm")
    assert result.records[0].report["kept"] == [{"node": "bn1", "reason": "'c1' is also read elsewhere"}]
    assert [f["node"] for f in result.records[0].report["folded"]] == ["bn2", "bn3"]


@pytest.mark.parametrize("recipe", ["int8-qdq", "int8-weights"])
def test_recipes_fold_before_quantizing(recipe):
    """With the BatchNormalization folded, insert-qdq's Relu folds into the Conv's range and onnxruntime runs no
    float BatchNormalization between Q/DQ; the recipe's error is no worse than quantizing the unfolded model."""
    proto = _model()
    x = {"x": np.random.default_rng(2).normal(size=(64, 3, 8, 8)).astype(np.float32)}
    folded = compile_model(proto, recipe, data=x)
    assert folded.records[[r.name for r in folded.records].index("fold-batchnorm")].modified
    model = qir.to_proto(folded.model)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    pipeline = "insert-qdq" if recipe == "int8-qdq" else "quantize-weights{bits=8,granularity=channel,method=mse}"
    unfolded = qir.to_proto(compile_model(proto, pipeline, data=x).model)
    ref = run(proto, x)[0]
    assert sqnr_db(ref, run(model, x)[0]) >= sqnr_db(ref, run(unfolded, x)[0]) - 0.5
    assert len(model.graph.node) < len(unfolded.graph.node)
