"""Explanation backend: sklearn-identical permutation importance, exact/kernel Shapley, surrogates, embed, drift."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import MODELS, iris_classifier, mlp_model, run
from hypothesis import given, settings
from hypothesis import strategies as st

from qxc import compile_model
from qxc import ir as qir
from qxc.cli import main
from qxc.data import load_data
from qxc.errors import DataError, ModelError, UsageError
from qxc.explain import PermutationImportance, ShapleyExplainer, SklearnView
from qxc.explain.importance import ablation_importance, permutation_importance, shuffled_columns
from qxc.explain.predictor import Predictor
from qxc.explain.run import explain_model
from qxc.explain.shapley import shapley_values
from qxc.explain.surrogates import fit_local, fit_tree, sample_neighbourhood


def _xy(name, split="test"):
    with np.load(MODELS / f"{name}_{split}.npz") as z:
        return z["X"], z["labels"]


@pytest.mark.parametrize("name", ["digits_mlp", "diabetes_mlp", "breast_cancer_gb"])
def test_permutation_equals_sklearn_with_the_same_seed(name):
    from sklearn.inspection import permutation_importance as sk_perm

    data = name.split("_")[0] if name != "breast_cancer_gb" else "breast_cancer"
    x, y = _xy(data)
    pred = Predictor(qir.load(MODELS / f"{name}.onnx"))
    ours = permutation_importance(pred, x, y, n_repeats=4, random_state=3)
    our_calls = pred.calls
    theirs = sk_perm(SklearnView(pred), x, y, n_repeats=4, random_state=3)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-6)
    assert our_calls < x.shape[1] * 4 / 10  # batched: far fewer runs than sklearn's one per feature and repeat
    seed = np.random.RandomState(3).randint(2**31)  # sklearn's per-feature seed
    moved = sum((c != x[:, j]).sum() for j in range(x.shape[1]) for c in shuffled_columns(x, j, 4, seed))
    assert ours.settings["rows_evaluated"] == len(x) + moved  # a row whose shuffled value equals its own is not run


def test_sklearn_style_estimator_and_prediction_change_without_labels():
    x, _ = _xy("digits")
    est = PermutationImportance(str(MODELS / "digits_mlp.onnx"), n_repeats=3).fit(x)
    assert est.importances_mean_.shape == (64,) and -1 <= est.stability_ <= 1
    assert est.importances_mean_[0] == 0  # pixel 0 is always 0: shuffling it changes nothing
    assert est.importances_mean_.max() > 0
    assert "n_repeats" in est.get_params() and not any(k.endswith("_") for k in est.get_params())


def test_ablation_of_an_unused_feature_is_zero():
    x, y = _xy("digits")
    res = ablation_importance(Predictor(qir.load(MODELS / "digits_mlp.onnx")), x, y, baseline="zero")
    assert res.mean[0] == 0 and res.importances.shape == (64, 5)


@pytest.mark.parametrize("baseline", ["zero", "median"])
def test_ablation_runs_only_the_rows_it_changes(baseline):
    x, y = _xy("digits")
    pred = Predictor(qir.load(MODELS / "digits_mlp.onnx"))
    res = ablation_importance(pred, x, y, baseline=baseline, n_repeats=3, random_state=2)
    n, f = x.shape
    assert res.settings["rows_evaluated"] < 0.7 * n * (f + 1)  # pixels already at the baseline are not run again
    ref = {"zero": np.zeros(f), "median": np.median(x, axis=0)}[baseline]
    rng = np.random.default_rng(2)
    subsets = [rng.choice(n, size=n, replace=True) for _ in range(3)]
    labels = pred.predict(x).labels
    for col in (0, 20, 36):  # the whole ablated copy, run in full, scored on each bootstrap subset
        xa = x.copy()
        xa[:, col] = ref[col]
        ablated = pred.predict(xa).labels
        want = [np.mean(labels[s] == y[s]) - np.mean(ablated[s] == y[s]) for s in subsets]
        np.testing.assert_allclose(res.importances[col], want, atol=1e-12)


def _brute_force_shapley(pred, x, bg):
    import itertools
    import math

    m = x.shape[0]
    def v(s):
        rows = bg.copy()
        rows[:, list(s)] = x[list(s)]
        return pred.value(rows).mean()
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for r in range(m):
            for s in itertools.combinations(others, r):
                w = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
                phi[i] += w * (v(s + (i,)) - v(s))
    return phi


def test_exact_shapley_matches_brute_force_and_is_efficient():
    x, _ = _xy("diabetes")
    pred = Predictor(qir.load(MODELS / "diabetes_mlp.onnx"))
    bg = x[:20]
    res = shapley_values(pred, x[:3], bg)
    assert res.method == "exact"
    np.testing.assert_allclose(res.values.sum(axis=1) + res.base_value, res.outputs, rtol=1e-5, atol=1e-4)
    brute = _brute_force_shapley(pred, x[0], bg)
    np.testing.assert_allclose(res.values[0], brute, rtol=1e-4, atol=1e-3)


def test_exact_shapley_runs_identical_rows_once():
    from qxc.explain.shapley import _exact_values

    x, _ = _xy("diabetes")
    x = np.asarray(x, np.float32)
    pred = Predictor(qir.load(MODELS / "diabetes_mlp.onnx"))
    bg, inst = x[:40], x[40:44]
    assert (inst[:, None, 1] == bg[None, :, 1]).any()  # sex is binary: instances share it with background rows
    fx = pred.value(inst)
    every, n_every = _exact_values(pred, inst, bg, None, tie_features=0)
    dedup, n_dedup = _exact_values(pred, inst, bg, None)
    chunked, _ = _exact_values(pred, inst, bg, None, rows_per_build=3000)  # 2 background rows at a time
    finest, n_finest = _exact_values(pred, inst, bg, None, min_group=1)  # every group, however small
    assert n_every == 4 * 40 * 2**10 and n_finest <= n_dedup < 0.8 * n_every
    np.testing.assert_allclose(dedup, every, rtol=0, atol=1e-12)
    np.testing.assert_allclose(finest, every, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunked, every, rtol=0, atol=1e-12)
    np.testing.assert_allclose(every[:, 0], pred.value(np.repeat(bg, 4, axis=0)).reshape(40, 4).mean(axis=0))
    np.testing.assert_allclose(every[:, -1], fx, rtol=1e-12)
    res = shapley_values(pred, inst, bg)
    assert res.settings["rows_evaluated"] == n_dedup and res.settings["rows_deduplicated"] == n_every - n_dedup


def test_kernel_estimate_approaches_exact_and_is_seeded():
    x, _ = _xy("diabetes")
    pred = Predictor(qir.load(MODELS / "diabetes_mlp.onnx"))
    exact = shapley_values(pred, x[:5], x[:50]).values
    est = shapley_values(pred, x[:5], x[:50], max_exact=0, n_samples=32768, random_state=1)
    again = shapley_values(pred, x[:5], x[:50], max_exact=0, n_samples=32768, random_state=1)
    alone = shapley_values(pred, x[3:4], x[:50], max_exact=0, n_samples=32768, random_state=1)
    # with other instances or alone: the same values
    np.testing.assert_allclose(alone.values[0], est.values[3], rtol=1e-9, atol=1e-9)
    assert est.method == "kernel"
    np.testing.assert_array_equal(est.values, again.values)
    err = np.abs(est.values - exact)
    assert err.mean() < 0.03 * np.abs(exact).mean()
    assert 0.85 <= np.mean(err < 2 * est.std_error) and np.all(est.std_error < 0.1 * np.abs(exact).mean())
    rough = shapley_values(pred, x[:5], x[:50], max_exact=0, n_samples=4096, random_state=1)
    assert np.abs(rough.values - exact).mean() > err.mean() and rough.std_error.mean() > est.std_error.mean()
    # a budget that covers every coalition on the whole background enumerates them all: the exact values
    full = shapley_values(pred, x[:5], x[:50], max_exact=0, n_samples=50 * (2**10 - 2), random_state=1)
    np.testing.assert_allclose(full.values, exact, rtol=1e-9, atol=1e-9)
    assert np.all(full.std_error == 0)


def test_kernel_estimate_above_twelve_features_against_exact_enumeration():
    pred = Predictor(qir.from_proto(mlp_model(sizes=(13, 16, 1), seed=3)))
    x = np.random.default_rng(0).normal(size=(20, 13)).astype(np.float32)
    x[:, 0] = np.round(x[:, 0] / 4)  # mostly 0: ties with the background, the exact path's deduplication on the way
    exact = shapley_values(pred, x[:3], x[10:18], max_exact=13)  # 2^13 coalitions x 8 background rows
    est = shapley_values(pred, x[:3], x[10:18], random_state=0)
    assert exact.method == "exact" and est.method == "kernel" and exact.settings["rows_deduplicated"] > 0
    err = np.abs(est.values - exact.values)
    assert err.mean() < 0.06 * np.abs(exact.values).mean() and np.mean(err < 2 * est.std_error) >= 0.8
    np.testing.assert_allclose(est.values.sum(axis=1) + est.base_value, est.outputs, atol=1e-9)


def test_kernel_shares_pairs_by_the_pilot_spread_of_each_size(monkeypatch):
    from qxc.explain import shapley as shap_mod

    calls = []
    original = shap_mod._sampled_coalitions

    def spy(m, first, pairs, n_background, rng, allocation=None):
        calls.append((first.copy(), pairs, None if allocation is None else np.array(allocation)))
        return original(m, first, pairs, n_background, rng, allocation)

    monkeypatch.setattr(shap_mod, "_sampled_coalitions", spy)
    x, _ = _xy("digits")
    pred = Predictor(qir.load(MODELS / "digits_mlp.onnx"))
    shap_mod.shapley_values(pred, x[:2], x[100:150], n_samples=16384)
    (first, pilot, none), (_, pairs, allocation) = calls  # the pilot (kernel mass), then the main draw
    assert none is None and pilot == 2048 and pairs == 8192
    share = allocation / allocation.sum()
    kernel = shap_mod._pair_mass(64, first) / shap_mod._pair_mass(64, first).sum()
    # small coalitions' differences barely move: they get fewer pairs than their kernel mass, the middle more
    assert share[0] < kernel[0] and share[-1] > kernel[-1]


def test_kernel_sampling_runs_one_background_row_per_pair_balanced_and_stratified():
    from qxc.explain.shapley import _pair_mass, _sampled_coalitions

    first = np.array([2, 3, 4])  # sizes 2|6, 3|5 and 4 of 8 features
    z, size, rows = _sampled_coalitions(8, first, 500, 30, np.random.default_rng(0))
    assert z.shape == (500, 8) and rows.shape == (500,)
    np.testing.assert_array_equal(z.sum(axis=1), size)
    assert np.all(np.diff(size) >= 0)  # grouped by size
    assert np.bincount(rows, minlength=30).max() - np.bincount(rows, minlength=30).min() <= 1
    kernel = np.array([7 / (k * (8 - k)) for k in (2, 3, 4)]) * [2, 2, 1]
    np.testing.assert_allclose(_pair_mass(8, first), kernel)
    np.testing.assert_allclose(np.bincount(size, minlength=5)[first] / 500, kernel / kernel.sum(), atol=0.002)
    for k in (2, 3):  # within a size, every feature equally likely
        np.testing.assert_allclose(z[size == k].mean(axis=0), k / 8, atol=0.1)
    _, size, _ = _sampled_coalitions(8, first, 500, 30, np.random.default_rng(0), allocation=np.array([0, 1.0, 3.0]))
    np.testing.assert_array_equal(np.bincount(size, minlength=5)[first], [0, 125, 375])


def test_control_slope_is_the_regression_slope_and_ignores_pairs_with_nearly_equal_controls():
    from qxc.explain.shapley import _control_slopes

    rng = np.random.default_rng(0)
    counts = np.array([400, 300, 50])
    size = np.repeat([1, 2, 3], counts)
    c = rng.normal(0, 1, (2, 750))
    c[:, size == 3] = -0.09 + 1e-5 * rng.normal(size=(2, 50))  # a size whose pairs drew nearly equal outputs
    v = 2.0 * c + rng.normal(0, 0.1, (2, 750))
    slope = _control_slopes(v, c, counts, np.ones(2))
    np.testing.assert_allclose(slope[:, size == 1], 2.0, atol=0.3)
    np.testing.assert_allclose(slope[:, size == 2], 2.0, atol=0.3)
    assert np.abs(slope[:, size == 3]).max() < 0.01  # its own variance (1e-10) would make it ~1e3 from noise


def test_shapley_matches_shap_exact_explainer_when_shap_is_installed():
    shap = pytest.importorskip("shap")
    x, _ = _xy("diabetes")
    pred = Predictor(qir.load(MODELS / "diabetes_mlp.onnx"))
    bg = x[:50]
    ref = shap.ExactExplainer(lambda a: pred.value(np.asarray(a, np.float32)), shap.maskers.Independent(bg, 100))(x[:4])
    ours = ShapleyExplainer(str(MODELS / "diabetes_mlp.onnx")).fit(bg).explain(x[:4])
    np.testing.assert_allclose(ours, ref.values, rtol=1e-4, atol=1e-3)


def test_tree_surrogate_fidelity_is_held_out_and_export_is_exact():
    from qxc.explain.embed import tree_to_onnx, verify_tree

    x, _ = _xy("breast_cancer")
    pred = Predictor(qir.load(MODELS / "breast_cancer_gb.onnx"))
    tree = fit_tree(pred, x, [f"f{i}" for i in range(30)], max_depth=3)
    assert tree.settings["test_rows"] == 36 and 0.8 < tree.fidelity <= 1.0
    assert "f" in tree.rules and tree.tree.get_depth() <= 3
    assert verify_tree(tree_to_onnx(tree.tree, 30, True), tree.tree, x, True) == 0.0


@pytest.mark.parametrize("classifier", [True, False])
def test_tree_fit_without_input_checks_equals_scikit_learns_checked_fit(classifier):
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, export_text

    from qxc.explain.surrogates import fit_decision_tree, tree_fidelity, tree_rules

    x, _ = _xy("breast_cancer")
    x = np.ascontiguousarray(x, np.float32)
    y = (x[:, 0] > np.median(x[:, 0])).astype(np.int64) if classifier else x[:, 21] * 2.0 + x[:, 3]
    ours = fit_decision_tree(x, y, classifier, max_depth=4, random_state=0)
    theirs = (DecisionTreeClassifier if classifier else DecisionTreeRegressor)(max_depth=4, random_state=0).fit(x, y)
    np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
    expected = np.mean(theirs.predict(x) == y) if classifier else theirs.score(x, y)
    assert tree_fidelity(ours, x, y, classifier) == pytest.approx(expected, abs=1e-12)
    names = [f"feature_{(i + 1) % 30} <= x" for i in range(30)]  # names that look like the placeholders
    assert tree_rules(ours, names) == export_text(theirs, feature_names=names, decimals=4)
    holes = x.copy()
    holes[::7, 21] = np.nan  # not finite: scikit-learn's checked path (its trees take missing values)
    assert fit_decision_tree(holes, y, classifier, max_depth=4, random_state=0).get_depth() <= 4


def test_local_surrogate_samples_stay_in_range_and_respect_discrete_features():
    rng = np.random.default_rng(0)
    data = np.column_stack([rng.normal(size=500), rng.integers(0, 2, 500).astype(float)])
    s = sample_neighbourhood(data[:5], data, 400, rng)
    assert s[..., 0].min() >= data[:, 0].min() and s[..., 0].max() <= data[:, 0].max()
    assert set(np.unique(s[..., 1])) <= {0.0, 1.0}
    x, _ = _xy("diabetes")
    res = fit_local(Predictor(qir.load(MODELS / "diabetes_mlp.onnx")), x[:4], x)
    assert res.fidelity.shape == (4,) and np.all(res.fidelity > 0.9)  # a near-linear model: linear fits locally


def test_cli_explain_json_embed_and_drift(tmp_path):
    q = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz")
    qir.save(q.model, tmp_path / "q.onnx")
    out = tmp_path / "e.json"
    assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(MODELS / "digits_test.npz"), "--labels",
                 "--compare", str(tmp_path / "q.onnx"), "--instances", "3", "-o", str(out),
                 "--embed", str(tmp_path / "emb.onnx")]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "qxc.explain/1" and len(doc["features"]) == 64
    for key in ("permutation", "ablation", "shapley", "tree", "local", "drift"):
        assert key in doc
    assert np.array(doc["shapley"]["values"]).shape == (3, 64) and np.array(doc["local"]["values"]).shape == (3, 64)
    assert doc["drift"]["prediction_agreement"] > 0.95 and -1 <= doc["drift"]["importance_spearman"] <= 1
    assert doc["embedded"]["tree_onnx_max_diff"] == 0.0  # the exported tree was checked against scikit-learn
    x, _ = _xy("digits")
    emb = run(tmp_path / "emb.onnx", {"X": x[:8]})
    orig = run(MODELS / "digits_mlp.onnx", {"X": x[:8]})
    np.testing.assert_array_equal(emb[0], orig[0])  # the model's own outputs are untouched
    assert emb[-1].shape == (8, 10, 64)  # per-class, per-feature linear contributions


def test_images_are_explained_element_by_element(tmp_path):
    """A CNN's [rows, 1, 8, 8] input is a row of 64 features named by their index. Permutation importance equals
    scikit-learn's on an estimator that reshapes and feeds onnxruntime itself; with class labels, a logits output
    is explained as a classifier; --embed flattens the image for the surrogates, which give scikit-learn's
    predictions in the deployed model."""
    import onnxruntime as ort
    from sklearn.inspection import permutation_importance as sk_perm

    path = MODELS / "cnn_digits.onnx"
    model = qir.load(path)
    data = load_data(MODELS / "cnn_digits_test.npz", model)
    images, y = data.stacked["image"], data.labels
    pred = Predictor(model, task="classification")
    x = pred.table(data)
    assert x.shape == (len(images), 64) and pred.feature_names[:2] == ["image[0,0,0]", "image[0,0,1]"]
    np.testing.assert_array_equal(x[:, 8 * 3 + 5], images[:, 0, 3, 5])

    class Direct:  # scikit-learn's view of the model, reshaping the rows into images itself
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def fit(self, *a):
            return self

        def score(self, rows, labels):
            logits = self.session.run(None, {"image": rows.reshape(-1, 1, 8, 8).astype(np.float32)})[0]
            return float(np.mean(logits.argmax(axis=1) == labels))

    ours = permutation_importance(pred, x, y, n_repeats=2, random_state=4)
    theirs = sk_perm(Direct(), x, y, n_repeats=2, random_state=4)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-9)
    out, emb = tmp_path / "e.json", tmp_path / "emb.onnx"
    assert main(["explain", str(path), "--data", str(MODELS / "cnn_digits_test.npz"), "--labels", "--method",
                 "permutation,tree", "-o", str(out), "--embed", str(emb)]) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "classification" and doc["permutation"]["metric"] == "accuracy"
    assert len(doc["features"]) == 64 and "image[0," in doc["tree"]["rules"]
    leaf = ort.InferenceSession(str(emb), providers=["CPUExecutionProvider"]).run(
        ["qxc_explain_label"], {"image": images})[0]
    assert 0.3 < np.mean(leaf == pred.predict(x).labels) <= 1  # the tree's own fidelity, on the deployed model
    with pytest.raises(DataError, match=r"input 'image' expects shape \[N, 1, 8, 8\]"):
        pred.table(load_data({"image": images[:, :, :4]}, model))


def test_explain_refuses_unknown_methods():
    model = qir.load(MODELS / "digits_mlp.onnx")
    with pytest.raises(UsageError, match="unknown explanation method 'magic'"):
        from qxc.explain.run import explain_model

        explain_model(model, load_data(MODELS / "digits_test.npz", model), methods=["magic"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=3, max_size=12), st.randoms(use_true_random=False))
def test_spearman_equals_scipy_with_ties(values, rnd):
    from scipy.stats import spearmanr

    from qxc.explain.importance import spearman

    a = np.array(values, float)
    b = a.copy()
    rnd.shuffle(b)
    b = b + np.array([rnd.choice([0.0, 0.5, 1.0]) for _ in b])
    if np.all(a == a[0]) or np.all(b == b[0]):
        return
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-12)


def test_embed_refuses_a_tree_export_that_disagrees_with_scikit_learn(tmp_path, monkeypatch):
    import qxc.explain.embed as emb

    monkeypatch.setattr(emb, "verify_tree", lambda *a, **k: 1.0)  # as if skl2onnx had mistranslated a threshold
    out = tmp_path / "emb.onnx"
    code = main(["explain", str(MODELS / "diabetes_mlp.onnx"), "--data", str(MODELS / "diabetes_test.npz"),
                 "--method", "tree", "--embed", str(out), "-o", str(tmp_path / "e.json")])
    assert code == 3 and not out.exists()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.sampled_from([0.1, 0.25, 0.33, 0.5]), st.integers(0, 2**31 - 1))
def test_holdout_split_is_sklearns_train_test_split(n, fraction, seed):
    from sklearn.model_selection import train_test_split

    from qxc.explain.surrogates import holdout_split

    rows = np.arange(n)
    want_train, want_test = train_test_split(rows, test_size=fraction, random_state=seed)
    train, test = holdout_split(n, fraction, seed)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(test, want_test)


def test_binning_matches_searchsorted_with_ties_and_puts_missing_values_apart():
    from qxc.explain.surrogates import _bin_of

    rng = np.random.default_rng(0)
    edges = [np.array([-1.0, 0.0, 1.0]), np.array([0.5]), np.array([])]
    values = rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan, -3.0], size=(7, 11, 3))
    want = np.stack([np.where(np.isnan(values[..., j]), len(e) + 1, np.searchsorted(e, values[..., j], side="left"))
                     for j, e in enumerate(edges)], axis=-1)  # NaN: a bin above the top one, not in it
    np.testing.assert_array_equal(_bin_of(values, edges), want)


def test_r2_scores_as_sklearn_on_constant_and_multi_output_targets():
    from sklearn.metrics import r2_score

    from qxc.explain.importance import score
    from qxc.explain.predictor import Prediction

    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 3))
    p = (y + rng.normal(size=y.shape) * 0.3).astype(np.float32)
    assert score(Prediction(None, p), y, None, False) == pytest.approx(r2_score(y, p), abs=1e-12)  # uniform average
    flat = np.full(30, 2.0)
    for pred in (np.full(30, 2.0), np.full(30, 1.5)):  # a constant target: 1 when predicted exactly, else 0
        assert score(Prediction(None, pred.astype(np.float32)), flat, None, False) == r2_score(flat, pred)


def test_explain_refuses_too_few_rows_and_stays_finite_on_a_constant_target(tmp_path):
    x = np.load(MODELS / "diabetes_test.npz")["X"]
    np.savez(tmp_path / "few.npz", X=x[:3], labels=np.zeros(3, np.float32))
    assert main(["explain", str(MODELS / "diabetes_mlp.onnx"), "--data", str(tmp_path / "few.npz"),
                 "-o", str(tmp_path / "few.json")]) == 5
    assert not (tmp_path / "few.json").exists()
    np.savez(tmp_path / "flat.npz", X=x[:40], labels=np.full(40, 100.0, np.float32))
    assert main(["explain", str(MODELS / "diabetes_mlp.onnx"), "--data", str(tmp_path / "flat.npz"), "--labels",
                 "--method", "permutation,ablation", "-o", str(tmp_path / "flat.json")]) == 0
    doc = json.loads((tmp_path / "flat.json").read_text(), parse_constant=pytest.fail)  # no NaN or Infinity
    assert doc["permutation"]["baseline_score"] == 0.0 and set(doc["permutation"]["values"].values()) == {0.0}


def test_explain_threads_caps_onnxruntime_threads_and_keeps_the_results(tmp_path, monkeypatch):
    import qxc.explain.predictor as predictor_mod

    seen = []
    real = predictor_mod.Predictor.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.session.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(predictor_mod.Predictor, "__init__", spy)
    docs = []
    for threads in (["--threads", "1"], []):
        out = tmp_path / f"e{len(docs)}.json"
        assert main(["explain", str(MODELS / "diabetes_mlp.onnx"), "--data", str(MODELS / "diabetes_test.npz"),
                     "--method", "permutation,tree", "-o", str(out), *threads]) == 0
        docs.append(json.loads(out.read_text()))
    assert seen[0] == 1 and seen[-1] != 1
    a, b = docs[0]["permutation"]["values"], docs[1]["permutation"]["values"]
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a)


def test_embed_a_regressor_s_tree_surrogate(tmp_path):
    """A regression tree's float64 leaves become float32 in ONNX: the check compares in float32 (it refused the
    diabetes MLP's surrogate over a 7.6e-6 rounding difference)."""
    out = tmp_path / "e.json"
    assert main(["explain", str(MODELS / "diabetes_mlp.onnx"), "--data", str(MODELS / "diabetes_test.npz"),
                 "--method", "tree,local", "--embed", str(tmp_path / "emb.onnx"), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["embedded"]["tree_onnx_max_diff"] == 0.0
    x = np.load(MODELS / "diabetes_test.npz")["X"][:8]
    emb, orig = run(tmp_path / "emb.onnx", {"X": x}), run(MODELS / "diabetes_mlp.onnx", {"X": x})
    np.testing.assert_array_equal(emb[0], orig[0])


def test_skl2onnx_default_export_with_string_classes_is_explained_as_a_classifier(tmp_path):
    """skl2onnx's defaults: a ZipMap output and the classes' own labels (here strings)."""
    import onnx
    from sklearn.inspection import permutation_importance as sk_perm

    proto, x, labels = iris_classifier("mlp")
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=x, labels=labels)
    pred = Predictor(qir.load(tmp_path / "m.onnx"))
    assert pred.is_classifier and pred.predict(x[:2]).labels.dtype.kind in "OU"
    ours = permutation_importance(pred, x, labels, n_repeats=3, random_state=1)
    theirs = sk_perm(SklearnView(pred), x, labels, n_repeats=3, random_state=1)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-6)
    out = tmp_path / "e.json"
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--labels",
                 "--method", "permutation,tree", "--embed", str(tmp_path / "emb.onnx"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "classification" and doc["permutation"]["metric"] == "accuracy"
    assert "class: setosa" in doc["tree"]["rules"]  # the rules name the model's classes
    assert doc["embedded"]["tree_onnx_max_diff"] == 0.0
    emb = run(tmp_path / "emb.onnx", {"X": x[:5]})
    assert list(emb[2]) == list(pred.predict(x[:5]).labels)  # the embedded tree's labels: the model's own
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # the chunked path (a folder of shards) labels the tree's rows in tasks: the same tree
        np.savez(shards / f"p{i}.npz", X=x[i::3], labels=labels[i::3])
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(shards), "--method", "tree", "--workers", "2",
                 "-o", str(tmp_path / "c.json")]) == 0
    tree = json.loads((tmp_path / "c.json").read_text())["tree"]
    assert tree["metric"] == "agreement" and "class: setosa" in tree["rules"]


