"""Issue 5 figures: qxc's explanation backend vs sklearn.inspection, shap and lime, on the reference sklearn models.

    pip install -e '.[bench]'   # shap, lime
    python benchmarks/bench_explain.py [--models digits,breast_cancer,diabetes] [--instances 20]

Per model: permutation importance vs sklearn.inspection.permutation_importance (same ORT predictions through a
wrapper estimator, same seeds: max difference and time ratio); Shapley values vs shap's KernelExplainer at its
defaults (error vs shap's ExactExplainer where 2^M is feasible, time per instance); local surrogates vs LIME at its
defaults (held-out local fidelity in each method's own neighbourhood, time per instance); the whole `qxc explain`
wall time against a pure onnxruntime run over the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np
from _harness import ROOT, interleave

from qxc import ir as qir
from qxc.data import load_data
from qxc.explain.estimators import SklearnView
from qxc.explain.importance import permutation_importance
from qxc.explain.predictor import BATCH_ROWS, Predictor
from qxc.explain.run import explain_model
from qxc.explain.shapley import shapley_values
from qxc.explain.surrogates import fit_local

MODELS = {"digits": "digits_mlp", "breast_cancer": "breast_cancer_gb", "diabetes": "diabetes_mlp"}


def lime_fidelity(explainer, exp, x, fn, label, n, seed):
    """Weighted R^2 of LIME's own linear model on a fresh draw from LIME's own sampler (held out)."""
    state = explainer.random_state
    explainer.random_state = np.random.RandomState(seed)
    data, inverse = explainer._LimeTabularExplainer__data_inverse(x, n)
    explainer.random_state = state
    scaled = (data - explainer.scaler.mean_) / explainer.scaler.scale_
    d = np.sqrt(((scaled - scaled[0]) ** 2).sum(axis=1))
    w = explainer.base.kernel_fn(d)
    coefs = dict(exp.local_exp[label])
    feats = sorted(coefs)
    pred = exp.intercept[label] + scaled[:, feats] @ np.array([coefs[f] for f in feats])
    y = fn(inverse)
    y = y[:, label] if y.ndim == 2 else y
    mean = (w * y).sum() / w.sum()
    return 1 - (w * (y - pred) ** 2).sum() / max((w * (y - mean) ** 2).sum(), 1e-30)


@contextlib.contextmanager
def captured_rows():
    """Every row block the Predictors run meanwhile, copied, with whether its labels were asked for (the floor asks
    onnxruntime for the very outputs qxc asked for: the scores alone skip a classifier's label branch)."""
    rows, run = [], Predictor._run
    Predictor._run = lambda self, block, with_labels=True, pick=None: rows.append(
        (np.array(block), with_labels)) or run(self, block, with_labels, pick)
    try:
        yield rows
    finally:
        Predictor._run = run


def stacked(captured) -> tuple[np.ndarray, np.ndarray]:
    """The captured rows, and per row whether its labels were asked for."""
    return (np.concatenate([r for r, _ in captured]),
            np.concatenate([np.full(len(r), w) for r, w in captured]))


def bench(name: str, instances: int):
    import shap
    from lime.lime_tabular import LimeTabularExplainer
    from sklearn.inspection import permutation_importance as sk_perm

    model = qir.load(ROOT / f"models/{MODELS[name]}.onnx")
    train = load_data(ROOT / f"models/{name}_train.npz", model)
    test = load_data(ROOT / f"models/{name}_test.npz", model)
    x, y = test.stacked["X"], test.labels
    xtr = train.stacked["X"]
    pred = Predictor(model)
    m = x.shape[1]
    print(f"\n== {name}: {MODELS[name]}, {m} features, {len(x)} test rows, {pred.__class__.__name__} "
          f"{'classifier' if pred.is_classifier else 'regressor'}")
    # --- permutation
    t = time.perf_counter()
    ours = permutation_importance(pred, x, y, n_repeats=5, random_state=0)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = sk_perm(SklearnView(pred), x, y, n_repeats=5, random_state=0)
    t_sk = time.perf_counter() - t
    diff = float(np.max(np.abs(ours.importances - theirs.importances)))
    print(f"permutation: max |qxc - sklearn| = {diff:.2e}; time qxc {t_ours:.3f} s, sklearn {t_sk:.3f} s, "
          f"ratio {t_ours / t_sk:.3f}")
    # --- Shapley
    rng = np.random.default_rng(0)
    bg = xtr[np.sort(rng.choice(len(xtr), size=min(100, len(xtr)), replace=False))]
    pick = x[:instances]
    classes = np.argmax(pred.predict(pick).scores, axis=1) if pred.is_classifier else None

    def f_for(cls):
        return lambda a: pred.value(np.asarray(a, np.float32), None if cls is None else np.full(len(a), cls))

    def run_qxc():
        t = time.perf_counter()
        res = shapley_values(pred, pick, bg)
        return res, (time.perf_counter() - t) / len(pick)

    def run_kernel():
        out, elapsed = [], 0.0
        for i, row in enumerate(pick):
            f = f_for(None if classes is None else classes[i])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ke = shap.KernelExplainer(f, bg)
                t = time.perf_counter()
                out.append(ke.shap_values(row[None, :], silent=True).reshape(-1))
                elapsed += time.perf_counter() - t
        return np.array(out), elapsed / len(pick)

    # the floor: onnxruntime alone on the very rows qxc's Shapley runs (captured), in the Predictor's chunks;
    # Kernel runs every one of its coalitions (shap's default 2M + 2048, at most 2^M - 2) on every background row
    kernel_rows = min(2 * m + 2048, 2**m - 2) * len(bg)
    with captured_rows() as captured:
        shapley_values(pred, pick, bg)
    rows_f, labelled = stacked(captured)
    per_inst = len(rows_f) // len(pick)
    parts = ((rows_f[labelled], None), (rows_f[~labelled], [pred.score_out]))  # split before any timing

    def run_floor():
        t = time.perf_counter()
        for part, names in parts:
            for a in range(0, len(part), BATCH_ROWS):
                pred.session.run(names, {pred.input: part[a : a + BATCH_ROWS]})
        return (time.perf_counter() - t) / len(pick)

    times_q, times_k, floors = [], [], []
    for _ in range(5):  # the three sides interleaved, medians (the machines are shared)
        q, tq = run_qxc()
        kern, tk = run_kernel()
        times_q.append(tq)
        times_k.append(tk)
        floors.append(run_floor())
    t_q, t_k, t_floor = float(np.median(times_q)), float(np.median(times_k)), float(np.median(floors))
    line = f"shapley ({q.method}): time/instance qxc {t_q * 1e3:.2f} ms, shap Kernel {t_k * 1e3:.1f} ms, " \
           f"ratio {t_q / t_k:.3f} (rows/instance: Kernel {kernel_rows:,}, qxc {per_inst:,}; onnxruntime alone " \
           f"on qxc's rows: {t_floor * 1e3:.2f} ms, {t_floor / t_k:.3f} x Kernel; medians of 5 interleaved)"
    if m <= 12:
        exact = []
        for i, row in enumerate(pick):
            f = f_for(None if classes is None else classes[i])
            ex = shap.ExactExplainer(f, shap.maskers.Independent(bg, max_samples=100))
            exact.append(ex(row[None, :]).values.reshape(-1))
        exact = np.array(exact)
        e_q, e_k = np.abs(q.values - exact).mean(), np.abs(kern - exact).mean()
        line += f"; mean |error| vs shap Exact: qxc {e_q:.2e}, shap Kernel {e_k:.2e}"
    else:  # 2^M coalitions are out of reach: the reference is qxc's estimate on 32x the rows (and its own error)
        ref = shapley_values(pred, pick, bg, n_samples=32 * q.settings["n_samples"], random_state=12345)
        e_q, e_k = np.abs(q.values - ref.values).mean(), np.abs(kern - ref.values).mean()
        line += f"; mean |error| vs a {32 * q.settings['n_samples']:,}-row estimate (its standard error " \
                f"{np.nanmean(ref.std_error):.1e}): qxc {e_q:.2e} (its reported standard error " \
                f"{np.nanmean(q.std_error):.1e}), shap Kernel {e_k:.2e}; |values| {np.abs(ref.values).mean():.2e}"
    print(line)
    if q.method == "kernel":  # the reported stability (two half-budget estimates) against seeds' real agreement
        from qxc.explain.importance import spearman

        runs = [shapley_values(pred, pick, bg, random_state=s) for s in range(4)]
        imps = [np.abs(r.values).mean(axis=0) for r in runs]
        real = np.mean([spearman(imps[i], imps[j]) for i in range(4) for j in range(i + 1, 4)])
        print(f"shapley stability: reported {np.mean([r.stability for r in runs]):.3f} (mean of 4 seeds), rank "
              f"correlation between those seeds' whole estimates {real:.3f}")
    # --- local surrogates
    t = time.perf_counter()
    loc = fit_local(pred, pick, xtr, n_samples=1000, random_state=0)
    t_l = (time.perf_counter() - t) / len(pick)
    lime_exp = LimeTabularExplainer(xtr, mode="classification" if pred.is_classifier else "regression",
                                    random_state=0)
    fid_lime, fid_lime_in, t_lime = [], [], 0.0
    for i, row in enumerate(pick):
        if pred.is_classifier:
            cls = int(classes[i])
            fn = lambda a: pred.predict(np.asarray(a, np.float32)).scores  # noqa: E731
            t = time.perf_counter()
            exp = lime_exp.explain_instance(row, fn, labels=(cls,), num_features=m)
            t_lime += time.perf_counter() - t
            label = cls
        else:
            fn = lambda a: pred.predict(np.asarray(a, np.float32)).scores  # noqa: E731
            t = time.perf_counter()
            exp = lime_exp.explain_instance(row, fn, num_features=m)
            t_lime += time.perf_counter() - t
            label = 0 if 0 in exp.local_exp else 1
        fid_lime_in.append(exp.score if not isinstance(exp.score, dict) else exp.score[label])
        fid_lime.append(lime_fidelity(lime_exp, exp, row, fn, label, 5000, 1000 + i))
    t_lime /= len(pick)
    print(f"local: held-out fidelity qxc {np.mean(loc.fidelity):.4f} (in-sample {np.mean(loc.fidelity_in_sample):.4f})"
          f", LIME {np.mean(fid_lime):.4f} (its own in-sample score {np.mean(fid_lime_in):.4f}); time/instance qxc "
          f"{t_l * 1e3:.1f} ms, LIME {t_lime * 1e3:.1f} ms, ratio {t_l / t_lime:.3f}")
    # --- whole explain vs pure onnxruntime over the same rows: each side in a fresh process (a session's first large
    # runs pay for its memory arena; in one process the second side would reuse the first side's pages), interleaved
    # the very rows the explain runs (a tree ensemble's cost depends on the values), captured once and run as they
    # are, in chunks of the Predictor's batch size, by the pure side
    with captured_rows() as captured:
        doc = explain_model(model, test, methods=("permutation", "ablation", "shapley", "tree", "local"),
                            instances=instances)
    rows = doc["timing"]["rows_evaluated"]
    dump = ROOT / "out" / f"bench_explain_rows_{name}.npz"
    dump.parent.mkdir(exist_ok=True)
    rows_all, labelled = stacked(captured)
    np.savez(dump, rows=rows_all, labelled=labelled)
    del captured, rows_all
    path, data = ROOT / f"models/{MODELS[name]}.onnx", ROOT / f"models/{name}_test.npz"
    sides = {
        # imports before the timer on both sides (onnxruntime there; here also scikit-learn, ~1 s, for the tree)
        "explain": ("from qxc import ir as qir\nfrom qxc.data import load_data\nfrom qxc.explain.run import explain_model\n"
                    "import onnxruntime, qxc.explain.shapley, qxc.explain.surrogates, sklearn.tree, sklearn.model_selection\n"
                    f"model = qir.load({str(path)!r})\ntest = load_data({str(data)!r}, model)",
                    "explain_model(model, test, methods=('permutation', 'ablation', 'shapley', 'tree', 'local'), "
                    f"instances={instances})"),
        "pure": ("import numpy as np\nimport onnxruntime as ort\n"
                 f"z = np.load({str(dump)!r})\nrows, labelled = z['rows'], z['labelled']\n"
                 f"parts = ((rows[labelled], None), (rows[~labelled], [{pred.score_out!r}]))",
                 f"sess = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
                 "for part, names in parts:\n"
                 f"    for a in range(0, len(part), {BATCH_ROWS}):\n"
                 f"        sess.run(names, {{{pred.input!r}: part[a : a + {BATCH_ROWS}]}})"),
    }
    res = interleave(sides, rounds=6)  # each side first in half of the rounds
    wall, pure = res["explain"]["seconds"], res["pure"]["seconds"]
    dump.unlink()
    paired = [a / b for a, b in zip(res["explain"]["rounds"], res["pure"]["rounds"])]  # round by round
    print(f"qxc explain (5 methods): {wall:.3f} s for {rows:,} rows; pure onnxruntime (session + runs) on those very "
          f"rows {pure:.3f} s; ratio {wall / pure:.2f} (medians of 6 interleaved fresh processes each; round by round "
          f"{min(paired):.2f}-{max(paired):.2f}, median {float(np.median(paired)):.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,breast_cancer,diabetes")
    ap.add_argument("--instances", type=int, default=20)
    args = ap.parse_args()
    for name in args.models.split(","):
        bench(name, args.instances)


if __name__ == "__main__":
    main()
