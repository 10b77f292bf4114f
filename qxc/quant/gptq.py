"""GPTQ: rounding that compensates each weight row's error in the rows not yet quantized (Frantar et al., 2022).

For ``y = x @ W`` with ``W`` of shape (K, N), the output error of a reconstruction ``Wq`` on inputs ``X`` is
``tr((W - Wq)^T H (W - Wq))`` with ``H = X^T X``: round-to-nearest minimises it only when ``H`` is a multiple of the
identity. GPTQ quantizes the K rows in order and, after each, moves its error onto the rows still float along
``H``'s inverse, so later rows absorb what earlier ones lost. Each group's scale and zero point are chosen (by the
same min/max or clipping search as :func:`quantize_tensor`) when the loop reaches the group, from the weights as
updated by then.

``damp`` adds ``damp * mean(diag(H))`` to ``H``'s diagonal. With fewer sample rows than inputs (512 rows for
K = 2048), ``X^T X`` is singular and GPTQ's usual 1 % fits the samples, not the model: on the 18-layer FFN with 512
calibration rows (held-out rows measured), 1 % lost 1.6 dB against round-to-nearest, 100 % gained 1.3 dB; with
2,048 rows 10 % gained 1.5 dB. Infinite damping is plain rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.linalg import lapack

from qxc.quant.numerics import (
    Granularity,
    QType,
    QuantizedTensor,
    _db,
    _group_mse,
    _group_rtn,
    _half_fits,
    check_finite,
    qtype,
)

LAZY_ROWS = 32  # rows quantized between two matrix updates of the remaining rows (the paper's lazy batches)
COLUMN_ELEMS = 1 << 22  # weights GPTQ updates at a time (16 MB): a 4,096 x 50,000 lm_head goes 1,024 columns at a time


def auto_damp(k: int, rows: int) -> float:
    """Damping for a Gram of ``rows`` samples of ``k`` inputs: K / rows, between 0.01 and 1. Measured (held-out
    rows): the FFN's 2,048-wide inputs with 512 rows want ~1; digits' 64 inputs with 1,347 rows ~0.05-0.1 (39 dB
    against 30 for round-to-nearest)."""
    return float(min(1.0, max(0.01, k / max(rows, 1))))


def inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper-triangular ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``, from one Cholesky factorisation
    and one triangular inverse (of the row- and column-reversed matrix) instead of an inverse and a second
    factorisation. Only ``H``'s upper triangle is read. A zero ``H`` (inputs always zero) gives the identity: plain
    rounding."""
    k = hessian.shape[0]
    mean = float(np.trace(hessian)) / k
    rev = np.array(hessian[::-1, ::-1], dtype=np.float32, order="F")  # a copy, factored in place
    rev[np.diag_indices(k)] += damp * mean if mean > 0 else 1.0
    low, info = lapack.spotrf(rev, lower=1, clean=1, overwrite_a=1)
    if info == 0:
        low, info = lapack.strtri(low, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the damped Gram of its inputs is not positive definite (LAPACK info {info}); "
                                    "raise damp")
    return low[::-1, ::-1]  # a view of the factor (negative strides): no second K x K copy


