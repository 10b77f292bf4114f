"""Surrogates: a global decision tree and local linear models, with fidelity measured on held-out rows.

The tree is fit on the model's own predictions (class for classifiers, output for regressors) over the data, plus
in-distribution perturbations when asked (rows whose features are redrawn one at a time from the observed values),
and scored on held-out rows it never saw. Local surrogates (LIME-like) sample each instance's neighbourhood inside the
observed range of every feature (binary/categorical features take observed values), weight samples by an exponential
kernel, fit all instances' weighted ridge models at once (batched normal equations), and report fidelity on a second,
held-out neighbourhood sample — not on the samples the fit saw.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from qxc.explain.importance import r2_score
from qxc.explain.predictor import Predictor
from qxc.runtime.threads import serial_blas


@dataclass
class TreeSurrogate:
    tree: object
    fidelity: float  # held-out agreement (classifier) or R^2 (regressor) with the model
    fidelity_train: float
    rules: str
    classifier: bool
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self, features: list[str]) -> dict:
        t = self.tree.tree_
        nodes = [{"id": i, "feature": features[t.feature[i]] if t.feature[i] >= 0 else None,
                  "threshold": float(t.threshold[i]) if t.feature[i] >= 0 else None,
                  "left": int(t.children_left[i]), "right": int(t.children_right[i]),
                  "samples": int(t.n_node_samples[i]),
                  "value": (int(np.argmax(t.value[i])) if self.classifier else float(t.value[i].reshape(-1)[0]))}
                 for i in range(t.node_count)]
        return {"fidelity": round(self.fidelity, 6), "fidelity_train": round(self.fidelity_train, 6),
                "metric": "agreement" if self.classifier else "r2", "rules": self.rules, "nodes": nodes,
                "depth": int(self.tree.get_depth()), "leaves": int(self.tree.get_n_leaves()),
                "seconds": round(self.seconds, 4), "settings": self.settings}


def surrogate_targets(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    """What a surrogate learns: the model's class labels (classifiers) or its outputs (regressors)."""
    if predictor.is_classifier:  # the model's own labels: the rules then name its classes (strings, 3 and 7, ...)
        return predictor.predict(x).labels
    return predictor.value(x)  # a multi-output regressor's explained column


