"""GPTQ numerics: plain rounding where inputs are uncorrelated, lower output error where they are, the factor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qxc.quant import Granularity, NonFiniteError, quantize_tensor
from qxc.quant.gptq import (
    auto_damp,
    conv_from_kn,
    conv_kn,
    conv_pads,
    conv_rows,
    conv_transpose_as_conv,
    conv_transpose_from_conv,
    conv_transpose_rows,
    gptq_quantize,
    inverse_cholesky,
    reshaped,
    stack_directions,
    transposed,
    transposed_groups,
)


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    """Rows driven by a few latent factors plus a little noise, with a mean: inputs a MatMul sees after a ReLU."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(100).normal(size=(8, k))
    return (np.maximum(rng.normal(size=(n, 8)) @ mix, 0) + 0.1 * rng.normal(size=(n, k))).astype(np.float32)


@pytest.mark.parametrize("qt,symmetric", [("uint4", False), ("int4", True), ("int8", True), ("uint8", False)])
@pytest.mark.parametrize("granularity", [Granularity(axis=0, block=16), Granularity(axis=1), Granularity()])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_uncorrelated_inputs_give_exactly_plain_rounding(qt, symmetric, granularity, method):
    """With H a multiple of the identity no error moves between rows: codes, scales and zero points are those of
    quantize_tensor for the same granularity and method."""
    w = np.random.default_rng(1).standard_t(4, size=(48, 24)).astype(np.float32)
    got = gptq_quantize(w, 3.0 * np.eye(48), qt, symmetric=symmetric, granularity=granularity, method=method)
    want = quantize_tensor(w, qt, symmetric=symmetric, granularity=granularity, method=method)
    np.testing.assert_array_equal(got.codes, want.codes)
    assert got.scale.shape == want.scale.shape and got.zero_points.shape == want.zero_points.shape
    np.testing.assert_array_equal(got.scale, want.scale)
    np.testing.assert_array_equal(got.zero_points, want.zero_points)
    np.testing.assert_allclose(got.dequantized, want.dequantized, rtol=0, atol=0)
    assert got.sqnr == pytest.approx(want.sqnr, abs=1e-6)


@pytest.mark.parametrize("rows", [48, 2000])  # fewer rows than inputs (damped), and plenty
def test_correlated_inputs_get_a_lower_output_error_on_rows_it_never_saw(rows):
    k, n = 64, 48
    w = np.random.default_rng(2).normal(size=(k, n)).astype(np.float32)
    x, held_out = _correlated(rows, k, seed=3), _correlated(2000, k, seed=4)
    g = Granularity(axis=0, block=32)
    hessian = x.T.astype(np.float64) @ x
    got = gptq_quantize(w, hessian, "uint4", symmetric=False, granularity=g, damp=auto_damp(k, rows))
    mse = quantize_tensor(w, "uint4", symmetric=False, granularity=g, method="mse")

    def out_err(deq):
        return float(np.sum((held_out @ (w - deq)) ** 2))

    gain_db = 10 * np.log10(out_err(mse.dequantized) / out_err(got.dequantized))
    assert gain_db > (1.0 if rows < k else 3.0)
    assert got.sqnr < mse.sqnr  # it spends weight error where the inputs do not look
    assert got.codes.min() >= 0 and got.codes.max() <= 15


def test_inverse_cholesky_reads_the_upper_triangle_only():
    x = _correlated(30, 12, seed=5).astype(np.float64)
    h = x.T @ x
    u = inverse_cholesky(np.triu(h) + np.tril(np.full_like(h, 7.0), -1), damp=0.1)  # junk below the diagonal
    assert np.allclose(u, np.triu(u))
    damped = h + 0.1 * np.trace(h) / 12 * np.eye(12)
    want = np.linalg.inv(damped)
    np.testing.assert_allclose(u.T @ u, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())
    np.testing.assert_array_equal(inverse_cholesky(np.zeros((4, 4)), 1.0), np.eye(4, dtype=np.float32))


def test_auto_damp_follows_inputs_over_rows_within_bounds():
    assert auto_damp(2048, 512) == 1.0 and auto_damp(64, 6400) == 0.01 and auto_damp(512, 2048) == 0.25
    assert auto_damp(8, 0) == 1.0


