"""Issue 8 figures: `qxc explain --method permutation` on 1M rows of the digits data (tiled), local vs Ray.

    pip install -e '.[ray]'
    python benchmarks/bench_ray.py [--rows 1000000] [--repeats 1]

Sides (each a fresh subprocess, so peak RSS is the driver's own): local in memory (the whole .npz loaded), local
over a folder of shards (LocalBackend), Ray with 2 workers over the same shards (a local Ray instance of 2 CPUs).
Prints rows/s (rows x features x repeats evaluated per second), driver peak RSS, and that the importances agree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _harness import ROOT, measure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--shards", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        with np.load(ROOT / "models/digits_train.npz") as z:
            x, y = z["X"], z["labels"]
        reps = -(-args.rows // len(x))
        big_x, big_y = np.tile(x, (reps, 1))[: args.rows], np.tile(y, reps)[: args.rows]
        np.savez(tmp / "big.npz", X=big_x, labels=big_y)
        shards = tmp / "shards"
        shards.mkdir()
        for i, (xs, ys) in enumerate(zip(np.array_split(big_x, args.shards), np.array_split(big_y, args.shards))):
            np.save(shards / f"part{i:03d}.npy", xs)
            np.save(shards / f"part{i:03d}.labels.npy", ys)
        del big_x, big_y
        model = ROOT / "models/digits_mlp.onnx"
        common = ["--method", "permutation", "--labels", "--repeats", str(args.repeats)]
        sides = {
            "local, whole file": ["--data", str(tmp / "big.npz")],
            "local, shards": ["--data", str(shards), "--backend", "local"],
            "ray 2 workers, shards": ["--data", str(shards), "--backend", "ray", "--workers", "2"],
        }
        res, docs = {}, {}
        for name, extra in sides.items():
            out = tmp / f"{len(docs)}.json"
            argv = ["explain", str(model), *common, *extra, "-o", str(out)]
            res[name] = measure("from qxc.cli import main as qxc_main\nimport qxc.explain, qxc.scale",
                                f"assert qxc_main({argv!r}) == 0")
            docs[name] = json.loads(out.read_text())["permutation"]
        evals = args.rows * 64 * args.repeats
        base = res["local, whole file"]
        print(f"permutation importance, digits MLP, {args.rows:,} rows x 64 features x {args.repeats} repeat(s) "
              f"= {evals:,} row evaluations")
        print(f"{'side':<24}{'seconds':>9}{'rows/s':>14}{'vs local':>9}{'driver peak MiB':>17}{'vs local':>9}")
        for name, r in res.items():
            print(f"{name:<24}{r['seconds']:9.2f}{evals / r['seconds']:14,.0f}{base['seconds'] / r['seconds']:9.2f}"
                  f"{r['peak_mib']:17.1f}{r['peak_mib'] / base['peak_mib']:9.2f}")
        a, b = docs["local, shards"]["values"], docs["ray 2 workers, shards"]["values"]
        print(f"max |local shards - ray| importance difference: {max(abs(a[k] - b[k]) for k in a):.2e}")
        w = docs["local, whole file"]["values"]
        print(f"max |whole file - shards| (each shard shuffles its own rows): {max(abs(a[k] - w[k]) for k in a):.2e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
