"""Surrogates as ONNX: export through skl2onnx (verified against scikit-learn) and merge into the model.

``embed`` adds the surrogate tree (its prediction and leaf id) and a global linear surrogate's per-feature
contributions as extra outputs of the model, so a deployed model emits its explanation at run time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qxc import ir as qir
from qxc.graphs import value_names

PREFIX = "qxc_explain_"


def tree_to_onnx(tree, n_features: int, classifier: bool) -> ir.Model:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    opts = {id(tree): {"decision_leaf": True, **({"zipmap": False} if classifier else {})}}
    proto = to_onnx(tree, initial_types=[("X", FloatTensorType([None, n_features]))], options=opts,
                    target_opset={"": 17, "ai.onnx.ml": 3})
    return qir.from_proto(proto)


def verify_tree(model: ir.Model, tree, x: np.ndarray, classifier: bool) -> float:
    """Largest difference between the exported tree and scikit-learn on ``x`` (0.0 when identical): the same leaf
    for every row, and the same prediction in the exported model's float32 (a regression leaf's float64 value
    rounded to float32 is what the ONNX tree stores and returns)."""
    from qxc.runtime import make_session

    sess = make_session(model)
    out = sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})
    ref = tree.predict(np.asarray(x, np.float32))
    if not classifier:
        ref = ref.astype(np.float32)
    got = np.asarray(out[0]).reshape(-1)
    leaf_ref = tree.apply(np.asarray(x, np.float32))
    leaf_got = np.asarray(out[-1]).reshape(-1)
    if not len(x):
        return 0.0
    # class labels (numbers or strings) must be equal; a regression's outputs are compared by their difference
    mismatch = float(np.max(got != ref)) if classifier else float(np.max(np.abs(got.astype(np.float64) - ref)))
    return max(mismatch, float(np.max(leaf_got != leaf_ref)))


def linear_contributions(data: np.ndarray, targets: np.ndarray, alpha: float = 1e-3):
    """A global ridge surrogate; returns (mean, coef (outputs, features), R^2)."""
    from sklearn.linear_model import Ridge

    y = targets if targets.ndim == 2 else targets[:, None]
    ridge = Ridge(alpha=alpha).fit(data, y)
    return data.mean(axis=0).astype(np.float32), np.atleast_2d(ridge.coef_).astype(np.float32), float(
        ridge.score(data, y))


def _declare_output_ranks(model: ir.Model) -> None:
    """skl2onnx leaves some outputs without a shape; a probe run on one row tells their rank."""
    from qxc.runtime import make_session

    if all(o.shape is not None for o in model.graph.outputs):
        return
    sess = make_session(model)
    inp = sess.get_inputs()[0]
    arrays = sess.run(None, {inp.name: np.zeros((1, inp.shape[1]), np.float32)})
    for out, arr in zip(model.graph.outputs, arrays):
        if out.shape is None:
            out.shape = ir.Shape([None] * np.asarray(arr).ndim)


def embed(model: ir.Model, tree_model: ir.Model | None, mean: np.ndarray | None, coef: np.ndarray | None) -> list[str]:
    """Merge the surrogates into ``model`` (in place); returns the names of the outputs added."""
    graph = model.graph
    init = set(graph.initializers)
    x = next(v for v in graph.inputs if v.name not in init)
    taken = value_names(model)
    added = []
    if x.shape is not None and len(x.shape) > 2:  # an image: the surrogates read its elements as one row
        flat = ir.Node("", "Flatten", [x], [ir.AttrInt64("axis", 1)], name=f"{PREFIX}flatten")
        flat.outputs[0].name = f"{PREFIX}features"
        graph.append(flat)
        x = flat.outputs[0]
    if tree_model is not None:
        tg = tree_model.graph
        t_in = tg.inputs[0]
        _declare_output_ranks(tree_model)
        cast = ir.Node("", "Cast", [x], [ir.AttrInt64("to", ir.DataType.FLOAT.value)], name=f"{PREFIX}cast")
        cast.outputs[0].name = f"{PREFIX}input"
        graph.append(cast)
        t_in.replace_all_uses_with(cast.outputs[0])
        for name, v in list(tg.initializers.items()):
            tg.initializers.pop(name)
            v.name = PREFIX + name
            graph.register_initializer(v)
        outputs = list(tg.outputs)
        tg.outputs.clear()
        for node in list(tg):
            tg.remove(node)
            node.name = PREFIX + (node.name or node.op_type)
            for out in node.outputs:
                out.name = PREFIX + out.name
            graph.append(node)
        for out in outputs:
            graph.outputs.append(out)
            added.append(out.name)
        model.opset_imports.setdefault("ai.onnx.ml", 3)
        for domain, version in tree_model.opset_imports.items():
            model.opset_imports.setdefault(domain, version)
    if coef is not None:
        mean_v = ir.Value(name=f"{PREFIX}mean", shape=ir.Shape(mean.shape), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(mean))
        coef_v = ir.Value(name=f"{PREFIX}coef", shape=ir.Shape(coef.shape), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(coef))
        axis = ir.Value(name=f"{PREFIX}axis", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                        const_value=ir.tensor(np.array([1], np.int64)))
        for v in (mean_v, coef_v, axis):
            graph.register_initializer(v)
        xf = ir.Node("", "Cast", [x], [ir.AttrInt64("to", ir.DataType.FLOAT.value)], name=f"{PREFIX}cast_linear")
        sub = ir.Node("", "Sub", [xf.outputs[0], mean_v], name=f"{PREFIX}center")
        unsq = ir.Node("", "Unsqueeze", [sub.outputs[0], axis], name=f"{PREFIX}unsqueeze")
        mul = ir.Node("", "Mul", [unsq.outputs[0], coef_v], name=f"{PREFIX}contributions")
        for node, name in ((xf, "x_float"), (sub, "centered"), (unsq, "centered3"), (mul, "contributions")):
            node.outputs[0].name = PREFIX + name
            graph.append(node)
        out = mul.outputs[0]
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape([None, coef.shape[0], coef.shape[1]])
        graph.outputs.append(out)
        added.append(out.name)
    assert not (set(added) & taken)
    return added