def test_transposed_is_the_same_quantization_of_the_transposed_weight():
    w = np.random.default_rng(6).normal(size=(64, 10)).astype(np.float32)
    x = _correlated(100, 64, seed=7)
    qt = gptq_quantize(w, x.T @ x, "int4", symmetric=True, granularity=Granularity(axis=0, block=32))
    t = transposed(qt)
    assert t.granularity == Granularity(axis=1, block=32) and t.scale.shape == (10, 2)
    np.testing.assert_array_equal(t.dequantized, qt.dequantized.T)
    np.testing.assert_array_equal(t.codes, qt.codes.T)
    assert transposed(t).granularity == qt.granularity


def test_bad_weights_and_shapes_are_named():
    w = np.ones((8, 4), np.float32)
    w[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="'fc.w'"):
        gptq_quantize(w, np.eye(8), "uint4", symmetric=False, granularity=Granularity(axis=1), name="fc.w")
    with pytest.raises(ValueError, match="'fc.w'.*wants \\(8, 8\\), got \\(6, 6\\)"):
        gptq_quantize(np.ones((8, 4), np.float32), np.eye(6), "uint4", symmetric=False,
                      granularity=Granularity(axis=1), name="fc.w")


@pytest.mark.parametrize("kernel,pads,strides,dilations,auto_pad", [
    ((3, 3), (1, 1, 1, 1), (1, 1), (1, 1), "NOTSET"),
    ((2, 3), (0, 1, 1, 0), (2, 1), (1, 2), "NOTSET"),
    ((3,), (), (2,), (1,), "SAME_UPPER"),
    ((3, 3), (), (2, 2), (1, 1), "SAME_LOWER"),
    ((2, 2), (), (1, 1), (1, 1), "VALID"),
])
def test_conv_patches_times_the_weight_matrix_are_onnxruntimes_conv(kernel, pads, strides, dilations, auto_pad):
    """conv_rows (padding, strides, dilations, auto_pad) and conv_kn's (P * C, M) layout, against onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    spatial = (7, 6)[: len(kernel)] if len(kernel) == 2 else (9,)
    x = rng.normal(size=(3, 4, *spatial)).astype(np.float32)
    w = rng.normal(size=(5, 4, *kernel)).astype(np.float32)
    attrs = {"strides": list(strides), "dilations": list(dilations)}
    attrs.update({"pads": list(pads)} if auto_pad == "NOTSET" else {"auto_pad": auto_pad})
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    p = conv_pads(pads, auto_pad, spatial, kernel, strides, dilations)
    rows = np.concatenate(list(conv_rows(x, kernel, p, strides, dilations, max_bytes=256)))  # several blocks
    np.testing.assert_allclose(rows @ conv_kn(w), np.moveaxis(y, 1, -1).reshape(-1, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,method", [(64, "mse"), (40, "rtn")])  # 40: a partial block at every position
@pytest.mark.parametrize("granularity", [Granularity(axis=1, block=32), Granularity(axis=0), Granularity()])
def test_a_conv_weight_through_its_patch_matrix_comes_back_in_its_own_layout(channels, method, granularity):
    """With uncorrelated patches, GPTQ of conv_kn's matrix, blocks restarting at each kernel position, is
    quantize_tensor of the Conv weight itself: same codes, scales and zero points in ONNX's layout (mse's
    least-squares scale of a whole channel sums in the patch order: within 1e-6)."""
    w = np.random.default_rng(9).standard_t(5, size=(6, channels, 3, 3)).astype(np.float32)
    block = granularity.block is not None
    kn = (Granularity(axis=0, block=32) if block else Granularity(axis=1) if granularity.axis is not None
          else Granularity())
    got = conv_from_kn(gptq_quantize(conv_kn(w), np.eye(9 * channels), "uint4", symmetric=False, granularity=kn,
                                     method=method, segment=channels if block else None), w.shape, granularity)
    want = quantize_tensor(w, "uint4", symmetric=False, granularity=granularity, method=method)
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.zero_points, want.zero_points)
    tol = 1e-6 if method == "mse" and not block else 0
    np.testing.assert_allclose(got.scale, want.scale, rtol=tol, atol=0)
    np.testing.assert_allclose(got.dequantized, want.dequantized, rtol=tol, atol=tol)
    assert got.granularity == granularity and got.scale.shape == want.scale.shape


@pytest.mark.parametrize("kernel,pads,strides,dilations,output_padding", [
    ((4, 4), (1, 1, 1, 1), (2, 2), (1, 1), (0, 0)),  # PyTorch's ConvTranspose2d(k=4, s=2, p=1): a U-Net's upsampler
    ((2, 2), (0, 0, 0, 0), (2, 2), (1, 1), (0, 0)),
    ((3, 3), (1, 1, 1, 1), (2, 2), (1, 1), (1, 1)),
    ((3,), (2, 4), (3,), (2,), (1,)),
    ((3, 2), (0, 1, 2, 0), (1, 2), (2, 1), (0, 1)),
    ((5,), (6, 5), (2,), (1,), (0,)),  # pads beyond d * (k - 1): the zero-filled input is cropped
])
def test_conv_transpose_patches_times_the_conv_weight_are_onnxruntimes_conv_transpose(kernel, pads, strides,
                                                                                     dilations, output_padding):
    """A ConvTranspose as a Conv over its input with zeros between samples, against onnxruntime's ConvTranspose."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 3, *([7] * len(kernel)))).astype(np.float32)
    w = rng.normal(size=(3, 4, *kernel)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations), output_padding=list(output_padding))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rows = np.concatenate(list(conv_transpose_rows(x, kernel, pads, strides, dilations, output_padding,
                                                   max_bytes=256)))
    np.testing.assert_allclose(rows @ conv_kn(conv_transpose_as_conv(w)), np.moveaxis(y, 1, -1).reshape(-1, 4),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", [Granularity(axis=0, block=32), Granularity(axis=1), Granularity()])
def test_a_conv_transpose_weight_through_its_conv_comes_back_in_its_own_layout(granularity):
    """With uncorrelated patches, GPTQ of the equivalent Conv's matrix is quantize_tensor of the ConvTranspose
    weight (C, M, *kernel) itself: blocks along C (axis 0), channels along M (axis 1), in ONNX's layout."""
    w = np.random.default_rng(11).standard_t(5, size=(40, 6, 4, 4)).astype(np.float32)
    wc = conv_transpose_as_conv(w)
    block = granularity.block is not None
    g_conv = Granularity(axis=1, block=32) if block else Granularity(axis=0) if granularity.axis is not None else \
        Granularity()
    kn = Granularity(axis=0, block=32) if block else Granularity(axis=1) if granularity.axis is not None else \
        Granularity()
    qt = gptq_quantize(conv_kn(wc), np.eye(16 * 40), "uint4", symmetric=False, granularity=kn, method="rtn",
                       segment=40 if block else None)
    got = conv_transpose_from_conv(conv_from_kn(qt, wc.shape, g_conv), granularity)
    want = quantize_tensor(w, "uint4", symmetric=False, granularity=granularity, method="rtn")
    for field in ("codes", "scale", "zero_points", "dequantized"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.granularity == granularity


@pytest.mark.parametrize("granularity", [Granularity(axis=0, block=32), Granularity(axis=1), Granularity()])
def test_columns_in_chunks_give_the_whole_matrixs_result(monkeypatch, granularity):
    """Columns are independent given H: a wide weight goes a few columns at a time (bounded memory), same result."""
    import qxc.quant.gptq as gptq

    w = np.random.default_rng(10).normal(size=(64, 40)).astype(np.float32)
    x = _correlated(300, 64, seed=11)
    whole = gptq_quantize(w, x.T @ x, "uint4", symmetric=False, granularity=granularity)
    monkeypatch.setattr(gptq, "COLUMN_ELEMS", 64 * 7)  # 7 columns at a time, the last chunk 5
    chunked = gptq_quantize(w, x.T @ x, "uint4", symmetric=False, granularity=granularity)
    np.testing.assert_array_equal(chunked.codes, whole.codes)
    np.testing.assert_array_equal(chunked.scale, whole.scale)
    np.testing.assert_array_equal(chunked.dequantized, whole.dequantized)
    assert chunked.sqnr == pytest.approx(whole.sqnr, abs=1e-9)


@pytest.mark.parametrize("granularity", [Granularity(axis=1, block=32), Granularity()])
def test_a_weight_with_two_summed_axes_through_its_matrix_comes_back_in_its_own_layout(granularity):
    """An Einsum weight (4, 40, 16) summed over its first two axes is a 160 x 16 matrix; blocks of 32 along the
    40-long axis restart at each of the 4 (a partial block each): with uncorrelated inputs, quantize_tensor's codes."""
    w = np.random.default_rng(12).normal(size=(4, 40, 16)).astype(np.float32)
    kn = Granularity(axis=0, block=32) if granularity.axis is not None else Granularity()
    got = reshaped(gptq_quantize(w.reshape(160, 16), np.eye(160), "int4", symmetric=True, granularity=kn,
                                 method="rtn", segment=40 if granularity.axis is not None else None),
                   w.shape, granularity)
    want = quantize_tensor(w, "int4", symmetric=True, granularity=granularity, method="rtn")
    for field in ("codes", "scale", "zero_points", "dequantized"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.shape == b.shape, field
        np.testing.assert_array_equal(a, b, err_msg=field)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), c=st.integers(1, 40), kernel=st.sampled_from([(1,), (3,), (1, 1), (2, 3), (3, 3)]),
       kind=st.sampled_from(["block16", "block32", "channel", "tensor"]), qt=st.sampled_from(["uint4", "int4", "int8"]),
       seed=st.integers(0, 2**16))
def test_conv_codes_scales_and_zero_points_dequantize_to_the_reconstruction(m, c, kernel, kind, qt, seed):
    """Whatever the shape and groups, what GPTQ hands back in the Conv weight's layout is self-consistent under
    ONNX's DequantizeLinear (blocks along axis 1, a partial last one; per axis 0; per tensor), within the type."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, c, *kernel)).astype(np.float32)
    k = c * int(np.prod(kernel))
    x = rng.normal(size=(max(4, k // 2), k)) @ rng.normal(size=(k, k))  # correlated, maybe rank-deficient
    block = int(kind[5:]) if kind.startswith("block") else None
    stored = (Granularity(axis=1, block=block) if block else Granularity(axis=0) if kind == "channel"
              else Granularity())
    kn = Granularity(axis=0, block=block) if block else Granularity(axis=1) if kind == "channel" else Granularity()
    got = conv_from_kn(gptq_quantize(conv_kn(w), x.T @ x, qt, symmetric=qt != "uint4", granularity=kn, damp=0.1,
                                     segment=c if block else None), w.shape, stored)
    assert got.codes.shape == w.shape and got.scale.shape == stored.param_shape(w.shape)
    assert got.codes.min() >= got.qtype.qmin and got.codes.max() <= got.qtype.qmax
    scale, zp = got.scale.astype(np.float32), got.zero_points.astype(np.float32)
    if block:
        scale, zp = (np.repeat(a, block, axis=1)[:, :c] for a in (scale, zp))
    elif kind == "channel":
        scale, zp = (a.reshape(-1, *[1] * (w.ndim - 1)) for a in (scale, zp))
    np.testing.assert_array_equal((got.codes.astype(np.float32) - zp) * scale, got.dequantized)


@pytest.mark.parametrize("directions,granularity", [(2, Granularity(axis=2, block=16)), (1, Granularity(axis=2, block=16)),
                                                    (1, Granularity(axis=1)), (1, Granularity())])
def test_an_lstm_weight_per_direction_comes_back_in_its_own_layout(directions, granularity):
    """An LSTM's (directions, 4 * hidden, K) weight, each direction GPTQ'd as the (K, 4 * hidden) matrix x_t
    multiplies: with uncorrelated inputs it is quantize_tensor of the whole weight, in ONNX's layout (blocks along
    K per direction and gate row, or with one direction a scale per row or per tensor)."""
    w = np.random.default_rng(21).standard_t(5, size=(directions, 24, 40)).astype(np.float32)
    g_dir = Granularity() if granularity.axis is None else Granularity(granularity.axis - 1, granularity.block)
    pieces = [transposed(gptq_quantize(w[d].T, np.eye(40), "uint4", symmetric=False, method="rtn",
                                       granularity=transposed_groups(g_dir))) for d in range(directions)]
    got = stack_directions(pieces, w, granularity)
    want = quantize_tensor(w, "uint4", symmetric=False, granularity=granularity, method="rtn")
    for field in ("codes", "scale", "zero_points", "dequantized"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.granularity == granularity and got.sqnr == pytest.approx(want.sqnr, abs=1e-4)
