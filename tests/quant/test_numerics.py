"""Numerics against onnxruntime: codes and reconstructions bit-exact with QuantizeLinear/DequantizeLinear (opset 21)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp

from qxc.quant import Granularity, NonFiniteError, compute_params, qtype, quantize_tensor, sqnr_db
from qxc.quant.numerics import pack_uint4

ONNX_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int16": TensorProto.INT16,
              "uint16": TensorProto.UINT16, "int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


def _ort_qdq(x, qt, scale, zp, g: Granularity):
    attrs = {}
    if g.axis is not None:
        attrs["axis"] = g.axis
    if g.block is not None:
        attrs["block_size"] = g.block
    zp_t = numpy_helper.from_array(zp, "zp") if qt not in ("int4", "uint4") else helper.make_tensor(
        "zp", ONNX_TYPES[qt], zp.shape, zp.astype(np.int8 if qt == "int4" else np.uint8).reshape(-1).tolist())
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
         helper.make_node("Cast", ["q"], ["qc"], to=TensorProto.INT32),  # numpy has no int4: read codes as int32
         helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("qc", TensorProto.INT32, x.shape),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale, "scale"), zp_t])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@st.composite
def cases(draw):
    qt = draw(st.sampled_from(list(ONNX_TYPES)))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["tensor", "axis", "block"] if ndim > 1 else ["tensor", "axis"]))
    axis = None if kind == "tensor" else draw(st.integers(0, ndim - 1))
    block = draw(st.integers(1, 5)) if kind == "block" else None
    symmetric = draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 37.0]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * scale).astype(np.float32)
    if draw(st.booleans()):  # exact ties: multiples of half a quantization step
        x = (np.round(x * 4) / 4).astype(np.float32)
    if draw(st.integers(0, 9)) == 0:
        x[...] = 0  # all-zero tensor: scale must be valid and non-zero
    return x, qt, Granularity(axis, block), symmetric


@settings(max_examples=150, deadline=None)
@given(cases())
def test_codes_and_reconstruction_are_bit_exact_with_onnxruntime(case):
    x, qt, g, symmetric = case
    res = quantize_tensor(x, qt, symmetric=symmetric, granularity=g)
    if qt == "int4" and symmetric:  # each group's signed extreme over -8: negative where the extreme is
        assert np.all(res.scale != 0)
    else:
        assert np.all(res.scale > 0)
    q_ort, y_ort = _ort_qdq(x, qt, res.scale, res.zero_point, g)
    np.testing.assert_array_equal(np.asarray(q_ort).astype(np.int64), res.q.astype(np.int64))
    np.testing.assert_array_equal(y_ort, res.dequantized)


@settings(max_examples=100, deadline=None)
@given(st.floats(-1e4, 0, width=32), st.floats(0, 1e4, width=32), st.sampled_from(["int8", "uint8", "int16"]),
       st.booleans())
def test_params_equal_onnxruntime_compute_scale_zp(rmin, rmax, qt, symmetric):
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(ONNX_TYPES[qt], symmetric=symmetric)
    zp_ort, s_ort = compute_scale_zp(np.array(rmin, np.float32), np.array(rmax, np.float32), qmin, qmax, symmetric)
    s, zp = compute_params(np.array([rmin]), np.array([rmax]), qt, symmetric)
    assert s[0] == np.float32(s_ort) and zp[0] == int(zp_ort)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_blocks_equal_onnxruntime_blockwise_quantizer(symmetric):
    """Round-to-nearest int4 blocks of 32 (MatMulNBits' layout) against onnxruntime's own C++ quantizer, which its
    MatMulNBits tool calls: the same scales and zero points, the same codes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(1)
    k, n, bs = 96, 40, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[5, 3] = 9.0  # a positive extreme (symmetric: a negative scale) and a negative one
    w[40, 7] = -9.0
    packed = np.zeros((n, k // bs, bs // 2), np.uint8)
    scales = np.zeros((n, k // bs), np.float32)
    zp = np.zeros((n, (k // bs + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, bs, n, k, symmetric)
    ort_codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k)
    res = quantize_tensor(w, "int4" if symmetric else "uint4", symmetric=symmetric,
                          granularity=Granularity(axis=0, block=bs))
    # asymmetric: onnxruntime's C++ divides the range in float32, its Python compute_scale_zp (ours) in float64
    np.testing.assert_allclose(res.scale.T, scales, rtol=0 if symmetric else 2e-7)
    offset = 8 if symmetric else 0
    np.testing.assert_array_equal(res.codes.T.astype(np.int64) + offset, ort_codes)
    if not symmetric:
        ort_zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, : k // bs]
        np.testing.assert_array_equal(res.zero_points.T.astype(np.int64), ort_zp)
    else:
        assert res.scale[0, 3] < 0 and res.codes[5, 3] == -8 and res.dequantized[5, 3] == 9.0


def test_mse_is_never_worse_than_rtn_and_better_on_outliers():
    rng = np.random.default_rng(0)
    w = rng.standard_t(df=3, size=(64, 256)).astype(np.float32)  # heavy tails
    g = Granularity(axis=0, block=32)
    rtn = quantize_tensor(w, "int4", symmetric=False, granularity=g)
    mse = quantize_tensor(w, "int4", symmetric=False, granularity=g, method="mse")
    rtn_err = ((w - rtn.dequantized) ** 2).reshape(-1)
    mse_err = ((w - mse.dequantized) ** 2).reshape(-1)
    # per block never worse
    bw = lambda e: e.reshape(2, 32, 256).sum(axis=1)  # noqa: E731
    assert np.all(bw(mse_err.reshape(64, 256)) <= bw(rtn_err.reshape(64, 256)) + 1e-9)
    assert mse.sqnr_db(w) > rtn.sqnr_db(w) + 0.15  # blocks of 32 leave little to clip; per channel leaves more
    rtn_c = quantize_tensor(w, "int4", symmetric=True, granularity=Granularity(axis=1))
    mse_c = quantize_tensor(w, "int4", symmetric=True, granularity=Granularity(axis=1), method="mse")
    assert mse_c.sqnr_db(w) > rtn_c.sqnr_db(w) + 0.3  # heavy-tailed channels of 64: clipping the extreme pays



@pytest.mark.parametrize("qt,symmetric,half", [("uint4", False, True), ("int4", True, False), ("int8", True, False)])
def test_the_clip_search_keeps_each_rows_best_error_without_its_codes(qt, symmetric, half):
    """The search measures a candidate's error without keeping its codes: the error it holds for each row is the
    very float32 error of the codes made at the end from the winning scale and zero point."""
    from qxc.quant.numerics import _ClipSearch, _codes

    rng = np.random.default_rng(1)
    m = rng.standard_t(df=4, size=(500, 32)).astype(np.float32)
    q_t = qtype(qt)
    best = _ClipSearch(m, q_t, symmetric, m.min(axis=1), m.max(axis=1), half)
    rtn_err = best.err.copy()
    for f in (0.6, 0.8, 0.9):
        best.consider(np.float32(f))
    best.refine_scale()
    d = m - (_codes(m, best.s, best.z, q_t) - best.z[:, None]) * best.s[:, None]
    np.testing.assert_array_equal(best.err, np.einsum("ij,ij->i", d, d))
    assert np.all(best.err <= rtn_err) and np.any(best.err < rtn_err)

def test_nan_weights_are_named():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="tensor 'fc.weight' holds 1 NaN/Inf"):
        quantize_tensor(w, "int8", name="fc.weight")


def test_int4_storage_and_packing():
    res = quantize_tensor(np.linspace(-1, 1, 10, dtype=np.float32), "int4", symmetric=True)
    assert res.q.dtype == ml_dtypes.int4 and res.q.astype(int).min() >= -8
    packed = pack_uint4(np.array([1, 2, 15], np.uint8))
    assert packed.tolist() == [0x21, 0x0F]


def test_sqnr_of_identical_tensors_is_infinite():
    x = np.arange(4, dtype=np.float32)
    assert sqnr_db(x, x) == float("inf")
    assert 20 < sqnr_db(x, x + 0.01) < 60


def test_unknown_type_is_named():
    with pytest.raises(ValueError, match="unknown integer type 'int3'"):
        qtype("int3")


def test_onnx_proto_is_not_needed_for_numerics():
    assert onnx  # the numerics module itself imports no onnx (ruff banned-api), tests may


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_float16_scales_are_stored_exactly_and_cost_almost_nothing(method):
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.05, size=(128, 96)).astype(np.float32)
    g = Granularity(axis=0, block=32)
    full = quantize_tensor(w, "uint4", symmetric=False, granularity=g, method=method)
    half = quantize_tensor(w, "uint4", symmetric=False, granularity=g, method=method, scale_dtype="float16")
    assert half.scale_dtype == "float16" and full.scale_dtype == "float32"
    np.testing.assert_array_equal(half.scale.astype(np.float16).astype(np.float32), half.scale)
    assert abs(half.sqnr - full.sqnr) < 0.05
    # the codes are the ones onnxruntime's QuantizeLinear gives for the stored (float16-exact) scale
    q_ort, y_ort = _ort_qdq(w, "uint4", half.scale, half.zero_point, g)
    np.testing.assert_array_equal(np.asarray(q_ort).astype(np.int64), half.q.astype(np.int64))
    np.testing.assert_array_equal(y_ort, half.dequantized)


@pytest.mark.parametrize("magnitude, stored", [(1e-7, "float32"), (1e7, "float32"), (5e-3, "float16")])
def test_float16_scales_fall_back_to_float32_outside_half_range(magnitude, stored):
    # 5e-3: the spread of a transformer's down-projection; its scales (~1e-3) sit well inside float16
    w = (np.random.default_rng(5).normal(size=(64, 8)) * magnitude).astype(np.float32)
    res = quantize_tensor(w, "int4", symmetric=True, granularity=Granularity(axis=0, block=32), scale_dtype="float16")
    assert res.scale_dtype == stored and np.all(np.isfinite(res.scale)) and np.all(res.scale != 0)
    assert res.sqnr > 15