def _diabetes_regressor(targets: int, dtype=np.float32):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(dtype)
    y = np.stack([y, np.sqrt(y) * 10], axis=1)[:, :targets].squeeze()
    est = LinearRegression().fit(x, y)
    return qir.from_proto(to_onnx(est, x[:1])), x, y, est


def test_multi_output_regressors_explain_the_chosen_output():
    model, x, y, est = _diabetes_regressor(2)
    data = load_data({"X": x, "labels": y}, model)
    for output in (0, 1):
        doc = explain_model(model, data, methods=("permutation", "shapley", "tree", "local"), output=output,
                            instances=4)
        assert doc["outputs"] == 2 and doc["explained_output"] == output
        phi = np.array(doc["shapley"]["values"])
        fx = est.predict(x[doc["shapley"]["instances"]])[:, output]
        # exact Shapley values of the chosen output: they add up to its prediction less the base value
        np.testing.assert_allclose(phi.sum(axis=1) + doc["shapley"]["base_value"], fx, rtol=1e-4)
        assert doc["tree"]["fidelity"] > 0.5 and doc["local"]["fidelity_mean"] > 0.99  # a linear model, locally
        assert doc["permutation"]["baseline_score"] == pytest.approx(est.score(x, y), abs=1e-5)  # both outputs
    with pytest.raises(UsageError, match="output 2 to explain.*2 column"):
        explain_model(model, data, methods=("shapley",), output=2)


