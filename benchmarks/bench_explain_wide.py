"""Issue 5 (bounded memory): each explanation method on an image model with 3,072 features per row.

    python benchmarks/bench_explain_wide.py [--rows 200] [--methods permutation,ablation,tree,local,shapley]

The model is a small CNN on [rows, 3, 32, 32] inputs (each pixel of each channel a feature); the data is 200 random
images. Each side runs in a fresh process: peak RSS (VmHWM) and wall time, against onnxruntime alone running the
data once (the floor: the process, the libraries, the session and the data). What an explanation adds over that
floor must not grow with the features x rows x repeats it perturbs.
"""

from __future__ import annotations

import argparse

import numpy as np
from _harness import ROOT, interleave


def build(rows: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = ROOT / "out" / "bench_wide"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.normal(0, 0.1, (10, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1), helper.make_node("Softmax", ["y"], ["prob"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, out / "wide.onnx")
    x = rng.normal(0, 1, (rows, 3, 32, 32)).astype(np.float32)
    np.savez(out / "wide.npz", x=x, labels=rng.integers(0, 10, rows))
    return out / "wide.onnx", out / "wide.npz", x.nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--methods", default="permutation,ablation,tree,local,shapley")
    args = ap.parse_args()
    model, data, data_bytes = build(args.rows)
    setup = (f"from qxc import ir as qir\nfrom qxc.data import load_data\nfrom qxc.explain.run import explain_model\n"
             f"import onnxruntime, sklearn.tree\nmodel = qir.load({str(model)!r})\ndata = load_data({str(data)!r}, model)")
    sides = {"onnxruntime alone": (
        f"import numpy as np\nimport onnxruntime as ort\nx = np.load({str(data)!r})['x']",
        f"s = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
        "for a in range(0, len(x), 256):\n    s.run(None, {'x': x[a : a + 256]})")}
    for m in args.methods.split(","):
        sides[m] = (setup, f"explain_model(model, data, methods=({m!r},), instances=10)")
    res = interleave(sides, rounds=1)
    floor = res["onnxruntime alone"]["peak_mib"]
    print(f"== wide: [rows, 3, 32, 32] = 3,072 features, {args.rows} rows ({data_bytes / 2**20:.1f} MiB of data); "
          "each side in a fresh process")
    print(f"{'side':<20}{'seconds':>10}{'peak MiB':>10}{'over floor MiB':>16}")
    for name, r in res.items():
        print(f"{name:<20}{r['seconds']:>10.2f}{r['peak_mib']:>10.1f}{r['peak_mib'] - floor:>16.1f}")


if __name__ == "__main__":
    main()
