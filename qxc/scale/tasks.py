"""Chunk tasks and their exact merges: calibration ranges and permutation importance.

Tasks are module-level functions (Ray pickles them by reference). Each worker keeps its session and tap runner in
``worker.cache``. Merges walk the chunks in index order, so every backend adds the same floats in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qxc.calibrate.observers import Histogram, MinMax
from qxc.calibrate.ranges import Ranges
from qxc.scale.chunks import Chunk

BATCH = 64


def _feed_name(worker) -> str:
    from qxc.data import input_specs

    specs = input_specs(worker.model)
    return specs[0].name


def _runner(worker, tensors):
    key = ("taps", tuple(tensors) if tensors is not None else None)
    if key not in worker.cache:
        from qxc.calibrate.collect import TapRunner

        worker.cache[key] = TapRunner(worker.model, tensors, worker.providers)
    return worker.cache[key]


def _cast(x: np.ndarray, worker) -> np.ndarray:
    from qxc.data import input_specs

    dtype = input_specs(worker.model)[0].dtype
    return np.ascontiguousarray(x, dtype=dtype) if dtype is not None else x


def minmax_task(worker, chunk: Chunk, tensors):
    x, _ = chunk.load()
    x = _cast(x, worker)
    runner, name = _runner(worker, tensors), _feed_name(worker)
    stats: dict[str, MinMax] = {}
    for s in range(0, len(x), BATCH):
        for t, arr in runner.run({name: x[s : s + BATCH]}).items():
            stats.setdefault(t, MinMax()).update(np.asarray(arr))
    return {t: (m.lo, m.hi, m.count, m.infinite) for t, m in stats.items()}


def histogram_task(worker, chunk: Chunk, tensors, ranges: dict, bins: int):
    x, _ = chunk.load()
    x = _cast(x, worker)
    runner, name = _runner(worker, tensors), _feed_name(worker)
    hists = {t: Histogram(lo, hi, bins) for t, (lo, hi) in ranges.items()}
    for s in range(0, len(x), BATCH):
        for t, arr in runner.run({name: x[s : s + BATCH]}).items():
            if t in hists:
                hists[t].update(np.asarray(arr))
    return {t: h.counts for t, h in hists.items()}


def distributed_ranges(backend, chunks: Sequence[Chunk], *, tensors=None, method: str = "minmax",
                       percentile: float = 99.999, bins: int = 2048, activation_type: str = "uint8",
                       symmetric: bool = False, keep_minmax=()) -> Ranges:
    """Calibration ranges over chunks: min/max merged exactly, then fixed-range histograms summed exactly."""
    parts = backend.map(minmax_task, list(chunks), tensors)
    merged: dict[str, MinMax] = {}
    for part in parts:  # chunk order
        for t, (lo, hi, count, infinite) in part.items():
            merged[t] = merged.get(t, MinMax()).merge(MinMax(lo, hi, count, infinite))
    ranges = {t: (m.lo, m.hi) for t, m in merged.items() if m.seen}
    if method != "minmax":
        counts = backend.map(histogram_task, list(chunks), tensors, ranges, bins)
        keep = set(keep_minmax)
        for t, (lo, hi) in list(ranges.items()):
            h = Histogram(lo, hi, bins)
            for part in counts:
                if t in part:
                    h.counts += part[t]
            if t not in keep:
                ranges[t] = h.range_for(method, percentile=percentile, qt=activation_type, symmetric=symmetric)
    rows = sum(c.stop - c.start for c in chunks)
    return Ranges(method, ranges, rows, {"chunks": len(chunks), "batch_size": BATCH, "bins": bins},
                  {t for t, m in merged.items() if m.infinite})


def _chunk_seed(random_state: int, index: int) -> int:
    base = np.random.RandomState(random_state).randint(np.iinfo(np.int32).max + 1)
    return base if index == 0 else int((base + 1_000_003 * index) % (np.iinfo(np.int32).max + 1))


def permutation_task(worker, chunk: Chunk, n_repeats: int, random_state: int, use_labels: bool):
    """Sums of one chunk's per-row score terms (:class:`RowTerms`), unshuffled and per (feature, repeat)."""
    from qxc.explain.importance import RowTerms, shuffled_rows, shuffles

    pred = _predictor(worker)
    x, y = chunk.load()
    x = _table(x, pred)
    y = y if use_labels else None
    n, f = x.shape
    terms = RowTerms(pred.predict(x), y, pred.is_classifier)
    seed = _chunk_seed(random_state, chunk.index)
    orders = shuffles(n, n_repeats, seed)  # the same for every feature
    out = np.zeros((f, n_repeats, *terms.base_sum.shape))
    for col in range(f):  # one run per feature, of the rows whose value the shuffles moved (the rest keep base's)
        moved, parts = zip(*shuffled_rows(x, col, n_repeats, seed, orders))
        run = pred.predict(np.concatenate(parts)) if sum(map(len, moved)) else terms.base
        at = 0
        for r, rows in enumerate(moved):
            out[col, r] = terms.changed(rows, run.take(slice(at, at + len(rows))))
            at += len(rows)
    return {"n": n, "base": terms.base_sum, "perm": out, "classifier": pred.is_classifier, "labeled": y is not None,
            "label_sums": terms.label_sums()}


