"""Input Gram matrices ``X^T X`` of chosen tensors over sample data, for GPTQ (upper triangles: all it reads).

One instrumented onnxruntime session serves every weight. A tensor's rows are kept as they come while there are
fewer than half its width K (512 rows of a 2,048-wide input: 4 MB, where its Gram takes 16 MB), and folded into
the Gram once there are more; a tensor's storage is dropped once every weight it feeds has had its matrix. Tensors
are collected in groups whose storage fits ``GRAM_BYTES``, one pass over the data per group fetching only that
group's tensors, so memory does not grow with the number of layers.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from scipy.linalg import blas

from qxc import ir as qir
from qxc.calibrate.collect import TapRunner, _schedule
from qxc.data import Dataset
from qxc.errors import UsageError
from qxc.quant.gptq import conv_pads, conv_rows, conv_transpose_rows
from qxc.runtime.progress import progress

GRAM_BYTES = 128 << 20


@dataclass(frozen=True)
class Source:
    """Where a weight's input rows come from: ``tensor`` read as rows of its last ``axes`` axes (MatMul, Gemm: one;
    an Einsum summing several), or as its columns (``columns``: the x of a MatMul ``W @ x``), or the patches a Conv
    takes of it, ``conv = (kernel, pads, auto_pad, strides, dilations)``, of its input channels ``channels =
    (first, stop)`` only when given (one group of a grouped Conv); with ``output_padding``, the patches of the Conv
    that computes a ConvTranspose with these attributes (:func:`~qxc.quant.gptq.conv_transpose_rows`); with
    ``select = (axis, index)``, of the tensor's slice at ``index`` along ``axis`` (one direction of an LSTM's Y)."""

    tensor: str
    conv: tuple | None = None
    channels: tuple[int, int] | None = None
    axes: int = 1
    columns: bool = False
    output_padding: tuple[int, ...] | None = None
    select: tuple[int, int] | None = None

    def rows(self, arr: np.ndarray, k: int) -> Iterator[np.ndarray]:
        arr = np.asarray(arr, np.float32)
        if self.select is not None and arr.ndim > self.select[0]:
            arr = np.take(arr, self.select[1], axis=self.select[0])
        if self.columns:  # W @ x: the rows W multiplies are x's columns
            arr = np.swapaxes(arr, -1, -2) if arr.ndim >= 2 else arr
        if self.conv is None:
            width = int(np.prod(arr.shape[-self.axes :])) if arr.ndim >= self.axes else -1
        else:
            kernel, pads, auto_pad, strides, dilations = self.conv
            if arr.ndim > 2 + len(kernel):  # a Loop body's tensor, one slice per iteration: more samples
                arr = arr.reshape(-1, *arr.shape[-1 - len(kernel) :])
            if arr.ndim == 2 + len(kernel) and self.channels is not None and self.channels[1] <= arr.shape[1]:
                arr = arr[:, self.channels[0] : self.channels[1]]
            width = arr.shape[1] * int(np.prod(kernel)) if arr.ndim == 2 + len(kernel) else -1
        if width != k:
            raise UsageError(f"tensor '{self.tensor}' has shape {list(arr.shape)} on the sample data, which its "
                             f"weight cannot take ({k} inputs); check --data against the model's inputs")
        if self.conv is None:
            yield arr.reshape(-1, k)
        elif self.output_padding is not None:
            yield from conv_transpose_rows(arr, kernel, pads, strides, dilations, self.output_padding)
        else:
            yield from conv_rows(arr, kernel, conv_pads(pads, auto_pad, arr.shape[2:], kernel, strides, dilations),
                                 strides, dilations)


class _Rows:
    """One tensor's rows while they take less than half its Gram (fewer than K / 2 of them), then the Gram's upper
    triangle: at most K x K floats, 1.5x that while folding."""

    def __init__(self, k: int):
        self.k, self.rows, self.parts, self.upper = k, 0, [], None

    def add(self, x: np.ndarray) -> None:
        self.rows += len(x)
        if self.upper is None:
            self.parts.append(x)
            if 2 * self.rows < self.k:
                return
            self.upper = np.zeros((self.k, self.k), np.float32, order="F")
            parts, self.parts = self.parts, []
        else:
            parts = [x]
        for part in parts:  # x^T x added in place, one triangle: 10x faster than `gram += x.T @ x` and its temporary
            self.upper = blas.ssyrk(1.0, part.T, beta=1.0, c=self.upper, trans=0, lower=0, overwrite_c=1)

    def gram(self) -> np.ndarray:
        """X^T X in the upper triangle (the lower one is not meaningful)."""
        if self.upper is not None:
            return self.upper
        x = np.concatenate(self.parts) if self.parts else np.zeros((0, self.k), np.float32)
        return blas.ssyrk(1.0, x.T, trans=0, lower=0)


class GramCache:
    """``get(key)``: ``x^T x`` summed over the rows of the sources feeding ``key`` (a weight; rows of length ``k``),
    in the upper triangle. Keys are collected in the order given, a group at a time; asking for a key loads its
    group and drops the previous one; each key is asked for once per collection (a second ask collects its group
    again). Thread-safe."""

    def __init__(self, model: ir.Model, data: Dataset, wanted: dict[Hashable, tuple[Sequence[Source], int]],
                 batch_size: int = 64, budget: int = GRAM_BYTES):
        self.data, self.wanted, self.batch_size = data, wanted, batch_size
        self.groups: list[list[Hashable]] = []
        self.loaded: dict[Source, _Rows] = {}
        self.pending: dict[Source, int] = {}  # loaded source -> keys of the group not yet served
        self.lock = threading.Lock()
        self.last_sweep = False  # set before the last pass over the keys: the session goes after its last group
        if not wanted:
            return
        # the session is built now: the caller may edit the model once this returns
        self.weights = [v.const_value for g in model.graphs() for v in g.initializers.values()]
        self.runner: TapRunner | None = TapRunner(model, {s.tensor for sources, _ in wanted.values() for s in sources})
        probe = min(len(data), 4 if data.stacked is not None else 1)  # per-sample data: one sample per run
        seen = self.runner.run(next(data.slice(0, probe).batches(probe)))
        size = budget + 1
        for key, (sources, k) in wanted.items():  # each source: its rows x K floats, K x K once folded (_Rows)
            rows = [sum(len(r) for r in s.rows(seen[s.tensor], k)) * -(-len(data) // probe)
                    for s in sources if s.tensor in seen]
            need = sum(4 * k * (n if 2 * n < k else k) for n in rows)
            if size + need > budget:
                self.groups.append([])
                size = 0
            self.groups[-1].append(key)
            size += need
        self.group_of = {key: i for i, group in enumerate(self.groups) for key in group}

    def get(self, key: Hashable) -> tuple[np.ndarray, int]:
        """The Gram of ``key``'s inputs (upper triangle; zero for a tensor never seen, such as an If branch not
        taken: plain rounding) and the number of rows summed."""
        sources, _ = self.wanted[key]
        with self.lock:
            if not all(s in self.loaded for s in sources):
                self.loaded = {}  # the previous group's rows go before the next group's come
                index = self.group_of[key]
                self.loaded = self._collect(index)
                if index == len(self.groups) - 1 and self.last_sweep:  # its session holds the weights' pages:
                    self.runner = None  # close it, and unmap them (each is mapped again when next read)
                    qir.release_weights(None, self.weights)
                self.pending = {}
                for other in self.groups[index]:
                    for s in self.wanted[other][0]:
                        self.pending[s] = self.pending.get(s, 0) + 1
            tensors = [self.loaded[s] for s in sources]
            for s in sources:  # the last weight a source feeds: its storage goes with this call
                self.pending[s] -= 1
                if not self.pending[s]:
                    del self.loaded[s]
        h = tensors[0].gram()
        for t in tensors[1:]:
            h = h + t.gram()
        return h, sum(t.rows for t in tensors)

    def _collect(self, index: int) -> dict[Source, _Rows]:
        if self.runner is None:
            raise RuntimeError("GramCache: a key was asked for after the last sweep")
        width: dict[Source, int] = {}
        for key in self.groups[index]:
            sources, k = self.wanted[key]
            width.update(dict.fromkeys(sources, k))
        acc = {s: _Rows(k) for s, k in width.items()}
        tensors = {s.tensor for s in width}
        batches = list(_schedule(self.runner, self.data, self.batch_size, only=tensors))
        desc = f"gptq: input statistics {index + 1}/{len(self.groups)}"
        for start, stop in progress(batches, desc=desc):
            feed = next(self.data.slice(start, stop).batches(stop - start))
            arrays = self.runner.run(feed, only=tensors)
            for s, k in width.items():
                if s.tensor in arrays:
                    for rows in s.rows(arrays[s.tensor], k):
                        acc[s].add(rows)
        return acc