def test_float64_models_are_explained_in_float64():
    model, x, y, est = _diabetes_regressor(1, np.float64)
    doc = explain_model(model, load_data({"X": x, "labels": y}, model), methods=("shapley", "local"), instances=3)
    phi = np.array(doc["shapley"]["values"])
    fx = est.predict(x[doc["shapley"]["instances"]])
    np.testing.assert_allclose(phi.sum(axis=1) + doc["shapley"]["base_value"], fx, rtol=1e-9)
    assert min(doc["local"]["fidelity"]) > 0.999


def test_an_output_with_more_rows_than_inputs_is_a_model_error():
    """skl2onnx's MLPRegressor export of two targets flattens them into one column: twice the rows."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, 1]), "shape")])
    model = qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for ask in (Predictor.predict, Predictor.value):  # the first run, of one row, shows it
        with pytest.raises(ModelError, match="output 'y' gave 2 rows for 1 input rows"):
            ask(Predictor(model), np.ones((3, 4), np.float32))


def test_explain_output_and_task_reach_the_chunked_path(tmp_path):
    """The workers' Predictors take --explain-output and --task as the local run does."""
    model, x, y, est = _diabetes_regressor(2)
    qir.save(model, tmp_path / "m.onnx")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        np.savez(shards / f"p{i}.npz", X=x[i::2], labels=y[i::2])
    for output in (0, 1):
        out = tmp_path / f"c{output}.json"
        assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(shards), "--method", "shapley,tree",
                     "--instances", "3", "--explain-output", str(output), "-o", str(out)]) == 0
        doc = json.loads(out.read_text())
        fx = np.array(doc["shapley"]["outputs"])
        gap = np.abs(fx[:, None] - est.predict(x)[None, :, output]).min(axis=1)
        assert (gap < 1e-3).all()  # each explained output is a row's prediction in the chosen column
        assert doc["tree"]["metric"] == "r2"
    logits, xl, yl, _ = _iris_linear(softmax=False)
    qir.save(logits, tmp_path / "l.onnx")
    np.savez(shards / "p0.npz", X=xl, labels=yl)
    (shards / "p1.npz").unlink()
    assert main(["explain", str(tmp_path / "l.onnx"), "--data", str(shards), "--method", "tree",
                 "--task", "classification", "-o", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["tree"]["metric"] == "agreement"


@pytest.mark.parametrize("name", ["PermutationImportance", "AblationImportance", "ShapleyExplainer",
                                  "TreeSurrogateExplainer", "LocalSurrogate"])
def test_explainers_follow_scikit_learns_estimator_api(name):
    from sklearn.base import clone
    from sklearn.utils.estimator_checks import (
        check_get_params_invariance,
        check_no_attributes_set_in_init,
        check_set_params,
    )

    import qxc.explain.estimators as est

    e = getattr(est, name)(str(MODELS / "diabetes_mlp.onnx"), random_state=2)
    for check in (check_no_attributes_set_in_init, check_get_params_invariance, check_set_params):
        check(name, e)
    c = clone(e).set_params(random_state=5)
    assert c.get_params()["random_state"] == 5 and e.get_params(deep=False)["random_state"] == 2
    assert repr(c).startswith(name + "(")
    x, _ = _xy("diabetes")
    assert c.fit(x[:30]) is c


def test_shapley_explainer_explains_a_chosen_output():
    model, x, _, est = _diabetes_regressor(2)
    shap = ShapleyExplainer(model, output=1).fit(x[:50])
    phi = shap.explain(x[:3])
    np.testing.assert_allclose(phi.sum(axis=1) + shap.base_values_, est.predict(x[:3])[:, 1], rtol=1e-4)


def test_shapley_stability_is_the_agreement_of_two_half_budget_estimates():
    x, _ = _xy("digits")
    pred = Predictor(qir.load(MODELS / "digits_mlp.onnx"))
    res = shapley_values(pred, x[:6], x[100:200], random_state=0)
    assert res.method == "kernel" and 0.5 < res.stability < 1  # sampled: the halves agree, not perfectly
    # a lower bound: two whole estimates from different seeds agree at least as well, give or take their noise
    other = shapley_values(pred, x[:6], x[100:200], random_state=1)
    from qxc.explain.importance import spearman

    assert spearman(np.abs(res.values).mean(0), np.abs(other.values).mean(0)) > res.stability - 0.05
    assert res.to_json([f"x{i}" for i in range(64)])["stability"] == round(res.stability, 6)
    xd, _ = _xy("diabetes")
    exact = shapley_values(Predictor(qir.load(MODELS / "diabetes_mlp.onnx")), xd[:3], xd[50:80])
    assert exact.method == "exact" and exact.stability == 1.0


def _iris_linear(softmax: bool):
    """A PyTorch-style classifier: no label output, only (rows, classes) probabilities (Softmax) or logits."""
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    lr = LogisticRegression(max_iter=500).fit(x, y)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["out"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["z"], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])],
                              [numpy_helper.from_array(lr.coef_.T.astype(np.float32), "W"),
                               numpy_helper.from_array(lr.intercept_.astype(np.float32), "b")])
    return qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), x, y, lr


