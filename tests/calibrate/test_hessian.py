"""GramCache: the inputs' X^T X from one instrumented session, stored as rows or folded, in groups, then let go."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import mlp_model
from onnx import TensorProto, helper, numpy_helper

from qxc import ir as qir
from qxc.calibrate.hessian import GramCache, Source
from qxc.data import make_dataset


def _forward(proto, x):
    """The MLP's MatMul inputs, computed in numpy: x, then relu(x @ w0 + b0)."""
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {"x": x, "r0": np.maximum(x @ w["w0"] + w["b0"], 0)}


@pytest.mark.parametrize("rows", [10, 200])  # fewer rows than the 24 inputs (kept as rows), and more (folded)
@pytest.mark.parametrize("budget", [1, 1 << 20])  # every weight its own group, or one group
def test_grams_match_numpy_and_are_let_go_once_served(rows, budget):
    proto = mlp_model(sizes=(24, 32, 6), seed=1)
    model = qir.from_proto(proto)
    x = np.random.default_rng(0).normal(size=(rows, 24)).astype(np.float32)
    data = make_dataset({"x": x}, model)
    acts = _forward(proto, x)
    cache = GramCache(model, data, {"w0": ([Source("x")], 24), "w1": ([Source("r0")], 32)}, batch_size=7, budget=budget)
    assert len(cache.groups) == (2 if budget == 1 else 1)
    cache.last_sweep = True
    for key, name in (("w0", "x"), ("w1", "r0")):
        h, n = cache.get(key)
        want = acts[name].T.astype(np.float64) @ acts[name]
        assert n == rows
        np.testing.assert_allclose(np.triu(h), np.triu(want), rtol=1e-4, atol=1e-4)
        assert Source(name) not in cache.loaded  # its last weight was served: the rows are gone
    assert cache.runner is None  # the session went after the last group
    with pytest.raises(RuntimeError, match="after the last sweep"):
        cache.get("w0")


def test_a_tensor_feeding_several_weights_is_collected_once_and_summed_for_a_shared_weight():
    """Query and key projections read the same x; a weight used by two MatMuls on different inputs sums both."""
    rng = np.random.default_rng(2)
    wq, wk = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["q", "wk"], ["y"], name="again")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 8]) for n in ("k", "y")],
                          [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk")])
    model = qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(size=(40, 8)).astype(np.float32)
    wanted = {"wq": ([Source("x")], 8), "wk": ([Source("q"), Source("x")], 8)}
    cache = GramCache(model, make_dataset({"x": x}, model), wanted)
    hq, nq = cache.get("wq")
    assert Source("x") in cache.loaded  # wk still needs it
    hk, nk = cache.get("wk")
    q = x @ wq
    np.testing.assert_allclose(np.triu(hq), np.triu(x.T @ x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.triu(hk), np.triu(x.T @ x + q.T @ q), rtol=1e-4, atol=1e-3)
    assert (nq, nk) == (40, 80)


def test_sources_read_rows_columns_patches_and_loop_slices():
    """Rows of the last axes (an Einsum summing two), columns (W @ x), a grouped Conv's channels, a Loop body's
    stacked iterations (one more leading axis); a shape the weight cannot take is a one-line usage error."""
    from qxc.errors import UsageError
    from qxc.quant.gptq import conv_rows

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    (rows,) = Source("t", axes=2).rows(x, 32)
    np.testing.assert_array_equal(rows, x.reshape(-1, 32))
    (cols,) = Source("t", columns=True).rows(x[0, 0], 4)
    np.testing.assert_array_equal(cols, x[0, 0].T)
    conv = ((3, 3), (1, 1, 1, 1), "NOTSET", (1, 1), (1, 1))
    img = rng.normal(size=(3, 2, 6, 4, 4)).astype(np.float32)  # 3 iterations of 2 samples, 6 channels
    got = np.concatenate(list(Source("t", conv, channels=(2, 4)).rows(img, 18)))
    want = np.concatenate(list(conv_rows(img.reshape(6, 6, 4, 4)[:, 2:4], (3, 3), (1, 1, 1, 1), (1, 1), (1, 1))))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(UsageError, match="tensor 't' has shape \\[2, 5, 4, 8\\] on the sample data, which its "
                                         "weight cannot take \\(16 inputs\\)"):
        list(Source("t").rows(x, 16))