def perturb_marginal(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows copied from the data with one feature redrawn from its observed values: stays in each feature's range."""
    rows = x[rng.integers(0, len(x), n)].copy()
    cols = rng.integers(0, x.shape[1], n)
    rows[np.arange(n), cols] = x[rng.integers(0, len(x), n), cols]
    return rows


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices exactly as ``sklearn.model_selection.train_test_split(..., test_size=fraction,
    random_state=seed)`` draws them, without its input checks (whose dataframe-plugin discovery costs ~15 ms on
    first use, as much as a whole small explanation)."""
    n_test = int(np.ceil(fraction * n))
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def fit_decision_tree(x: np.ndarray, y: np.ndarray, classifier: bool, **params):
    """scikit-learn's decision tree: a classifier on class labels, a regressor on outputs.

    Finite float32 tables (what the tree builds on anyway) skip scikit-learn's input checks: their dataframe
    plugin discovery (narwhals reads every installed package's entry points) costs ~10 ms per process, as much as a
    whole small explanation; anything else goes through the checks."""
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    tree = (DecisionTreeClassifier if classifier else DecisionTreeRegressor)(**params)
    return tree.fit(x, y, check_input=not _checked(x))


def _checked(x: np.ndarray) -> bool:
    """A table scikit-learn's tree code takes as it is: float32, C-contiguous, finite."""
    return x.dtype == np.float32 and x.flags.c_contiguous and bool(np.isfinite(x).all())


def tree_fidelity(tree, x: np.ndarray, y: np.ndarray, classifier: bool) -> float:
    """Agreement with the model's labels (classifiers) or R^2 against its outputs (regressors)."""
    pred = tree.predict(x, check_input=not _checked(x))
    if classifier:
        return float(np.mean(pred == y))
    return r2_score(y, pred)


def tree_rules(tree, features: list[str], categories: dict[int, list[str]] | None = None) -> str:
    """The tree as text rules (scikit-learn's ``export_text``) with the features' names. The names are put in
    after the export: given them, ``export_text`` runs its input checks on the list (the plugin discovery above).
    A string column's split (``categories``: its category names by feature index; the table holds their indices)
    reads as the categories on each side: ``cat in {mid, rough}``."""
    import re

    from sklearn.tree import export_text

    text = export_text(tree, decimals=4)
    categories = categories or {}

    def split(mt: re.Match) -> str:
        j, side, threshold = int(mt.group(1)), mt.group(2), float(mt.group(3))
        if j not in categories:
            return mt.group(0)
        names = categories[j]
        chosen = [n for code, n in enumerate(names) if (code <= threshold) == (side == "<=")]
        return f"feature_{j} in {{{', '.join(chosen)}}}"

    text = re.sub(r"feature_(\d+) (<=|> ) (-?[\d.]+)", split, text)
    return re.sub(r"(?<=--- )feature_(\d+)(?= [<>]| in )", lambda mt: str(features[int(mt.group(1))]), text)


def fit_tree(predictor: Predictor, x: np.ndarray, features: list[str], *, max_depth: int = 4,
             max_leaf_nodes: int | None = None, perturbations: int = 0, holdout: float = 0.25,
             random_state: int = 0) -> TreeSurrogate:
    t = time.perf_counter()
    rng = np.random.default_rng(random_state)
    x = np.asarray(x)
    train_rows, test_rows = holdout_split(len(x), holdout, random_state)
    train, test = x[train_rows], x[test_rows]
    if perturbations:
        train = np.concatenate([train, perturb_marginal(train, perturbations, rng)])
    y_train, y_test = surrogate_targets(predictor, train), surrogate_targets(predictor, test)
    return tree_surrogate(train, y_train, test, y_test, predictor.is_classifier, features, max_depth=max_depth,
                          max_leaf_nodes=max_leaf_nodes, random_state=random_state,
                          categories=predictor.category_names, started=t,
                          settings={"perturbations": perturbations, "holdout": holdout})


def tree_surrogate(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, classifier: bool,
                   features: list[str], *, max_depth: int = 4, max_leaf_nodes: int | None = None,
                   random_state: int = 0, categories: dict[int, list[str]] | None = None,
                   started: float | None = None, settings: dict | None = None) -> TreeSurrogate:
    """The tree fit on the model's targets over ``train``, its fidelity on ``test`` (held out) and on ``train``, its
    rules; ``settings`` joins the fit's own (the local run's and the sharded run's trees are written alike)."""
    t = time.perf_counter() if started is None else started
    tree = fit_decision_tree(train, y_train, classifier, max_depth=max_depth, max_leaf_nodes=max_leaf_nodes,
                             random_state=random_state)
    fid, fid_train = tree_fidelity(tree, test, y_test, classifier), tree_fidelity(tree, train, y_train, classifier)
    rules = tree_rules(tree, list(features), categories)
    return TreeSurrogate(tree, float(fid), float(fid_train), rules, classifier, time.perf_counter() - t,
                         {**(settings or {}), "max_depth": max_depth, "max_leaf_nodes": max_leaf_nodes,
                          "random_state": random_state, "train_rows": len(train), "test_rows": len(test)})


@dataclass
class LocalResult:
    values: np.ndarray  # (instances, features): each feature's local contribution to the explained output
    coef: np.ndarray  # (instances, features): slope per feature unit (continuous) or the in-bin effect (binned)
    intercept: np.ndarray
    fidelity: np.ndarray  # (instances,) weighted R^2 on held-out neighbourhood samples
    fidelity_in_sample: np.ndarray
    outputs: np.ndarray
    representation: list[str]  # per instance: "continuous" or "binned"
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self, features: list[str]) -> dict:
        return {"values": np.round(self.values, 8).tolist(), "coef": np.round(self.coef, 8).tolist(),
                "intercept": np.round(self.intercept, 8).tolist(), "features": features,
                "representation": self.representation,
                "fidelity": np.round(self.fidelity, 6).tolist(), "fidelity_mean": round(float(np.mean(self.fidelity)), 6),
                "fidelity_in_sample_mean": round(float(np.mean(self.fidelity_in_sample)), 6),
                "outputs": np.round(self.outputs, 8).tolist(), "seconds": round(self.seconds, 4),
                "settings": self.settings}


def _feature_kinds(x: np.ndarray, max_levels: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which features are discrete (few observed levels, all whole numbers) and their observed values."""
    ordered = np.sort(x, axis=0)  # every column sorted at once: its levels are where it steps
    steps = np.ones(ordered.shape, bool)
    steps[1:] = ordered[1:] != ordered[:-1]
    levels = [ordered[steps[:, j], j] for j in range(x.shape[1])]
    levels = [lv[~np.isnan(lv)] for lv in levels]  # missing values (NaN, sorted last) are no level
    discrete = np.array([len(lv) <= max_levels and np.allclose(lv, np.round(lv)) for lv in levels])
    return discrete, levels


def sample_neighbourhood(x0: np.ndarray, data: np.ndarray, n: int, rng: np.random.Generator, *, scale: float = 0.25,
                         discrete=None, levels=None, dtype=np.float32) -> np.ndarray:
    """``n`` samples around each row of ``x0`` (instances, features) -> (instances, n, features).

    Continuous features: Gaussian steps of ``scale`` x the feature's standard deviation, reflected back into the
    observed [min, max]. Discrete features: keep the instance's value, or with probability 0.3 take an observed level.
    Missing values (NaN) in the data are left out of those statistics; an instance's missing value stays missing.
    """
    if discrete is None:
        discrete, levels = _feature_kinds(data)
    lo, hi, sd = _observed(data)
    lo, hi = lo.astype(dtype), hi.astype(dtype)
    k, f = x0.shape
    s = rng.standard_normal((k, n, f), dtype=np.float32).astype(dtype, copy=False)  # the type the model reads
    s *= (scale * sd).astype(dtype)
    s += x0[:, None, :].astype(dtype)
    # reflect into [lo, hi]: lo + |s - lo| folds what lies below lo, hi - |hi - s| what lies above hi (steps of a
    # quarter sd rarely cross the range twice: what still lies outside is clipped); in place, no masks
    s -= lo
    np.abs(s, out=s)
    s += lo - hi
    np.abs(s, out=s)
    np.subtract(hi, s, out=s)
    np.clip(s, lo, hi, out=s)
    d = np.flatnonzero(discrete)
    if len(d):  # every discrete feature at once: one uniform u per value flips (u < 0.3) and picks the level (u / 0.3)
        count = np.array([len(levels[j]) for j in d])
        table = np.zeros((len(d), count.max()))
        for i, j in enumerate(d):
            table[i, : count[i]] = levels[j]
        u = rng.random((k, n, len(d)))
        pick = np.minimum((u * (count / 0.3)).astype(np.int64), count - 1)  # uniform over the levels when u < 0.3
        s[:, :, d] = np.where((u < 0.3) & (count > 0), table[np.arange(len(d)), pick], x0[:, None, d])
    return s


def _observed(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each feature's min, max and standard deviation over its observed values (NaN is missing; a feature never
    observed gets 0, 0 and 0)."""
    if not np.isnan(data).any():
        return data.min(axis=0), data.max(axis=0), data.std(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = np.nanmin(data, axis=0), np.nanmax(data, axis=0), np.nanstd(data, axis=0)
    return tuple(np.nan_to_num(a) for a in stats)


def _bins(data: np.ndarray) -> list[np.ndarray]:
    """Each feature's quartile edges over its observed values (missing values, NaN, left out)."""
    with warnings.catch_warnings():  # a feature never observed has no edges
        warnings.simplefilter("ignore", RuntimeWarning)
        quartiles = (np.nanquantile if np.isnan(data).any() else np.quantile)(data, [0.25, 0.5, 0.75], axis=0)
    return [np.unique(q[~np.isnan(q)]) for q in quartiles.T]


def _bin_of(values: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Per feature, the number of its edges below each value (``searchsorted(..., side="left")``), all at once; a
    missing value (NaN) is a bin of its own, above the top one."""
    table = np.full((len(edges), max(map(len, edges), default=0)), np.inf)
    for j, e in enumerate(edges):
        table[j, : len(e)] = e
    out = np.zeros(values.shape, np.int64)
    for column in table.T:  # a few edges (quartiles): one comparison over every value each
        out += values > column
    nan = np.isnan(values)
    if nan.any():
        out[nan] = np.broadcast_to(np.array([len(e) + 1 for e in edges]), values.shape)[nan]
    return out


class _Rep:
    """One neighbourhood: how samples are drawn, the design matrix a linear model sees, and the sample weights."""

    def __init__(self, kind: str, x0: np.ndarray, data: np.ndarray, width: float, discrete, levels,
                 dtype=np.float32):
        self.kind, self.x0, self.data, self.width, self.dtype = kind, x0, data, width, dtype
        self.discrete, self.levels = discrete, levels
        sd = _observed(data)[2]
        self.sd = np.where(sd > 0, sd, 1.0)
        if kind == "binned":
            self.data_t = data.astype(dtype)  # the samples are data rows' values, in the type the model reads
            edges = _bins(data)
            self.bin0 = _bin_of(x0, edges)
            self.data_bins = _bin_of(data, edges).astype(np.int8)  # at most 3 edges: bins 0..3, 4 for missing

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples per instance (the first is the instance itself) and the design matrix a linear model sees."""
        k, f = self.x0.shape
        if self.kind == "continuous":
            s = sample_neighbourhood(self.x0, self.data, n, rng, discrete=self.discrete, levels=self.levels,
                                     dtype=self.dtype)
            s[:, 0, :] = self.x0
            z = s - self.x0[:, None, :].astype(self.dtype)
            z /= self.sd.astype(self.dtype)
            np.nan_to_num(z, copy=False, nan=0.0)  # an instance's missing value stays missing: no step
            return s, z
        # LIME's tabular sampling: every feature drawn from its observed marginal; a sample's bin is its data row's
        at = rng.integers(0, len(self.data), (k, n, f), dtype=np.int64)  # each value's data row, as a flat index:
        at *= f  # a 1-D take is ~2x faster than indexing rows and columns
        at += np.arange(f)
        s = self.data_t.take(at)
        s[:, 0, :] = self.x0
        z = (self.data_bins.take(at) == self.bin0[:, None, :]).astype(self.dtype)
        z[:, 0, :] = 1.0
        return s, z

    def weights(self, z: np.ndarray) -> np.ndarray:
        d2 = (z**2).sum(axis=2) if self.kind == "continuous" else ((1 - z) ** 2).sum(axis=2)
        return np.exp(-d2 / self.width**2)


def _fit(z, y, w, alpha, gram_bytes: int = 64 << 20):
    """Per instance, the weighted ridge fit of ``y`` on ``[1, z]`` (the intercept not penalised) -> (k, f+1).

    The normal equations are built in float64 from the blocks ``[sum w, sum w z; sum w z', z' W z]``, without
    materialising the design matrix with its column of ones; instances go in groups whose Gram matrices and float64
    copies of ``z`` fit in ``gram_bytes`` (an image's 3,072 features make a 75 MB Gram matrix per instance)."""
    k, n, f = z.shape
    group = max(1, gram_bytes // (8 * ((f + 1) ** 2 + 2 * n * f)))
    if k > group:
        return np.concatenate([_fit(z[a : a + group], y[a : a + group], w[a : a + group], alpha, gram_bytes)
                               for a in range(0, k, group)])
    z = z.astype(np.float64, copy=False)
    zw = z * w[:, :, None]
    gram = np.empty((k, f + 1, f + 1))
    rhs = np.empty((k, f + 1))
    gram[:, 0, 0] = w.sum(axis=1)
    gram[:, 0, 1:] = gram[:, 1:, 0] = zw.sum(axis=1)
    rhs[:, 0] = (w * y).sum(axis=1)
    with serial_blas(enabled=n * (f + 1) ** 2 > 1 << 18):  # batched BLAS, per instance
        np.matmul(zw.transpose(0, 2, 1), z, out=gram[:, 1:, 1:])
        rhs[:, 1:] = (zw.transpose(0, 2, 1) @ y[..., None])[..., 0]
    gram[:, 1:, 1:] += alpha * np.eye(f)
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def _r2(beta, z, y, w):
    pred = beta[:, :1] + (z @ beta[:, 1:, None])[..., 0]
    mean = (w * y).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    ss_res = (w * (y - pred) ** 2).sum(1)
    ss_tot = (w * (y - mean) ** 2).sum(1)
    return np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 1.0)


def fit_local(predictor: Predictor, x0: np.ndarray, data: np.ndarray, *, n_samples: int = 1000,
              kernel_width: float | None = None, alpha: float = 1e-3, representation: str = "auto",
              random_state: int = 0) -> LocalResult:
    """Local linear surrogates for every row of ``x0`` at once.

    ``representation``: ``continuous`` (slopes in a small in-range neighbourhood), ``binned`` (LIME's quartile
    indicators over the data's marginals, which suit step-function models such as tree ensembles) or ``auto``: both
    are fit and, per instance, the one with the better fidelity on a validation draw is kept. The reported fidelity
    always comes from a further held-out draw that neither the fit nor the choice saw.
    """
    t = time.perf_counter()
    rng = np.random.default_rng(random_state)
    data = np.asarray(data, np.float64)
    x0 = np.asarray(x0, np.float64)
    k, f = x0.shape
    discrete, levels = _feature_kinds(data)
    dtype = np.float64 if predictor.dtype == np.float64 else np.float32  # samples in the type the model reads
    width = kernel_width or 0.75 * np.sqrt(f)
    classes = np.argmax(predictor.predict(x0.astype(predictor.dtype)).scores, axis=1) \
        if predictor.is_classifier else None
    kinds = ["continuous", "binned"] if representation == "auto" else [representation]
    if any(kind not in ("continuous", "binned") for kind in kinds):
        raise ValueError(f"unknown representation '{representation}'; use auto, continuous or binned")

    def evaluate(rep: _Rep, n: int, rows=slice(None)):
        s, z = rep.draw(n, rng)
        cls = None if classes is None else np.repeat(classes[rows], n)
        y = predictor.value(s.reshape(-1, f).astype(predictor.dtype), cls).reshape(len(s), n)
        return z, y, rep.weights(z)

    # the row budget stays ~2 x n_samples per instance: in auto mode each representation is fit on half of it
    n_fit = n_samples if len(kinds) == 1 else max(100, n_samples // 2)
    fits = {}
    for kind in kinds:
        rep = _Rep(kind, x0, data, width, discrete, levels, dtype)
        z, y, w = evaluate(rep, n_fit)
        beta = _fit(z, y, w, alpha)
        val = _r2(beta, *evaluate(rep, max(50, n_samples // 4))) if len(kinds) > 1 else np.zeros(k)
        fits[kind] = (rep, beta, _r2(beta, z, y, w), val, y[:, 0])
    pick = np.array([max(kinds, key=lambda kd: fits[kd][3][i]) for i in range(k)])
    beta = np.stack([fits[pick[i]][1][i] for i in range(k)])
    in_sample = np.array([fits[pick[i]][2][i] for i in range(k)])
    held = np.zeros(k)
    for kind in kinds:  # the held-out draw, in the neighbourhood each instance's chosen surrogate lives in
        rows = pick == kind
        if rows.any():
            rep = _Rep(kind, x0[rows], data, width, discrete, levels, dtype)
            held[rows] = _r2(fits[kind][1][rows], *evaluate(rep, max(100, n_samples // 2), rows))
    values = np.empty((k, f))
    coef = np.empty((k, f))
    center = np.nanmean(data, axis=0) if np.isnan(data).any() else data.mean(axis=0)
    sd = fits[kinds[0]][0].sd
    for i in range(k):
        if pick[i] == "continuous":
            coef[i] = beta[i, 1:] / sd
            values[i] = np.nan_to_num(coef[i] * (x0[i] - center))  # a missing value contributes no step
        else:
            coef[i] = beta[i, 1:]
            values[i] = beta[i, 1:]  # the effect of being in the instance's quartile bin
    return LocalResult(values, coef, beta[:, 0], held, in_sample, fits[kinds[0]][4], pick.tolist(),
                       time.perf_counter() - t,
                       {"n_samples": n_samples, "kernel_width": width, "alpha": alpha, "random_state": random_state,
                        "representation": representation, "discrete_features": int(discrete.sum())})