def test_probability_and_logit_outputs_are_classifiers_by_the_argmax():
    from sklearn.inspection import permutation_importance as sk_perm

    model, x, y, lr = _iris_linear(softmax=True)
    pred = Predictor(model)  # auto: a probability matrix
    assert pred.is_classifier
    np.testing.assert_array_equal(pred.predict(x).labels, lr.predict(x))
    ours = permutation_importance(pred, x, y, n_repeats=3, random_state=0)
    theirs = sk_perm(SklearnView(pred), x, y, n_repeats=3, random_state=0)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-6)
    assert ours.metric == "accuracy" and ours.baseline_score == pytest.approx(lr.score(x, y))
    logits, *_ = _iris_linear(softmax=False)
    assert not Predictor(logits).is_classifier  # logits are numbers unless told
    doc = explain_model(logits, load_data({"X": x, "labels": y}, logits), methods=("permutation", "tree"),
                        task="classification")
    assert doc["task"] == "classification" and doc["permutation"]["metric"] == "accuracy"
    assert doc["tree"]["metric"] == "agreement"


def test_a_task_the_model_cannot_have_is_refused():
    with pytest.raises(UsageError, match="label output 'label': it is a classifier"):
        Predictor(qir.load(MODELS / "digits_mlp.onnx"), task="regression")
    with pytest.raises(UsageError, match=r"gives shape \[1, 1\] for one row"):
        Predictor(qir.load(MODELS / "diabetes_mlp.onnx"), task="classification")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), outputs=st.integers(1, 3), classifier=st.booleans(),
       labeled=st.booleans(), changed=st.integers(0, 40))
