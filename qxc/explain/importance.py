"""Feature importance: permutation (sklearn-identical with labels) and ablation, in a few large onnxruntime runs.

Every perturbed copy of the data for every feature and repeat is stacked into one matrix and evaluated in chunks;
the scoring is numpy. Results carry the spread over repeats and a stability score: the mean Spearman rank
correlation of the importances between repeats (1 = the ranking never changes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from qxc.explain.predictor import Prediction, Predictor

BUFFER_BYTES = 64 << 20  # the perturbed rows packed for onnxruntime at most (see _predict_blocks)


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties getting their average rank (scipy's rankdata 'average')."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks), in numpy: scipy.stats costs a second to import."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 1.0 if np.array_equal(a, b) else 0.0
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(np.dot(ra, rb) / np.sqrt(np.dot(ra, ra) * np.dot(rb, rb)))


def stability(per_repeat: np.ndarray) -> float:
    """Mean pairwise Spearman correlation of the importance vectors of the repeats (rows)."""
    r = len(per_repeat)
    if r < 2:
        return 1.0
    vals = [spearman(per_repeat[i], per_repeat[j]) for i in range(r) for j in range(i + 1, r)]
    return float(np.mean(vals))


def score(pred: Prediction, y: np.ndarray | None, reference: Prediction | None, classifier: bool) -> float:
    """With labels: accuracy (classifiers) or R^2 (regressors), as sklearn's ``estimator.score``.
    Without: minus the mean prediction change against ``reference`` (total variation for probabilities)."""
    terms = RowTerms(pred if y is not None else reference, y, classifier)
    sums = terms.base_sum if y is not None else terms.terms(pred, slice(None)).sum(axis=0)
    return score_from_sums(sums, terms.n, classifier, y is not None, terms.ss_tot)


def r2_score(y_true, y_pred) -> float:
    """scikit-learn's ``r2_score``: outputs averaged uniformly; a constant target scores 1 if predicted exactly,
    else 0. (n,) and (n, 1) alike."""
    yy, out = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    out, yy = _columns(out), _columns(yy)  # (rows, outputs)
    return _r2_from_sums(np.sum((yy - out) ** 2, axis=0), _ss_tot(yy))


def _columns(a: np.ndarray) -> np.ndarray:
    """(rows,) or (rows, outputs) as (rows, outputs), zero rows included."""
    return a[:, None] if a.ndim == 1 else a


def _ss_tot(y) -> np.ndarray:
    """Per output, the labels' total sum of squares about their mean."""
    yy = _columns(np.asarray(y, np.float64))
    return np.sum((yy - yy.mean(axis=0)) ** 2, axis=0)


def _r2_from_sums(ss_res: np.ndarray, ss_tot: np.ndarray) -> float:
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), np.where(ss_res == 0, 1.0, 0.0))
    return float(np.mean(r2))


