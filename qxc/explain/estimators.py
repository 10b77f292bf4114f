"""scikit-learn-style explainers: ``__init__`` stores options, ``fit`` returns self, learned attributes end in ``_``.
``X`` is a rows x features array, or the model's feeds: a dict by input name, or a pandas DataFrame with a column per
input (skl2onnx's DataFrame exports, string columns included).

    from qxc.explain import PermutationImportance
    imp = PermutationImportance("models/digits_mlp.onnx", n_repeats=5, random_state=0).fit(X, y)
    imp.importances_mean_, imp.importances_std_, imp.stability_
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from qxc import ir as qir
from qxc.explain import importance as _imp
from qxc.explain.predictor import Predictor


class SklearnView:
    """A Predictor as a scikit-learn estimator (``predict``, ``score``; ``fit`` is a no-op), so sklearn's own tools,
    e.g. ``sklearn.inspection.permutation_importance``, score exactly the predictions qxc's explainers see."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self._estimator_type = "classifier" if predictor.is_classifier else "regressor"

    def fit(self, X, y=None):
        return self

    def predict(self, X) -> np.ndarray:
        out = self.predictor.predict(np.asarray(X, self.predictor.dtype))
        return out.labels if self.predictor.is_classifier else out.scores

    def score(self, X, y) -> float:
        from sklearn.metrics import accuracy_score, r2_score

        return (accuracy_score if self.predictor.is_classifier else r2_score)(y, self.predict(X))


class _Base(BaseEstimator):
    """scikit-learn's BaseEstimator gives ``get_params``/``set_params``, ``clone`` and the repr from ``__init__``."""

    def __init__(self, model: Any, *, providers=("cpu",), random_state: int = 0):
        self.model = model
        self.providers = providers
        self.random_state = random_state

    def _predictor(self) -> Predictor:
        return Predictor(qir.coerce_model(self.model), providers=self.providers, output=getattr(self, "output", 0))

    @staticmethod
    def _table(predictor: Predictor, X) -> np.ndarray:
        """``X`` as the rows x features table the explainers read: an array as it is; the model's feeds (a dict by
        input name, or a pandas DataFrame) through the Predictor's table, string columns coded as category
        indices."""
        from collections.abc import Mapping

        from qxc.data import Dataset, load_data

        if isinstance(X, Mapping | Dataset) or (hasattr(X, "columns") and hasattr(X, "to_numpy")):
            return predictor.table(load_data(X, predictor.model))
        return np.asarray(X)


class PermutationImportance(_Base):
    def __init__(self, model, *, n_repeats: int = 5, providers=("cpu",), random_state: int = 0):
        super().__init__(model, providers=providers, random_state=random_state)
        self.n_repeats = n_repeats

    def fit(self, X, y=None):
        predictor = self._predictor()
        res = _imp.permutation_importance(predictor, self._table(predictor, X), y, n_repeats=self.n_repeats,
                                          random_state=self.random_state)
        self.importances_ = res.importances
        self.importances_mean_ = res.mean
        self.importances_std_ = res.std
        self.stability_ = _imp.stability(res.importances.T)
        self.baseline_score_ = res.baseline_score
        return self


class AblationImportance(_Base):
    def __init__(self, model, *, baseline: str = "mean", n_repeats: int = 5, providers=("cpu",), random_state: int = 0):
        super().__init__(model, providers=providers, random_state=random_state)
        self.baseline = baseline
        self.n_repeats = n_repeats

    def fit(self, X, y=None):
        predictor = self._predictor()
        res = _imp.ablation_importance(predictor, self._table(predictor, X), y, baseline=self.baseline,
                                       n_repeats=self.n_repeats, random_state=self.random_state)
        self.importances_, self.importances_mean_, self.importances_std_ = res.importances, res.mean, res.std
        self.stability_ = _imp.stability(res.importances.T)
        return self


class ShapleyExplainer(_Base):
    """``fit(background)`` then ``explain(X)`` -> (instances, features) Shapley values (also ``shap_values_``, and
    their standard errors ``std_error_``: 0 where exact). ``n_samples`` is the row budget per instance of the
    estimate used above ``max_exact`` features."""

    def __init__(self, model, *, max_exact: int = 12, n_samples: int = 24576, output: int = 0, providers=("cpu",),
                 random_state: int = 0):
        super().__init__(model, providers=providers, random_state=random_state)
        self.max_exact = max_exact
        self.n_samples = n_samples
        self.output = output

    def fit(self, X, y=None):
        self.predictor_ = self._predictor()
        self.background_ = self._table(self.predictor_, X)
        return self

    def explain(self, X) -> np.ndarray:
        from qxc.explain.shapley import shapley_values

        res = shapley_values(self.predictor_, self._table(self.predictor_, X), self.background_, max_exact=self.max_exact,
                             n_samples=self.n_samples, random_state=self.random_state)
        self.shap_values_, self.base_values_, self.method_ = res.values, res.base_value, res.method
        self.std_error_ = res.std_error
        return res.values


class TreeSurrogateExplainer(_Base):
    def __init__(self, model, *, max_depth: int = 4, perturbations: int = 0, output: int = 0, providers=("cpu",),
                 random_state: int = 0):
        super().__init__(model, providers=providers, random_state=random_state)
        self.max_depth = max_depth
        self.perturbations = perturbations
        self.output = output

    def fit(self, X, y=None, feature_names=None):
        from qxc.explain.surrogates import fit_tree

        predictor = self._predictor()
        X = self._table(predictor, X)
        names = feature_names or predictor.feature_names or [f"x{i}" for i in range(X.shape[1])]
        res = fit_tree(predictor, X, names, max_depth=self.max_depth, perturbations=self.perturbations,
                       random_state=self.random_state)
        self.tree_, self.fidelity_, self.rules_ = res.tree, res.fidelity, res.rules
        return self


class LocalSurrogate(_Base):
    def __init__(self, model, *, n_samples: int = 1000, output: int = 0, providers=("cpu",), random_state: int = 0):
        super().__init__(model, providers=providers, random_state=random_state)
        self.n_samples = n_samples
        self.output = output

    def fit(self, X, y=None):
        self.predictor_ = self._predictor()
        self.data_ = self._table(self.predictor_, X)
        return self

    def explain(self, X) -> np.ndarray:
        from qxc.explain.surrogates import fit_local

        res = fit_local(self.predictor_, self._table(self.predictor_, X), self.data_, n_samples=self.n_samples,
                        random_state=self.random_state)
        self.coef_, self.intercept_, self.fidelity_ = res.coef, res.intercept, res.fidelity
        self.representation_ = res.representation
        return res.values