def test_row_terms_score_a_changed_copy_as_scoring_it_whole(seed, n, outputs, classifier, labeled, changed):
    """The incremental score (the changed rows' terms only) equals scoring the whole copy."""
    from qxc.explain.importance import RowTerms, score, score_from_sums
    from qxc.explain.predictor import Prediction

    rng = np.random.default_rng(seed)
    k = outputs + 1 if classifier else outputs

    def prediction(m):
        s = rng.random((m, k)) if classifier or k > 1 else rng.normal(size=m)
        return Prediction(np.argmax(s, axis=1) if classifier else None, s.astype(np.float32))

    base = prediction(n)
    y = None
    if labeled:
        y = rng.integers(0, k, n) if classifier else rng.normal(size=(n, k) if k > 1 else n)
    rows = np.sort(rng.choice(n, size=min(changed, n), replace=False))
    part = prediction(len(rows))
    whole = Prediction(None if base.labels is None else base.labels.copy(), base.scores.copy())
    whole.scores[rows] = part.scores
    if whole.labels is not None:
        whole.labels[rows] = part.labels
    terms = RowTerms(base, y, classifier)
    got = score_from_sums(terms.changed(rows, part), n, classifier, labeled, terms.ss_tot)
    assert got == pytest.approx(score(whole, y, base, classifier), rel=1e-9, abs=1e-12)


def test_a_constant_feature_of_a_regressor_has_no_importance():
    """Its shuffles move no row (an empty change), which the scoring handles."""
    from sklearn.inspection import permutation_importance as sk_perm

    x, y = _xy("diabetes")
    x = x.copy()
    x[:, 0] = 0.5
    pred = Predictor(qir.load(MODELS / "diabetes_mlp.onnx"))
    ours = permutation_importance(pred, x, y, n_repeats=3, random_state=0)
    theirs = sk_perm(SklearnView(pred), x, y, n_repeats=3, random_state=0)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-6)
    assert ours.mean[0] == 0 and permutation_importance(pred, x, None, n_repeats=2).mean[0] == 0
    assert ablation_importance(pred, x, y).mean[0] == 0


@pytest.mark.parametrize("per_column", [False, True])
def test_table_exports_with_string_inputs_are_explained(tmp_path, per_column):
    """A pipeline exported with a numeric and a string input (or one input per column) is explained on one table:
    string columns coded as category indices. Permutation importance equals scikit-learn's on an estimator that
    feeds onnxruntime directly from the inputs (no qxc code), ablation puts a string column at its most frequent
    category, and the JSON names the categories."""
    import onnx
    import onnxruntime as ort
    from helpers import mixed_pipeline
    from sklearn.inspection import permutation_importance as sk_perm

    proto, feeds, y = mixed_pipeline(per_column)
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **feeds, labels=y)
    model = qir.load(tmp_path / "m.onnx")
    data = load_data(tmp_path / "d.npz", model)
    pred = Predictor(model)
    x = pred.table(data)
    names = ["a", "b", "c", "cat"] if per_column else ["num[0]", "num[1]", "num[2]", "cat"]
    assert pred.feature_names == names and x.shape == (len(y), 4) and pred.categorical.tolist() == [0, 0, 0, 1]
    cats = pred.table_inputs.categories["cat"][0].tolist()
    assert cats == ["mid", "rough", "smooth"] and [cats[int(c)] for c in x[:5, 3]] == feeds["cat"][:5, 0].tolist()

    class Direct:  # scikit-learn's view of the model, fed straight from the columns
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

        def fit(self, *a):
            return self

        def score(self, table, labels):
            width = {i.name: (i.shape[1] if len(i.shape) == 2 else 1) for i in self.session.get_inputs()}
            cols, at = {}, 0
            for name, w in width.items():
                part = table[:, at : at + w]
                cols[name] = np.array(cats, dtype=object)[part.astype(int)] if name == "cat" else \
                    part.astype(np.float32)
                at += w
            return float(np.mean(self.session.run(None, cols)[0] == labels))

    ours = permutation_importance(pred, x, y, n_repeats=3, random_state=2)
    theirs = sk_perm(Direct(), x, y, n_repeats=3, random_state=2)
    np.testing.assert_allclose(ours.importances, theirs.importances, atol=1e-9)
    assert ours.importances[3].mean() > 0  # the category matters to the model
    abl = ablation_importance(pred, x, y, n_repeats=1)
    mode = np.bincount(x[:, 3].astype(int)).argmax()
    changed = sum(int((x[:, j] != x[:, j].mean()).sum()) for j in range(3)) + int((x[:, 3] != mode).sum())
    assert abl.settings["rows_evaluated"] == len(x) + changed
    out = tmp_path / "e.json"
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--labels",
                 "--method", "permutation,ablation,shapley,tree,local", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["features"] == names and doc["categories"] == {"cat": cats}
    sh = doc["shapley"]
    assert sh["method"] == "exact" and sh["efficiency_gap_max"] < 1e-6 and sh["mean_abs"]["cat"] > 0
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--embed",
                 str(tmp_path / "emb.onnx")]) == 2
    assert not (tmp_path / "emb.onnx").exists()


