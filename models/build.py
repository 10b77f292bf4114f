"""Build qxc's reference models and their data from data that ships with scikit-learn (nothing is downloaded).

    python models/build.py            # the small committed models and fixtures (< 1 MB each)
    python models/build.py --ffn      # also the 37.8M-parameter FFN into models/large/ffn_18x512x2048/ (ignored)
    python models/build.py --ffn --layers 4 --out /tmp/ffn   # a smaller FFN elsewhere

Every model is built deterministically (fixed seeds), so a rebuild gives the same numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8


def _model(graph, opset=OPSET, extra_opsets=()):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def _save_npz(path: Path, **arrays):
    np.savez_compressed(path, **arrays)


def _split(X, y, test_size, seed=0):
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y if y.dtype.kind == "i" else None)


def _skl(model, n_features, name, extra=None):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(model, initial_types=[("X", FloatTensorType([None, n_features]))],
                  target_opset={"": OPSET, "ai.onnx.ml": 3}, options=extra)
    onx.ir_version = IR_VERSION
    onx.graph.name = name
    onx.producer_name = "skl2onnx"
    return onx


def build_digits_mlp(out: Path):
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = _split(X, y.astype(np.int64), 0.25)
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=0).fit(Xtr, ytr)
    onx = _skl(clf, 64, "digits_mlp", {id(clf): {"zipmap": False}})
    onnx.save(onx, out / "digits_mlp.onnx")
    _save_npz(out / "digits_train.npz", X=Xtr, labels=ytr)
    _save_npz(out / "digits_test.npz", X=Xte, labels=yte)
    print(f"digits_mlp: test accuracy {clf.score(Xte, yte):.4f}")


def build_breast_cancer_gb(out: Path):
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier

    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    Xtr, Xte, ytr, yte = _split(X, y, 0.25)
    clf = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0).fit(Xtr, ytr)
    onx = _skl(clf, X.shape[1], "breast_cancer_gb", {id(clf): {"zipmap": False}})
    onnx.save(onx, out / "breast_cancer_gb.onnx")
    names = np.array([str(n) for n in data.feature_names])
    _save_npz(out / "breast_cancer_train.npz", X=Xtr, labels=ytr, feature_names=names)
    _save_npz(out / "breast_cancer_test.npz", X=Xte, labels=yte, feature_names=names)
    print(f"breast_cancer_gb: test accuracy {clf.score(Xte, yte):.4f}")


def build_diabetes_mlp(out: Path):
    from sklearn.datasets import load_diabetes
    from sklearn.neural_network import MLPRegressor

    data = load_diabetes()
    X, y = (data.data / data.data.std(0)).astype(np.float32), data.target.astype(np.float32)
    from sklearn.model_selection import train_test_split

    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    reg = MLPRegressor(hidden_layer_sizes=(32,), solver="lbfgs", alpha=1000.0, max_iter=2000, random_state=0)
    reg.fit(Xtr, ytr)
    onx = _skl(reg, X.shape[1], "diabetes_mlp")
    onnx.save(onx, out / "diabetes_mlp.onnx")
    names = np.array([str(n) for n in data.feature_names])
    _save_npz(out / "diabetes_train.npz", X=Xtr, labels=ytr, feature_names=names)
    _save_npz(out / "diabetes_test.npz", X=Xte, labels=yte, feature_names=names)
    print(f"diabetes_mlp: test R^2 {reg.score(Xte, yte):.4f}")


def _cnn_graph(w1, b1, w2, b2, w3=None, b3=None):
    nodes = [
        helper.make_node("Conv", ["image", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["features"], name="flatten"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "conv1.w"), (b1, "conv1.b"), (w2, "conv2.w"),
                                                         (b2, "conv2.b"))]
    out_name, out_shape = "features", [None, w2.shape[0] * 4]
    if w3 is not None:
        nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
        inits += [numpy_helper.from_array(w3, "fc.w"), numpy_helper.from_array(b3, "fc.b")]
        out_name, out_shape = "logits", [None, w3.shape[0]]
    graph = helper.make_graph(
        nodes, "cnn_digits", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    return _model(graph)


def build_cnn(out: Path):
    """Conv/Relu/MaxPool x2 + Gemm on digits: random (fixed-seed) conv filters, a ridge-fitted classifier head."""
    import onnxruntime as ort
    from sklearn.datasets import load_digits
    from sklearn.linear_model import RidgeClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    Xtr, Xte, ytr, yte = _split(X, y.astype(np.int64), 0.25)
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 16).astype(np.float32)
    body = _cnn_graph(w1, b1, w2, b2)
    sess = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"])
    ftr = sess.run(None, {"image": Xtr})[0]
    fte = sess.run(None, {"image": Xte})[0]
    ridge = RidgeClassifier(alpha=1.0).fit(ftr, ytr)
    w3 = ridge.coef_.astype(np.float32)
    b3 = ridge.intercept_.astype(np.float32)
    onnx.save(_cnn_graph(w1, b1, w2, b2, w3, b3), out / "cnn_digits.onnx")
    _save_npz(out / "cnn_digits_train.npz", image=Xtr, labels=ytr)
    _save_npz(out / "cnn_digits_test.npz", image=Xte, labels=yte)
    print(f"cnn_digits: test accuracy {ridge.score(fte, yte):.4f}")


def ffn_model(d_model: int, d_ff: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """A transformer feed-forward stack: x + W2 relu(W1 x + b1) + b2, repeated, then a 10-way head."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        p = f"layer{i}"
        w1 = rng.normal(0, 1 / np.sqrt(d_model), (d_model, d_ff)).astype(np.float32)
        w2 = rng.normal(0, 1 / np.sqrt(d_ff * layers), (d_ff, d_model)).astype(np.float32)
        b1 = rng.normal(0, 0.02, d_ff).astype(np.float32)
        b2 = rng.normal(0, 0.02, d_model).astype(np.float32)
        inits += [numpy_helper.from_array(a, f"{p}.{n}") for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
        nodes += [
            helper.make_node("MatMul", [x, f"{p}.w1"], [f"{p}.mm1"], name=f"{p}.fc1"),
            helper.make_node("Add", [f"{p}.mm1", f"{p}.b1"], [f"{p}.h"], name=f"{p}.bias1"),
            helper.make_node("Relu", [f"{p}.h"], [f"{p}.a"], name=f"{p}.relu"),
            helper.make_node("MatMul", [f"{p}.a", f"{p}.w2"], [f"{p}.mm2"], name=f"{p}.fc2"),
            helper.make_node("Add", [f"{p}.mm2", f"{p}.b2"], [f"{p}.o"], name=f"{p}.bias2"),
            helper.make_node("Add", [x, f"{p}.o"], [f"{p}.y"], name=f"{p}.residual"),
        ]
        x = f"{p}.y"
    head = rng.normal(0, 1 / np.sqrt(d_model), (d_model, 10)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head.w"))
    nodes.append(helper.make_node("MatMul", [x, "head.w"], ["logits"], name="head"))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_model])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    return m


