"""``qxc explain``: every method on one model (and its drift against another), as one JSON document.

Schema ``qxc.explain/1``::

    {"schema", "model", "features": [names], "task": "classification"|"regression", "rows",
     "output": the name of the model output explained (a classifier's probabilities, a regressor's first float output),
     "outputs", "explained_output": (multi-output regressors) how many outputs, and the one explained,
     "output_shape", "explained_element": (an output of rank 3 or more, a language model's logits) its shape after
                 the batch axis, and the explained output as an index into it; the outputs are its elements in C order,
     "categories": (string inputs) {feature: [category names]}: the feature's values are indices into these,
     "input_shape": (an image-like input) its shape after the batch axis; the features are its elements in C order,
     "permutation" | "ablation": {"values": {feature: mean}, "std", "stability", "metric", "seconds", "settings"},
     "shapley": {"values": [[instance x feature]], "std_error": [[same shape; 0 where exact]], "mean_abs",
                 "base_value", "method": "exact"|"kernel", "stability" (rank correlation of mean |value| between
                 two half-budget estimates; 1 where exact), "settings": {..., "rows_evaluated"}, ...},
     "tree": {"fidelity", "metric", "rules", "nodes", "depth", "leaves", "seconds", "settings"},
     "local": {"values": [[instance x feature contributions]], "fidelity" (held-out, per instance), ...},
     "layers": {"values": [per-tensor activation statistics]},
     "drift": {"prediction_agreement" | "prediction_r2", "importance_spearman", "importance_top_k_overlap",
               "surrogate_agreement", "other": {the other model's permutation/tree blocks}},
     "timing": {"seconds", "rows_evaluated", "onnxruntime_calls"},
     "notes": [what a reader should know about the results' reliability, one line each] (when there is any)}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from qxc import ir as qir
from qxc.data import Dataset, load_data
from qxc.errors import DataError, UsageError
from qxc.explain.importance import ablation_importance, permutation_importance
from qxc.explain.predictor import Predictor
from qxc.explain.shapley import MAX_EXACT

METHODS = ("permutation", "ablation", "shapley", "tree", "local", "layers")
SCHEMA = "qxc.explain/1"
MIN_ROWS = 10
# the Kernel estimate and the local surrogates solve features x features normal equations (134 MB at 4,096)
MAX_REGRESSION_FEATURES = 4096


def _matrix(data: Dataset, predictor: Predictor) -> np.ndarray:
    x = predictor.table(data)
    if len(x) < MIN_ROWS:
        raise DataError(f"{data.source}: explanations need at least {MIN_ROWS} rows of data, got {len(x)} (scores, "
                        "spreads and the surrogates' held-out fidelity are undefined on fewer); pass more rows")
    return x


def _output_columns(predictor: Predictor, x: np.ndarray, output: int) -> int:
    """How many outputs a regressor has (1 for classifiers); ``output`` must name one of them."""
    scores = predictor.predict(x[:1]).scores
    columns = 1 if predictor.is_classifier or scores.ndim == 1 else scores.shape[1]
    if not 0 <= output < columns:
        what = "a classifier explains its predicted class" if predictor.is_classifier else \
            f"the model's '{predictor.score_out}' has {columns} column(s)"
        raise UsageError(f"output {output} to explain: {what}; use 0" + (f"..{columns - 1}" if columns > 1 else ""))
    return columns


def class_labels(labels: np.ndarray | None, columns: int) -> bool:
    """Whether ``labels`` are class indices of a (rows, ``columns``) score output."""
    if labels is None or labels.ndim != 1 or columns < 2 or labels.dtype.kind not in "iuf" or not len(labels):
        return False
    return bool(np.all(labels == np.rint(labels)) and labels.min() >= 0 and labels.max() < columns)


def explain_model(model, data: Dataset | Any, *, methods: Sequence[str] = ("permutation", "tree", "local"),
                  use_labels: bool = True, compare=None, providers=("cpu",), seed: int = 0, repeats: int = 5,
                  instances: int = 10, background: int = 100, max_depth: int = 4, max_leaf_nodes: int | None = None,
                  perturbations: int = 0, baseline: str = "mean", local_samples: int = 1000, source: str = "",
                  threads: int | None = None, output: int = 0, task: str = "auto", output_name: str | None = None
                  ) -> dict:
    """Every method in ``methods`` on ``model`` over ``data`` as one ``qxc.explain/1`` document (schema above);
    the tree surrogate is bounded by ``max_depth`` and ``max_leaf_nodes`` and also fits ``perturbations`` extra
    in-distribution rows (a data row with one feature redrawn from its observed values); ablation replaces a
    feature by its ``baseline`` (mean, median or zero);
    ``threads`` caps onnxruntime's intra-op threads (default: onnxruntime's own choice); ``output``: the column of
    a multi-output regressor that Shapley values and the surrogates explain (permutation and ablation score every
    output, as scikit-learn's ``score`` does); ``task``: see :class:`Predictor` (auto: skl2onnx label outputs and
    probability-matrix outputs make classifiers); ``output_name``: the model output explained (default: the first
    float output)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown explanation method '{unknown[0]}'; use {', '.join(METHODS)}")
    t0 = time.perf_counter()
    model = qir.coerce_model(model)
    data = load_data(data, model)  # a path, a dict of arrays, a DataFrame or a Dataset
    predictor = Predictor(model, providers=providers, threads=threads, output=output, task=task,
                          output_name=output_name)
    x = _matrix(data, predictor)
    columns = _output_columns(predictor, x, output)
    if task == "auto" and use_labels and class_labels(data.labels, columns) and not predictor.is_classifier:
        # logits (a CNN's last Gemm) with class indices as labels: a classifier, not a k-output regressor
        task = "classification"
        predictor.as_classifier()
        columns = 1
    y = data.labels if use_labels else None  # without labels: prediction change instead of a metric
    given = data.meta.get("feature_names")  # the data's own names win; then the model's input names
    features = given if given is not None and len(given) == x.shape[1] else (
        predictor.feature_names or [f"x{i}" for i in range(x.shape[1])])
    doc: dict = {"schema": SCHEMA, "model": source, "features": list(features),
                 "task": "classification" if predictor.is_classifier else "regression", "rows": int(len(x)),
                 "output": predictor.score_out}
    if columns > 1:
        doc["outputs"], doc["explained_output"] = columns, output
        shape = predictor.out_item_shape
        if shape is not None and len(shape) > 1:  # (tokens, vocabulary) logits: columns are their elements in C order
            doc["output_shape"] = list(shape)
            doc["explained_element"] = [int(i) for i in np.unravel_index(output, shape)]
    if predictor.table_inputs.single is not None and predictor.table_inputs.item_shape:
        doc["input_shape"] = list(predictor.table_inputs.item_shape)
    categories = _categories(predictor, features)
    if categories:
        doc["categories"] = categories
    wide = [m for m in ("shapley", "local") if m in methods]
    if wide and x.shape[1] > MAX_REGRESSION_FEATURES:
        f = x.shape[1]
        shape = f" (an input of {list(predictor.table_inputs.item_shape)})" if "input_shape" in doc else ""
        raise UsageError(f"method '{wide[0]}': {f:,} features{shape}; its regression solves {f:,} x {f:,} normal "
                         f"equations ({8 * f * f / 1e9:.1f} GB each): explain at most {MAX_REGRESSION_FEATURES:,} "
                         "features (downsample the input) or use --method permutation,ablation,tree")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(instances, len(x)), replace=False))
    bg = x[np.sort(rng.choice(len(x), size=min(background, len(x)), replace=False))]
    if ("shapley" in methods or "local" in methods) and x.shape[1] > MAX_EXACT:
        # the Kernel estimate and wide local fits keep BLAS on one thread: its libraries are found meanwhile (the
        # exact path and narrow fits never need them, and the scan would only compete with their runs)
        from qxc.runtime.threads import prefetch_threadpools

        prefetch_threadpools()
    tree_opts = {"max_depth": max_depth, "max_leaf_nodes": max_leaf_nodes, "perturbations": perturbations,
                 "random_state": seed}
    perm = None
    if "permutation" in methods:
        perm = permutation_importance(predictor, x, y, n_repeats=repeats, random_state=seed)
        doc["permutation"] = perm.to_json(features)
    if "ablation" in methods:
        doc["ablation"] = ablation_importance(predictor, x, y, baseline=baseline, n_repeats=repeats,
                                              random_state=seed).to_json(features)
    if "shapley" in methods:
        from qxc.explain.shapley import shapley_values

        res = shapley_values(predictor, x[pick], bg, random_state=seed)
        doc["shapley"] = {**res.to_json(features), "instances": pick.tolist()}
    tree = None
    if "tree" in methods:
        from qxc.explain.surrogates import fit_tree

        tree = fit_tree(predictor, x, features, **tree_opts)
        doc["tree"] = tree.to_json(features)  # exported to ONNX (and verified) by --embed, not on every run
        note = few_rows_note(doc["tree"])
        if note:
            doc.setdefault("notes", []).append(note)
    if "local" in methods:
        from qxc.explain.surrogates import fit_local

        loc = fit_local(predictor, x[pick], x, n_samples=local_samples, random_state=seed)
        doc["local"] = {**loc.to_json(features), "instances": pick.tolist()}
        note = poor_fit_note(np.asarray(loc.fidelity, np.float64))
        if note:
            doc.setdefault("notes", []).append(note)
    if "layers" in methods:
        from qxc.explain.layers import activation_stats

        doc["layers"] = {"values": activation_stats(model, data, providers=providers)}
    if compare is not None:
        doc["drift"] = _drift(predictor, qir.coerce_model(compare), x, y, perm, tree, features, providers, seed,
                              repeats, tree_opts, threads, output, task, output_name)
    doc["timing"] = {"seconds": round(time.perf_counter() - t0, 4), "rows_evaluated": int(predictor.rows_evaluated),
                     "onnxruntime_calls": int(predictor.calls)}
    return doc