def distributed_permutation(backend, chunks: Sequence[Chunk], *, n_repeats: int = 5, random_state: int = 0,
                            use_labels: bool = True) -> dict:
    """Permutation importance from per-chunk sums (each chunk shuffles its own rows; one chunk = sklearn's)."""
    from qxc.explain.importance import score_from_sums

    parts = backend.map(permutation_task, list(chunks), n_repeats, random_state, use_labels)
    n = sum(p["n"] for p in parts)
    base = sum(p["base"] for p in parts)
    perm = np.zeros_like(parts[0]["perm"])
    for p in parts:  # chunk order
        perm = perm + p["perm"]
    classifier = parts[0]["classifier"]
    labeled = all(p["labeled"] for p in parts)
    ss_tot = None
    if labeled and not classifier:  # per output: sum y^2 - (sum y)^2 / n
        sy, sy2 = sum(p["label_sums"][0] for p in parts), sum(p["label_sums"][1] for p in parts)
        ss_tot = sy2 - sy * sy / n
    baseline = score_from_sums(base, n, classifier, labeled, ss_tot)
    imp = np.array([[baseline - score_from_sums(perm[c, r], n, classifier, labeled, ss_tot)
                     for r in range(perm.shape[1])] for c in range(perm.shape[0])])
    metric = ("accuracy" if classifier else "r2") if labeled else "prediction_change"
    return {"importances": imp, "metric": metric, "baseline_score": float(baseline), "rows": int(n),
            "chunks": len(chunks)}


def compare_task(worker, chunk: Chunk, layers: bool, use_labels: bool):
    """Error sums of reference (model 0) vs candidate (model 1) over one chunk."""
    from qxc.compare import Accumulator

    if "compare" not in worker.cache:
        worker.cache["compare"] = Accumulator(worker.models[0], worker.models[1], ref_providers=worker.providers,
                                              cand_providers=worker.providers, layers=layers, threads=worker.threads)
    acc = worker.cache["compare"]
    x, y = chunk.load()
    x = _cast(x, worker)
    name = _feed_name(worker)
    state = acc.empty()
    for s in range(0, len(x), BATCH):
        feed = {name: x[s : s + BATCH]}
        state["rows"] += len(feed[name])
        acc.update(state, feed, None if (y is None or not use_labels) else y[s : s + BATCH])
    return state


def distributed_compare(backend, chunks: Sequence[Chunk], ref, cand, *, layers: bool = True, jump_db: float = 6.0,
                        use_labels: bool = True):
    """``qxc compare`` over chunks: float64 error sums and counts merged in chunk order."""
    from qxc.compare import finish, merge_states, plan

    _, mapping, order = plan(ref, cand, layers)
    state = merge_states(backend.map(compare_task, list(chunks), layers, use_labels))
    settings = {"jump_db": jump_db, "batch_size": BATCH, "rows": state["rows"], "chunks": len(chunks),
                "backend": backend.name}
    return finish(state, order, mapping, layers=layers, jump_db=jump_db, settings=settings)


def predict_task(worker, chunk: Chunk):
    """The model's class label (classifiers) or output (regressors) for every row of a chunk: surrogate targets."""
    from qxc.explain.surrogates import surrogate_targets

    pred = _predictor(worker)
    x, _ = chunk.load()
    return surrogate_targets(pred, _table(x, pred))


def distributed_labels(backend, chunks: Sequence[Chunk]) -> np.ndarray:
    return np.concatenate(backend.map(predict_task, list(chunks)))


def describe_task(worker, _=None) -> dict:
    """What the workers explain: the model output (its name) and the task, as the local run's document has them."""
    pred = _predictor(worker)
    return {"task": "classification" if pred.is_classifier else "regression", "output": pred.score_out}


def distributed_description(backend) -> dict:
    return backend.map(describe_task, [None])[0]


def _table(x: np.ndarray, pred) -> np.ndarray:
    """A chunk's rows as the explainers' rows x features (an image's elements in C order)."""
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=pred.dtype)


def _predictor(worker):
    if "predictor" not in worker.cache:
        from qxc.explain.predictor import Predictor

        worker.cache["predictor"] = Predictor(worker.model, providers=worker.providers, threads=worker.threads,
                                              **worker.predictor_options)
    return worker.cache["predictor"]


def allocation_task(worker, background: np.ndarray, seed: int):
    """The Kernel estimate's pilot, once for every task (each would otherwise run its own 8,192 rows)."""
    from qxc.explain.shapley import kernel_allocation

    predictor = _predictor(worker)
    before = predictor.rows_evaluated
    return kernel_allocation(predictor, background, random_state=seed), predictor.rows_evaluated - before


def shapley_task(worker, rows: np.ndarray, background: np.ndarray, seed: int, allocation="pilot"):
    from qxc.explain.shapley import shapley_values

    return shapley_values(_predictor(worker), rows, background, random_state=seed, allocation=allocation)


def distributed_shapley(backend, x: np.ndarray, background: np.ndarray, *, seed: int = 0, per_task: int = 4):
    """Shapley values of the rows of ``x``, a few instances per task (instances are independent; every task draws
    the same coalitions from ``seed``), as one :class:`~qxc.explain.shapley.ShapleyResult` equal to one local call.
    Above the exact limit, the pilot that shares the pairs among the coalition sizes runs once, in a task of its
    own, and every task gets its allocation."""
    from qxc.explain.shapley import MAX_EXACT, ShapleyResult

    allocation, pilot_rows = "pilot", 0
    chunks = [x[s : s + per_task] for s in range(0, len(x), per_task)]
    if x.shape[1] > MAX_EXACT and len(chunks) > 1:
        allocation, pilot_rows = backend.map(allocation_task, [background], seed)[0]
    parts = backend.map(shapley_task, chunks, background, seed, allocation)
    rows = pilot_rows + sum(p.settings["rows_evaluated"] for p in parts)
    return ShapleyResult(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("values", "base_value", "outputs")),
                         parts[0].method, sum(p.seconds for p in parts),
                         {**parts[0].settings, "instances": len(x), "rows_evaluated": rows, "tasks": len(parts)},
                         np.concatenate([p.std_error for p in parts]),
                         None if any(p.halves_abs is None for p in parts) else sum(p.halves_abs for p in parts))
