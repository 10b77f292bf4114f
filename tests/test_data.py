"""Data formats and their checks against the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import MODELS, mlp_model
from onnx import TensorProto, helper

from qxc import ir as qir
from qxc.data import load_data
from qxc.errors import DataError


@pytest.fixture
def mlp():
    return qir.from_proto(mlp_model())


def test_npz_with_labels_and_feature_names():
    model = qir.load(MODELS / "breast_cancer_gb.onnx")
    ds = load_data(MODELS / "breast_cancer_test.npz", model)
    assert len(ds) == len(ds.labels) == 143
    assert ds.meta["feature_names"][0] == "mean radius"
    assert ds.stacked["X"].dtype == np.float32


def test_csv_header_label_column_and_float64_cast(tmp_path, mlp):
    rows = np.random.default_rng(0).normal(size=(5, 8))
    header = ",".join([f"f{i}" for i in range(8)] + ["label"])
    body = "\n".join(",".join(map(str, [*r, i % 2])) for i, r in enumerate(rows))
    (tmp_path / "d.csv").write_text(header + "\n" + body + "\n")
    ds = load_data(tmp_path / "d.csv", mlp)
    assert ds.stacked["x"].dtype == np.float32 and ds.stacked["x"].shape == (5, 8)
    assert ds.labels.tolist() == [0, 1, 0, 1, 0]
    assert ds.meta["feature_names"] == [f"f{i}" for i in range(8)]


def test_csv_label_column_of_class_names_anywhere_and_ragged_rows(tmp_path, mlp):
    rows = np.random.default_rng(0).normal(size=(3, 8))
    header = ",".join(["label"] + [f"f{i}" for i in range(8)])
    body = "\n".join(",".join([name, *map(str, r)]) for name, r in zip(["setosa", "virginica", "setosa"], rows))
    (tmp_path / "d.csv").write_text(header + "\n" + body + "\n")
    ds = load_data(tmp_path / "d.csv", mlp)
    assert ds.labels.tolist() == ["setosa", "virginica", "setosa"]
    np.testing.assert_allclose(ds.stacked["x"], rows.astype(np.float32))
    (tmp_path / "r.csv").write_text(header + "\n" + body + "\nsetosa,1,2\n")
    with pytest.raises(DataError, match="r.csv: row 5 has 3 cells, the header 9"):
        load_data(tmp_path / "r.csv", mlp)


def test_npy_and_batches(tmp_path, mlp):
    np.save(tmp_path / "d.npy", np.zeros((10, 8), np.float32))
    ds = load_data(tmp_path / "d.npy", mlp)
    assert [len(b["x"]) for b in ds.batches(4)] == [4, 4, 2]


def test_list_of_samples_for_inputs_whose_batch_axis_is_not_first():
    graph = helper.make_graph(
        [helper.make_node("Add", ["state", "rate"], ["y"])], "g",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]),
         helper.make_tensor_value_info("rate", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, 4])])
    model = qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ds = load_data({"state": np.zeros((6, 2, 3, 4), np.float32), "rate": np.arange(6, dtype=np.float32)}, model)
    assert len(ds) == 6 and ds.stacked is None
    first = next(iter(ds.batches()))
    assert first["state"].shape == (2, 3, 4) and first["rate"].shape == ()


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((4, 8), np.float32), "extra": np.zeros(4)}, "'extra' matches no model input"),
    ({}, "no data for input 'x'"),
    ({"x": np.zeros((4, 7), np.float32)}, "expects 8 features"),
    ({"x": np.zeros((4, 2, 7), np.float32)}, "expects shape"),
    ({"x": np.zeros((0, 8), np.float32)}, "zero rows"),
    ({"x": np.full((4, 8), np.nan, np.float32)}, "NaN or Inf"),
    ({"x": np.array([["a"] * 8])}, "dtype"),
])
def test_bad_data_is_named(mlp, arrays, match):
    with pytest.raises(DataError, match=match):
        load_data(arrays, mlp)
