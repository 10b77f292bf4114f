"""cleanup: golden rewrites on ONNX text, bit-exact results on every reference model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import REFERENCE, feeds_for, run

from qxc import compile_model
from qxc import ir as qir


def _clean(text: str) -> tuple[str, dict]:
    result = compile_model(qir.from_onnx_text(text), "cleanup", check_input=False)
    return qir.to_onnx_text(result.model), result.records[0].report


GOLDEN_IN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2] x) => (float[N, 2] y, float[N, 2] z) <float[2] w1 = {1.0, 2.0}, float[2] w2 = {1.0, 2.0}, float[2] unused = {5.0, 6.0}> {
    a = Identity (x)
    b = Add (a, w1)
    c = Mul (b, w2)
    dead = Neg (c)
    y = Identity (c)
    z = Identity (x)
}
"""

GOLDEN_OUT = """<
   ir_version: 8,
   opset_import: ["" : 17]
>
g (float[N,2] x) => (float[N,2] y, float[N,2] z)
   <float[2] w1 =  {1,2}, float[2] w1>
{
   b = Add (x, w1)
   y = Mul (b, w1)
   z = Identity (x)
}"""


def test_golden_cleanup():
    text, report = _clean(GOLDEN_IN)
    # onnx-ir writes a value_info entry for each typed initializer: hence the second 'float[2] w1'
    assert "\n".join(ln.rstrip() for ln in text.strip().splitlines()) == GOLDEN_OUT.strip()
    assert report == {"identities": 2, "dead_nodes": 1, "dead_initializers": 1, "merged_initializers": 1,
                      "reordered_graphs": 0}


def test_out_of_order_nodes_are_sorted():
    text, report = _clean("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    y = Neg (a)
    a = Abs (x)
}""")
    assert report["reordered_graphs"] == 1
    assert text.index("Abs") < text.index("Neg")


def test_clean_model_is_unmodified():
    model = qir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    y = Neg (x)
}""")
    assert not compile_model(model, "cleanup").modified


def test_identity_between_graph_input_and_output_is_kept():
    text, report = _clean("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    y = Identity (x)
}""")
    assert "Identity" in text and report["identities"] == 0


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_cleanup_and_fold_are_bit_exact_on_reference_models(name):
    path, data = REFERENCE[name]
    feeds = feeds_for(path, data, rows=64)
    before = run(path, feeds)
    result = compile_model(path, "fold-constants,cleanup", verify_runtime=True)
    after = run(qir.to_proto(result.model), feeds)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert result.stats_after["nodes"] <= result.stats_before["nodes"]


def test_dead_branch_frees_outer_weights_in_one_run():
    model = qir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] y) <float[2] w = {1.0, 2.0}> {
    unused = If (c) <then_branch = t () => (float[2] o) { o = Add (x, w) }, else_branch = e () => (float[2] o2) { o2 = Sub (x, w) }>
    y = Neg (x)
}""")
    result = compile_model(model, "cleanup")
    assert not result.model.graph.initializers
    assert not compile_model(result.model, "cleanup").modified  # idempotent
    onnx.checker.check_model(qir.to_proto(result.model), full_check=True)
