"""Model I/O: validation on load, atomic save, external data, checker on a skeleton, opset upgrade, interop."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from helpers import MODELS, iris_classifier, mlp_model, run
from onnx import TensorProto, helper, numpy_helper

from qxc import ir as qir
from qxc.errors import ModelError, UsageError


def _save_external(model: onnx.ModelProto, folder, name="m.onnx"):
    path = folder / name
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=name + ".data",
              size_threshold=0)
    return path


def test_load_keeps_external_weights_mapped_and_save_round_trips(tmp_path):
    path = _save_external(mlp_model(), tmp_path)
    model = qir.load(path)
    assert all(isinstance(v.const_value, qir.ir.ExternalTensor) for v in model.graph.initializers.values())
    out = qir.save(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()  # external in, external out
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(path, {"x": x})[0], run(out, {"x": x})[0])


def test_release_weights_unmaps_and_returns_only_the_tensors_still_in_use(tmp_path):
    """A weight whose buffer is still exported (a numpy view, a live session) keeps its mapping and comes back, so
    a pass retries those alone (retrying every weight released so far made quantize-weights quadratic: 3,000
    weights took 19 s, 11 s without)."""
    model = qir.load(_save_external(mlp_model(), tmp_path))
    values = list(model.graph.initializers.values())
    held = values[0].const_value.numpy()  # a view into the mapping
    kept = qir.release_weights(model, values)
    assert [t.name for t in kept] == [values[0].const_value.name]
    del held
    assert qir.release_weights(model, kept) == []
    np.testing.assert_array_equal(values[0].const_value.numpy(), numpy_helper.to_array(mlp_model().graph.initializer[0]))


def test_save_refuses_to_overwrite_the_input_or_its_data(tmp_path):
    path = _save_external(mlp_model(), tmp_path)
    before = path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    model = qir.load(path)
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        qir.save(model, path)
    assert (path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_save_is_atomic_when_serialization_fails(tmp_path, monkeypatch):
    model = qir.from_proto(mlp_model())
    (tmp_path / "out.onnx").write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(qir.onnx, "save", boom)
    with pytest.raises(RuntimeError):
        qir.save(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]  # no temp folder left


def test_two_saves_are_byte_identical(tmp_path):
    model = qir.load(MODELS / "digits_mlp.onnx")
    a = qir.save(model, tmp_path / "a.onnx").read_bytes()
    b = qir.save(model, tmp_path / "b.onnx").read_bytes()
    assert a == b


@pytest.mark.parametrize("location", ["../evil.bin", "/etc/passwd", "sub/../../evil.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    m = mlp_model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    (tmp_path / "evil.bin").write_bytes(b"\0" * 1024)
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save(m, sub / "m.onnx")
    with pytest.raises(ModelError, match="outside the model folder|absolute path"):
        qir.load(sub / "m.onnx")


def test_missing_and_truncated_external_data_are_named(tmp_path):
    path = _save_external(mlp_model(), tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="truncated"):
        qir.load(path)
    data.unlink()
    with pytest.raises(ModelError, match="missing"):
        qir.load(path)


def test_declared_shape_larger_than_the_bytes_is_refused(tmp_path):
    m = mlp_model()
    m.graph.initializer[0].dims[:] = [1 << 20, 1 << 20]  # a terabyte of float32 claimed, 128 bytes stored
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="declares shape .* but stores"):
        qir.load(tmp_path / "m.onnx")


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b'{"graph": {}}', "not a readable ONNX|not an ONNX model"),
    (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "not a readable ONNX|not an ONNX"),
])
def test_garbage_files_are_refused(tmp_path, content, match):
    (tmp_path / "m.onnx").write_bytes(content)
    with pytest.raises(ModelError, match=match):
        qir.load(tmp_path / "m.onnx")


def test_truncated_model_is_refused(tmp_path):
    data = (MODELS / "digits_mlp.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="m.onnx"):
        qir.load(tmp_path / "m.onnx")


@pytest.mark.parametrize("opset", [3, qir.MAX_OPSET + 1])
def test_unsupported_opsets_are_refused(tmp_path, opset):
    m = mlp_model()
    m.opset_import[0].version = opset
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=f"opset {opset} is outside"):
        qir.load(tmp_path / "m.onnx")


def test_unknown_domain_is_refused(tmp_path):
    m = mlp_model()
    m.graph.node[0].domain = "com.example.secret"
    m.opset_import.append(helper.make_opsetid("com.example.secret", 1))
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="com.example.secret"):
        qir.load(tmp_path / "m.onnx")


def test_check_finds_a_broken_graph_and_names_it():
    m = mlp_model()
    m.graph.node[1].input[0] = "does_not_exist"
    with pytest.raises(ModelError, match="does_not_exist"):
        qir.check(qir.from_proto(m))


def test_skeleton_restores_every_weight():
    model = qir.from_proto(mlp_model(sizes=(64, 64, 8)))
    before = {n: v.const_value for n, v in model.graph.initializers.items()}
    with qir.skeleton(model, min_bytes=1) as moved:
        assert moved and not model.graph.initializers
    assert {n: v.const_value for n, v in model.graph.initializers.items()} == before
    assert [v.name for v in model.graph.inputs] == ["x"]


def test_upgrade_opset_keeps_weights_and_results():
    proto = mlp_model(opset=13)
    original = qir.from_proto(proto)
    model = qir.upgrade_opset(original, 21)
    assert model is original  # in place
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(proto, {"x": x})[0], run(qir.to_proto(model), {"x": x})[0])


def test_graphsurgeon_edge_round_trips():
    model = qir.from_proto(mlp_model())
    graph = qir.to_graphsurgeon(model)
    back = qir.coerce_model(graph)
    x = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(run(qir.to_proto(model), {"x": x})[0], run(qir.to_proto(back), {"x": x})[0])


def test_fingerprint_reads_weights():
    a = qir.from_proto(mlp_model(seed=0))
    b = qir.from_proto(mlp_model(seed=1))
    assert qir.fingerprint(a) != qir.fingerprint(b)
    assert qir.fingerprint(a) == qir.fingerprint(qir.from_proto(mlp_model(seed=0)))


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(qir, "EXTERNAL_DATA_THRESHOLD", 100)
    qir.save(qir.from_proto(mlp_model(sizes=(64, 64, 8))), tmp_path / "o.onnx")
    assert (tmp_path / "o.onnx.data").exists()
    assert os.path.getsize(tmp_path / "o.onnx") < os.path.getsize(tmp_path / "o.onnx.data")


def test_nan_weights_are_loadable_but_named_by_quantization_later(tmp_path):
    m = mlp_model()
    arr = numpy_helper.to_array(m.graph.initializer[0]).copy()
    arr[0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, "w0"))
    onnx.save(m, tmp_path / "m.onnx")
    assert qir.load(tmp_path / "m.onnx").graph.initializers["w0"].const_value.numpy()[0, 0] != 0


@pytest.mark.parametrize("kind", ["mlp", "forest"])
def test_zipmap_outputs_survive_load_compile_and_save(tmp_path, kind):
    """onnx-ir holds no map types: skl2onnx's default ZipMap output (a sequence of maps) is carried around it."""
    import onnxruntime as ort

    from qxc import compile_model

    proto, x, _ = iris_classifier(kind, string_labels=kind == "mlp")
    onnx.save(proto, tmp_path / "m.onnx")
    model = qir.load(tmp_path / "m.onnx")
    assert [o.type for o in model.graph.outputs][1] is None  # held aside, not lost
    result = compile_model(model, "cleanup,quantize-weights", verify_runtime=True)
    assert result.records[1].report["weights_quantized"] == (2 if kind == "mlp" else 0)
    qir.save(result.model, tmp_path / "q.onnx")
    qir.save(result.model, tmp_path / "q_ext.onnx", external_data=True)
    ref = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for name in ("q.onnx", "q_ext.onnx"):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert [o.type for o in sess.get_outputs()] == [o.type for o in ref.get_outputs()]
        got, want = sess.run(None, {"X": x}), ref.run(None, {"X": x})
        assert (got[0] == want[0]).mean() >= 0.97  # the labels, and the probabilities still dicts per class
        prob = np.array([[row[c] for c in sorted(row)] for row in got[1]])
        prob_ref = np.array([[row[c] for c in sorted(row)] for row in want[1]])
        assert set(got[1][0]) == set(want[1][0]) and np.abs(prob - prob_ref).max() <= (0.05 if kind == "mlp" else 0)
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"), full_check=True)
    assert qir.from_proto(proto).meta[qir.HIDDEN_TYPES_KEY]  # a user's proto is read without being changed
    assert proto.graph.output[1].type.HasField("sequence_type")


def test_external_data_save_keeps_string_tensors_in_the_model(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    names = np.array([f"class_{i:03d}" for i in range(100)], dtype=object)  # 900 bytes of strings
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["wy"]), helper.make_node("Identity", ["names"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [100]),
         helper.make_tensor_value_info("wy", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(names, "names"), numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    model = qir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    qir.save(model, tmp_path / "m.onnx", external_data=True)
    saved = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    where = {t.name: t.data_location for t in saved.graph.initializer}
    assert where == {"names": onnx.TensorProto.DEFAULT, "w": onnx.TensorProto.EXTERNAL}
    out = run(str(tmp_path / "m.onnx"), {})
    assert list(out[0]) == list(names) and out[1].sum() == 64 * 64
