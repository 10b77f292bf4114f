"""Scale-out: local and Ray backends give the same numbers; shards; a killed worker is retried; errors surface."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODELS

from qxc import ir as qir
from qxc.calibrate import collect_ranges
from qxc.data import load_data
from qxc.errors import DataError, QxcError
from qxc.explain.importance import permutation_importance
from qxc.explain.predictor import Predictor
from qxc.scale import LocalBackend, RayBackend, chunks_of, distributed_permutation, distributed_ranges

ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra: pip install 'qxc[ray]'")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def shards(tmp_path):
    with np.load(MODELS / "digits_train.npz") as z:
        x, y = z["X"], z["labels"]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 4), np.array_split(y, 4))):
        np.save(folder / f"part{i}.npy", xs)
        np.save(folder / f"part{i}.labels.npy", ys)
    return folder


def test_single_chunk_permutation_equals_the_in_memory_one():
    model = qir.load(MODELS / "digits_mlp.onnx")
    x, y = load_data(MODELS / "digits_test.npz", model).stacked["X"], np.load(MODELS / "digits_test.npz")["labels"]
    local = LocalBackend(model)
    res = distributed_permutation(local, chunks_of(MODELS / "digits_test.npz", "X", 10_000), n_repeats=3,
                                  random_state=4)
    ref = permutation_importance(Predictor(model), x, y, n_repeats=3, random_state=4)
    np.testing.assert_allclose(res["importances"], ref.importances, atol=1e-6)


def test_distributed_shapley_runs_the_pilot_once_and_equals_one_local_call():
    from qxc.explain.shapley import shapley_values
    from qxc.scale import distributed_shapley

    model = qir.load(MODELS / "digits_mlp.onnx")
    x = load_data(MODELS / "digits_test.npz", model).stacked["X"]
    bg = x[:100]
    local = shapley_values(Predictor(model), x[100:110], bg, random_state=3)
    dist = distributed_shapley(LocalBackend(model), x[100:110], bg, seed=3, per_task=4)  # 3 tasks
    np.testing.assert_array_equal(dist.values, local.values)
    np.testing.assert_array_equal(dist.std_error, local.std_error)
    np.testing.assert_allclose(dist.halves_abs, local.halves_abs, rtol=1e-12)  # the tasks' sums add up
    assert dist.stability == local.stability
    # one pilot in all: each task (and the pilot's) runs the background's outputs, nothing else twice
    assert dist.settings["rows_evaluated"] == local.settings["rows_evaluated"] + 3 * len(bg)


def test_ray_equals_local_for_ranges_and_importance(cluster, shards):
    model = qir.load(MODELS / "digits_mlp.onnx")
    chunks = chunks_of(shards, "X", 200)
    assert len(chunks) == 8  # 4 shards x 2 chunks, read by the workers themselves
    local, remote = LocalBackend(model), RayBackend(model, workers=2)
    try:
        for method in ("minmax", "entropy"):
            a = distributed_ranges(local, chunks, method=method)
            b = distributed_ranges(remote, chunks, method=method)
            assert a.ranges == b.ranges  # bit-identical
        pa = distributed_permutation(local, chunks, n_repeats=2, random_state=1)
        pb = distributed_permutation(remote, chunks, n_repeats=2, random_state=1)
        np.testing.assert_allclose(pa["importances"], pb["importances"], atol=1e-6)
        assert pa["metric"] == "accuracy" and pa["rows"] == 1347
    finally:
        remote.close()
    # and min/max over chunks equals the single in-memory pass
    whole = collect_ranges(model, load_data(MODELS / "digits_train.npz", model), method="minmax")
    assert {k: v for k, v in a.ranges.items()} == {k: v for k, v in whole.ranges.items()} or a.method == "entropy"


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(cluster, shards):
    model = qir.load(MODELS / "digits_mlp.onnx")
    chunks = chunks_of(shards, "X", 20)  # 68 chunks: the run lasts long enough to be interrupted
    expected = distributed_permutation(LocalBackend(model), chunks, n_repeats=3, random_state=0)
    remote = RayBackend(model, workers=2)
    try:
        from qxc.scale.tasks import permutation_task

        refs = [remote.actors[i % 2].run.remote(permutation_task, c, 3, 0, True) for i, c in enumerate(chunks)]
        ready, _ = ray.wait(refs, num_returns=2, timeout=60)
        assert len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs), "finished before the kill"
        ray.kill(remote.actors[0], no_restart=False)  # the process dies mid-run; Ray restarts it and retries
        parts = ray.get(refs)
    finally:
        remote.close()
    perm = sum(p["perm"] for p in parts)
    base = sum(p["base"] for p in parts)
    n = sum(p["n"] for p in parts)
    np.testing.assert_allclose((base - perm) / n, expected["importances"], atol=1e-6)


def test_worker_errors_surface_as_one_message(cluster, tmp_path):
    model = qir.load(MODELS / "digits_mlp.onnx")
    np.save(tmp_path / "bad.npy", np.zeros((10, 7), np.float32))  # 7 features, the model wants 64
    remote = RayBackend(model, workers=1)
    try:
        with pytest.raises(QxcError) as e:
            distributed_permutation(remote, chunks_of(tmp_path / "bad.npy", "X", 100), n_repeats=1)
    finally:
        remote.close()
    assert isinstance(e.value, DataError) and "expects 64 features" in str(e.value) and "\n" not in str(e.value)


def test_cli_explain_on_ray_matches_local(cluster, shards, tmp_path):
    import json

    from qxc.cli import main

    outs = []
    for backend in ("local", "ray"):
        out = tmp_path / f"{backend}.json"
        assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(shards), "--method", "permutation",
                     "--labels", "--repeats", "2", "--backend", backend, "--workers", "2", "--chunk-rows", "200",
                     "-o", str(out)]) == 0
        outs.append(json.loads(out.read_text())["permutation"]["values"])
    assert outs[0] == outs[1]
    assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(shards), "--method", "local"]) == 2


def test_compare_shapley_and_tree_on_ray_match_local(cluster, shards, tmp_path):
    import json

    from qxc import compile_model
    from qxc.cli import main

    q = compile_model(MODELS / "digits_mlp.onnx", "insert-qdq", data=MODELS / "digits_train.npz")
    qir.save(q.model, tmp_path / "q.onnx")
    docs = {}
    for backend in ("local", "ray"):
        out = tmp_path / f"c_{backend}.json"
        assert main(["compare", str(MODELS / "digits_mlp.onnx"), str(tmp_path / "q.onnx"), "--data", str(shards),
                     "--backend", backend, "--workers", "2", "--chunk-rows", "200", "--json", str(out)]) == 0
        exp = tmp_path / f"e_{backend}.json"
        assert main(["explain", str(MODELS / "digits_mlp.onnx"), "--data", str(shards), "--method",
                     "shapley,tree", "--instances", "6", "--backend", backend, "--workers", "2", "--chunk-rows",
                     "200", "-o", str(exp)]) == 0
        docs[backend] = (json.loads(out.read_text()), json.loads(exp.read_text()))
    (cl, el), (cr, er) = docs["local"], docs["ray"]
    def close(a, b):
        return a == b or abs(a - b) < 1e-6

    for name in cl["outputs"]:
        assert close(cl["outputs"][name]["sqnr_db"], cr["outputs"][name]["sqnr_db"])
    assert cl["accuracy"] == cr["accuracy"] and cl["first_jump"]["tensor"] == cr["first_jump"]["tensor"]
    np.testing.assert_allclose(el["shapley"]["values"], er["shapley"]["values"], atol=1e-6)
    assert el["tree"]["rules"] == er["tree"]["rules"] and el["tree"]["fidelity"] == er["tree"]["fidelity"]
    # the chunked compare agrees with the in-memory one
    whole = compare_models_whole(tmp_path / "q.onnx")
    assert close(whole["outputs"]["probabilities"]["sqnr_db"], cl["outputs"]["probabilities"]["sqnr_db"])


def compare_models_whole(candidate):
    from qxc.compare import compare_models

    ref = qir.load(MODELS / "digits_mlp.onnx")
    return compare_models(ref, qir.load(candidate), load_data(MODELS / "digits_train.npz", ref)).to_json()


def test_csv_chunks_match_the_npz(tmp_path):
    with np.load(MODELS / "diabetes_test.npz") as z:
        x, y = z["X"], z["labels"]
    header = ",".join([f"f{i}" for i in range(10)] + ["target"])
    rows = "\n".join(",".join(repr(float(v)) for v in [*r, t]) for r, t in zip(x, y))
    (tmp_path / "d.csv").write_text(header + "\n" + rows + "\n")
    model = qir.load(MODELS / "diabetes_mlp.onnx")
    local = LocalBackend(model)
    a = distributed_permutation(local, chunks_of(tmp_path / "d.csv", "X", 40), n_repeats=2)
    b = distributed_permutation(local, chunks_of(MODELS / "diabetes_test.npz", "X", 40), n_repeats=2)
    np.testing.assert_allclose(a["importances"], b["importances"], atol=1e-6)
    assert a["metric"] == "r2"


def test_ray_backend_without_ray_is_a_clear_error(monkeypatch):
    import builtins

    from qxc.errors import UsageError

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UsageError, match=r"needs Ray: pip install 'qxc\[ray\]'"):
        RayBackend(qir.load(MODELS / "digits_mlp.onnx"))


@pytest.mark.parametrize("labels", [True, False])
def test_single_chunk_permutation_of_a_multi_output_regressor_equals_the_in_memory_one(tmp_path, labels):
    """R^2 averaged over the outputs, and the absolute change of each output: the chunks' sums reproduce them."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    x, y = x.astype(np.float32), np.stack([y, np.sqrt(y) * 10], axis=1)
    model = qir.from_proto(to_onnx(LinearRegression().fit(x, y), x[:1]))
    np.savez(tmp_path / "d.npz", X=x, labels=y)
    res = distributed_permutation(LocalBackend(model), chunks_of(tmp_path / "d.npz", "X", 10_000), n_repeats=2,
                                  random_state=3, use_labels=labels)
    ref = permutation_importance(Predictor(model), x, y if labels else None, n_repeats=2, random_state=3)
    assert res["metric"] == ref.metric
    np.testing.assert_allclose(res["importances"], ref.importances, rtol=1e-6, atol=1e-9)


