"""``qxc bench``: interleaved latency medians of several models on the same inputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from qxc import ir as qir
from qxc.data import input_specs, load_data
from qxc.errors import ModelError, UsageError
from qxc.runtime.session import make_session


def _inputs(model, batch: int, data: str | None, seed: int = 0) -> dict[str, np.ndarray]:
    if data:
        ds = load_data(data, model)
        return next(iter(ds.batches(batch)))
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        if spec.shape is None or spec.dtype is None:
            raise UsageError(f"input '{spec.name}' has no declared shape/dtype; pass --data to bench this model")
        shape = [batch if (i == 0 and d is None) else (d if d is not None else 1) for i, d in enumerate(spec.shape)]
        if spec.dtype == np.dtype(object):
            raise UsageError(f"input '{spec.name}' takes strings, which random inputs cannot make up (the model "
                             "would meet unknown categories): pass --data with real rows")
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def bench_models(paths: Sequence[str], *, batch: int = 1, providers: Sequence[str] = ("cpu",), threads: int = 1,
                 runs: int = 100, data: str | None = None, warmup: int = 5) -> dict:
    models = [qir.load(p) for p in paths]
    feeds = _inputs(models[0], batch, data)
    sessions = [make_session(m, providers=providers, threads=threads) for m in models]
    for path, s in zip(paths, sessions):
        names = {i.name for i in s.get_inputs()}
        if names != set(feeds):
            raise UsageError(f"models have different inputs ({sorted(names)} vs {sorted(feeds)}); bench them apart")
        try:
            for _ in range(warmup):
                s.run(None, feeds)
        except Exception as e:  # onnxruntime's own failure on these inputs (its exception types are not public)
            what = "the rows of --data" if data else "random inputs (zeros for integers: ids, indices)"
            raise ModelError(f"{path}: onnxruntime failed on {what}: {qir._first_line(e)}"
                             + ("" if data else "; pass --data with real rows")) from None
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - t)
    rows = len(next(iter(feeds.values())))
    out = []
    for path, ts in zip(paths, times):
        med = statistics.median(ts)
        out.append({"model": str(path), "median_ms": med * 1e3, "p90_ms": float(np.percentile(ts, 90)) * 1e3,
                    "rows_per_s": rows / med})
    return {"batch": rows, "threads": threads, "runs": runs, "providers": sessions[0].get_providers(), "models": out}