def test_missing_values_are_data_and_the_explainers_treat_them_as_missing(tmp_path):
    """A pipeline that imputes (skl2onnx's Imputer) is fed its real data, 10 % missing: compiled, compared and
    explained. Ablation's mean leaves the missing values out, the continuous local surrogate keeps an instance's
    missing value missing (no step, no contribution), the binned one makes "missing" a bin of its own (the effect
    of being missing), the layer view counts them."""
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    x[np.random.default_rng(0).random(x.shape) < 0.1] = np.nan
    pipe = make_pipeline(SimpleImputer(), StandardScaler(), MLPClassifier((16,), max_iter=500, random_state=0))
    pipe.fit(x, y)
    proto = to_onnx(pipe, x[:1], options={id(pipe.steps[-1][1]): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=x, labels=y)
    model = qir.load(tmp_path / "m.onnx")
    pred = Predictor(model)
    assert np.mean(pred.predict(x).labels == pipe.predict(x)) > 0.99
    q = compile_model(tmp_path / "m.onnx", "int8-qdq", data=tmp_path / "d.npz")
    assert np.mean(Predictor(q.model).predict(x).labels == y) >= np.mean(pipe.predict(x) == y) - 0.01
    abl = ablation_importance(pred, x, y, n_repeats=1)
    baseline = np.nanmean(x, axis=0)
    assert abl.settings["rows_evaluated"] == len(x) + sum(int((x[:, j] != baseline[j]).sum()) for j in range(30))
    rows = np.flatnonzero(np.isnan(x[:40]).any(axis=1))[:4]
    loc = fit_local(pred, x[rows], x, n_samples=400, representation="continuous")
    assert np.isfinite(loc.values).all() and np.isfinite(loc.fidelity).all()
    assert (loc.values[np.isnan(x[rows])] == 0).all()  # no step along a missing value: no contribution
    binned = fit_local(pred, x[rows], x, n_samples=400, representation="binned")  # LIME's: missing is a bin
    assert np.isfinite(binned.values).all() and (binned.values[np.isnan(x[rows])] != 0).any()
    samples = sample_neighbourhood(x[rows], x, 50, np.random.default_rng(0))
    assert np.isnan(samples[np.broadcast_to(np.isnan(x[rows])[:, None, :], samples.shape)]).all()
    assert not np.isnan(samples[np.broadcast_to(~np.isnan(x[rows])[:, None, :], samples.shape)]).any()
    out = tmp_path / "e.json"
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--labels", "--method",
                 "permutation,ablation,shapley,tree,local,layers", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["layers"]["values"][0]["missing"] == int(np.isnan(x).sum())
    assert doc["tree"]["fidelity"] > 0.8
    assert main(["explain", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--embed",
                 str(tmp_path / "emb.onnx")]) == 2  # the embedded surrogates need complete rows: refused, named
    assert not (tmp_path / "emb.onnx").exists()


def test_sklearn_style_explainers_take_the_models_feeds_and_a_dataframe():
    """The estimators read a table export's own feeds (a dict by input name, or a DataFrame with a column per
    input, strings included) and give what the table gives."""
    import pandas as pd
    from helpers import mixed_pipeline

    from qxc.explain import LocalSurrogate, TreeSurrogateExplainer

    proto, feeds, y = mixed_pipeline(per_column=True)
    frame = pd.DataFrame({k: v[:, 0] for k, v in feeds.items()})
    by_dict = PermutationImportance(proto, n_repeats=2).fit(feeds, y)
    by_frame = PermutationImportance(proto, n_repeats=2).fit(frame, y)
    pred = Predictor(qir.from_proto(proto))
    table = pred.table(load_data(feeds, pred.model))
    direct = permutation_importance(pred, table, y, n_repeats=2)
    np.testing.assert_array_equal(by_dict.importances_, direct.importances)
    np.testing.assert_array_equal(by_frame.importances_, direct.importances)
    with pytest.raises(UsageError, match="input 'cat' takes strings, coded in the table"):
        PermutationImportance(proto, n_repeats=2).fit(table, y)  # a coded table alone: the categories are unknown
    shap_vals = ShapleyExplainer(proto).fit(frame.iloc[:50]).explain(frame.iloc[:3])
    assert shap_vals.shape == (3, 4)
    tree = TreeSurrogateExplainer(proto).fit(frame)
    assert "cat" in tree.rules_ or "a" in tree.rules_
    assert LocalSurrogate(proto, n_samples=200).fit(feeds).explain({k: v[:2] for k, v in feeds.items()}).shape == (2, 4)
    doc = explain_model(proto, frame.assign(label=y), methods=["permutation"])  # the Python API takes it too
    assert doc["features"] == ["a", "b", "c", "cat"] and doc["permutation"]["metric"] == "accuracy"


def test_tree_rules_name_the_categories_on_each_side_of_a_string_columns_split():
    from sklearn.tree import DecisionTreeClassifier

    from qxc.explain.surrogates import tree_rules

    codes = np.repeat(np.arange(3.0), 20)
    x = np.c_[np.random.default_rng(0).random(60), codes]  # size tells nothing
    tree = DecisionTreeClassifier(max_depth=1, random_state=0).fit(x, codes == 2)  # cat, between codes 1 and 2
    rules = tree_rules(tree, ["size", "cat"], {1: ["mid", "rough", "smooth"]})
    assert "|--- cat in {mid, rough}" in rules and "|--- cat in {smooth}" in rules
    assert tree_rules(tree, ["size", "cat"]).startswith("|--- cat <= 1.5000")


def test_cli_tree_and_ablation_settings_reach_the_methods(tmp_path):
    """--max-leaf-nodes, --perturbations, --baseline and --local-samples are what the JSON says was used."""
    out = tmp_path / "e.json"
    data = str(MODELS / "digits_test.npz")
    assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", data, "--method", "tree,ablation,local",
                 "--max-leaf-nodes", "6", "--perturbations", "500", "--baseline", "median", "--local-samples", "300",
                 "--instances", "2", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["tree"]["leaves"] <= 6 and doc["tree"]["settings"]["train_rows"] == 337 + 500
    assert doc["ablation"]["settings"]["baseline"] == "median" and doc["local"]["settings"]["n_samples"] == 300
    assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", data, "--method", "tree", "--perturbations",
                 "10", "--backend", "ray"]) == 2  # refused before any cluster starts
    assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", data, "--perturbations", "-1"]) == 2


def test_value_asks_onnxruntime_for_the_scores_alone():
    """Shapley and local surrogates read probabilities only: the label output is not requested (onnxruntime then
    skips the label branch's nodes), while predict still returns labels."""
    pred = Predictor(qir.load(MODELS / "digits_mlp.onnx"))
    asked = []
    real = pred.session.run
    pred.session.run = lambda names, feed, *a: asked.append(list(names)) or real(names, feed, *a)
    x, _ = _xy("digits")
    v = pred.value(x[:5])
    assert asked and all(a == [pred.score_out] for a in asked) and v.shape == (5,)
    assert pred.predict(x[:5]).labels is not None and asked[-1] == [pred.label_out, pred.score_out]


