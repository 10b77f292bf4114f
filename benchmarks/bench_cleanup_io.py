"""Issue 2 figure: `qxc compile -p cleanup` vs onnx.load + onnx.save on the 37.8M-parameter FFN (external data).

    python benchmarks/bench_cleanup_io.py [--layers 18] [--rounds 5]

Prints median time and peak RSS of each side (fresh subprocess each), the time ratio (target <= 1.5x) and qxc's peak
RSS relative to the weight bytes (target <= 0.5x), also above the interpreter+import floor.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _harness import ensure_ffn, interleave


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = ensure_ffn(args.layers)
    weights = (model.parent / "ffn.onnx.data").stat().st_size
    tmp = Path(tempfile.mkdtemp())
    sides = {
        "onnx.load + onnx.save": (
            "import onnx",
            f"""
            m = onnx.load({str(model)!r})
            onnx.save(m, {str(tmp / 'onnx_out.onnx')!r}, save_as_external_data=True, all_tensors_to_one_file=True,
                      location='onnx_out.onnx.data', size_threshold=1024)
            """,
        ),
        "qxc compile -p cleanup": (
            "from qxc.cli import main as qxc_main\nimport qxc.passes",
            f"""
            rc = qxc_main(["compile", {str(model)!r}, "-o", {str(tmp / 'qxc_out.onnx')!r}, "-p", "cleanup", "-q",
                           "--force"])
            assert rc == 0
            """,
        ),
    }
    try:
        res = interleave(sides, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = weights / 2**20
    print(f"model: {model.parent.name} ({mib:.1f} MiB external data), median of {args.rounds} interleaved rounds")
    print(f"{'side':<26}{'time s':>9}{'peak RSS MiB':>14}{'import MiB':>12}{'above import':>14}")
    for name, r in res.items():
        print(f"{name:<26}{r['seconds']:9.3f}{r['peak_mib']:14.1f}{r['import_mib']:12.1f}"
              f"{r['peak_mib'] - r['import_mib']:14.1f}")
    q, o = res["qxc compile -p cleanup"], res["onnx.load + onnx.save"]
    print(f"time ratio qxc/onnx: {q['seconds'] / o['seconds']:.2f}x (target <= 1.5x)")
    print(f"qxc peak RSS / weight bytes: {q['peak_mib'] / mib:.2f}x absolute, "
          f"{(q['peak_mib'] - q['import_mib']) / mib:.2f}x above import (target <= 0.5x)")
    print(f"onnx peak RSS / weight bytes: {o['peak_mib'] / mib:.2f}x absolute, "
          f"{(o['peak_mib'] - o['import_mib']) / mib:.2f}x above import")


if __name__ == "__main__":
    main()