def build_ffn(out: Path, d_model=512, d_ff=2048, layers=18, rows=512, external=True):
    out.mkdir(parents=True, exist_ok=True)
    m = ffn_model(d_model, d_ff, layers)
    path = out / "ffn.onnx"
    if external:
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ffn.onnx.data",
                  size_threshold=1024)
    else:
        onnx.save(m, path)
    rng = np.random.default_rng(1)
    _save_npz(out / "ffn_data.npz", x=rng.normal(0, 1, (rows, d_model)).astype(np.float32))
    build_ffn_calibration(out, d_model, rows)
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"ffn: {layers} layers, d_model {d_model}, d_ff {d_ff}: {n:,} parameters -> {path}")
    return path


def build_ffn_calibration(out: Path, d_model=512, rows=512) -> Path:
    """Calibration rows for the FFN, from the same distribution as its reference data but another seed: data-aware
    methods (GPTQ) are fit on these and judged on ffn_data.npz."""
    path = out / "ffn_calib.npz"
    _save_npz(path, x=np.random.default_rng(2).normal(0, 1, (rows, d_model)).astype(np.float32))
    return path


def if_constants_model() -> onnx.ModelProto:
    """Weights as Constant nodes inside both If branches (what Paddle-style exports look like)."""
    rng = np.random.default_rng(3)

    def branch(name, seed_scale):
        w1 = (rng.normal(0, 1, (4, 8)) * seed_scale).astype(np.float32)
        w2 = rng.normal(0, 1, (8, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, (3,)).astype(np.float32)
        nodes = [
            helper.make_node("Constant", [], [f"{name}.w1"], value=numpy_helper.from_array(w1)),
            helper.make_node("Constant", [], [f"{name}.w2"], value=numpy_helper.from_array(w2)),
            helper.make_node("Constant", [], [f"{name}.b"], value=numpy_helper.from_array(b)),
            helper.make_node("MatMul", ["x", f"{name}.w1"], [f"{name}.h"], name=f"{name}.fc1"),
            helper.make_node("Relu", [f"{name}.h"], [f"{name}.a"], name=f"{name}.relu"),
            helper.make_node("Identity", [f"{name}.a"], [f"{name}.a2"], name=f"{name}.copy"),
            helper.make_node("MatMul", [f"{name}.a2", f"{name}.w2"], [f"{name}.o"], name=f"{name}.fc2"),
            helper.make_node("Add", [f"{name}.o", f"{name}.b"], [f"{name}.y"], name=f"{name}.bias"),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT,
                                                                                   [None, 3])])

    nodes = [
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0, 1], np.int64))),
        helper.make_node("ReduceSum", ["x", "axes"], ["total"], name="sum", keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("then", 1.0),
                         else_branch=branch("else", 0.5)),
    ]
    graph = helper.make_graph(nodes, "if_constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    return _model(graph)


def build_fixtures(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(if_constants_model(), out / "if_constants.onnx")
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (64, 4)).astype(np.float32)
    x[::2] = np.abs(x[::2])  # both branches taken
    x[1::2] = -np.abs(x[1::2])
    _save_npz(out / "if_constants_data.npz", x=x)
    build_ffn(out, d_model=32, d_ff=64, layers=2, rows=128, external=False)
    (out / "ffn.onnx").rename(out / "ffn_small.onnx")
    (out / "ffn_data.npz").rename(out / "ffn_small_data.npz")
    print(f"fixtures -> {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ffn", action="store_true", help="also build the large FFN (external data)")
    ap.add_argument("--ffn-only", action="store_true", help="build only the large FFN")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--out", type=Path, help="folder for the large FFN (default models/large/ffn_LxDxF)")
    args = ap.parse_args()
    if not args.ffn_only:
        build_digits_mlp(HERE)
        build_breast_cancer_gb(HERE)
        build_diabetes_mlp(HERE)
        build_cnn(HERE)
        build_fixtures(HERE / "fixtures")
    if args.ffn or args.ffn_only:
        out = args.out or HERE / "large" / f"ffn_{args.layers}x{args.d_model}x{args.d_ff}"
        build_ffn(out, args.d_model, args.d_ff, args.layers)


if __name__ == "__main__":
    main()
