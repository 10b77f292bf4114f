"""Issue 9 figures: qxc insert-qdq (passes/int8-qdq.toml) vs onnxruntime.quantization.quantize_static.

    python benchmarks/bench_insert_qdq.py [--models ffn,cnn,digits] [--sweep] [--rounds 3]

Both sides: QDQ, per-channel int8 weights, uint8 activations, min-max calibration on the same samples (64 and 512).
Per model: compile time (median of interleaved rounds, fresh subprocess each) and peak RSS with 64 and 512 samples,
output SQNR vs fp32 on held-out rows (accuracy for digits and the CNN), onnxruntime latency (batch 1, 1 thread).
``--sweep`` times both on FFN stacks of 151 / 601 / 1,201 / 2,401 nodes (d_model 64, d_ff 256, 64 samples).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _harness import ROOT, ensure_ffn, fidelity, fresh, interleave, latencies, model_bytes, outputs

ORT_IMPORTS = """
import numpy as np
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader, CalibrationMethod
"""


def ort_body(model: Path, out: Path, calib: Path, key: str, ext: bool) -> str:
    return f"""
z = np.load({str(calib)!r})[{key!r}]
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter({{{key!r}: z[i:i+1]}} for i in range(len(z)))
    def get_next(self):
        return next(self.it, None)
