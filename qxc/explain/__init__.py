"""The explanation backend: importance, Shapley values, surrogates, drift, layer statistics (all on onnxruntime)."""

from qxc.explain.estimators import (
    AblationImportance,
    LocalSurrogate,
    PermutationImportance,
    ShapleyExplainer,
    SklearnView,
    TreeSurrogateExplainer,
)
from qxc.explain.predictor import Predictor
from qxc.explain.run import explain_model

__all__ = ["AblationImportance", "LocalSurrogate", "PermutationImportance", "Predictor", "ShapleyExplainer",
           "SklearnView", "TreeSurrogateExplainer", "explain_model"]
