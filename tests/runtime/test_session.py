"""Provider selection and fallback (available providers injected: no GPU here), sessions, batched runs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import MODELS, mlp_model

from qxc import ir as qir
from qxc.errors import ModelError, UsageError
from qxc.runtime import make_session, resolve_providers, run_batched
from qxc.runtime.session import ProviderFallbackWarning, normalize_output

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_names_map_to_providers_in_the_requested_order():
    assert resolve_providers("tensorrt,cuda", available=GPU_BUILD) == GPU_BUILD
    assert resolve_providers(["cuda"], available=GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cpu", available=GPU_BUILD) == ["CPUExecutionProvider"]


def test_missing_provider_falls_back_with_a_warning():
    with pytest.warns(ProviderFallbackWarning, match="'cuda' .* not available"):
        assert resolve_providers("cuda", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_strict_provider_fails_instead():
    with pytest.raises(UsageError, match="not available.*onnxruntime-gpu"):
        resolve_providers("tensorrt", available=["CPUExecutionProvider"], strict=True)


def test_unknown_provider_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown execution provider 'gpu9'"):
        resolve_providers("gpu9")


def test_session_from_ir_model_with_external_data(tmp_path):
    import onnx

    onnx.save(mlp_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = qir.load(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sess = make_session(model, threads=1)
    x = np.ones((3, 8), np.float32)
    ref = make_session(tmp_path / "m.onnx").run(None, {"x": x})[0]
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def test_runtime_load_failure_is_one_line():
    m = mlp_model()
    m.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="onnxruntime cannot load the model") as e:
        make_session(qir.from_proto(m))
    assert "\n" not in str(e.value)


def test_run_batched_matches_one_run_and_normalizes_zipmap():
    sess = make_session(MODELS / "digits_mlp.onnx")
    x = np.random.default_rng(0).random((100, 64), dtype=np.float32)
    whole = sess.run(None, {"X": x})
    parts = run_batched(sess, {"X": x}, batch_size=7)
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a, b)
    zipmap = [{0: 0.25, 1: 0.75}, {0: 1.0, 1: 0.0}]
    np.testing.assert_array_equal(normalize_output(zipmap), np.array([[0.25, 0.75], [1.0, 0.0]], np.float32))


@pytest.mark.gpu
def test_cuda_session_runs_on_a_real_device():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider in this onnxruntime build (install qxc[gpu] on a GPU machine)")
    sess = make_session(MODELS / "digits_mlp.onnx", providers="cuda", strict_provider=True)
    assert sess.get_providers()[0] == "CUDAExecutionProvider"


def test_serial_blas_runs_numpy_blas_on_one_thread_and_restores_it():
    from threadpoolctl import threadpool_info

    from qxc.runtime import serial_blas

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    with serial_blas():
        inside = blas_threads()
    with serial_blas(enabled=False):
        assert blas_threads() == before
    assert inside and all(t == 1 for t in inside)
    assert blas_threads() == before


def test_blas_libraries_found_on_a_background_thread_are_found_once(monkeypatch):
    import threading

    import threadpoolctl

    from qxc.runtime import threads

    made, real = [], threadpoolctl.ThreadpoolController
    monkeypatch.setattr(threads, "_controller", None)
    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", lambda: made.append(1) or real())
    threads.prefetch_threadpools()  # the scan starts meanwhile...
    callers = [threading.Thread(target=threads._threadpools) for _ in range(4)]
    for c in callers:
        c.start()
    with threads.serial_blas():  # ...and whoever needs it first waits for that one scan
        pass
    for c in callers:
        c.join()
    assert made == [1] and threads._controller is not None
