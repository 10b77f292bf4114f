"""Issue 3 figures: qxc quantize-weights vs onnxruntime's quantize_dynamic and MatMulNBitsQuantizer.

    python benchmarks/bench_quantize_weights.py [--models ffn,cnn,digits,emb] [--rounds 3] [--ceiling]

Sides: qxc's int4 round-to-nearest with float32 scales is onnxruntime's setting exactly; "f16" stores the scales
as float16 (the int4-weights recipe does, with method=mse); int4-weights-gptq is fit on calibration rows (the FFN's
ffn_calib.npz, the sklearn models' train split) that the error measurement never sees. For each model: compile time (median of interleaved
rounds, each side in a fresh subprocess) and its ratio to a plain onnx.load+save, peak RSS of each compile, file
size / fp32, output error vs fp32 on the reference data (SQNR dB, cosine; accuracy for digits), onnxruntime latency
/ fp32 (batch 1, 1 thread, interleaved calls).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _harness import ROOT, ensure_ffn, fidelity, fresh, interleave, latencies, model_bytes, outputs

QXC = "from qxc.cli import main as qxc_main\nimport qxc.passes"


def qxc_side(model: Path, out: Path, pipeline: str, data: Path | None = None) -> tuple[str, str]:
    extra = f", '--data', {str(data)!r}" if data else ""
    return QXC, (f"assert qxc_main(['compile', {str(model)!r}, '-o', {str(out)!r}, '-p', {pipeline!r}, '-q', "
                 f"'--force'{extra}]) == 0")


def sides_for(model: Path, tmp: Path, ext: bool, calib: Path) -> dict[str, tuple[str, str, Path]]:
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()]
    save_kw = "save_as_external_data=True, all_tensors_to_one_file=True, location='{n}.data'" if ext else ""
    out = {}
    p = tmp / "loadsave.onnx"
    out["onnx load+save"] = ("import onnx", f"onnx.save(onnx.load({str(model)!r}), {str(p)!r}, "
                                            f"{save_kw.format(n=p.name)})", p)
    p = tmp / "ort_dyn8.onnx"
    out["ort dynamic int8"] = (
        "from onnxruntime.quantization import quantize_dynamic, QuantType",
        f"quantize_dynamic({str(model)!r}, {str(p)!r}, weight_type=QuantType.QInt8, per_channel=True, "
        f"use_external_data_format={ext})", p)
    for name, pipe in [("qxc int8-weights", "passes/int8-weights.toml"),
                       ("qxc int8-weights-ort", "passes/int8-weights-ort.toml")]:
        p = tmp / (name.split()[1] + ".onnx")
        out[name] = (*qxc_side(model, p, str(ROOT / pipe)), p)
    for sym in (True, False):  # round to nearest at both of the MatMulNBits tool's settings, side by side
        tag = " sym" if sym else ""
        p = tmp / f"ort_nbits4{tag.strip()}.onnx"
        out[f"ort nbits int4 b32{tag}"] = (
            "import onnx\nfrom onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer",
            f"""
            q = MatMulNBitsQuantizer(onnx.load({str(model)!r}), bits=4, block_size=32, is_symmetric={sym})
            q.process()
            q.model.save_model_to_file({str(p)!r}, use_external_data_format={ext})
            """, p)
        p = tmp / f"qxc_rtn4{tag.strip()}.onnx"
        out[f"qxc int4 rtn b32{tag}"] = (*qxc_side(model, p, f"quantize-weights{{bits=4,symmetric={str(sym).lower()},"
                                                             "method=rtn,format=matmulnbits},cleanup"), p)
    p = tmp / "qxc_rtn4h.onnx"
    out["qxc int4 rtn b32 f16"] = (*qxc_side(model, p, "quantize-weights{bits=4,symmetric=false,method=rtn,"
                                                       "format=matmulnbits,scale-dtype=float16},cleanup"), p)
    p = tmp / "qxc_int4.onnx"
    out["qxc int4-weights"] = (*qxc_side(model, p, str(ROOT / "passes/int4-weights.toml")), p)
    p = tmp / "ort_gptq4.onnx"  # onnxruntime's GPTQ (its bundled neural-compressor code), same rows and blocks
    out["ort gptq int4 b32"] = (
        "import onnx\nimport numpy as np\nfrom onnxruntime.quantization import CalibrationDataReader\n"
        "from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, GPTQWeightOnlyQuantConfig",
        f"""
            class Rows(CalibrationDataReader):
                def __init__(self):
                    with np.load({str(calib)!r}) as z:
                        self.items = iter([{{k: z[k][i : i + 64] for k in {names!r}}}
                                           for i in range(0, len(z[{names[0]!r}]), 64)])

                def get_next(self):
                    return next(self.items, None)

            cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Rows(), block_size=128)
            q = MatMulNBitsQuantizer(onnx.load({str(model)!r}), bits=4, block_size=32, is_symmetric=False,
                                     algo_config=cfg)
            q.process()
            q.model.save_model_to_file({str(p)!r}, use_external_data_format={ext})
            """, p)
    p = tmp / "qxc_int4_gptq.onnx"
    out["qxc int4-weights-gptq"] = (*qxc_side(model, p, str(ROOT / "passes/int4-weights-gptq.toml"), calib), p)
    return out


def bench(label: str, model: Path, data: Path, calib: Path, rounds: int, ext: bool, label_key: str | None = None):
    """``calib``: the rows GPTQ is fit on; every error is measured on ``data``, which it never sees."""
    tmp = Path(tempfile.mkdtemp())
    try:
        sides = sides_for(model, tmp, ext, calib)
        res = interleave({k: (fresh(p) + imp, body) for k, (imp, body, p) in sides.items()}, rounds)
        with np.load(data) as z:
            import onnxruntime as ort

            names = [i.name for i in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()]
            feeds = {n: z[n] for n in names}
            labels = z["labels"] if label_key else None
        ref = outputs(model, feeds)
        paths = {"fp32": model, **{k: p for k, (_, _, p) in sides.items() if k != "onnx load+save"}}
        lat = latencies(paths, {k: v[:1] for k, v in feeds.items()}, runs=100 if label == "ffn" else 300)
        fp32_bytes = model_bytes(model)
        base = res["onnx load+save"]["seconds"]
        print(f"\n== {label}: {model.name} ({fp32_bytes / 2**20:.1f} MiB), fp32 latency {lat['fp32']:.3f} ms "
              f"(batch 1, 1 thread)")
        print(f"{'side':<22}{'time s':>8}{'x load+save':>12}{'peak MiB':>10}{'size/fp32':>10}{'SQNR dB':>9}"
              f"{'cosine':>9}{'accuracy':>9}{'latency/fp32':>13}")
        if labels is not None:
            acc = float((ref[0] == labels).mean())
            print(f"{'fp32':<22}{'':>8}{'':>12}{'':>10}{'1.000':>10}{'':>9}{'':>9}{acc:9.4f}{'1.00':>13}")
        for name, r in res.items():
            line = f"{name:<22}{r['seconds']:8.3f}{r['seconds'] / base:12.2f}{r['peak_mib']:10.1f}"
            if name == "onnx load+save":
                print(line)
                continue
            path = sides[name][2]
            got = outputs(path, feeds)
            out_i = 1 if label_key else 0  # digits: probabilities
            sqnr, cos = fidelity(ref[out_i], got[out_i])
            acc = f"{float((got[0] == labels).mean()):9.4f}" if labels is not None else f"{'':>9}"
            print(f"{line}{model_bytes(path) / fp32_bytes:10.3f}{sqnr:9.2f}{cos:9.5f}{acc}"
                  f"{lat[name] / lat['fp32']:13.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ceiling(model: Path, blocks: int = 20000):
    """How much any choice of per-block (scale, zero point) can gain over min/max round-to-nearest (uint4, blocks of
    32): a dense 31 x 31 grid of independent shrink factors for each block's min and max, each followed by the
    least-squares scale refit, on the FFN's first fc1 and fc2 weights."""
    import onnx
    from onnx import numpy_helper

    from qxc.quant import Granularity, quantize_tensor

    m = onnx.load(str(model))
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in ("layer0.w1", "layer0.w2")}
    print("\n== int4 block-32 weight SQNR (dB): round-to-nearest, qxc mse, and the best any per-block scale and zero "
          "point reach (dense 2-D grid + least squares)")
    print(f"{'weight':<12}{'rtn':>8}{'mse':>8}{'grid':>8}{'mse-rtn':>9}{'grid-rtn':>9}")
    for name, w in weights.items():
        g = Granularity(axis=0, block=32)
        sub = np.ascontiguousarray(w.T.reshape(-1, 32)[:blocks].T)  # (32, blocks): each column one block
        rtn = quantize_tensor(sub, "uint4", symmetric=False, granularity=g).sqnr
        mse = quantize_tensor(sub, "uint4", symmetric=False, granularity=g, method="mse").sqnr
        x = sub.T.astype(np.float64)
        lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        best = np.full(len(x), np.inf)
        for a in np.linspace(0.4, 1.0, 31):
            for b in np.linspace(0.4, 1.0, 31):
                s = np.maximum((hi * b - lo * a) / 15, 1e-12)
                z = np.clip(np.rint(-lo * a / s), 0, 15)
                q = np.clip(np.rint(x / s[:, None]) + z[:, None], 0, 15)
                c = q - z[:, None]
                for scale in (s, (x * c).sum(1) / np.maximum((c * c).sum(1), 1e-30)):
                    qq = np.clip(np.rint(x / scale[:, None]) + z[:, None], 0, 15)
                    best = np.minimum(best, ((x - scale[:, None] * (qq - z[:, None])) ** 2).sum(1))
        grid = float(10 * np.log10((x**2).sum() / best.sum()))
        print(f"{name:<12}{rtn:8.3f}{mse:8.3f}{grid:8.3f}{mse - rtn:9.3f}{grid - rtn:9.3f}")


