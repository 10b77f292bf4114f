"""Shapley values of a tabular model's output (interventional, against a background sample).

Up to ``max_exact`` features every coalition is enumerated (2^M of them) and the values are exact — what shap's
ExactExplainer computes: the coalitions go to onnxruntime in large runs and the attribution is one matrix product.
Identical rows are run once: where an instance and a background row share a feature's value (a binary feature, a
common category, a rounded reading), the coalitions with and without that feature make the same row, so only the
coalitions holding every shared feature are run (on diabetes, whose ``sex`` is binary, 37 % fewer rows).
Above ``max_exact``, a KernelSHAP estimate: coalition sizes drawn from the Shapley kernel, each mask paired with its
complement, the weighted least squares with the efficiency constraint solved once for all instances (the masks are
shared). Classifiers are explained on the probability of each instance's predicted class. Seeded and reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from qxc.explain.predictor import Predictor


@dataclass
class ShapleyResult:
    values: np.ndarray  # (instances, features)
    base_value: np.ndarray  # (instances,) mean output over the background (for the explained class)
    outputs: np.ndarray  # (instances,) the explained output f(x)
    method: str
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self, features: list[str]) -> dict:
        err = np.abs(self.values.sum(axis=1) + self.base_value - self.outputs)
        return {"values": np.round(self.values, 8).tolist(), "features": features,
                "mean_abs": dict(zip(features, np.round(np.abs(self.values).mean(axis=0), 8).tolist())),
                "base_value": np.round(self.base_value, 8).tolist(), "outputs": np.round(self.outputs, 8).tolist(),
                "efficiency_gap_max": float(err.max()) if len(err) else 0.0, "method": self.method,
                "seconds": round(self.seconds, 4), "settings": self.settings}


def _masks(m: int) -> np.ndarray:
    k = np.arange(2**m)[:, None]
    return ((k >> np.arange(m)[None, :]) & 1).astype(bool)


def _exact_weights(z: np.ndarray) -> np.ndarray:
    """A (2^M, M): phi = v @ A with v the coalition values in ``z``'s order."""
    m = z.shape[1]
    size = z.sum(axis=1)
    w = np.array([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)])
    with_i = np.where(z, w[np.maximum(size - 1, 0)][:, None], 0.0)
    without_i = np.where(~z, -w[np.minimum(size, m - 1)][:, None], 0.0)
    return with_i + without_i


def _values(predictor: Predictor, x: np.ndarray, background: np.ndarray, z: np.ndarray, classes: np.ndarray | None,
            rows_per_run: int) -> np.ndarray:
    """v[i, k] = mean over the background of f(x_i on coalition k, background elsewhere).

    The rows are blended bitwise, ``bg ^ ((bg ^ x) & mask)``, with each coalition's mask tiled over the background
    once per block of coalitions and shared by all instances: numpy then runs long contiguous loops (a ``where``
    over rows of M features runs M-long ones, several times slower), and the blend is exact.
    """
    n, m = x.shape
    b = len(background)
    out = np.empty((n, len(z)))
    bits = np.dtype(f"u{x.dtype.itemsize}")
    ones = np.array(-1).astype(bits)
    bg = np.ascontiguousarray(background).view(bits).reshape(-1)  # (b*m,)
    xb = np.ascontiguousarray(x).view(bits)
    per_block = max(1, min(len(z), rows_per_run // b))  # coalitions per run
    per_run = max(1, min(n, rows_per_run // (per_block * b)))  # instances per run
    buf = np.empty((per_run, per_block, b * m), bits)
    for c in range(0, len(z), per_block):
        zc = z[c : c + per_block]
        k = len(zc)
        tiled = np.tile(np.where(zc, ones, bits.type(0)), (1, b))  # (k, b*m)
        for s in range(0, n, per_run):
            xs = xb[s : s + per_run]
            j = len(xs)
            diff = np.bitwise_xor(bg[None, :], np.tile(xs, (1, b)))  # (j, b*m)
            rows = buf[:j, :k]
            np.bitwise_and(diff[:, None, :], tiled[None], out=rows)
            np.bitwise_xor(rows, bg[None, None, :], out=rows)
            cls = None if classes is None else np.repeat(classes[s : s + j], k * b)
            vals = predictor.value(rows.view(x.dtype).reshape(-1, m), cls).reshape(j, k, b)
            out[s : s + j, c : c + k] = vals.mean(axis=2)
    return out


def _subsets(features: np.ndarray) -> np.ndarray:
    """Every subset of ``features`` as an integer bit mask (ascending)."""
    k = np.arange(1 << len(features))
    return ((k[:, None] >> np.arange(len(features))) & 1) @ (1 << features)


def _exact_values(predictor: Predictor, x: np.ndarray, background: np.ndarray, classes: np.ndarray | None,
                  fx: np.ndarray, rows_per_build: int = 1 << 18, tie_features: int = 4) -> tuple[np.ndarray, int]:
    """v[i, S] for every coalition S (an integer bit mask; S = 0 is the mean over the background, S = all is f(x)),
    and the number of rows run.

    The background is taken in chunks of at most ``rows_per_build / 2^M`` rows (bounded memory: 12 MB at 12
    features), and each chunk's rows are grouped by the features they share with the instance (the ``tie_features``
    most often shared, so at most 2^tie_features groups): for a group sharing the features in ``t``, the row of
    coalition S is the row of S | t, so only the coalitions containing ``t`` are run and S reads the value of S | t.
    Ties are bitwise, so the rows left out are identical to the bit to rows that are run.

    A group's rows are written in one pass: with its free features split in two halves, every coalition is
    t | a | b (a, b subsets of each half), and its rows over the group's background rows are ``A[a] ^ B[b]`` with
    ``A[a] = bg ^ ((bg ^ x) & mask(t | a))`` and ``B[b] = (bg ^ x) & mask(b)``: two small tables, one broadcast xor.
    """
    n, m = x.shape
    ints = np.arange(1 << m)
    chunk = max(1, min(len(background), rows_per_build >> m))
    bits = np.dtype(f"u{x.dtype.itemsize}")
    words = np.where(_masks(m), np.array(-1).astype(bits), bits.type(0))  # (2^m, m): all ones on S's features
    buf = np.empty((1 << m) * chunk * m, bits)  # reused: a fresh array per run costs its page faults every time
    xw = np.ascontiguousarray(x).view(bits)
    pow2 = 1 << np.arange(m)
    plans: dict[int, tuple] = {}  # per shared-feature mask t: the coalitions' halves, their masks tiled over a chunk

    def plan(t: int) -> tuple:
        if t not in plans:
            free = np.flatnonzero(((t >> np.arange(m)) & 1) == 0)
            hi, lo = _subsets(free[len(free) // 2 :]) | t, _subsets(free[: len(free) // 2])
            plans[t] = ((hi[:, None] | lo[None, :]).reshape(-1), np.tile(words[hi], (1, chunk)),
                        np.tile(words[lo], (1, chunk)), ints | t)
        return plans[t]

    v = np.zeros((n, 1 << m))
    evaluated = 0
    for i in range(n):
        for c in range(0, len(background), chunk):
            bgw = np.ascontiguousarray(background[c : c + chunk]).view(bits)
            tied = xw[i] == bgw  # (chunk, m)
            counts = tied.sum(axis=0)
            keep = np.argsort(-counts, kind="stable")[:tie_features]
            keep = keep[counts[keep] > 0]
            pattern = tied[:, keep] @ pow2[keep]
            order = np.argsort(pattern, kind="stable")
            groups, start = [], 0
            for idx in np.split(order, np.flatnonzero(np.diff(pattern[order])) + 1):
                t = int(pattern[idx[0]])
                coalitions, mask_hi, mask_lo, reads = plan(t)
                width = len(idx) * m
                bg_rows = bgw[idx]
                diff = (bg_rows ^ xw[i]).reshape(-1)
                bg_rows = bg_rows.reshape(-1)
                a = mask_hi[:, :width] & diff
                a ^= bg_rows
                b = mask_lo[:, :width] & diff
                size = len(coalitions) * width
                np.bitwise_xor(a[:, None, :], b[None, :, :], out=buf[start : start + size].reshape(len(a), len(b), -1))
                groups.append((coalitions, reads, len(idx)))
                start += size
            rows = buf[:start].view(x.dtype).reshape(-1, m)
            vals = predictor.value(rows, None if classes is None else np.full(len(rows), classes[i]))
            evaluated += len(vals)
            start = 0
            table = np.empty(1 << m)
            for coalitions, reads, count in groups:
                table[coalitions] = vals[start : start + len(coalitions) * count].reshape(-1, count).sum(axis=1)
                v[i] += table[reads]
                start += len(coalitions) * count
    return v / len(background), evaluated


def shapley_values(predictor: Predictor, x: np.ndarray, background: np.ndarray, *, max_exact: int = 12,
                   n_samples: int = 2048, random_state: int = 0, rows_per_run: int = 65_536) -> ShapleyResult:
    t = time.perf_counter()
    x = np.asarray(x, dtype=predictor.dtype)
    background = np.asarray(background, dtype=predictor.dtype)
    n, m = x.shape
    classes = None
    if predictor.is_classifier:
        classes = np.argmax(predictor.predict(x).scores, axis=1)
    fx = predictor.value(x, classes)
    if m <= max_exact:
        v, evaluated = _exact_values(predictor, x, background, classes, fx)
        base = v[:, 0]
        phi = v @ _exact_weights(_masks(m))
        method = "exact"
        settings = {"coalitions": int(2**m), "rows_evaluated": evaluated,
                    "rows_deduplicated": int(n * len(background) * 2**m - evaluated)}
    else:
        base_rows = predictor.value(np.repeat(background, n, axis=0),
                                    None if classes is None else np.tile(classes, len(background)))
        base = base_rows.reshape(len(background), n).mean(axis=0)
        phi = _kernel(predictor, x, background, classes, fx, base, n_samples, random_state, rows_per_run)
        method, settings = "kernel", {"n_samples": n_samples, "random_state": random_state}
    settings.update({"background": len(background), "instances": n})
    return ShapleyResult(phi, base, fx, method, time.perf_counter() - t, settings)


def _kernel(predictor, x, background, classes, fx, base, n_samples, random_state, rows_per_run) -> np.ndarray:
    """KernelSHAP: coalition sizes with the most kernel mass (1 and M-1, then 2 and M-2, ...) are enumerated while
    the budget allows, with their exact kernel weights; the remaining mass is covered by sampled coalitions
    (sizes drawn by kernel mass, each paired with its complement). One weighted least squares for all instances,
    under the efficiency constraint sum(phi) = f(x) - E[f(background)]."""
    n, m = x.shape
    rng = np.random.default_rng(random_state)
    mass = {s: (m - 1) / (s * (m - s)) for s in range(1, m)}
    masks, weights = [], []
    budget = n_samples
    enumerated = set()
    for s in range(1, m // 2 + 1):
        sizes = {s, m - s}
        count = sum(math.comb(m, k) for k in sizes)
        if count > budget:
            break
        for k in sorted(sizes):
            for combo in _combinations(m, k):
                masks.append(combo)
                weights.append(mass[k] / math.comb(m, k))
        budget -= count
        enumerated |= sizes
    rest = [k for k in range(1, m) if k not in enumerated]
    if rest and budget >= 2:
        p = np.array([mass[k] for k in rest])
        total = p.sum()
        half = budget // 2
        for k in rng.choice(rest, size=half, p=p / total):
            mk = np.zeros(m, bool)
            mk[rng.choice(m, size=k, replace=False)] = True
            masks += [mk, ~mk]
            weights += [total / (2 * half)] * 2
    z = np.array(masks)
    w = np.array(weights)
    v = _values(predictor, x, background, z, classes, rows_per_run)  # (n, S)
    zf = z.astype(np.float64)
    y = v - base[:, None] - zf[:, -1][None, :] * (fx - base)[:, None]  # eliminate the last feature
    a = zf[:, :-1] - zf[:, -1:]
    sw = np.sqrt(w)[:, None]
    sol, *_ = np.linalg.lstsq(a * sw, (y.T * sw), rcond=None)  # (m-1, n)
    phi = np.empty((n, m))
    phi[:, :-1] = sol.T
    phi[:, -1] = (fx - base) - sol.sum(axis=0)
    return phi


def _combinations(m: int, k: int):
    import itertools

    for combo in itertools.combinations(range(m), k):
        mk = np.zeros(m, bool)
        mk[list(combo)] = True
        yield mk
