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
from dataclasses import dataclass, field

import numpy as np

from qxc.explain.predictor import Predictor


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


def _targets(predictor: Predictor, x: np.ndarray) -> np.ndarray:
    p = predictor.predict(x)
    if predictor.is_classifier:
        return np.argmax(p.scores, axis=1)
    return p.scores.astype(np.float64)


def perturb_marginal(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows copied from the data with one feature redrawn from its observed values: stays in each feature's range."""
    rows = x[rng.integers(0, len(x), n)].copy()
    cols = rng.integers(0, x.shape[1], n)
    rows[np.arange(n), cols] = x[rng.integers(0, len(x), n), cols]
    return rows


def fit_tree(predictor: Predictor, x: np.ndarray, features: list[str], *, max_depth: int = 4,
             max_leaf_nodes: int | None = None, perturbations: int = 0, holdout: float = 0.25,
             random_state: int = 0) -> TreeSurrogate:
    from sklearn.model_selection import train_test_split
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, export_text

    t = time.perf_counter()
    rng = np.random.default_rng(random_state)
    train, test = train_test_split(np.asarray(x), test_size=holdout, random_state=random_state)
    if perturbations:
        train = np.concatenate([train, perturb_marginal(train, perturbations, rng)])
    y_train, y_test = _targets(predictor, train), _targets(predictor, test)
    cls = DecisionTreeClassifier if predictor.is_classifier else DecisionTreeRegressor
    tree = cls(max_depth=max_depth, max_leaf_nodes=max_leaf_nodes, random_state=random_state).fit(train, y_train)
    if predictor.is_classifier:
        fid, fid_train = float(np.mean(tree.predict(test) == y_test)), float(np.mean(tree.predict(train) == y_train))
    else:
        fid, fid_train = tree.score(test, y_test), tree.score(train, y_train)
    rules = export_text(tree, feature_names=list(features), decimals=4)
    return TreeSurrogate(tree, float(fid), float(fid_train), rules, predictor.is_classifier, time.perf_counter() - t,
                         {"max_depth": max_depth, "max_leaf_nodes": max_leaf_nodes, "perturbations": perturbations,
                          "holdout": holdout, "random_state": random_state, "train_rows": len(train),
                          "test_rows": len(test)})


@dataclass
class LocalResult:
    coef: np.ndarray  # (instances, features) in the model's output units per feature unit
    intercept: np.ndarray
    fidelity: np.ndarray  # (instances,) weighted R^2 on held-out neighbourhood samples
    fidelity_in_sample: np.ndarray
    outputs: np.ndarray
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def contributions(self, x: np.ndarray, center: np.ndarray) -> np.ndarray:
        return self.coef * (x - center)

    def to_json(self, features: list[str], x: np.ndarray, center: np.ndarray) -> dict:
        return {"values": np.round(self.contributions(x, center), 8).tolist(), "coef": np.round(self.coef, 8).tolist(),
                "intercept": np.round(self.intercept, 8).tolist(), "features": features,
                "fidelity": np.round(self.fidelity, 6).tolist(), "fidelity_mean": round(float(np.mean(self.fidelity)), 6),
                "fidelity_in_sample_mean": round(float(np.mean(self.fidelity_in_sample)), 6),
                "outputs": np.round(self.outputs, 8).tolist(), "seconds": round(self.seconds, 4),
                "settings": self.settings}


def _feature_kinds(x: np.ndarray, max_levels: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which features are discrete (few observed levels) and their observed values."""
    levels = [np.unique(x[:, j]) for j in range(x.shape[1])]
    discrete = np.array([len(lv) <= max_levels and np.allclose(lv, np.round(lv)) for lv in levels])
    return discrete, levels


def sample_neighbourhood(x0: np.ndarray, data: np.ndarray, n: int, rng: np.random.Generator, *, scale: float = 0.25,
                         discrete=None, levels=None) -> np.ndarray:
    """``n`` samples around each row of ``x0`` (instances, features) -> (instances, n, features).

    Continuous features: Gaussian steps of ``scale`` x the feature's standard deviation, reflected back into the
    observed [min, max]. Discrete features: keep the instance's value, or with probability 0.3 take an observed level.
    """
    if discrete is None:
        discrete, levels = _feature_kinds(data)
    lo, hi = data.min(axis=0), data.max(axis=0)
    sd = data.std(axis=0)
    k, f = x0.shape
    s = x0[:, None, :] + rng.normal(size=(k, n, f)) * (scale * sd)[None, None, :]
    span = np.where(hi > lo, hi - lo, 1.0)
    s = lo + np.abs(((s - lo) + span) % (2 * span) - span)  # reflect into [lo, hi]
    s = np.clip(s, lo, hi)
    for j in np.where(discrete)[0]:
        flip = rng.random((k, n)) < 0.3
        draws = levels[j][rng.integers(0, len(levels[j]), (k, n))]
        s[:, :, j] = np.where(flip, draws, x0[:, None, j])
    return s


def fit_local(predictor: Predictor, x0: np.ndarray, data: np.ndarray, *, n_samples: int = 1000,
              kernel_width: float | None = None, alpha: float = 1e-3, random_state: int = 0) -> LocalResult:
    t = time.perf_counter()
    rng = np.random.default_rng(random_state)
    data = np.asarray(data, np.float64)
    x0 = np.asarray(x0, np.float64)
    k, f = x0.shape
    discrete, levels = _feature_kinds(data)
    sd = np.where(data.std(axis=0) > 0, data.std(axis=0), 1.0)
    width = kernel_width or 0.75 * np.sqrt(f)
    classes = np.argmax(predictor.predict(x0.astype(predictor.dtype)).scores, axis=1) \
        if predictor.is_classifier else None

    def draw():
        s = sample_neighbourhood(x0, data, n_samples, rng, discrete=discrete, levels=levels)
        s[:, 0, :] = x0  # the instance itself
        cls = None if classes is None else np.repeat(classes, n_samples)
        y = predictor.value(s.reshape(-1, f).astype(predictor.dtype), cls).reshape(k, n_samples)
        d = np.sqrt((((s - x0[:, None, :]) / sd) ** 2).sum(axis=2))
        w = np.exp(-(d**2) / width**2)
        return s, y, w

    s, y, w = draw()
    z = (s - x0[:, None, :]) / sd  # centred, standardised design
    a = np.concatenate([np.ones((k, n_samples, 1)), z], axis=2)
    aw = a * w[:, :, None]
    gram = np.einsum("kni,knj->kij", aw, a) + alpha * np.eye(f + 1)[None] * np.r_[0, np.ones(f)][None, :, None]
    rhs = np.einsum("kni,kn->ki", aw, y)
    beta = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (k, f+1)

    def r2(s_, y_, w_):
        pred = beta[:, :1] + np.einsum("knf,kf->kn", (s_ - x0[:, None, :]) / sd, beta[:, 1:])
        mean = (w_ * y_).sum(1, keepdims=True) / w_.sum(1, keepdims=True)
        ss_res = (w_ * (y_ - pred) ** 2).sum(1)
        ss_tot = (w_ * (y_ - mean) ** 2).sum(1)
        return np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 1.0)

    in_sample = r2(s, y, w)
    s2, y2, w2 = draw()  # held-out neighbourhood
    held = r2(s2, y2, w2)
    coef = beta[:, 1:] / sd
    return LocalResult(coef, beta[:, 0], held, in_sample, y[:, 0], time.perf_counter() - t,
                       {"n_samples": n_samples, "kernel_width": width, "alpha": alpha, "random_state": random_state,
                        "discrete_features": int(discrete.sum())})