def embedding(rows: int = 50_000, dim: int = 512):
    """A 4-bit embedding table looked up by 32 token ids per row (then a mean and a Linear): size, SQNR and latency
    of DequantizeLinear -> Gather (qxc format=qdq), GatherBlockQuantized (qxc format=matmulnbits) and onnxruntime's
    MatMulNBitsQuantizer with Gather among its op types (blocks of 32 along the features, asymmetric, RTN)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tmp = Path(tempfile.mkdtemp())
    try:
        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.normal(0, 1, (rows, dim)).astype(np.float32), "table"),
                 numpy_helper.from_array(rng.normal(0, dim ** -0.5, (dim, 8)).astype(np.float32), "w"),
                 numpy_helper.from_array(np.array([1], np.int64), "axes")]
        # opset 18 (axes an input): onnxruntime's quantizer raises the opset to 21 for int4 without converting the
        # older ReduceMean's axes attribute, and its model then fails to load
        g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
                               helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0, name="mean"),
                               helper.make_node("MatMul", ["m", "w"], ["y"], name="head")], "emb",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        src = tmp / "emb.onnx"
        onnx.save(model, src)
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        from qxc.cli import main as qxc_main

        paths = {"fp32": src}
        for name, fmt in (("qxc int4 qdq (DQ->Gather)", "qdq"), ("qxc int4 GatherBlockQuantized", "matmulnbits")):
            paths[name] = tmp / f"{fmt}.onnx"
            assert qxc_main(["compile", str(src), "-o", str(paths[name]), "-q", "-p",
                             f"quantize-weights{{bits=4,symmetric=false,method=rtn,ops=[Gather,MatMul],"
                             f"format={fmt}}}"]) == 0
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=False,
                                 op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
        q.process()
        paths["ort nbits (Gather too)"] = tmp / "ort.onnx"
        q.model.save_model_to_file(str(paths["ort nbits (Gather too)"]))
        feeds = {"ids": rng.integers(0, rows, (256, 32)).astype(np.int64)}
        ref = outputs(src, feeds)[0]
        lat = latencies(paths, {"ids": feeds["ids"][:1]}, runs=50)
        print(f"\n== embedding: {rows:,} x {dim} table ({model_bytes(src) / 2**20:.1f} MiB), 32 ids per row, "
              f"fp32 latency {lat['fp32']:.3f} ms (batch 1, 1 thread)")
        print(f"{'side':<32}{'size/fp32':>10}{'SQNR dB':>9}{'latency/fp32':>13}")
        for name, path in paths.items():
            sqnr = fidelity(ref, outputs(path, feeds)[0])[0] if name != "fp32" else float("inf")
            print(f"{name:<32}{model_bytes(path) / model_bytes(src):10.3f}{sqnr:9.2f}{lat[name] / lat['fp32']:13.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ffn,cnn,digits,emb")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ceiling", action="store_true", help="also measure the data-free int4 scale-search ceiling")
    args = ap.parse_args()
    models = args.models.split(",")
    if args.ceiling:
        ceiling(ensure_ffn())
    if "ffn" in models:
        ffn = ensure_ffn()
        bench("ffn", ffn, ffn.parent / "ffn_data.npz", ffn.parent / "ffn_calib.npz", args.rounds, ext=True)
    if "cnn" in models:
        bench("cnn", ROOT / "models/cnn_digits.onnx", ROOT / "models/cnn_digits_test.npz",
              ROOT / "models/cnn_digits_train.npz", args.rounds, ext=False)
    if "digits" in models:
        bench("digits", ROOT / "models/digits_mlp.onnx", ROOT / "models/digits_test.npz",
              ROOT / "models/digits_train.npz", args.rounds, ext=False, label_key="labels")
    if "emb" in models:
        embedding()


if __name__ == "__main__":
    main()