def few_rows_note(tree: dict) -> str | None:
    """A note when the tree was fit and tested on too few rows to be trusted: its held-out fidelity falls far below
    the fit's own (a wine classifier's 54 test rows: 1.00 on the 40 it was fit on, 0.43 on the 14 held out)."""
    settings = tree["settings"]
    if settings["perturbations"] or settings["test_rows"] >= 100 or tree["fidelity"] >= tree["fidelity_train"] - 0.15:
        return None
    return (f"tree: held-out fidelity {tree['fidelity']:.2f} on {settings['test_rows']} rows against "
            f"{tree['fidelity_train']:.2f} on the {settings['train_rows']} it was fit on: too few rows to fit and test "
            "a tree; --perturbations N fits it on N more in-distribution rows")


def poor_fit_note(fidelity: np.ndarray) -> str | None:
    """A note when some local surrogates predict held-out neighbours worse than their mean does (R^2 below 0): the
    model is not linear there (a decision tree's steps; a neighbourhood nearly constant but for a few points across
    a step reads far below 0), and one such instance drags the mean down (a tree's: -127.8, mean -12.5, median
    0.2)."""
    bad = fidelity < 0
    if not bad.any():
        return None
    return (f"local: held-out fidelity below 0 for {int(bad.sum())} of {len(fidelity)} instances (down to "
            f"{fidelity.min():.2f}; mean {fidelity.mean():.2f}, median {np.median(fidelity):.2f}): the model is not "
            "linear around them, and their local values describe it poorly")