def gptq_quantize(w: np.ndarray, hessian: np.ndarray | None, qt: QType | str, *, symmetric: bool,
                  granularity: Granularity, method: str = "mse", damp: float = 1.0, name: str = "tensor",
                  keep_dequantized: bool = True, scale_dtype: str = "float32",
                  factor: np.ndarray | None = None, segment: int | None = None) -> QuantizedTensor:
    """Quantize the (K, N) weight of ``x @ w`` given ``hessian = X^T X`` (K, K) of its inputs, or any positive
    multiple of it (only its upper triangle is read), or ``factor = inverse_cholesky(hessian, damp)`` instead (the
    caller may then let the Gram go before the loop).

    ``granularity`` is in ``w``'s layout: blocks along axis 0 (K), one group per column (axis 1), or per tensor.
    ``segment``: K is made of runs of this many rows (a Conv's input channels at each kernel position, see
    :func:`conv_rows`), and blocks restart at each run, a partial block ending it; scales then have one row per
    (run, block).
    Codes, scales and zero points come in the layout :func:`quantize_tensor` gives for that granularity (with
    ``hessian`` a multiple of the identity, they are its very values).
    """
    qt = qtype(qt)
    w = np.asarray(w, np.float32)
    gram = factor if factor is not None else hessian
    if w.ndim != 2 or gram is None or gram.shape != (w.shape[0], w.shape[0]):
        k = w.shape[0] if w.ndim else 0
        raise ValueError(f"'{name}': GPTQ needs a (K, N) weight and its inputs' (K, K) Gram: a {w.shape} weight "
                         f"wants ({k}, {k}), got {None if gram is None else gram.shape}")
    check_finite(w, name)
    k, n = w.shape
    kernel = _group_mse if method == "mse" else _group_rtn
    block = granularity.block if granularity.axis is not None and granularity.block is not None else None
    if granularity.axis is not None and granularity.axis % 2 != (0 if block else 1):
        raise ValueError(f"'{name}': GPTQ groups are blocks along K (axis 0) or whole columns (axis 1), got "
                         f"{granularity}")
    seg = segment or k
    if k % seg:
        raise ValueError(f"'{name}': K = {k} is not a whole number of segments of {seg}")
    per_seg = -(-seg // block) if block else 1
    nb = k // seg * per_seg if block else 1
    if block:  # every group's range, for the float16 check
        starts = np.array([r for r in range(k) if r % seg % block == 0])
        lo, hi = np.minimum.reduceat(w, starts, axis=0), np.maximum.reduceat(w, starts, axis=0)
    else:
        lo, hi = (w.min(axis=0), w.max(axis=0)) if granularity.axis is not None else (w.min(), w.max())
    half = scale_dtype == "float16" and _half_fits(np.ravel(lo), np.ravel(hi), qt, symmetric)
    u = factor if factor is not None else inverse_cholesky(hessian, damp)
    native = qt.storage if qt.bits >= 8 else np.dtype(np.int8 if qt.signed else np.uint8)
    codes = np.empty((k, n), native)
    scales = np.empty((nb, n), np.float32)
    zeros = np.empty((nb, n), np.float32)
    recon = np.empty((k, n), np.float32) if keep_dequantized else None
    whole = None
    if granularity.axis is None:  # one scale for the whole tensor, from the weight as given
        flat = w.reshape(1, -1)
        whole = kernel(flat, qt, symmetric, flat.min(axis=1), flat.max(axis=1), half=half)[1:]
    group_of_row = np.arange(k) // seg * per_seg + np.arange(k) % seg // block if block else np.zeros(k, int)
    noise = 0.0
    step = max(1, COLUMN_ELEMS // k)  # columns are independent given H: bounded temporaries, whatever N is
    for c in range(0, n, step):
        cols = slice(c, min(n, c + step))
        q, scales[:, cols], zeros[:, cols] = _columns(w[:, cols], u, qt, symmetric, kernel, half, block, seg, per_seg,
                                                      whole)
        codes[:, cols] = q
        q -= zeros[group_of_row, cols]
        q *= scales[group_of_row, cols]  # q now holds the reconstruction
        if recon is not None:
            recon[:, cols] = q
        q -= w[:, cols]
        noise += float(np.einsum("ij,ij->", q, q, dtype=np.float64))
    sqnr = _db(float(np.dot(w.reshape(-1), w.reshape(-1))), noise)
    if granularity.axis is None:
        scale, zp = scales[0, :1].reshape(()), zeros[0, :1].reshape(())
    elif block is None:
        scale, zp = scales[0], zeros[0]
    else:
        scale, zp = scales, zeros
    return QuantizedTensor(codes=codes, scale=np.array(scale, np.float32),  # 0-d stays 0-d
                           zero_points=np.array(zp).astype(native), qtype=qt, granularity=granularity,
                           sqnr=sqnr, dequantized=recon, scale_dtype="float16" if half else "float32")


def _columns(w: np.ndarray, u: np.ndarray, qt: QType, symmetric: bool, kernel, half: bool, block: int | None,
             seg: int, per_seg: int, whole: tuple | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of some columns of a (K, N) weight: codes (float32), and the scales and zero points of every group
    (one row per group; a single row without blocks). ``whole``: the per-tensor (scale, zero point)."""
    k, n = w.shape

    def params(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if whole is not None:
            return np.repeat(whole[0], n), np.repeat(whole[1], n)
        m = np.ascontiguousarray(rows.T)  # (N, rows): a group per column
        _, s, z = kernel(m, qt, symmetric, m.min(axis=1), m.max(axis=1), half=half)
        return s, z

    nb = k // seg * per_seg if block else 1
    codes = np.empty((k, n), np.float32)
    scales = np.empty((nb, n), np.float32)
    zeros = np.empty((nb, n), np.float32)
    rest = np.array(w, np.float32)  # a copy, updated as rows are quantized
    s = z = None
    if block is None:
        s, z = params(rest)
        scales[0], zeros[0] = s, z
    for a in range(0, k, LAZY_ROWS):
        b = min(a + LAZY_ROWS, k)
        part = rest[a:b]  # a view: updated in place
        errs = np.empty_like(part)
        ua = u[a:b, a:b]
        for i in range(b - a):
            row = a + i
            if block is not None and row % seg % block == 0:
                end = min(row + block, row - row % seg + seg)
                group = row // seg * per_seg + row % seg // block
                s, z = params(rest[row:end])  # up to date: every earlier error applied
                scales[group], zeros[group] = s, z
            q = np.rint(part[i] / s)
            q += z
            np.clip(q, qt.qmin, qt.qmax, out=q)
            codes[row] = q
            err = (part[i] - (q - z) * s) / ua[i, i]
            part[i + 1 :] -= ua[i, i + 1 :, None] * err
            errs[i] = err
        if b < k:
            rest[b:] -= u[a:b, b:].T @ errs
    return codes, scales, zeros


def transposed_groups(g: Granularity) -> Granularity:
    """A 2-D weight's groups once it is transposed: axis 0 and 1 swap."""
    return Granularity(None if g.axis is None else 1 - g.axis % 2, g.block)


def transposed(qt: QuantizedTensor) -> QuantizedTensor:
    """The same quantization of a 2-D weight stored transposed ((N, K) instead of (K, N))."""
    return QuantizedTensor(codes=np.ascontiguousarray(qt.codes.T), scale=np.array(qt.scale.T),  # 0-d stays 0-d
                           zero_points=np.array(qt.zero_points.T), qtype=qt.qtype,
                           granularity=transposed_groups(qt.granularity), sqnr=qt.sqnr, dequantized=None if qt.dequantized is None else
                           np.ascontiguousarray(qt.dequantized.T), scale_dtype=qt.scale_dtype)


# ------------------------------------------------------------------------------------------------ Conv weights
# A Conv is a MatMul of its input's patches: row p * C + c of the (K, M) view is input channel c at kernel position p
# (C order), so that the blocks along the input channels of one kernel position are runs of consecutive rows.


def conv_kn(w: np.ndarray) -> np.ndarray:
    """A Conv weight (M, C, *kernel) as the (K = P * C, M) matrix the input's patches multiply."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(w, np.float32), (0, 1), (-1, -2)).reshape(-1, w.shape[0]))


def conv_from_kn(qt: QuantizedTensor, shape: tuple[int, ...], granularity: Granularity) -> QuantizedTensor:
    """The quantization of :func:`conv_kn`'s matrix in the Conv weight's own layout and ``granularity`` (per output
    channel: axis 0; blocks along the input channels: axis 1; or per tensor)."""
    m, c, *kernel = shape

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(a.reshape(*kernel, c, m), (-1, -2), (0, 1)))

    scale, zp = qt.scale, qt.zero_points
    if granularity.axis is not None and granularity.block is not None:  # (positions x blocks, M) -> (M, blocks, *k)
        scale, zp = (np.ascontiguousarray(np.moveaxis(a.reshape(*kernel, -1, m), (-1, -2), (0, 1)))
                     for a in (scale, zp))
    return QuantizedTensor(codes=back(qt.codes), scale=scale, zero_points=zp, qtype=qt.qtype, granularity=granularity,
                           sqnr=qt.sqnr, dequantized=None if qt.dequantized is None else back(qt.dequantized),
                           scale_dtype=qt.scale_dtype)


# A ConvTranspose is a Conv, stride 1, over its input with stride - 1 zeros between samples, padded by
# d * (k - 1) - pads (plus output_padding at the end), with the kernel flipped and its channel axes swapped.


def conv_transpose_as_conv(w: np.ndarray) -> np.ndarray:
    """A ConvTranspose weight (C, M, *kernel) as the weight (M, C, *kernel flipped) of the Conv that computes it on
    :func:`conv_transpose_rows`' input."""
    w = np.asarray(w, np.float32)
    return np.ascontiguousarray(np.flip(np.swapaxes(w, 0, 1), axis=tuple(range(2, w.ndim))))


def conv_transpose_from_conv(qt: QuantizedTensor, granularity: Granularity) -> QuantizedTensor:
    """The quantization of :func:`conv_transpose_as_conv`'s weight (per output channel: axis 0; blocks along the
    input channels: axis 1; or per tensor) in the ConvTranspose weight's own layout and ``granularity`` (output
    channels on axis 1, blocks along the input channels on axis 0)."""

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(np.flip(a, axis=tuple(range(2, a.ndim))), 0, 1))

    blocked = granularity.axis is not None and granularity.block is not None
    scale, zp = (back(qt.scale), back(qt.zero_points)) if blocked else (qt.scale, qt.zero_points)
    return QuantizedTensor(codes=back(qt.codes), scale=scale, zero_points=zp, qtype=qt.qtype, granularity=granularity,
                           sqnr=qt.sqnr, dequantized=None if qt.dequantized is None else back(qt.dequantized),
                           scale_dtype=qt.scale_dtype)


def conv_transpose_rows(x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int],
                        dilations: Sequence[int], output_padding: Sequence[int], max_bytes: int = 16 << 20
                        ) -> Iterator[np.ndarray]:
    """The patches a ConvTranspose's equivalent Conv multiplies by ``conv_kn(conv_transpose_as_conv(w))``: ``x``
    (N, C, *spatial) with stride - 1 zeros between its samples, padded by d * (k - 1) - pads at the start and that
    plus output_padding at the end (cropped where negative), in rows of P * C values."""
    r = len(kernel)
    x = np.asarray(x, np.float32)
    up = np.zeros((*x.shape[:2], *[(size - 1) * s + 1 for size, s in zip(x.shape[2:], strides)]), np.float32)
    up[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = x
    begins = [d * (k - 1) - pads[i] for i, (k, d) in enumerate(zip(kernel, dilations))]
    ends = [d * (k - 1) - pads[i + r] + output_padding[i] for i, (k, d) in enumerate(zip(kernel, dilations))]
    up = up[(slice(None), slice(None), *(slice(max(0, -b), up.shape[2 + i] - max(0, -e))
                                         for i, (b, e) in enumerate(zip(begins, ends))))]
    yield from conv_rows(up, kernel, [max(0, b) for b in begins] + [max(0, e) for e in ends], [1] * r, dilations,
                         max_bytes)


def reshaped(qt: QuantizedTensor, shape: tuple[int, ...], granularity: Granularity) -> QuantizedTensor:
    """The quantization of ``w.reshape(K, N)`` (K: ``w``'s leading axes, blocks along the last of them) in ``w``'s
    own ``shape`` and ``granularity``: blocks along that axis, the one kept axis as channels, or per tensor."""
    scale, zp = qt.scale, qt.zero_points
    if granularity.axis is not None and granularity.block is not None:
        pshape = granularity.param_shape(shape)
        scale, zp = scale.reshape(pshape), zp.reshape(pshape)
    return QuantizedTensor(codes=qt.codes.reshape(shape), scale=scale, zero_points=zp, qtype=qt.qtype,
                           granularity=granularity, sqnr=qt.sqnr, scale_dtype=qt.scale_dtype,
                           dequantized=None if qt.dequantized is None else qt.dequantized.reshape(shape))


def stack_output_channels(pieces: list[QuantizedTensor], w: np.ndarray) -> QuantizedTensor:
    """The quantizations of consecutive output-channel slices of ``w`` (a grouped Conv's groups, per channel or per
    block) as one, in ``w``'s layout."""
    first = pieces[0]
    noise = sum(_noise(p, part) for p, part in zip(pieces, np.split(w, len(pieces))))
    cat = [np.concatenate([getattr(p, f) for p in pieces]) for f in ("codes", "scale", "zero_points")]
    return QuantizedTensor(codes=cat[0], scale=cat[1], zero_points=cat[2], qtype=first.qtype,
                           granularity=first.granularity,
                           sqnr=_db(float(np.sum(np.square(w, dtype=np.float64))), noise),
                           dequantized=None if first.dequantized is None else
                           np.concatenate([p.dequantized for p in pieces]),
                           scale_dtype="float16" if all(p.scale_dtype == "float16" for p in pieces) else "float32")


def stack_directions(pieces: list[QuantizedTensor], w: np.ndarray, granularity: Granularity) -> QuantizedTensor:
    """The quantizations of an LSTM's or a GRU's (directions, gates * hidden, K) weight, one (gates * hidden, K)
    piece per direction, as one in ``w``'s layout and ``granularity`` (blocks along K, or with one direction a
    scale per row or per tensor)."""
    one = pieces[0] if len(pieces) == 1 else stack_output_channels(pieces, w.reshape(-1, w.shape[-1]))
    shape = granularity.param_shape(w.shape)
    return dataclasses.replace(one, codes=one.codes.reshape(w.shape), scale=one.scale.reshape(shape),
                               zero_points=one.zero_points.reshape(shape), granularity=granularity,
                               dequantized=None if one.dequantized is None else one.dequantized.reshape(w.shape))


def _noise(qt: QuantizedTensor, w: np.ndarray) -> float:
    """The squared reconstruction error behind ``qt.sqnr`` (dB) of ``w``."""
    signal = float(np.sum(np.square(w, dtype=np.float64)))
    return 0.0 if qt.sqnr == float("inf") else signal / 10 ** (qt.sqnr / 10)


def conv_rows(x: np.ndarray, kernel: Sequence[int], pads: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], max_bytes: int = 16 << 20) -> Iterator[np.ndarray]:
    """The patches a Conv multiplies by :func:`conv_kn`'s matrix (of a grouped one's group: x holds that group's
    channels): rows of P * C values, in blocks of about ``max_bytes``. ``x`` is (N, C, *spatial); ``pads`` are
    ONNX's (begins, then ends)."""
    r = len(kernel)
    x = np.pad(np.asarray(x, np.float32), [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + r)))
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
                       *(slice(None, None, d) for d in dilations))]  # (N, C, *out, *kernel)
    order = (0, *range(2, 2 + 2 * r), 1)  # (N, *out, *kernel, C)
    width = int(np.prod(kernel)) * x.shape[1]
    per_sample = int(np.prod(windows.shape[2 : 2 + r])) * width * 4
    step = max(1, max_bytes // max(1, per_sample))
    for a in range(0, x.shape[0], step):
        yield windows[a : a + step].transpose(order).reshape(-1, width)


def conv_pads(node_pads: Sequence[int], auto_pad: str, spatial: Sequence[int], kernel: Sequence[int],
              strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX Conv's pads (begins, then ends) for its ``auto_pad`` on an input of the given spatial size."""
    r = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return list(node_pads) if node_pads else [0] * (2 * r)
    if auto_pad == "VALID":
        return [0] * (2 * r)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (-(-size // s) - 1) * s + d * (k - 1) + 1 - size)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends
