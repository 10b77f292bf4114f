"""Robustness: already-quantized inputs, determinism, SIGINT mid-compile, and a model beyond 2 GiB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from helpers import MODELS, ROOT, run
from onnx import TensorProto, helper

from qxc import compile_model
from qxc import ir as qir
from qxc.cli import main
from qxc.pipeline import registered_passes

RECIPES = ["int8-qdq", "int8-weights", "int4-weights", "prune50", "prune-channels50", "cleanup"]


def _quantized_inputs(tmp_path):
    """A QDQ model (ours), a QOperator model (onnxruntime's quantize_static), a MatMulNBits model and an int8
    embedding table read through DequantizeLinear (the MiniLM case onnxruntime's quantizer breaks)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    out = {}
    qdq = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz").model
    out["qdq"] = qdq
    x = np.load(MODELS / "digits_train.npz")["X"][:32]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"X": x[i : i + 1]} for i in range(len(x)))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(MODELS / "digits_mlp.onnx"), str(tmp_path / "qop.onnx"), Reader(),
                    quant_format=QuantFormat.QOperator)
    out["qoperator"] = qir.load(tmp_path / "qop.onnx")
    out["matmulnbits"] = compile_model(MODELS / "digits_mlp.onnx", "quantize-weights{bits=4,format=matmulnbits}").model
    table = np.random.default_rng(0).integers(-127, 127, (100, 16)).astype(np.int8)
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["table_q", "table_s"], ["table"], name="dq"),
         helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0, name="pool"),
         helper.make_node("MatMul", ["pooled", "w"], ["y"], name="head")],
        "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [onnx.numpy_helper.from_array(table, "table_q"), onnx.numpy_helper.from_array(np.array(0.01, np.float32),
                                                                                      "table_s"),
         onnx.numpy_helper.from_array(np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    out["int8-embedding"] = qir.from_proto(m)
    return out


def _feeds(name):
    if name == "int8-embedding":
        return {"ids": np.random.default_rng(0).integers(0, 100, (8, 5)).astype(np.int64)}
    return {"X": np.load(MODELS / "digits_test.npz")["X"][:16]}


def test_already_quantized_models_survive_every_pass_and_recipe(tmp_path, figure):
    models = _quantized_inputs(tmp_path)
    specs = [n for n, c in registered_passes().items() if c().in_place] + [str(ROOT / f"passes/{r}.toml")
                                                                           for r in RECIPES]
    checked = 0
    for name, model in models.items():
        proto_bytes = qir.model_bytes(model)
        data = {"ids": _feeds(name)["ids"]} if name == "int8-embedding" else MODELS / "digits_train.npz"
        for spec in specs:
            m = qir.from_proto(proto_bytes)
            result = compile_model(m, spec, data=data)
            outs = run(qir.to_proto(result.model), _feeds(name))  # never a model that fails at run time
            assert all(np.all(np.isfinite(o)) for o in outs if o.dtype.kind == "f"), (name, spec)
            if name == "int8-embedding":  # no QuantizeLinear on an integer tensor
                for node in result.model.graph:
                    if node.op_type == "QuantizeLinear":
                        assert node.inputs[0].dtype == qir.ir.DataType.FLOAT
            checked += 1
    figure(f"already-quantized inputs: {len(models)} models x {len(specs)} passes/recipes = {checked} compiles ran")


def test_same_input_pipeline_and_data_give_identical_bytes_and_json(tmp_path):
    for spec in ("passes/int8-qdq.toml", "passes/int4-weights.toml", "passes/int4-weights-gptq.toml",
                 "prune-magnitude{sparsity=0.5,sensitivity=true},insert-qdq{method=entropy}"):
        outs = []
        for tag in "ab":
            out = tmp_path / f"{tag}.onnx"
            assert main(["compile", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "-p",
                         str(ROOT / spec) if spec.endswith(".toml") else spec, "--data",
                         str(MODELS / "digits_train.npz"), "--json", str(tmp_path / f"{tag}.json"), "--no-timings",
                         "-q", "--force"]) == 0
            doc = json.loads((tmp_path / f"{tag}.json").read_text())
            doc.pop("output")
            outs.append((out.read_bytes(), doc))
        assert outs[0][0] == outs[1][0], spec
        assert outs[0][1] == outs[1][1], spec


def _ffn_file(tmp_path, layers=10, d=512, ff=2048):
    sys.path.insert(0, str(ROOT / "models"))
    import build

    path = tmp_path / "ffn.onnx"
    onnx.save(build.ffn_model(d, ff, layers), path, save_as_external_data=True, location="ffn.onnx.data")
    return path


def test_sigint_mid_compile_leaves_no_output_and_exits_130(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    model = _ffn_file(folder)
    before = sorted(os.listdir(folder))
    out = folder / "out.onnx"
    dump = tmp_path / "dump"
    proc = subprocess.Popen([sys.executable, "-m", "qxc.cli", "compile", str(model), "-o", str(out), "-p",
                             "quantize-weights{method=mse}", "--dump-dir", str(dump)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (dump / "00-input.onnx").exists() and time.time() < deadline:  # the pipeline has started
        time.sleep(0.02)
    time.sleep(0.2)  # inside quantize-weights (it takes a few seconds on this model)
    assert proc.poll() is None, "the compile finished before the signal: make the model larger"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(os.listdir(folder)) == before  # no output, no temp files, input untouched


@pytest.mark.slow
def test_beyond_2gib_quantize_weights_end_to_end(tmp_path, figure):
    """A > 2 GiB model (external data, written in chunks) through quantize-weights in a subprocess."""
    d, ff, layers = 4096, 8192, 9  # 9 x 2 x 32 Mi floats = 2.25 GiB
    rng = np.random.default_rng(0)
    data_path = tmp_path / "big.onnx.data"
    inits, nodes, x, offset = [], [], "x", 0
    with open(data_path, "wb") as f:
        for i in range(layers):
            for name, shape in ((f"w{i}a", (d, ff)), (f"w{i}b", (ff, d))):
                arr = (rng.standard_normal(shape, dtype=np.float32) * 0.01)
                arr.tofile(f)
                t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    t.external_data.add(key=k, value=v)
                offset += arr.nbytes
                inits.append(t)
                del arr
            nodes += [helper.make_node("MatMul", [x, f"w{i}a"], [f"h{i}"], name=f"fc{i}a"),
                      helper.make_node("MatMul", [f"h{i}", f"w{i}b"], [f"y{i}"], name=f"fc{i}b")]
            x = f"y{i}"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "big.onnx")
    size = offset
    assert size > 2 * 2**30
    code = (
        "import sys\n"
        "from qxc.cli import main\n"
        f"rc = main(['compile', {str(tmp_path / 'big.onnx')!r}, '-o', {str(tmp_path / 'q.onnx')!r}, '-p',"
        " 'quantize-weights{method=rtn}', '-q'])\n"
        "hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print('PEAK', hwm)\n"
        "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    peak = int(next(ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")).split()[1])
    out_size = (tmp_path / "q.onnx.data").stat().st_size
    figure(f"> 2 GiB model: {size / 2**30:.2f} GiB in, {out_size / 2**30:.2f} GiB out, peak RSS "
          f"{peak / 2**30:.2f} GiB ({peak / size:.2f}x the model)")
    assert out_size < 0.3 * size
    assert peak < 0.5 * size
    x0 = np.random.default_rng(1).normal(size=(2, d)).astype(np.float32)
    y = run(tmp_path / "q.onnx", {"x": x0})[0]
    assert y.shape == (2, d) and np.all(np.isfinite(y))


@pytest.mark.parametrize("model, data", [("breast_cancer_gb", "breast_cancer"), ("diabetes_mlp", "diabetes")])
def test_every_bundled_recipe_compiles_models_with_and_without_weights_to_touch(model, data):
    """A tree ensemble has nothing to prune or quantize (the sensitivity-guided pruning once failed on the empty
    selection); a small MLP has. Every recipe runs, and the result runs with finite outputs."""
    from qxc.pipeline import bundled_recipes

    feeds = {"X": np.load(MODELS / f"{data}_test.npz")["X"][:32]}
    ref = run(MODELS / f"{model}.onnx", feeds)
    for name, path in bundled_recipes().items():
        result = compile_model(MODELS / f"{model}.onnx", path, data=MODELS / f"{data}_train.npz")
        outs = run(qir.to_proto(result.model), feeds)
        assert all(np.all(np.isfinite(o)) for o in outs if o.dtype.kind == "f"), name
        if model == "breast_cancer_gb" and not name.startswith("int8-qdq"):  # nothing to change: the same model
            assert not result.modified or all(np.array_equal(a, b) for a, b in zip(outs, ref)), name