def _categories(predictor: Predictor, features: list[str]) -> dict[str, list[str]]:
    """String columns' categories by feature name: a coded value v in the results means categories[feature][v]."""
    return {features[j]: names for j, names in predictor.category_names.items()}


def _drift(predictor, other, x, y, perm, tree, features, providers, seed, repeats, tree_opts, threads=None,
           output=0, task="auto", output_name=None) -> dict:
    from qxc.explain.drift import drift
    from qxc.explain.surrogates import fit_tree, holdout_split

    cand = Predictor(other, providers=providers, threads=threads, output=output, task=task,
                     categories=predictor.table_inputs.categories, output_name=output_name)
    perm_c = permutation_importance(cand, x, y, n_repeats=repeats, random_state=seed)
    perm_r = perm or permutation_importance(predictor, x, y, n_repeats=repeats, random_state=seed)
    tree_r = tree or fit_tree(predictor, x, features, **tree_opts)
    tree_c = fit_tree(cand, x, features, **tree_opts)
    holdout = x[holdout_split(len(x), 0.25, seed)[1]]
    out = drift(predictor, cand, x, importance_ref=perm_r.mean, importance_cand=perm_c.mean, tree_ref=tree_r.tree,
                tree_cand=tree_c.tree, holdout=holdout)
    out["other"] = {"permutation": perm_c.to_json(features), "tree": tree_c.to_json(features)}
    return out
