"""Every registered pass on every reference model: the contract the pass manager relies on.

In-place contract honoured, ``modified`` equal to "the serialized model changed", checker passes, I/O signature
unchanged, onnxruntime runs the result (bit-exact for passes declared ``exact``), idempotent, the same on an
external-data copy, and the same inside ``If`` branches as in a plain graph.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import REFERENCE, feeds_for, run, wrap_in_if

from qxc import ir as qir
from qxc.data import load_data
from qxc.pipeline import PassContext, registered_passes
from qxc.stats import signature

PASSES = sorted(registered_passes())
MODELS = ["digits_mlp", "breast_cancer_gb", "diabetes_mlp", "cnn_digits", "ffn_small", "if_constants"]


def _run_pass(name: str, model: ir.Model, data_path):
    cls = registered_passes()[name]
    ctx = PassContext(data=load_data(data_path, model).head(32))
    p = cls(None, ctx)
    return p, p(model)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_contract(pass_name, model_name):
    path, data = REFERENCE[model_name]
    model = qir.load(path)
    before_fp, before_sig = qir.fingerprint(model), signature(model)
    p, result = _run_pass(pass_name, model, data)
    if not p.in_place:  # functional (instrument): a new model; the input untouched
        assert result.model is not model and qir.fingerprint(model) == before_fp
        qir.check(result.model)
        inputs, outputs = signature(result.model)
        assert inputs == before_sig[0] and outputs[: len(before_sig[1])] == before_sig[1]
        assert result.modified == (len(outputs) > len(before_sig[1]) or any(
            n.op_type in ("If", "Loop") for n in result.model.graph))
        run(qir.to_proto(result.model), feeds_for(path, data, rows=8))
        return
    assert result.model is model, "in-place passes return the model they were given"
    assert (qir.fingerprint(model) != before_fp) == result.modified, "modified must say whether the model changed"
    qir.check(model)
    assert signature(model) == before_sig
    feeds = feeds_for(path, data, rows=32)
    outs = run(qir.to_proto(model), feeds)
    if type(p).exact:
        for a, b in zip(run(path, feeds), outs):
            np.testing.assert_array_equal(a, b)
    if type(p).idempotent:
        _, again = _run_pass(pass_name, model, data)
        assert not again.modified, "a second run finds nothing left to do"


@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_on_external_data_model(pass_name, tmp_path):
    path, data = REFERENCE["ffn_small"]
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(path), ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    plain, ext_model = qir.load(path), qir.load(ext)
    input_bytes = (tmp_path / "ext.onnx.data").read_bytes()
    plain = _run_pass(pass_name, plain, data)[1].model
    ext_model = _run_pass(pass_name, ext_model, data)[1].model
    out = qir.save(ext_model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    assert qir.fingerprint(qir.load(out)) == qir.fingerprint(plain)
    assert (tmp_path / "ext.onnx.data").read_bytes() == input_bytes  # the input's weights are never written


def _ops(graph: ir.Graph) -> Counter:
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(graph))


@pytest.mark.parametrize("model_name", ["ffn_small", "cnn_digits", "digits_mlp"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_inside_if_branches_matches_plain_graph(pass_name, model_name):
    path, data = REFERENCE[model_name]
    plain = qir.load(path)
    wrapped = qir.from_proto(wrap_in_if(onnx.load(path)))
    if not registered_passes()[pass_name]().in_place:
        pytest.skip("functional passes are checked on subgraphs in their own tests")
    _run_pass(pass_name, plain, data)
    _run_pass(pass_name, wrapped, data)
    if_node = next(n for n in wrapped.graph if n.op_type == "If")
    # what a pass puts in the outer graph for outer values (a graph input's Q/DQ) counts with each branch
    outer = Counter(n.op_type for n in wrapped.graph
                    if n is not if_node and not (n.op_type == "Constant" and n.outputs[0].name == "wrap_cond"))
    for attr in ("then_branch", "else_branch"):
        assert _ops(if_node.attributes[attr].value) + outer == _ops(plain.graph)
    feeds = feeds_for(path, data, rows=16)
    for a, b in zip(run(qir.to_proto(plain), feeds), run(qir.to_proto(wrapped), feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