quantize_static({str(model)!r}, {str(out)!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, use_external_data_format={ext})
"""


def qxc_side(model: Path, out: Path, calib: Path) -> tuple[str, str]:
    return ("from qxc.cli import main as qxc_main\nimport onnxruntime, qxc.passes, qxc.calibrate, qxc.runtime  # imported before timing, like the other side",
            f"assert qxc_main(['compile', {str(model)!r}, '-o', {str(out)!r}, '-p', {str(ROOT / 'passes/int8-qdq.toml')!r},"
            f" '--data', {str(calib)!r}, '-q', '--force']) == 0")


def _calib_files(tmp: Path, rows: np.ndarray, key: str, counts=(64, 512)) -> dict[int, Path]:
    files = {}
    for n in counts:
        p = tmp / f"calib{n}.npz"
        np.savez(p, **{key: rows[:n]})
        files[n] = p
    return files


def bench(label: str, model: Path, key: str, calib_rows: np.ndarray, test: dict, labels, rounds: int, ext: bool):
    tmp = Path(tempfile.mkdtemp())
    try:
        calib = _calib_files(tmp, calib_rows, key)
        sides = {}
        for n, c in calib.items():
            sides[f"ort{n}"] = (fresh(tmp / f"ort{n}.onnx") + ORT_IMPORTS, ort_body(model, tmp / f"ort{n}.onnx", c, key, ext))
            sides[f"qxc{n}"] = qxc_side(model, tmp / f"qxc{n}.onnx", c)
        res = interleave(sides, rounds)
        ref = outputs(model, test)
        lat = latencies({"fp32": model, "ort": tmp / "ort64.onnx", "qxc": tmp / "qxc64.onnx"},
                        {k: v[:1] for k, v in test.items()}, runs=100 if label == "ffn" else 300)
        mib = model_bytes(model) / 2**20
        print(f"\n== {label}: {model.name} ({mib:.1f} MiB), fp32 latency {lat['fp32']:.3f} ms (batch 1, 1 thread)")
        print(f"{'side':<6}{'time64 s':>9}{'time512 s':>10}{'peak64':>8}{'peak512':>8}{'512/64':>7}{'SQNR dB':>9}"
              f"{'cosine':>9}{'accuracy':>9}{'lat ms':>8}{'vs fp32':>8}")
        oi = 1 if labels is not None and len(ref) > 1 else 0
        if labels is not None:
            pred = ref[0] if ref[0].ndim == 1 else ref[0].argmax(1)
            print(f"{'fp32':<6}{'':>59}{float((pred == labels).mean()):9.4f}")
        for side in ("ort", "qxc"):
            a, b = res[f"{side}64"], res[f"{side}512"]
            got = outputs(tmp / f"{side}64.onnx", test)
            sq, cos = fidelity(ref[oi], got[oi])
            acc = ""
            if labels is not None:
                pred = got[0] if got[0].ndim == 1 else got[0].argmax(1)
                acc = f"{float((pred == labels).mean()):9.4f}"
            print(f"{side:<6}{a['seconds']:9.3f}{b['seconds']:10.3f}{a['peak_mib']:8.1f}{b['peak_mib']:8.1f}"
                  f"{b['peak_mib'] / a['peak_mib']:7.2f}{sq:9.4f}{cos:9.5f}{acc:>9}{lat[side]:8.3f}"
                  f"{lat[side] / lat['fp32']:8.2f}")
        q, o = res["qxc64"], res["ort64"]
        print(f"time ratio qxc/ort: {q['seconds'] / o['seconds']:.3f} (64 samples), "
              f"{res['qxc512']['seconds'] / res['ort512']['seconds']:.3f} (512); "
              f"peak RSS qxc / fp32 file: {q['peak_mib'] / mib:.2f}x; latency qxc/ort {lat['qxc'] / lat['ort']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(rounds: int):
    sys.path.insert(0, str(ROOT / "models"))
    import build
    import onnx

    tmp = Path(tempfile.mkdtemp())
    try:
        rows = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
        calib = tmp / "calib.npz"
        np.savez(calib, x=rows)
        print("\n== node sweep: FFN stacks, d_model 64, d_ff 256, 64 calibration samples")
        print(f"{'nodes':>7}{'ort s':>9}{'qxc s':>9}{'qxc/ort':>9}")
        for layers in (25, 100, 200, 400):
            m = build.ffn_model(64, 256, layers)
            path = tmp / f"ffn{layers}.onnx"
            onnx.save(m, path)
            sides = {"ort": (ORT_IMPORTS, ort_body(path, tmp / f"o{layers}.onnx", calib, "x", False)),
                     "qxc": qxc_side(path, tmp / f"q{layers}.onnx", calib)}
            res = interleave(sides, rounds if layers < 400 else 1)
            print(f"{len(m.graph.node):7d}{res['ort']['seconds']:9.2f}{res['qxc']['seconds']:9.2f}"
                  f"{res['qxc']['seconds'] / res['ort']['seconds']:9.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def floor(label: str, model: Path, rounds: int):
    """The fixed costs of a small compile in a fresh process: onnxruntime's first session (both sides build one to
    calibrate) and ONNX's operator-schema registry, which importing onnxruntime.quantization fills before the timer
    starts and qxc fills inside it (its first checker or shape-inference call)."""
    sides = {
        "first session": ("import onnxruntime as ort",
                          f"ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])"),
        "schemas": ("import onnx\n" f"m = onnx.load({str(model)!r})", "onnx.shape_inference.infer_shapes(m)"),
        "schemas after ort import": ("import onnx\nimport onnxruntime.quantization\n" f"m = onnx.load({str(model)!r})",
                                     "onnx.shape_inference.infer_shapes(m)"),
    }
    res = interleave(sides, rounds)
    print(f"\n== fixed costs in a fresh process ({label}): "
          + "; ".join(f"{k} {v['seconds'] * 1e3:.1f} ms" for k, v in res.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ffn,cnn,digits")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if "ffn" in models:
        ffn = ensure_ffn()
        rows = np.load(ffn.parent / "ffn_data.npz")["x"]
        test = {"x": np.random.default_rng(7).normal(size=(256, rows.shape[1])).astype(np.float32)}
        bench("ffn", ffn, "x", rows, test, None, args.rounds, ext=True)
    for name, key, model, train, testf in (("cnn", "image", "cnn_digits", "cnn_digits_train", "cnn_digits_test"),
                                           ("digits", "X", "digits_mlp", "digits_train", "digits_test")):
        if name in models:
            z, t = np.load(ROOT / f"models/{train}.npz"), np.load(ROOT / f"models/{testf}.npz")
            bench(name, ROOT / f"models/{model}.onnx", key, z[key], {key: t[key]}, t["labels"], args.rounds, ext=False)
            floor(name, ROOT / f"models/{model}.onnx", args.rounds)
    if args.sweep:
        sweep(args.rounds)


if __name__ == "__main__":
    main()
