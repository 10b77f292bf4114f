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
import time
import warnings

import numpy as np
from _harness import ROOT, interleave

from qxc import ir as qir
from qxc.data import load_data
from qxc.explain.estimators import SklearnView
from qxc.explain.importance import permutation_importance
from qxc.explain.predictor import Predictor
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

    times_q, times_k = [], []
    for _ in range(3):  # interleaved; medians (the machines are shared)
        q, tq = run_qxc()
        kern, tk = run_kernel()
        times_q.append(tq)
        times_k.append(tk)
    t_q, t_k = float(np.median(times_q)), float(np.median(times_k))
    # the floor: onnxruntime alone on as many rows as qxc evaluates per instance (coalitions x background, less
    # the identical rows the exact path runs once); Kernel runs every coalition x background row
    kernel_rows = (2**m - 2 if q.method == "exact" else q.settings["n_samples"]) * len(bg)
    per_inst = q.settings.get("rows_evaluated", kernel_rows * len(pick)) // len(pick)
    rows_f = np.resize(xtr, (min(per_inst * len(pick), 65536), m)).astype(np.float32)
    t, done = time.perf_counter(), 0
    while done < per_inst * len(pick):
        k = min(65536, per_inst * len(pick) - done)
        pred.session.run(None, {pred.input: rows_f[:k]})
        done += k
    t_floor = (time.perf_counter() - t) / len(pick)
    line = f"shapley ({q.method}): time/instance qxc {t_q * 1e3:.2f} ms, shap Kernel {t_k * 1e3:.1f} ms, " \
           f"ratio {t_q / t_k:.3f} (rows/instance: Kernel {kernel_rows:,}, qxc {per_inst:,}; onnxruntime alone " \
           f"on qxc's rows: {t_floor * 1e3:.2f} ms, {t_floor / t_k:.3f} x Kernel; medians of 3)"
    if m <= 12:
        exact = []
        for i, row in enumerate(pick):
            f = f_for(None if classes is None else classes[i])
            ex = shap.ExactExplainer(f, shap.maskers.Independent(bg, max_samples=100))
            exact.append(ex(row[None, :]).values.reshape(-1))
        exact = np.array(exact)
        e_q, e_k = np.abs(q.values - exact).mean(), np.abs(kern - exact).mean()
        line += f"; mean |error| vs shap Exact: qxc {e_q:.2e}, shap Kernel {e_k:.2e}"
    else:
        line += f"; qxc vs shap Kernel mean |diff| {np.abs(q.values - kern).mean():.3e} " \
                f"(|values| {np.abs(kern).mean():.3e})"
    print(line)
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
    doc = explain_model(model, test, methods=("permutation", "ablation", "shapley", "tree", "local"),
                        instances=instances)
    rows = doc["timing"]["rows_evaluated"]
    path, data = ROOT / f"models/{MODELS[name]}.onnx", ROOT / f"models/{name}_test.npz"
    sides = {
        # imports before the timer on both sides (onnxruntime there; here also scikit-learn, ~1 s, for the tree)
        "explain": ("from qxc import ir as qir\nfrom qxc.data import load_data\nfrom qxc.explain.run import explain_model\n"
                    "import onnxruntime, qxc.explain.shapley, qxc.explain.surrogates, sklearn.tree, sklearn.model_selection\n"
                    f"model = qir.load({str(path)!r})\ntest = load_data({str(data)!r}, model)",
                    "explain_model(model, test, methods=('permutation', 'ablation', 'shapley', 'tree', 'local'), "
                    f"instances={instances})"),
        "pure": ("import numpy as np\nimport onnxruntime as ort\n"
                 f"x = np.load({str(data)!r})['X'].astype(np.float32)\n"
                 f"big = np.resize(x, ({min(rows, 65536)}, x.shape[1]))",
                 f"sess = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
                 f"done = 0\nwhile done < {rows}:\n"
                 f"    k = min(65536, {rows} - done)\n    sess.run(None, {{'X': big[:k]}})\n    done += k"),
    }
    res = interleave(sides, rounds=3)
    wall, pure = res["explain"]["seconds"], res["pure"]["seconds"]
    print(f"qxc explain (5 methods): {wall:.3f} s for {rows} rows; pure onnxruntime (session + runs) on as many rows "
          f"{pure:.3f} s; ratio {wall / pure:.2f} (medians of 3 interleaved fresh processes each)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,breast_cancer,diabetes")
    ap.add_argument("--instances", type=int, default=20)
    args = ap.parse_args()
    for name in args.models.split(","):
        bench(name, args.instances)


if __name__ == "__main__":
    main()
