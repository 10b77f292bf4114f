"""Shared test helpers: reference model paths, onnxruntime runs, model builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

# name -> (model path, data path, input name)
REFERENCE = {
    "digits_mlp": (MODELS / "digits_mlp.onnx", MODELS / "digits_test.npz"),
    "breast_cancer_gb": (MODELS / "breast_cancer_gb.onnx", MODELS / "breast_cancer_test.npz"),
    "diabetes_mlp": (MODELS / "diabetes_mlp.onnx", MODELS / "diabetes_test.npz"),
    "cnn_digits": (MODELS / "cnn_digits.onnx", MODELS / "cnn_digits_test.npz"),
    "ffn_small": (MODELS / "fixtures" / "ffn_small.onnx", MODELS / "fixtures" / "ffn_small_data.npz"),
    "if_constants": (MODELS / "fixtures" / "if_constants.onnx", MODELS / "fixtures" / "if_constants_data.npz"),
}


def feeds_for(model_path: Path, data_path: Path, rows: int | None = None) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    with np.load(data_path) as z:
        return {n: z[n][:rows] for n in names}


def run(model, feeds: dict[str, np.ndarray], optimization: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if not optimization:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str | bytes) else str(model) if isinstance(model, Path) else \
        model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = np.sum((ref - test.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def as_half(model: onnx.ModelProto, elem_type: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """The same float model in float16 (or bfloat16): every float initializer, graph input and output converted."""
    import ml_dtypes

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dtype = np.float16 if elem_type == TensorProto.FLOAT16 else ml_dtypes.bfloat16
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = elem_type
    return m


def wrap_in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its whole body moved into both branches of an If (weights become branch-local)."""
    g = model.graph
    def branch(tag):
        b = helper.make_graph(list(g.node), f"{tag}_body", [], list(g.output), list(g.initializer))
        b.value_info.extend(g.value_info)
        return b
    cond = helper.make_node("Constant", [], ["wrap_cond"], value=numpy_helper.from_array(np.array(True)))
    node = helper.make_node("If", ["wrap_cond"], [o.name for o in g.output], name="wrap",
                            then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([cond, node], g.name + "_if", list(g.input), list(g.output))
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def mlp_model(sizes=(8, 16, 4), seed=0, opset=17, act: str | None = "Relu") -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, b).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"], name=f"bias{i}")]
        x = f"h{i}"
        if act and i < len(sizes) - 2:
            nodes.append(helper.make_node(act, [x], [f"r{i}"], name=f"{act.lower()}{i}"))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, sizes[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, sizes[-1]])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def iris_classifier(kind: str = "logistic", zipmap: bool = True, string_labels: bool = True):
    """An skl2onnx iris classifier as skl2onnx exports it by default (ZipMap: a sequence-of-maps output), its
    classes strings or integers; returns (ModelProto, X float32, labels)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    labels = np.array(["setosa", "versicolor", "virginica"])[y] if string_labels else y
    est = {"logistic": lambda: LogisticRegression(max_iter=500),
           "forest": lambda: RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0),
           "mlp": lambda: MLPClassifier((32,), max_iter=2000, random_state=0)}[kind]().fit(x, labels)
    proto = to_onnx(est, x[:1], options={id(est): {"zipmap": zipmap}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return proto, x, labels


def mixed_pipeline(per_column: bool = False):
    """An skl2onnx pipeline with a numeric and a string input, as exported from a table: StandardScaler on three
    breast-cancer measurements and OneHotEncoder on a category ("rough", "mid", "smooth") into a logistic regression.
    ``per_column``: one [rows, 1] input per column (a, b, c, cat: a DataFrame's export); otherwise ``num`` [rows, 3]
    and ``cat`` [rows, 1]. Returns (ModelProto, feeds with the strings as a str array, labels)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    num = x[:, [0, 1, 7]].astype(np.float32)
    cat = np.where(x[:, 4] > 0.1, "rough", np.where(x[:, 4] > 0.09, "mid", "smooth")).reshape(-1, 1)
    pipe = Pipeline([("ct", ColumnTransformer([("num", StandardScaler(), [0, 1, 2]), ("cat", OneHotEncoder(), [3])])),
                     ("lr", LogisticRegression(max_iter=500))]).fit(np.concatenate([num.astype(object), cat], axis=1), y)
    if per_column:
        types = [(n, FloatTensorType([None, 1])) for n in "abc"] + [("cat", StringTensorType([None, 1]))]
        feeds = {n: num[:, [j]] for j, n in enumerate("abc")} | {"cat": cat}
    else:
        types = [("num", FloatTensorType([None, 3])), ("cat", StringTensorType([None, 1]))]
        feeds = {"num": num, "cat": cat}
    proto = convert_sklearn(pipe, initial_types=types, options={"zipmap": False},
                            target_opset={"": 17, "ai.onnx.ml": 3})
    return proto, feeds, y


def embedding_lm(tied: bool) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(head): a (400, 32) token table and a (32, 400) head, or, ``tied``, the head
    reading the table itself through a Gemm with transB (one initializer, two readers)."""
    rng = np.random.default_rng(5)
    table = numpy_helper.from_array(rng.normal(size=(400, 32)).astype(np.float32), "table")
    inits = [table]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    if tied:
        nodes.append(helper.make_node("Gemm", ["e", "table"], ["y"], name="head", transB=1))
        ids_shape, y_shape = [5], [5, 400]
    else:
        inits.append(numpy_helper.from_array(rng.normal(size=(32, 400)).astype(np.float32), "head_w"))
        nodes.append(helper.make_node("MatMul", ["e", "head_w"], ["y"], name="head"))
        ids_shape, y_shape = [None, 5], [None, 5, 400]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def left_weight_model(seed: int = 0) -> onnx.ModelProto:
    """``y = (W2 @ relu(W1 @ x^T))^T``: MatMuls whose constant weight comes first (``W @ x``), a weight applied to column
    vectors, as PyTorch exports ``torch.matmul(W, x)``; W1 is (24, 64), W2 (8, 24)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 1 / 8, (24, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 24)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="cols"),
             helper.make_node("MatMul", ["w1", "xt"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["w2", "hr"], ["o"], name="fc2"),
             helper.make_node("Transpose", ["o"], ["y"], perm=[1, 0], name="rows")]
    graph = helper.make_graph(nodes, "left", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def masked_attention_model(d: int = 16, t: int = 6, seed: int = 0) -> onnx.ModelProto:
    """Self-attention with a padding mask as PyTorch exports it: ``Where(mask, 0, -inf)`` added to the scores
    before the Softmax (padded keys get probability 0), then a mean over the tokens and a projection."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, d ** -0.5, (d, d)).astype(np.float32), n)
             for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("Where", ["mask", "zero", "neg_inf"], ["bias"], name="mask_bias"),
             helper.make_node("Unsqueeze", ["bias", "axis1"], ["bias3"], name="bias3"),
             helper.make_node("Add", ["scores", "bias3"], ["masked"], name="masked"),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="context"),
             helper.make_node("ReduceMean", ["ctx"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             helper.make_node("MatMul", ["pooled", "wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, t, d]),
                                              helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, t])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def masked_attention_data(n: int = 96, d: int = 16, t: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t + 1, n)
    return {"x": rng.normal(size=(n, t, d)).astype(np.float32), "mask": np.arange(t)[None, :] < lengths[:, None]}