class RowTerms:
    """A score as a sum of per-row terms, so that a copy of the data whose predictions changed on a few rows is
    scored from those rows alone, and chunks' sums add up (the distributed run's): correct labels (accuracy),
    squared residuals per output (R^2), or the prediction change against ``base`` (total variation of
    probabilities, absolute change of each regression output)."""

    def __init__(self, base: Prediction, y: np.ndarray | None, classifier: bool):
        self.base, self.classifier = base, classifier
        self.y = None if y is None else np.asarray(y)
        self.n = len(base.scores)
        self.base_terms = self.terms(base, slice(None))
        self.base_sum = self.base_terms.sum(axis=0)
        self.ss_tot = _ss_tot(self.y) if self.y is not None and not classifier else None  # R^2's denominators

    def terms(self, p: Prediction, rows) -> np.ndarray:
        """(rows,) or (rows, outputs) terms of prediction ``p`` for the data's ``rows``."""
        if self.y is not None:
            if self.classifier:
                return (p.labels == self.y[rows]).astype(np.float64)
            y = self.y[rows].astype(np.float64)
            return (_columns(y) - _columns(p.scores.astype(np.float64))) ** 2
        d = np.abs(p.scores.astype(np.float64) - self.base.scores[rows].astype(np.float64))
        return 0.5 * d.sum(axis=1) if self.classifier and d.ndim == 2 else _columns(d)

    def changed(self, rows: np.ndarray, part: Prediction) -> np.ndarray:
        """The sums with ``rows``' predictions replaced by ``part``."""
        return self.base_sum - self.base_terms[rows].sum(axis=0) + self.terms(part, rows).sum(axis=0)

    def label_sums(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per output, the sum of the labels and of their squares (R^2's total sum of squares, chunk by chunk)."""
        if self.y is None or self.classifier:
            return None
        y = _columns(self.y.astype(np.float64))
        return y.sum(axis=0), (y * y).sum(axis=0)


def score_from_sums(sums: np.ndarray, n: int, classifier: bool, labeled: bool, ss_tot: np.ndarray | None = None
                    ) -> float:
    """What :func:`score` gives, from :class:`RowTerms` sums over ``n`` rows (``ss_tot``: per-output total sum of
    squares of the labels, for R^2)."""
    sums = np.asarray(sums, np.float64)
    if labeled:
        return float(sums / n) if classifier else _r2_from_sums(sums, ss_tot)
    return -float(sums / n) if classifier else -float(np.mean(sums) / n)  # the mean over rows (and outputs)


@dataclass
class ImportanceResult:
    importances: np.ndarray  # (features, repeats)
    baseline_score: float
    metric: str
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.importances.mean(axis=1)

    @property
    def std(self) -> np.ndarray:
        return self.importances.std(axis=1)

    def to_json(self, features: list[str]) -> dict:
        return {"values": dict(zip(features, np.round(self.mean, 8).tolist())),
                "std": dict(zip(features, np.round(self.std, 8).tolist())),
                "stability": round(stability(self.importances.T), 6), "metric": self.metric,
                "baseline_score": self.baseline_score, "seconds": round(self.seconds, 4), "settings": self.settings}


def _predict_blocks(predictor: Predictor, blocks, rows_per_run: int, base: Prediction):
    """Yield ``(rows, prediction)`` for each ``(rows, values)`` block of perturbed rows, in order. The blocks are
    packed into one reused buffer of at most ``rows_per_run`` rows and ``BUFFER_BYTES`` of input or output (so a wide
    row, an image's, or a wide output, a language model's logits, takes fewer), run together; a block larger than
    the buffer runs alone. Memory stays bounded by the buffer and the largest block, however many blocks there are."""
    buf, filled, pending = None, 0, []

    def flush():
        nonlocal filled
        run = predictor.predict(buf[:filled]) if filled else base.take(slice(0, 0))
        at = 0
        for rows in pending:
            # a copy: a view would keep the whole run's predictions alive through the next run (twice the buffer)
            part = run.take(slice(at, at + len(rows)))
            yield rows, Prediction(None if part.labels is None else part.labels.copy(), part.scores.copy())
            at += len(rows)
        del run
        pending.clear()
        filled = 0

    for rows, values in blocks:
        if buf is None:
            row_bytes = max(1, values.shape[1] * np.dtype(predictor.dtype).itemsize, predictor.out_row_bytes or 0)
            buf = np.empty((max(1, min(rows_per_run, BUFFER_BYTES // row_bytes)), values.shape[1]), predictor.dtype)
        if len(rows) > len(buf):
            yield from flush()
            yield rows, predictor.predict(values)
            continue
        if filled + len(rows) > len(buf):
            yield from flush()
        buf[filled : filled + len(rows)] = values
        filled += len(rows)
        pending.append(rows)
    yield from flush()


def _changed_scores(predictor: Predictor, blocks, base: Prediction, y, classifier: bool, rows_per_run: int):
    """Score a stream of perturbed copies of the data, each given as ``(rows, values)``: the rows whose input
    changed and their new inputs (the other rows keep the base prediction: identical rows are not run again, and
    the score is updated from the changed rows' terms alone)."""
    terms = RowTerms(base, y, classifier)
    return [score_from_sums(terms.changed(rows, part), terms.n, classifier, y is not None, terms.ss_tot)
            for rows, part in _predict_blocks(predictor, blocks, rows_per_run, base)]


def shuffled_columns(x: np.ndarray, col: int, n_repeats: int, seed: int, orders=None):
    """The column ``col`` after each of ``n_repeats`` cumulative shuffles, as sklearn's permutation_importance does
    them: one RandomState(seed) per feature, shuffling an index vector in place every repeat (``orders``: the
    index vectors of ``shuffles(len(x), n_repeats, seed)``, when the caller drew them once for every feature)."""
    column = x[:, col]
    for order in shuffles(len(x), n_repeats, seed) if orders is None else orders:
        column = column[order]
        yield column


def shuffles(n: int, n_repeats: int, seed: int) -> list[np.ndarray]:
    """The index vector after each shuffle. Every feature starts a RandomState from the same seed, so every feature
    gets these very shuffles: a caller draws them once (seeding a legacy RandomState costs ~0.15 ms; sklearn does it
    per feature)."""
    rs = np.random.RandomState(seed)
    idx = np.arange(n)
    orders = []
    for _ in range(n_repeats):
        rs.shuffle(idx)
        orders.append(idx.copy())
    return orders


def shuffled_rows(x: np.ndarray, col: int, n_repeats: int, seed: int, orders=None):
    """Per repeat of ``shuffled_columns``, the rows whose value the shuffle moved and their new inputs (the others
    are the data's own rows: their predictions need not run again; NaN != NaN, so a NaN is run, to be safe)."""
    for column in shuffled_columns(x, col, n_repeats, seed, orders):
        rows = np.flatnonzero(column != x[:, col])
        values = x[rows]
        values[:, col] = column[rows]
        yield rows, values


def permutation_importance(predictor: Predictor, x: np.ndarray, y: np.ndarray | None = None, *, n_repeats: int = 5,
                           random_state: int = 0, rows_per_run: int = 200_000) -> ImportanceResult:
    """Drop in score when one feature's column is shuffled.

    With labels and the same ``random_state`` this equals ``sklearn.inspection.permutation_importance`` on the same
    predictions: one seed is drawn from RandomState(random_state); every feature restarts a RandomState from it and
    shuffles its index vector cumulatively over the repeats, as sklearn does.
    """
    import time

    t = time.perf_counter()
    x = np.asarray(x)
    n, f = x.shape
    base = predictor.predict(x)
    baseline = score(base, y, base, predictor.is_classifier)
    seed = np.random.RandomState(random_state).randint(np.iinfo(np.int32).max + 1)

    evaluated = n
    orders = shuffles(n, n_repeats, seed)  # the same for every feature

    def blocks():
        nonlocal evaluated
        for col in range(f):
            for rows, values in shuffled_rows(x, col, n_repeats, seed, orders):
                evaluated += len(rows)
                yield rows, values

    scores = _changed_scores(predictor, blocks(), base, y, predictor.is_classifier, rows_per_run)
    imp = baseline - np.array(scores).reshape(f, n_repeats)
    metric = ("accuracy" if predictor.is_classifier else "r2") if y is not None else "prediction_change"
    return ImportanceResult(imp, baseline, metric, time.perf_counter() - t,
                            {"n_repeats": n_repeats, "random_state": random_state, "rows": n,
                             "rows_evaluated": evaluated})


Baseline = Literal["mean", "median", "zero"]


def ablation_importance(predictor: Predictor, x: np.ndarray, y: np.ndarray | None = None, *,
                        baseline: Baseline = "mean", background: np.ndarray | None = None,
                        n_repeats: int = 5, random_state: int = 0, rows_per_run: int = 200_000) -> ImportanceResult:
    """Replace one feature by a baseline (mean, median or zero of ``background``, missing values (NaN) left out)
    and measure the change. A string column (coded as category indices) takes its most frequent category instead:
    a mean category is no category.

    Repeats evaluate disjoint random row subsets (bootstrap of the rows), giving the spread and stability.
    """
    import time

    t = time.perf_counter()
    x = np.asarray(x)
    bg = x if background is None else np.asarray(background)
    with warnings.catch_warnings():  # a column with no observed value keeps NaN (missing) as its baseline
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_val = {"mean": np.nanmean(bg, axis=0), "median": np.nanmedian(bg, axis=0),
                   "zero": np.zeros(bg.shape[1])}[baseline]
    for col in np.flatnonzero(predictor.categorical):
        codes, counts = np.unique(bg[:, col], return_counts=True)
        ref_val[col] = codes[np.argmax(counts)]
    n, f = x.shape
    rng = np.random.default_rng(random_state)
    subsets = [rng.choice(n, size=n, replace=True) for _ in range(n_repeats)] if n_repeats > 1 else [np.arange(n)]
    changed = [np.flatnonzero(x[:, col] != ref_val[col]) for col in range(f)]  # the others are the data's rows

    def blocks():
        for col, rows in enumerate(changed):
            values = x[rows]
            values[:, col] = ref_val[col]
            yield rows, values

    base = predictor.predict(x)
    classifier, labeled = predictor.is_classifier, y is not None
    terms = RowTerms(base, y, classifier)  # each row's score term, unablated
    # a bootstrap sample's score comes from its rows' terms summed: how often it draws each row, times the terms;
    # a feature's ablation changes only its changed rows' terms, so nothing (features x rows x outputs) is held
    counts = np.stack([np.bincount(rows, minlength=n) for rows in subsets]).astype(np.float64)  # (repeats, rows)
    base_sums = counts @ terms.base_terms
    ss_tot = [_ss_tot(np.asarray(y)[rows]) if labeled and not classifier else None for rows in subsets]
    baseline_scores = [score_from_sums(base_sums[r], len(rows), classifier, labeled, ss_tot[r])
                       for r, rows in enumerate(subsets)]
    imp = np.zeros((f, len(subsets)))
    for col, (rows, part) in enumerate(_predict_blocks(predictor, blocks(), rows_per_run, base)):
        sums = base_sums + counts[:, rows] @ (terms.terms(part, rows) - terms.base_terms[rows])
        imp[col] = [bs - score_from_sums(sums[r], len(subset), classifier, labeled, ss_tot[r])
                    for r, (bs, subset) in enumerate(zip(baseline_scores, subsets))]
    metric = ("accuracy" if predictor.is_classifier else "r2") if y is not None else "prediction_change"
    return ImportanceResult(imp, float(np.mean(baseline_scores)), metric, time.perf_counter() - t,
                            {"baseline": baseline, "n_repeats": n_repeats, "random_state": random_state, "rows": n,
                             "rows_evaluated": n + sum(len(r) for r in changed)})
