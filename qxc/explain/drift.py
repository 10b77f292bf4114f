"""How explanations move between two models (fp32 vs compiled) on the same data."""

from __future__ import annotations

import numpy as np

from qxc.explain.importance import r2_score, spearman
from qxc.explain.predictor import Predictor


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / max(1, k)


def drift(ref: Predictor, cand: Predictor, x: np.ndarray, *, importance_ref: np.ndarray | None = None,
          importance_cand: np.ndarray | None = None, tree_ref=None, tree_cand=None, holdout: np.ndarray | None = None,
          top_k: int = 5) -> dict:
    pr, pc = ref.predict(x), cand.predict(x)
    out: dict = {}
    if ref.is_classifier:
        out["prediction_agreement"] = float(np.mean(np.argmax(pr.scores, 1) == np.argmax(pc.scores, 1)))
        out["probability_max_abs_diff"] = float(np.max(np.abs(pr.scores - pc.scores)))
    else:
        a, b = pr.scores.astype(np.float64), pc.scores.astype(np.float64)
        out["prediction_r2"] = r2_score(a, b)  # of the candidate against the reference, every output
        out["prediction_mean_abs_diff"] = float(np.mean(np.abs(a - b)))
    if importance_ref is not None and importance_cand is not None:
        out["importance_spearman"] = spearman(importance_ref, importance_cand)
        out["importance_top_k_overlap"] = top_k_overlap(importance_ref, importance_cand, top_k)
        out["top_k"] = top_k
    if tree_ref is not None and tree_cand is not None and holdout is not None:
        a, b = tree_ref.predict(holdout), tree_cand.predict(holdout)
        out["surrogate_agreement"] = float(np.mean(a == b)) if ref.is_classifier else r2_score(a, b)
    return out