def test_an_integer_input_in_a_table_takes_the_nearest_whole_number():
    """A float input and an int64 input form one float64 table; a sampled 2.6 reaches the model as 3, not 2."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0], [10.0], [100.0]], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
         helper.make_node("Concat", ["x", "kf"], ["xk"], axis=1), helper.make_node("MatMul", ["xk", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2]),
              helper.make_tensor_value_info("k", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])], [w])
    pred = Predictor(qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert pred.dtype == np.float64 and pred.feature_names == ["x[0]", "x[1]", "k"]
    np.testing.assert_allclose(pred.value(np.array([[1.0, 2.0, 2.6], [0.0, 0.0, -1.4]])), [321.0, -100.0])


def test_the_datas_feature_names_win_over_the_input_names(tmp_path):
    import onnx
    from helpers import mixed_pipeline

    proto, feeds, y = mixed_pipeline()
    onnx.save(proto, tmp_path / "m.onnx")
    names = ["radius", "texture", "concave points", "surface"]
    np.savez(tmp_path / "d.npz", **feeds, labels=y, feature_names=np.array(names))
    doc = explain_model(tmp_path / "m.onnx", tmp_path / "d.npz", methods=["permutation"])
    assert doc["features"] == names and doc["categories"] == {"surface": ["mid", "rough", "smooth"]}
    np.savez(tmp_path / "short.npz", **feeds, labels=y, feature_names=np.array(names[:2]))  # not one per feature
    assert explain_model(tmp_path / "m.onnx", tmp_path / "short.npz", methods=["permutation"])["features"] == [
        "num[0]", "num[1]", "num[2]", "cat"]


def test_a_model_exported_with_a_fixed_batch_of_one_is_explained_and_compared(tmp_path):
    """Exports without a dynamic batch axis take one row per run: explain runs them one at a time (the last block
    padded, the padding dropped) and gives what the dynamic model gives; compare runs both a row at a time."""
    import onnx

    from qxc.compare import compare_models

    proto = onnx.load(MODELS / "diabetes_mlp.onnx")
    for v in [*proto.graph.input, *proto.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, tmp_path / "fixed.onnx")
    data = MODELS / "diabetes_test.npz"
    fixed = explain_model(tmp_path / "fixed.onnx", data, methods=["permutation", "shapley"], instances=2)
    dynamic = explain_model(MODELS / "diabetes_mlp.onnx", data, methods=["permutation", "shapley"], instances=2)
    assert fixed["permutation"]["values"] == dynamic["permutation"]["values"]
    assert fixed["shapley"]["values"] == dynamic["shapley"]["values"]
    assert fixed["timing"]["onnxruntime_calls"] == fixed["timing"]["rows_evaluated"]
    ref = qir.load(MODELS / "diabetes_mlp.onnx")
    result = compare_models(ref, qir.load(tmp_path / "fixed.onnx"), load_data(data, ref)).to_json()
    assert all(o["max_abs"] == 0 for o in result["outputs"].values())


def test_wide_rows_run_in_bounded_batches_with_the_same_results(monkeypatch):
    """Each onnxruntime run takes at most BATCH_BYTES of input, and the perturbed copies of permutation and ablation
    are packed into at most BUFFER_BYTES (ablation used to build every copy at once: 16 GB for a 3 x 32 x 32 image
    on 200 rows); the importances do not change."""
    from qxc.explain import importance
    from qxc.explain import predictor as predictor_module

    model = qir.load(MODELS / "digits_mlp.onnx")
    data = load_data(MODELS / "digits_test.npz", model)
    x, y = data.stacked["X"][:120], data.labels[:120]
    free = Predictor(model)
    want = [permutation_importance(free, x, y, n_repeats=2).importances,
            ablation_importance(free, x, y, n_repeats=2).importances]
    monkeypatch.setattr(predictor_module, "BATCH_BYTES", 64 * 4 * 50)  # 50 rows of 64 float32 features
    monkeypatch.setattr(importance, "BUFFER_BYTES", 64 * 4 * 300)  # 300 perturbed rows
    capped = Predictor(model)
    rows_per_run, rows_per_predict = [], []
    session_run, predict = capped.session.run, capped.predict
    monkeypatch.setattr(capped.session, "run", lambda names, feeds: (
        rows_per_run.append(len(next(iter(feeds.values())))), session_run(names, feeds))[1])
    monkeypatch.setattr(capped, "predict", lambda rows, *a: (rows_per_predict.append(len(rows)), predict(rows, *a))[1])
    got = [permutation_importance(capped, x, y, n_repeats=2).importances,
           ablation_importance(capped, x, y, n_repeats=2).importances]
    assert max(rows_per_run) == 50 and max(rows_per_predict) == 300
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_regressions_over_too_many_features_are_refused_naming_the_cost(monkeypatch, tmp_path, capsys):
    """Shapley's Kernel estimate and the local surrogates solve features x features normal equations: above the
    limit they are refused before any run, naming the count and what to do; a compile report skips explanations of
    an input wider than its limit with a note (a ResNet's 150,528 pixels would take hours)."""
    from qxc import cli
    from qxc.explain import run as run_module

    monkeypatch.setattr(run_module, "MAX_REGRESSION_FEATURES", 32)
    model = qir.load(MODELS / "digits_mlp.onnx")
    data = load_data(MODELS / "digits_test.npz", model)
    with pytest.raises(UsageError, match=r"method 'local': 64 features; its regression solves 64 x 64 normal "
                                         r"equations .* explain at most 32 features"):
        run_module.explain_model(model, data, methods=("permutation", "local"))
    assert run_module.explain_model(model, data, methods=("permutation",))["permutation"]
    monkeypatch.setattr(cli, "REPORT_MAX_FEATURES", 32)
    assert main(["compile", str(MODELS / "digits_mlp.onnx"), "-o", str(tmp_path / "q.onnx"), "-p", "int8-qdq",
                 "--data", str(MODELS / "digits_train.npz"), "--report", str(tmp_path / "r.html"), "-q"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["explain"] is None
    assert "the report has no explanations: the input has 64 features per row" in capsys.readouterr().err


def _three_d_output_model(features: int = 6, tokens: int = 3, vocab: int = 4):
    """[rows, 6] -> MatMul -> Reshape to [rows, 3, 4]: a language model's (tokens, vocabulary) logits in small."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(4).normal(size=(features, tokens * vocab)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "w"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["logits"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, tokens, vocab])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, tokens, vocab], np.int64), "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return qir.from_proto(m)


def test_an_output_of_rank_three_is_explained_element_by_element():
    """(rows, tokens, vocabulary) logits were an internal error: their columns are the elements in C order, the
    chosen one is explained exactly, and the document says which element it is."""
    model = _three_d_output_model()
    x = np.random.default_rng(5).normal(size=(60, 6)).astype(np.float32)
    out = run(qir.to_proto(model), {"X": x})[0]
    pred = Predictor(model)
    np.testing.assert_array_equal(pred.predict(x).scores, out.reshape(60, 12))
    doc = explain_model(model, {"X": x}, methods=("permutation", "shapley"), output=6, instances=3)
    assert (doc["outputs"], doc["output_shape"], doc["explained_element"]) == (12, [3, 4], [1, 2])
    phi = np.array(doc["shapley"]["values"])
    fx = out[doc["shapley"]["instances"], 1, 2]
    np.testing.assert_allclose(phi.sum(axis=1) + doc["shapley"]["base_value"], fx, rtol=1e-4, atol=1e-5)


def test_wide_outputs_run_in_bounded_batches_with_the_same_values(monkeypatch):
    """Each run's output is bounded as its input is (a small GPT's 16 x 5,000 logits took 13 GB in 8,192-row runs):
    one first row shows the output's width, every later run takes at most BATCH_BYTES of it; the values do not
    change."""
    from qxc.explain import predictor as predictor_module

    model = _three_d_output_model()
    x = np.random.default_rng(6).normal(size=(100, 6)).astype(np.float32)
    want = Predictor(model, output=5).value(x)
    monkeypatch.setattr(predictor_module, "BATCH_BYTES", 12 * 4 * 10)  # 10 rows of 12 float32 outputs (40 inputs)
    capped = Predictor(model, output=5)
    rows_per_run, session_run = [], capped.session.run
    monkeypatch.setattr(capped.session, "run", lambda names, feeds: (
        rows_per_run.append(len(next(iter(feeds.values())))), session_run(names, feeds))[1])
    got = capped.value(x)
    assert rows_per_run[0] == 1 and max(rows_per_run) == 10 and sum(rows_per_run) == 100
    np.testing.assert_array_equal(got, want)


def test_ablation_of_a_wide_output_scores_each_bootstrap_sample_as_brute_force():
    """Without labels, ablation's score is the mean change over rows and outputs; each bootstrap sample's comes
    from how often it draws each row, never from a features x rows x outputs array (a small GPT's 16 x 5,000
    logits made it 1.7 GB)."""
    model = _three_d_output_model()
    x = np.random.default_rng(7).normal(size=(50, 6)).astype(np.float32)
    pred = Predictor(model)
    res = ablation_importance(pred, x, None, n_repeats=3, random_state=4)
    base = pred.predict(x).scores
    rng = np.random.default_rng(4)
    subsets = [rng.choice(50, size=50, replace=True) for _ in range(3)]
    for col in range(6):
        xa = x.copy()
        xa[:, col] = x[:, col].mean()
        change = np.abs(pred.predict(xa).scores.astype(np.float64) - base).mean(axis=1)
        np.testing.assert_allclose(res.importances[col], [change[s].mean() for s in subsets], rtol=1e-6)
    import tracemalloc  # numpy reports its buffers to tracemalloc

    wide, xw = _three_d_output_model(60, 25, 200), np.random.default_rng(8).normal(size=(200, 60)).astype(np.float32)
    pw = Predictor(wide)
    tracemalloc.start()
    ablation_importance(pw, xw, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # one run buffer's 64 MB of outputs (the one before it let go) and a few (rows x outputs) terms; features x rows
    # x outputs in float64 would take 480 MB, twice over
    assert peak < 125e6


def test_the_document_names_the_model_output_it_explains(tmp_path):
    """An IsolationForest's ONNX gives a (rows, 1) integer label and a float score: the score is what is explained,
    and the JSON and the page say so by name (they used to leave the user to guess among the outputs)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import IsolationForest

    from qxc.report import build_report, write_report

    x = load_breast_cancer().data.astype(np.float32)[:120]
    forest = IsolationForest(n_estimators=10, random_state=0).fit(x)
    model = qir.from_proto(to_onnx(forest, x[:1], target_opset={"": 17, "ai.onnx.ml": 3}))
    assert [o.name for o in model.graph.outputs] == ["label", "scores"]
    doc = explain_model(model, load_data({"X": x}, model), methods=("permutation",))
    assert doc["task"] == "regression" and doc["output"] == "scores"
    page = write_report(build_report(title="iso", explain=doc), tmp_path / "r.html").read_text()
    assert "Explained output: <code>scores</code> (regression)." in page


def test_a_tree_fit_on_too_few_rows_comes_with_a_note(tmp_path, capsys):
    """A logistic regression's 54 wine test rows: the tree fits its 40 perfectly and misses most of the 14 held out.
    The JSON's notes and the command's stderr say so and point to --perturbations, which lifts the held-out
    fidelity."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from qxc.cli import main

    x, y = load_wine(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(xtr, ytr)
    path = tmp_path / "clf.onnx"
    path.write_bytes(to_onnx(clf, xtr[:1]).SerializeToString())
    np.savez(tmp_path / "d.npz", X=xte)
    assert main(["explain", str(path), "--data", str(tmp_path / "d.npz"), "--method", "tree", "-o",
                 str(tmp_path / "e.json")]) == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    tree = doc["tree"]
    assert tree["settings"]["test_rows"] == 14 and tree["fidelity"] < tree["fidelity_train"] - 0.15
    assert doc["notes"][0].startswith(f"tree: held-out fidelity {tree['fidelity']:.2f} on 14 rows")
    assert "qxc: note: tree: held-out fidelity" in capsys.readouterr().err
    assert main(["explain", str(path), "--data", str(tmp_path / "d.npz"), "--method", "tree", "--perturbations",
                 "2000", "-o", str(tmp_path / "p.json")]) == 0
    more = json.loads((tmp_path / "p.json").read_text())
    assert "notes" not in more and more["tree"]["fidelity"] > tree["fidelity"]
    digits = explain_model(qir.load(MODELS / "digits_mlp.onnx"), load_data(MODELS / "digits_test.npz",
                           qir.load(MODELS / "digits_mlp.onnx")), methods=("tree",))
    assert "notes" not in digits  # 450 rows: nothing to say


def test_local_surrogates_worse_than_a_constant_come_with_a_note():
    """A decision tree's steps: around some instances the linear surrogate predicts held-out neighbours worse than
    their mean (R^2 below 0, far below where the neighbourhood is nearly constant); the note counts them and gives
    the median beside the mean they drag down. No note where every fit beats a constant."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.tree import DecisionTreeClassifier

    from qxc.explain.run import poor_fit_note

    assert poor_fit_note(np.array([0.5, 0.9])) is None
    assert poor_fit_note(np.array([0.5, -3.0, 0.7])) == (
        "local: held-out fidelity below 0 for 1 of 3 instances (down to -3.00; mean -0.60, median 0.50): the model "
        "is not linear around them, and their local values describe it poorly")
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0)
    tree = qir.from_proto(to_onnx(DecisionTreeClassifier(max_depth=4, random_state=0).fit(xtr, ytr), xtr[:1]))
    doc = explain_model(tree, load_data({"X": xte}, tree), methods=("local",))
    fidelity = np.array(doc["local"]["fidelity"])
    assert (fidelity < 0).any()  # this tree has such instances
    assert [n for n in doc.get("notes", []) if n.startswith("local:")] == [poor_fit_note(fidelity)]


def _two_headed() -> qir.ir.Model:
    """A network with two float outputs: an embedding (3 numbers) first, then class probabilities (a Softmax)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(50)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "we"], ["emb"]), helper.make_node("MatMul", ["x", "wc"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)], "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "we"),
         numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "wc")])
    return qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_the_output_to_explain_is_chosen_by_name(tmp_path):
    """By default the first float output (the embedding, as numbers); --output-name picks the classification
    head, whose probabilities make it a classifier; a name the model lacks, or a label output, is a usage error
    that lists what can be explained."""
    x = np.random.default_rng(51).normal(size=(120, 4)).astype(np.float32)
    data = load_data({"x": x}, _two_headed())
    first = explain_model(_two_headed(), data, methods=("permutation", "shapley"), instances=3)
    assert (first["output"], first["task"], first["outputs"]) == ("emb", "regression", 3)
    heads = explain_model(_two_headed(), data, methods=("permutation", "shapley"), instances=3, output_name="probs")
    assert (heads["output"], heads["task"]) == ("probs", "classification") and "outputs" not in heads
    probs = run(qir.to_proto(_two_headed()), {"x": x[heads["shapley"]["instances"]]})[1]
    phi = np.array(heads["shapley"]["values"])  # exact values of the predicted class's probability
    np.testing.assert_allclose(phi.sum(axis=1) + heads["shapley"]["base_value"], probs.max(axis=1), rtol=1e-4)
    with pytest.raises(UsageError, match="no output 'logits'; its outputs are emb, probs"):
        explain_model(_two_headed(), data, methods=("permutation",), output_name="logits")
    path = tmp_path / "heads.onnx"
    qir.save(_two_headed(), path)
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["explain", str(path), "--data", str(tmp_path / "d.npz"), "--method", "tree", "--output-name", "probs",
                 "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["output"] == "probs"
    clf = qir.load(MODELS / "digits_mlp.onnx")
    with pytest.raises(UsageError, match="output 'label' holds no floats to explain; its float outputs are "
                                         "probabilities"):
        explain_model(clf, load_data(MODELS / "digits_test.npz", clf), methods=("permutation",), output_name="label")
