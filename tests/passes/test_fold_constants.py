"""fold-constants: Constant lifting (also inside If branches), folding evaluated by onnxruntime, what is left alone."""

from __future__ import annotations

import numpy as np
from helpers import REFERENCE, feeds_for, run

from qxc import compile_model
from qxc import ir as qir


def test_if_branch_constants_become_initializers_with_identical_outputs():
    path, data = REFERENCE["if_constants"]
    feeds = feeds_for(path, data)
    result = compile_model(path, "fold-constants,cleanup")
    model = result.model
    branch_inits = {n for g in model.graph.subgraphs() for n in g.initializers}
    assert {"then.w1", "then.w2", "then.b", "else.w1", "else.w2", "else.b"} <= branch_inits
    assert "Constant" not in result.stats_after["ops"]
    assert result.records[0].report["lifted"] == 8
    for a, b in zip(run(path, feeds), run(qir.to_proto(model), feeds)):
        np.testing.assert_array_equal(a, b)


def test_constant_subexpressions_fold_to_runtime_values():
    model = qir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] x) => (float[N, 3] y) <float[3] a = {1.5, -2.0, 3.25}, float[3] b = {0.1, 0.2, 0.3}> {
    s = Add (a, b)
    e = Exp (s)
    y = Mul (x, e)
}""")
    result = compile_model(model, "fold-constants,cleanup")
    ops = result.stats_after["ops"]
    assert ops == {"Mul": 1}
    folded = next(iter(result.model.graph.initializers.values())).const_value.numpy()
    expected = np.exp(np.array([1.5, -2.0, 3.25], np.float32) + np.array([0.1, 0.2, 0.3], np.float32))
    np.testing.assert_array_equal(folded, expected)


def test_random_quantize_and_graph_inputs_are_not_folded():
    model = qir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, float[3] over) => (float[3] y, float[3] z, uint8[3] q) <float[3] over = {1.0, 2.0, 3.0}, float sc = {0.1}> {
    r = RandomUniform <shape = [3]> ()
    y = Add (x, r)
    z = Add (x, over)
    q = QuantizeLinear (over, sc)
}""")
    result = compile_model(model, "fold-constants")
    assert not result.modified
    assert result.records[0].report["folded_nodes"] == 0


def test_large_results_are_left_as_nodes():
    model = qir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1000, 1000] x) => (float[1000, 1000] y, float s2) <float[1] one = {1.0}, int64[2] shape = {1000, 1000}> {
    big = Expand (one, shape)
    s = ReduceSum <keepdims = 0> (big)
    s2 = Identity (s)
    y = Add (x, big)
}""")
    result = compile_model(model, "fold-constants{max-elements=1000}")
    report = result.records[0].report
    assert result.stats_after["ops"] == {"Expand": 1, "Add": 1, "Identity": 1}  # the 1M-element value stays a node
    assert report["too_large"] == ["big (Expand)"]
    assert report["folded_nodes"] == 1  # ReduceSum still folds from the unmaterialized value
