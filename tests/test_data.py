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
    ({"x": np.full((4, 8), -np.inf, np.float32)}, "infinite values"),
    ({"x": np.array([["a"] * 8])}, "dtype"),
])
def test_bad_data_is_named(mlp, arrays, match):
    with pytest.raises(DataError, match=match):
        load_data(arrays, mlp)


def test_string_inputs_from_str_arrays_and_csv_columns_by_input_name(tmp_path):
    """A table export (one input per column, one of them strings) reads a CSV by header name, and an .npz of str
    arrays; object arrays are refused by name (qxc does not unpickle)."""
    from helpers import mixed_pipeline

    proto, feeds, y = mixed_pipeline(per_column=True)
    model = qir.from_proto(proto)
    np.savez(tmp_path / "d.npz", **feeds, labels=y)
    ds = load_data(tmp_path / "d.npz", model)
    assert ds.stacked["cat"].dtype == object and ds.stacked["cat"][0, 0] == feeds["cat"][0, 0]
    flat = load_data({k: v[:, 0] for k, v in feeds.items()}, model)  # 1-D columns for the [rows, 1] inputs
    assert flat.stacked["a"].shape == (len(y), 1) and flat.stacked["cat"].tolist() == ds.stacked["cat"].tolist()
    lines = ["label,cat,c,b,a"] + [f"{t},{s},{c},{b},{a}" for t, s, a, b, c in
                                   zip(y, feeds["cat"][:, 0], feeds["a"][:, 0], feeds["b"][:, 0], feeds["c"][:, 0])]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    csv = load_data(tmp_path / "d.csv", model)
    assert csv.labels.tolist() == y.tolist()
    for name in "abc":
        np.testing.assert_array_equal(csv.stacked[name], feeds[name])
    assert csv.stacked["cat"].tolist() == feeds["cat"].astype(object).tolist()
    (tmp_path / "extra.csv").write_text("a,b,c,cat,d\n1,2,3,mid,4\n")
    with pytest.raises(DataError, match="CSV column 'd' matches no model input"):
        load_data(tmp_path / "extra.csv", model)
    (tmp_path / "missing.csv").write_text("a,b,cat\n1,2,mid\n")
    with pytest.raises(DataError, match="no CSV column named 'c'"):
        load_data(tmp_path / "missing.csv", model)
    np.savez(tmp_path / "obj.npz", **{**feeds, "cat": feeds["cat"].astype(object)})
    with pytest.raises(DataError, match="array 'cat' holds Python objects.*dtype=str"):
        load_data(tmp_path / "obj.npz", model)
    wide = qir.from_proto(mixed_pipeline()[0])
    with pytest.raises(DataError, match=r"input 'num' takes shape \[N, 3\]; a CSV column feeds"):
        load_data(tmp_path / "d.csv", wide)


def test_csv_empty_cells_are_missing_values(tmp_path, mlp):
    (tmp_path / "d.csv").write_text("a,b,c,d,e,f,g,h,label\n1,,3,4,5,6,7,nan,0\n1,2,3,4,5,6,7,8,1\n")
    ds = load_data(tmp_path / "d.csv", mlp)
    assert np.isnan(ds.stacked["x"][0, [1, 7]]).all() and not np.isnan(ds.stacked["x"][1]).any()
    (tmp_path / "inf.csv").write_text("1,2,3,4,5,6,7,inf\n")
    with pytest.raises(DataError, match="input 'x' holds infinite values"):
        load_data(tmp_path / "inf.csv", mlp)


def test_a_dataframe_feeds_a_column_per_input_or_a_single_inputs_features(mlp):
    import pandas as pd
    from helpers import mixed_pipeline

    proto, feeds, y = mixed_pipeline(per_column=True)
    model = qir.from_proto(proto)
    frame = pd.DataFrame({**{k: v[:, 0] for k, v in feeds.items()}, "label": y})
    ds = load_data(frame, model)
    assert ds.labels.tolist() == y.tolist() and ds.stacked["cat"].shape == (len(y), 1)
    np.testing.assert_array_equal(ds.stacked["a"], feeds["a"])
    with pytest.raises(DataError, match="no column named 'cat'"):
        load_data(frame.drop(columns=["cat"]), model)
    table = pd.DataFrame(np.arange(24, dtype=np.float64).reshape(3, 8), columns=[f"f{i}" for i in range(8)])
    single = load_data(table.assign(target=[0, 1, 0]), mlp)
    assert single.stacked["x"].shape == (3, 8) and single.meta["feature_names"][0] == "f0"
    assert single.labels.tolist() == [0, 1, 0]


def test_an_empty_cell_for_an_integer_input_is_named(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["k"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("k", TensorProto.INT64, [None, 1]),
                               helper.make_tensor_value_info("s", TensorProto.STRING, [None, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])])
    model = qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (tmp_path / "x.csv").write_text("k,s\n1,a\n,b\n")
    with pytest.raises(DataError, match="column 'k' has empty cells, and its int64 input cannot take a missing"):
        load_data(tmp_path / "x.csv", model)
    (tmp_path / "ok.csv").write_text('k,s\n1,"a, quoted"\n2,b\n')
    ds = load_data(tmp_path / "ok.csv", model)
    assert ds.stacked["k"].dtype == np.int64 and ds.stacked["s"][0, 0] == "a, quoted"


def _ids_model(elem=TensorProto.INT64):
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("ids", elem, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    return qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_whole_numbers_saved_as_floats_feed_an_integer_input():
    """Token ids or counts saved as floats (pandas, a mixed np.savez) are cast when every value is a whole number
    that fits, as a CSV's are; a fraction, a NaN or a value out of range is named."""
    ds = load_data({"ids": np.array([[1.0, 4999.0, 0.0]], np.float32)}, _ids_model())
    assert ds.stacked["ids"].dtype == np.int64 and ds.stacked["ids"].tolist() == [[1, 4999, 0]]
    for values, match in [([[1.5, 2, 3]], "holds fractions for its int64 input"),
                          ([[np.nan, 2, 3]], "holds NaN or inf"),
                          ([[300, 2, 3]], "values do not fit the model's uint8")]:
        model = _ids_model(TensorProto.UINT8 if "uint8" in match else TensorProto.INT64)
        with pytest.raises(DataError, match=match):
            load_data({"ids": np.array(values, np.float64)}, model)