def test_csv_chunks_read_empty_cells_as_missing_like_the_local_reader(tmp_path):
    from qxc.data import load_data

    model = qir.load(MODELS / "diabetes_mlp.onnx")
    lines = ["a,b,c,d,e,f,g,h,i,j,target", "1,,3,4,5,6,7,8,9,10,100", "1,2,3,4,5,6,7,8,9,,200", "1,2,3,4,5,6,7,8,9,10,50"]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    chunks = chunks_of(tmp_path / "d.csv", "X", 2)
    table = np.concatenate([c.load()[0] for c in chunks])
    local = load_data(tmp_path / "d.csv", model)
    np.testing.assert_array_equal(table, local.stacked["X"].astype(np.float64))
    assert np.isnan(table).sum() == 2


def test_chunked_commands_refuse_multi_input_models_saying_what_to_do(tmp_path, capsys):
    import onnx
    from helpers import mixed_pipeline

    from qxc.cli import main

    proto, feeds, y = mixed_pipeline()
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **feeds, labels=y)
    m, d = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz")
    for argv, hint in ((["calibrate", m, "--data", d, "-o", str(tmp_path / "r.json")], "qxc compile --data"),
                       (["compare", m, m, "--data", d, "--backend", "ray"], "compare it with --backend local"),
                       (["explain", m, "--data", d, "--backend", "ray", "--method", "permutation"],
                        "explain it with --backend local")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "take single-input models; this one has inputs num, cat" in err and hint in err
    assert not (tmp_path / "r.json").exists()


def test_csv_chunks_read_class_name_labels_like_the_local_reader(tmp_path):
    from helpers import iris_classifier

    from qxc.data import load_data

    proto, x, labels = iris_classifier("logistic")
    lines = ["a,label,b,c,d"] + [",".join([repr(float(r[0])), name, *map(lambda v: repr(float(v)), r[1:])])
                                 for r, name in zip(x, labels)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    chunks = chunks_of(tmp_path / "d.csv", "X", 40)
    got = [c.load() for c in chunks]
    local = load_data(tmp_path / "d.csv", qir.from_proto(proto))
    np.testing.assert_array_equal(np.concatenate([t for t, _ in got]), local.stacked["X"].astype(np.float64))
    assert np.concatenate([y for _, y in got]).tolist() == local.labels.tolist() == labels.tolist()


def test_chunked_explain_of_an_image_model_equals_the_local_run(tmp_path):
    """An image's elements are its features in the chunked run too (names included), and logits with class labels
    make a classifier there as well: on one shard, permutation importance equals the local run's, and the tree is
    the local run's, written the same way."""
    import json

    from qxc.cli import main

    folder = tmp_path / "shards"
    folder.mkdir()
    with np.load(MODELS / "cnn_digits_test.npz") as z:
        np.savez(folder / "all.npz", image=z["image"], labels=z["labels"])
    docs = {}
    for kind, data in (("chunked", folder), ("local", MODELS / "cnn_digits_test.npz")):
        out = tmp_path / f"{kind}.json"
        assert main(["explain", str(MODELS / "cnn_digits.onnx"), "--data", str(data), "--labels", "--method",
                     "permutation,tree", "-o", str(out)]) == 0
        docs[kind] = json.loads(out.read_text())
    chunked, local = docs["chunked"], docs["local"]
    assert chunked["features"] == local["features"] and len(local["features"]) == 64
    assert (chunked["task"], chunked["output"]) == (local["task"], local["output"]) == ("classification", "logits")
    same = {"fidelity", "fidelity_train", "metric", "rules", "nodes", "depth", "leaves"}
    assert {k: v for k, v in chunked["tree"].items() if k in same} == {k: v for k, v in local["tree"].items() if k in same}
    assert set(chunked["tree"]) == set(local["tree"])
    assert chunked["permutation"]["metric"] == local["permutation"]["metric"] == "accuracy"
    np.testing.assert_allclose(list(chunked["permutation"]["values"].values()),
                               list(local["permutation"]["values"].values()), atol=1e-6)


def test_distributed_ranges_name_the_tensors_holding_infinities(tmp_path):
    """Chunks merge the -inf flag as the local run keeps it (insert-qdq leaves those tensors float)."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Less", ["x", "zero"], ["neg"]), helper.make_node("Where", ["neg", "ninf", "x"], ["w"]),
         helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [None, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf")])
    model = qir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.abs(np.random.default_rng(0).normal(size=(40, 4))).astype(np.float32)
    x[35, 2] = -1.0  # one negative value, in the last chunk only
    np.savez(tmp_path / "d.npz", x=x)
    res = distributed_ranges(LocalBackend(model), chunks_of(tmp_path / "d.npz", "x", 10))
    local = collect_ranges(model, load_data(tmp_path / "d.npz", model))
    assert res.infinite == local.infinite == {"w"} and res.ranges == local.ranges


def test_chunked_commands_name_missing_data_before_starting_a_backend(tmp_path, capsys, monkeypatch):
    """A data path that does not exist is a one-line data error (exit 5), raised before any backend starts; it was
    an internal error (FileNotFoundError) once the backend ran."""
    from qxc import cli

    started = []
    monkeypatch.setattr(cli, "_backend", lambda *a, **k: started.append(1))
    m, missing = str(MODELS / "digits_mlp.onnx"), str(tmp_path / "nope.npz")
    for argv in (["explain", m, "--data", missing, "--backend", "ray", "--method", "permutation",
                  "-o", str(tmp_path / "e.json")],
                 ["calibrate", m, "--data", missing, "--backend", "ray", "-o", str(tmp_path / "r.json")],
                 ["compare", m, m, "--data", missing, "--backend", "ray"]):
        assert cli.main(argv) == 5
        assert capsys.readouterr().err.strip() == f"qxc: error: {missing}: no such file or folder"
    assert not started and not list(tmp_path.iterdir())
