"""Shapley values of a tabular model's output (interventional, against a background sample).

Up to ``max_exact`` features every coalition is enumerated (2^M of them) and the values are exact — what shap's
ExactExplainer computes: the coalitions go to onnxruntime in large runs and the attribution is one matrix product.
Identical rows are run once: where an instance and a background row share a feature's value (a binary feature, a
common category, a rounded reading), the coalitions with and without that feature make the same row, so only the
coalitions holding every shared feature are run (on diabetes, whose ``sex`` is binary, 37 % fewer rows).
Above ``max_exact``, a KernelSHAP estimate within a budget of rows per instance: complementary coalition pairs
stratified over the kernel's sizes, each run on one background row (many coalitions on one row each beat few on
every row), the background row's own output as a control variate, one weighted least squares with the efficiency
constraint for all instances (the coalitions are shared), and a standard error for every value. Classifiers are
explained on the probability of each instance's predicted class. Seeded and reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from qxc.explain.importance import spearman
from qxc.explain.predictor import BATCH_ROWS, Predictor
from qxc.runtime.threads import serial_blas

MAX_EXACT = 12  # features up to which every coalition is enumerated


@dataclass
class ShapleyResult:
    values: np.ndarray  # (instances, features)
    base_value: np.ndarray  # (instances,) mean output over the background (for the explained class)
    outputs: np.ndarray  # (instances,) the explained output f(x)
    method: str
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    # (instances, features) standard error of each value: 0 where exact, NaN where too few samples to tell
    std_error: np.ndarray | None = None
    # (2, features): |value| summed over the instances in two independent estimates, each from half of the
    # samples (None where exact, or too few samples); sums, so that tasks' results add up
    halves_abs: np.ndarray | None = None

    @property
    def stability(self) -> float | None:
        """Spearman rank correlation of the features' mean |value| between the two half-budget estimates (what two
        seeds at half the budget agree on: a lower bound for the whole estimate's); 1 where exact."""
        if self.method == "exact":
            return 1.0
        return None if self.halves_abs is None else spearman(self.halves_abs[0], self.halves_abs[1])

    def to_json(self, features: list[str]) -> dict:
        err = np.abs(self.values.sum(axis=1) + self.base_value - self.outputs)
        se = np.zeros_like(self.values) if self.std_error is None else self.std_error
        return {"values": np.round(self.values, 8).tolist(), "features": features,
                "std_error": [[None if np.isnan(e) else round(float(e), 8) for e in row] for row in se],
                "mean_abs": dict(zip(features, np.round(np.abs(self.values).mean(axis=0), 8).tolist())),
                "base_value": np.round(self.base_value, 8).tolist(), "outputs": np.round(self.outputs, 8).tolist(),
                "efficiency_gap_max": float(err.max()) if len(err) else 0.0, "method": self.method,
                "stability": None if self.stability is None else round(float(self.stability), 6),
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


def _all_ones(z: np.ndarray, bits: np.dtype) -> np.ndarray:
    """Coalition masks as words of ``bits``: all ones on each coalition's features, zero elsewhere."""
    return np.negative(z.astype(bits))


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
    bg = np.ascontiguousarray(background).view(bits).reshape(-1)  # (b*m,)
    xb = np.ascontiguousarray(x).view(bits)
    per_block = max(1, min(len(z), rows_per_run // b))  # coalitions per run
    per_run = max(1, min(n, rows_per_run // (per_block * b)))  # instances per run
    buf = np.empty((per_run, per_block, b * m), bits)
    for c in range(0, len(z), per_block):
        zc = z[c : c + per_block]
        k = len(zc)
        tiled = np.tile(_all_ones(zc, bits), (1, b))  # (k, b*m)
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
                  rows_per_build: int = 1 << 18, tie_features: int = 4, min_group: int = 4
                  ) -> tuple[np.ndarray, int]:
    """v[i, S] for every coalition S (an integer bit mask; S = 0 is the mean over the background, S = all is f(x)),
    and the number of rows run.

    The background is taken in chunks of at most ``rows_per_build / 2^M`` rows (bounded memory: 12 MB at 12
    features), and each chunk's rows are grouped by the features they share with the instance (the ``tie_features``
    most often shared, so at most 2^tie_features groups): for a group sharing the features in ``t``, the row of
    coalition S is the row of S | t, so only the coalitions containing ``t`` are run and S reads the value of S | t.
    Ties are bitwise, so the rows left out are identical to the bit to rows that are run. A group of fewer than
    ``min_group`` rows gives up its least shared ties (joining a larger group) until it has that many: each group
    costs a dozen numpy calls, more than the rows it would save.

    A group's rows are written in one pass: with its free features split in two halves, every coalition is
    t | a | b (a, b subsets of each half), and its rows over the group's background rows are ``A[a] ^ B[b]`` with
    ``A[a] = bg ^ ((bg ^ x) & mask(t | a))`` and ``B[b] = (bg ^ x) & mask(b)``: two small tables, one broadcast xor.
    """
    n, m = x.shape
    ints = np.arange(1 << m)
    chunk = max(1, min(len(background), rows_per_build >> m))
    bits = np.dtype(f"u{x.dtype.itemsize}")
    words = _all_ones(_masks(m), bits)  # (2^m, m)
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
            pattern = tied[:, keep] @ (1 << np.arange(len(keep)))  # bit j: shares the j-th most shared feature
            for j in range(len(keep), 0, -1):  # small groups drop their least shared tie
                small = np.bincount(pattern, minlength=1 << len(keep))[pattern] < min_group
                pattern[small] &= (1 << (j - 1)) - 1
            pattern = ((pattern[:, None] >> np.arange(len(keep))) & 1) @ pow2[keep]  # as a mask of features
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


def shapley_values(predictor: Predictor, x: np.ndarray, background: np.ndarray, *, max_exact: int = MAX_EXACT,
                   n_samples: int = 24576, random_state: int = 0, rows_per_run: int = 65_536,
                   allocation: np.ndarray | str | None = "pilot") -> ShapleyResult:
    """Exact Shapley values up to ``max_exact`` features, above it a KernelSHAP estimate that runs about
    ``n_samples`` rows per instance (``_kernel``; plus, once per call, a pilot of at most 8,192 rows that shares the
    rows among the coalition sizes, unless ``allocation`` comes from :func:`kernel_allocation`); ``rows_per_run``
    bounds the rows built at once for the coalitions run on the whole background. An instance's values depend on
    the model, the background, the seed and the instance alone."""
    t = time.perf_counter()
    x = np.asarray(x, dtype=predictor.dtype)
    background = np.asarray(background, dtype=predictor.dtype)
    n, m = x.shape
    classes = None
    if predictor.is_classifier:
        classes = np.argmax(predictor.predict(x).scores, axis=1)
    fx = predictor.value(x, classes)
    if m <= max_exact:
        v, evaluated = _exact_values(predictor, x, background, classes)
        base = v[:, 0]
        phi = v @ _exact_weights(_masks(m))
        method = "exact"
        settings = {"coalitions": int(2**m), "rows_evaluated": evaluated,
                    "rows_deduplicated": int(n * len(background) * 2**m - evaluated)}
        std_error = np.zeros_like(phi)
        halves_abs = None
    else:
        # each background row's output (per class for classifiers), each row run once
        bg_out = _background_scores(predictor, background)
        base = _background_outputs(bg_out, classes, n).mean(axis=1)
        before = predictor.rows_evaluated
        with serial_blas():  # the Gram matrices alternate with onnxruntime runs
            phi, std_error, halves = _kernel(predictor, x, background, classes, fx, bg_out, n_samples,
                                             random_state, rows_per_run, allocation=allocation)
        method = "kernel"
        settings = {"n_samples": n_samples, "random_state": random_state,
                    "rows_evaluated": int(predictor.rows_evaluated - before + len(background))}
        halves_abs = None if halves is None else np.stack([np.abs(h).sum(axis=0) for h in halves])
    settings.update({"background": len(background), "instances": n})
    return ShapleyResult(phi, base, fx, method, time.perf_counter() - t, settings, std_error, halves_abs)


def _pair_mass(m: int, k: np.ndarray) -> np.ndarray:
    """The Shapley kernel's mass on the coalitions of size ``k`` and of size ``m - k`` together."""
    return (m - 1) / (k * (m - k)) * np.where(2 * k == m, 1, 2)


def _sampled_coalitions(m: int, first: np.ndarray, pairs: int, n_background: int, rng: np.random.Generator,
                        allocation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pairs`` complementary pairs of coalitions, as the first coalition of each pair (its complement is the
    second) with a size in ``first`` (sizes up to m/2): the pairs are shared among the sizes in proportion to
    ``allocation`` (by default the Shapley kernel's mass) — stratified, not drawn — the features of each drawn
    uniformly, and each pair gets one background row, taken in turn from fresh permutations of the background
    (every row used equally often). Returns the first coalitions and their sizes (grouped by size, ascending) and
    their background rows."""
    alloc = _pair_mass(m, first) if allocation is None else np.asarray(allocation, np.float64)
    if not len(first) or pairs < 1 or alloc.sum() <= 0:
        return np.zeros((0, m), bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    share = alloc / alloc.sum() * pairs
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[: pairs - counts.sum()]] += 1
    # a uniform draw of each pair's size among the features: the ones whose random key is among its smallest
    keys = rng.random((pairs, m))
    kth = np.empty(pairs)
    for k, start, count in zip(first, np.cumsum(counts) - counts, counts):
        if count:
            kth[start : start + count] = np.partition(keys[start : start + count], k - 1, axis=1)[:, k - 1]
    rounds = -(-pairs // n_background)
    rows = np.argsort(rng.random((rounds, n_background)), axis=1).reshape(-1)[:pairs]  # fresh permutations
    return keys <= kth[:, None], np.repeat(first, counts), rows


def _background_outputs(bg_out: np.ndarray, classes: np.ndarray | None, n: int) -> np.ndarray:
    """(n, b): each background row's output for each of ``n`` instances (for its class, for classifiers)."""
    return np.tile(bg_out, (n, 1)) if classes is None else bg_out[:, classes].T


def _kernel(predictor, x, background, classes, fx, bg_out, n_samples, random_state, rows_per_run, batches: int = 8,
            pilot_instances: int = 2, pilot_pairs: int = 2048, allocation: np.ndarray | str | None = "pilot"
            ) -> tuple[np.ndarray, np.ndarray]:
    """KernelSHAP within a budget of ``n_samples`` rows per instance; returns the values and their standard errors.

    The coalition sizes with the most kernel mass (1 and M-1, then 2 and M-2, ...) are enumerated on the whole
    background while the budget allows (all of them: the exact values). The rest of the budget samples complementary
    pairs of coalitions of the other sizes (``_sampled_coalitions``), each pair run on a single background row: for
    the same number of rows, many coalitions on one row each estimate the values far better than few coalitions on
    every row (measured on the digits MLP: 12x fewer rows than coalitions x background at equal error).

    A pair enters the regression only through the difference of its two values: with the last feature eliminated
    by the efficiency constraint sum(phi) = f(x) - E[f(background)], a coalition's design row is the negative of its
    complement's, so the pair's Gram matrix is twice its first coalition's and its right-hand side is that row times
    the difference. The background row's own output is a control variate for that difference: its deviation from
    the background mean, scaled by a slope fitted per coalition size and instance, is taken off (unbiased: its mean
    is zero).

    The pairs are shared among the sizes in proportion to each size's kernel mass times the spread of its
    differences (Neyman allocation): the differences of small coalitions barely move, those of half the features
    swing most, and the proportional split needs about twice the rows for the same error on the digits MLP. The
    spread is measured once per call on a pilot of ``pilot_pairs`` pairs explaining ``pilot_instances`` background
    rows, so an instance's values depend on the model, the background and the seed, not on the other instances
    explained with it (``allocation``: "pilot" measures it here; an array from :func:`kernel_allocation`, measured
    once for many calls, or None for the kernel mass alone). Each size's mass is spread evenly over its pairs, so
    the estimate stays unbiased. One weighted least squares for all instances (the coalitions are shared); the
    standard error comes from the spread of the same fit over ``batches`` disjoint shares of the pairs, each dealt
    every size's pairs in turn.
    """
    n, m = x.shape
    b = len(background)
    fb = _background_outputs(bg_out, classes, n)
    base = fb.mean(axis=1)
    rng = np.random.default_rng(random_state)
    ends, w_ends, first, total = _pair_plan(m, b, n_samples)
    v_ends = _values(predictor, x, background, ends, classes, rows_per_run) if len(ends) else np.zeros((n, 0))
    runner = _PairRows(predictor, background)
    if isinstance(allocation, str):  # "pilot": measured here
        allocation = _pilot_allocation(runner, bg_out, first, total, random_state, pilot_instances, pilot_pairs)
    z, size, rows = _sampled_coalitions(m, first, total, b, rng, allocation)
    pairs = len(z)
    dv = _corrected(runner.differences(x, classes, z, rows), size, rows, fb) if pairs else np.zeros((n, 0))
    counts = np.bincount(size, minlength=m // 2 + 1)
    counts = counts[counts > 0]

    def solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        try:
            sol = np.linalg.solve(gram, rhs)  # (m-1, n)
        except np.linalg.LinAlgError:  # too few coalitions to pin every feature down
            sol = np.linalg.lstsq(gram, rhs, rcond=None)[0]
        phi = np.empty((n, m))
        phi[:, :-1] = sol.T
        phi[:, -1] = (fx - base) - sol.sum(axis=0)
        return phi

    # weighted least squares through its normal equations, in the rows' design with the last feature eliminated;
    # the batches' Gram matrices and right-hand sides add up to the whole fit's, and each fits alone
    a = ends[:, :-1] - ends[:, -1:].astype(np.float64)
    y = v_ends - base[:, None] - ends[:, -1][None, :] * (fx - base)[:, None]
    gram_e, rhs_e = (a * w_ends[:, None]).T @ a, (a * w_ends[:, None]).T @ y.T
    use = batches if pairs >= batches * m else 1
    batch = (np.arange(pairs) - np.repeat(np.cumsum(counts) - counts, counts)) % use  # each size's pairs in turn
    deal = np.argsort(batch, kind="stable")
    zd = z[deal]
    y = dv[:, deal] - (2.0 * zd[:, -1] - 1)[None, :] * (fx - base)[:, None]
    mass = (_pair_mass(m, size) / np.repeat(counts, counts))[deal, None]  # each size's mass over its pairs
    bounds = np.r_[0, np.cumsum(np.bincount(batch, minlength=use))]
    # one batch's design at a time, and only running sums of the Gram matrices kept (whole, and per half): with
    # many features (an image's 3,072) every batch's own M x M matrix held at once would take gigabytes
    sums = [[0.0, 0.0, 0] for _ in range(3)]  # the whole fit's, the first half's and the second half's (g, r, k)
    parts = []
    for i, (p, q) in enumerate(zip(bounds[:-1], bounds[1:])):
        a = zd[p:q, :-1].astype(np.float64)
        a -= zd[p:q, -1:]
        aw = a * mass[p:q]
        g, r, k = aw.T @ a, 0.5 * (aw.T @ y[:, p:q].T), q - p
        del a, aw
        for acc in (sums[0], sums[1 + (i >= use // 2)]):
            acc[0], acc[1], acc[2] = acc[0] + g, acc[1] + r, acc[2] + k
        if pairs and use > 1:
            parts.append(solve(gram_e + pairs / k * g, rhs_e + pairs / k * r))
    phi = solve(gram_e + sums[0][0], rhs_e + sums[0][1])
    if not pairs:
        return phi, np.zeros_like(phi), None  # every coalition enumerated: exact
    if use == 1:
        return phi, np.full_like(phi, np.nan), None  # too few pairs per batch for a fit of its own
    # two independent estimates, each from half of the batches (half the budget): what two seeds would give
    halves = [solve(gram_e + pairs / k * g, rhs_e + pairs / k * r) for g, r, k in sums[1:]]
    return phi, np.stack(parts).std(axis=0, ddof=1) / np.sqrt(use), halves


def _pair_plan(m: int, b: int, n_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The Kernel estimate's rows: the coalition sizes enumerated on the whole background (their coalitions and
    kernel weights), the sizes (up to m/2) left to sample in complementary pairs, and how many pairs the budget
    leaves for them."""
    ends, w_ends, budget, enumerated = [np.zeros((0, m), bool)], [], n_samples, set()
    everything = (2**m - 2) * b <= n_samples
    for k in range(1, m // 2 + 1):
        sizes = sorted({k, m - k})
        count = sum(math.comb(m, j) for j in sizes)
        if not everything and (count * b > n_samples // 8 or count * b > budget):  # worth its rows when cheap
            break
        for j in sizes:
            ends.append(_combinations(m, j))
            w_ends += [(m - 1) / (j * (m - j)) / math.comb(m, j)] * math.comb(m, j)
        budget -= count * b
        enumerated.update(sizes)
    first = np.array([k for k in range(1, m // 2 + 1) if k not in enumerated], np.int64)
    return np.concatenate(ends), np.array(w_ends, np.float64), first, budget // 2


class _PairRows:
    """Runs complementary coalition pairs, each on its background row, in blocks built just before their run.

    Buffers are reused (no page faults per run), and the instance is tiled over a block so that every xor runs over
    whole contiguous arrays (against a broadcast row numpy loops M features at a time: 4x slower here)."""

    def __init__(self, predictor: Predictor, background: np.ndarray):
        self.predictor, self.background = predictor, background
        m = background.shape[1]
        self.bits = np.dtype(f"u{background.dtype.itemsize}")
        self.block = BATCH_ROWS // 2  # pairs per run
        self.buf = np.empty((2 * self.block, m), self.bits)
        self.t, self.xt = np.empty((self.block, m), self.bits), np.empty((self.block, m), self.bits)

    def differences(self, inst: np.ndarray, cls: np.ndarray | None, z: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(instances, pairs): f(S's row) - f(its complement's row), per instance and pair."""
        block, buf, t, xt = self.block, self.buf, self.t, self.xt
        dv = np.empty((len(inst), len(z)))
        words = _all_ones(z, self.bits)
        bgw = np.ascontiguousarray(self.background).view(self.bits)[rows]  # (pairs, m): each pair's background row
        for i, row in enumerate(np.ascontiguousarray(inst).view(self.bits)):
            full = None if cls is None else np.full(2 * block, cls[i])
            xt[:] = row
            for a in range(0, len(z), block):
                k = min(block, len(z) - a)
                np.bitwise_xor(bgw[a : a + k], xt[:k], out=t[:k])
                t[:k] &= words[a : a + k]  # (bg ^ x) & mask: S's row is bg ^ t, its complement's is x ^ t
                np.bitwise_xor(bgw[a : a + k], t[:k], out=buf[:k])
                np.bitwise_xor(xt[:k], t[:k], out=buf[k : 2 * k])
                vals = self.predictor.value(buf[: 2 * k].view(self.background.dtype),
                                            None if full is None else full[: 2 * k])
                np.subtract(vals[:k], vals[k:], out=dv[i, a : a + k])
        return dv


def _corrected(dv: np.ndarray, size: np.ndarray, rows: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """The differences less the control variate (slopes fitted per size among these pairs)."""
    control = outputs[:, rows] - outputs.mean(axis=1, keepdims=True)
    return dv - _control_slopes(dv, control, np.bincount(size)[np.unique(size)], outputs.var(axis=1)) * control


def _pilot_allocation(runner: _PairRows, bg_out: np.ndarray, first: np.ndarray, total: int, random_state: int,
                      pilot_instances: int = 2, pilot_pairs: int = 2048) -> np.ndarray | None:
    """Each sampled size's share of the pairs: its kernel mass times the spread of its differences, measured on a
    pilot that explains ``pilot_instances`` background rows (None: too few pairs to measure; the kernel mass)."""
    background = runner.background
    b, m = background.shape
    few = min(pilot_pairs, total // 4)
    if len(first) <= 1 or few < 8 * len(first):
        return None
    prng = np.random.default_rng([random_state, 1])
    pick = np.sort(prng.choice(b, size=min(pilot_instances, b), replace=False))
    pcls = None if bg_out.ndim == 1 else np.argmax(bg_out[pick], axis=1)
    z, size, rows = _sampled_coalitions(m, first, few, b, prng)
    dvc = _corrected(runner.differences(background[pick], pcls, z, rows), size, rows,
                     _background_outputs(bg_out, pcls, len(pick)))
    got = np.bincount(size, minlength=m // 2 + 1)[first]
    spread = np.array([np.sqrt(np.mean(dvc[:, size == k].var(axis=1, ddof=1))) if c >= 8 else 0.0
                       for k, c in zip(first, got)])
    known = got >= 8  # too few pilot pairs to tell: the spread of the nearest sizes that have enough
    if not known.any() or spread[known].max() <= 0:
        return None
    return _pair_mass(m, first) * np.interp(first, first[known], spread[known])


def kernel_allocation(predictor: Predictor, background: np.ndarray, *, n_samples: int = 24576,
                      random_state: int = 0) -> np.ndarray | None:
    """The Kernel estimate's share of pairs per coalition size, as :func:`shapley_values` measures it on its pilot:
    measured once, it can be passed to many calls over the same model, background, budget and seed (the
    distributed run does), with the very values a single call gives."""
    background = np.asarray(background, dtype=predictor.dtype)
    b, m = background.shape
    _, _, first, total = _pair_plan(m, b, n_samples)
    return _pilot_allocation(_PairRows(predictor, background), _background_scores(predictor, background), first, total,
                             random_state)


def _background_scores(predictor: Predictor, background: np.ndarray) -> np.ndarray:
    """Each background row's output: (b,) for regressors, (b, classes) probabilities for classifiers."""
    return (predictor.value(background) if not predictor.is_classifier
            else predictor.predict(background).scores.astype(np.float64))


def _control_slopes(v: np.ndarray, c: np.ndarray, counts: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(instances, pairs): per instance, the least-squares slope of the values ``v`` on the control ``c`` within
    each run of ``counts`` consecutive pairs (one coalition size), over the control's ``variance`` on the whole
    background (per instance, known exactly) rather than its variance among those pairs: a size whose few pairs
    happen to draw nearly equal background outputs would otherwise get a slope of thousands from noise, and the
    control's mean over those pairs, times that slope, would move the values far off."""
    starts = np.cumsum(counts) - counts
    dc = c - np.repeat(np.add.reduceat(c, starts, axis=1) / counts, counts, axis=1)
    cov = np.add.reduceat(dc * v, starts, axis=1)  # the centred control sums to zero: v needs no centring
    denominator = counts[None, :] * variance[:, None]
    slope = np.where(denominator > 0, cov / np.where(denominator > 0, denominator, 1), 0.0)
    return np.repeat(slope, counts, axis=1)


def _combinations(m: int, k: int) -> np.ndarray:
    """Every coalition of ``k`` of ``m`` features, as rows of a boolean matrix."""
    import itertools

    idx = np.array(list(itertools.combinations(range(m), k)), np.int64).reshape(-1, k)
    z = np.zeros((len(idx), m), bool)
    np.put_along_axis(z, idx, True, axis=1)
    return z
