"""Issue 4 figures: structured 50 % latency, sensitivity-guided vs uniform error, compressed sizes.

    python benchmarks/bench_prune.py [--models ffn,cnn,digits]

Per model: onnxruntime latency of prune-channels{sparsity=0.5} vs dense (batch 1 and 64, 1 thread, interleaved);
output relative RMS error vs dense on held-out rows of unstructured pruning at 50 % and 80 % with uniform per-layer
sparsity, one global threshold, and sensitivity-guided allocation (measured on separate calibration rows); zip
(deflate) sizes of dense, 50 % pruned and 50 % pruned + int8 QDQ.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import ROOT, ensure_ffn, latencies, model_bytes, outputs

from qxc import compile_model
from qxc import ir as qir
from qxc.cli import zipped_size


def rel_err(ref, got):
    r, g = ref.astype(np.float64), got.astype(np.float64)
    return float(np.sqrt(((r - g) ** 2).sum() / (r**2).sum()))


def bench(label, model: Path, key: str, calib: np.ndarray, test: np.ndarray):
    tmp = Path(tempfile.mkdtemp())
    try:
        feeds = {key: test}
        calib_npz = tmp / "calib.npz"
        np.savez(calib_npz, **{key: calib})
        ref = outputs(model, feeds)
        oi = 1 if len(ref) > 1 else 0
        t = time.perf_counter()
        res = compile_model(model, "prune-channels{sparsity=0.5},cleanup")
        t_struct = time.perf_counter() - t
        qir.save(res.model, tmp / "struct.onnx")
        before, after = res.stats_before["parameters"], res.stats_after["parameters"]
        kept = len(res.records[0].report["kept_whole"])
        print(f"\n== {label}: structured 50 %: {t_struct:.2f} s, parameters {before} -> {after} "
              f"({after / before:.2f}x), layers kept whole {kept}")
        for batch in (1, 64):
            lat = latencies({"dense": model, "struct": tmp / "struct.onnx"}, {key: test[:batch]},
                            runs=100 if label == "ffn" else 300)
            print(f"  latency batch {batch}: {lat['struct']:.3f} ms vs {lat['dense']:.3f} ms dense = "
                  f"{lat['struct'] / lat['dense']:.2f}x")
        print(f"  output rel. error of structured 50 % (no fine-tuning): "
              f"{rel_err(ref[oi], outputs(tmp / 'struct.onnx', feeds)[oi]):.4f}")
        print(f"  {'sparsity':>8} {'uniform err':>12} {'global err':>11} {'guided err':>11} {'guided/uniform':>15} "
              f"{'guided s':>9}")
        for s in (0.5, 0.8):
            errs = {}
            for name, spec in (("uniform", f"prune-magnitude{{sparsity={s}}}"),
                               ("global", f"prune-magnitude{{sparsity={s},scope=global}}"),
                               ("guided", f"prune-magnitude{{sparsity={s},sensitivity=true}}")):
                t = time.perf_counter()
                r = compile_model(model, spec, data=calib_npz)
                secs = time.perf_counter() - t
                qir.save(r.model, tmp / f"{name}.onnx", force=True)
                errs[name] = rel_err(ref[oi], outputs(tmp / f"{name}.onnx", feeds)[oi])
            print(f"  {s:8.2f} {errs['uniform']:12.4f} {errs['global']:11.4f} {errs['guided']:11.4f} "
                  f"{errs['guided'] / errs['uniform']:15.3f} {secs:9.1f}")
        r = compile_model(model, "prune-magnitude{sparsity=0.5},cleanup")
        qir.save(r.model, tmp / "p50.onnx", force=True)
        r = compile_model(model, "prune-magnitude{sparsity=0.5},insert-qdq,cleanup", data=calib_npz)
        qir.save(r.model, tmp / "p50q.onnx", force=True)
        mib = 2**20
        dz = zipped_size(model)
        print(f"  size raw/zip MiB: dense {model_bytes(model) / mib:.2f}/{dz / mib:.2f}, 50 % pruned "
              f"{model_bytes(tmp / 'p50.onnx') / mib:.2f}/{zipped_size(tmp / 'p50.onnx') / mib:.2f} "
              f"(zip {zipped_size(tmp / 'p50.onnx') / dz:.2f}x dense), + int8 {model_bytes(tmp / 'p50q.onnx') / mib:.2f}/"
              f"{zipped_size(tmp / 'p50q.onnx') / mib:.2f} (zip {zipped_size(tmp / 'p50q.onnx') / dz:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="ffn,cnn,digits")
    args = ap.parse_args()
    models = args.models.split(",")
    if "ffn" in models:
        ffn = ensure_ffn()
        rows = np.load(ffn.parent / "ffn_data.npz")["x"]
        test = np.random.default_rng(7).normal(size=(256, rows.shape[1])).astype(np.float32)
        bench("ffn", ffn, "x", rows[:256], test)
    for name, key, model, train, test in (("cnn", "image", "cnn_digits", "cnn_digits_train", "cnn_digits_test"),
                                          ("digits", "X", "digits_mlp", "digits_train", "digits_test")):
        if name in models:
            z, t = np.load(ROOT / f"models/{train}.npz"), np.load(ROOT / f"models/{test}.npz")
            bench(name, ROOT / f"models/{model}.onnx", key, z[key][:512], t[key])


if __name__ == "__main__":
    main()
