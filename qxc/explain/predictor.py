"""Run a tabular ONNX model (original or compiled) as a vectorised function for the explainers.

One onnxruntime session; rows go in chunks of at most ``batch_size`` (bounded host and device memory); skl2onnx
classifier outputs (label + probabilities, ZipMap) become arrays. The explainers run only rows that differ from
ones already run (see ``importance`` and ``shapley``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qxc.data import fixed_batch, input_specs
from qxc.errors import DataError, ModelError, UsageError

# Rows per onnxruntime run. Small enough that a run's intermediates stay in cache: on the digits MLP 8,192-row runs
# take 231 ns a row against 327 ns for 65,536-row runs (same on a tree ensemble and the 10-feature MLP), and a fresh
# session's first runs fault in 8x less arena memory.
BATCH_ROWS = 8192
# ... and at most this many input bytes, and as many output bytes, per run: a wide row (an image of 3 x 32 x 32) or a
# wide output (a language model's tokens x vocabulary logits) takes fewer rows per run, so the run's input and
# output and onnxruntime's arena for its activations stay bounded whatever the row's width
BATCH_BYTES = 8 << 20


@dataclass
class Prediction:
    labels: np.ndarray | None  # (n,) class labels for classifiers
    scores: np.ndarray  # (n, k) probabilities/scores for classifiers, (n,) for regressors

    def take(self, rows) -> Prediction:
        """The predictions of ``rows`` (an index array or a slice)."""
        return Prediction(None if self.labels is None else self.labels[rows], self.scores[rows])


class Predictor:
    def __init__(self, model: ir.Model, *, providers: Sequence[str] = ("cpu",), batch_size: int = BATCH_ROWS,
                 threads: int | None = None, output: int = 0,
                 task: Literal["auto", "classification", "regression"] = "auto",
                 categories: dict[str, list[list[str]]] | None = None, output_name: str | None = None):
        """The model reads a table of rows x features: its single [rows, features] input (or [rows, d1, d2, ...] with
        fixed d's, an image: each element a feature, in C order), or one input per column
        or group of columns (skl2onnx's DataFrame exports: [rows, 1] inputs, numbers or strings); string columns
        are coded as numbers (the index of the category in ``categories``, per string input and column, learned
        from the data by :meth:`table` when not given), so every explainer works on one numeric matrix.
        ``task``: ``auto`` takes a model with a label output (skl2onnx) for a classifier, and one whose only
        float output is a probability matrix (rows in [0, 1] summing to 1, e.g. a Softmax; one probe row tells)
        too, its label the most probable class; ``classification`` takes any (rows, classes) score output's argmax
        for the label (logits); ``regression`` explains the outputs as numbers. ``output_name``: the float output
        explained (default: the first; another output of a classifier with a label output, an embedding or a
        second head, is explained as numbers, or as a classifier of its own if it holds probabilities)."""
        from qxc.runtime import make_session

        self.model = model  # what it runs (the feeds of a table are checked against its inputs)
        self.table_inputs = _TableInputs(input_specs(model), categories)
        self.input = self.table_inputs.single  # the input's name when the table is the model's one input
        self.dtype = self.table_inputs.dtype
        self.n_features = self.table_inputs.n_features
        self.session = make_session(model, providers=providers, threads=threads)
        self.batch_size = batch_size
        outs = self.session.get_outputs()
        self.output_names = [o.name for o in outs]
        # a classifier's label output: 1-D integer or string labels (skl2onnx keeps the classes' own type)
        self.label_out = next((o.name for o in outs if ("int" in o.type or o.type == "tensor(string)")
                               and len(o.shape or []) == 1), None)
        floats = [o for o in outs if "float" in o.type or "double" in o.type or "map" in o.type]
        if not floats:
            raise UsageError("the model has no float output to explain")
        self.score_out = floats[0].name
        if output_name is not None:
            if output_name not in self.output_names:
                raise UsageError(f"the model has no output '{output_name}'; its outputs are "
                                 f"{', '.join(self.output_names)}")
            if output_name not in {o.name for o in floats}:
                raise UsageError(f"output '{output_name}' holds no floats to explain; its float outputs are "
                                 f"{', '.join(o.name for o in floats)}")
            if output_name != self.score_out:  # not the classifier's scores: its labels say nothing of this one
                self.label_out = None
            self.score_out = output_name
        self.output = output  # the column of a multi-output regressor that ``value`` explains
        self.rows_evaluated = 0
        self.calls = 0
        self.out_row_bytes: int | None = None  # the score output's bytes per row, once a run has shown it
        self.out_item_shape: tuple[int, ...] | None = None  # ... and its shape per row, before flattening
        self.argmax_labels = False  # labels are the argmax of the scores (no label output)
        if task not in ("auto", "classification", "regression"):
            raise UsageError(f"unknown task '{task}'; use auto, classification or regression")
        if task == "regression" and self.label_out is not None:
            raise UsageError(f"the model has a label output '{self.label_out}': it is a classifier; use task auto "
                             "or classification")
        if self.label_out is None and task != "regression":
            self._argmax_task(task)

    def _argmax_task(self, task: str) -> None:
        if self.n_features is None:
            if task == "classification":
                raise UsageError(f"input '{self.input}' has no fixed feature count to probe the model with")
            return
        probe = self.session.run([self.score_out], self.table_inputs.feeds(np.zeros((1, self.n_features),
                                                                                     self.dtype), probe=True))[0]
        probe = _per_row(np.asarray(probe, np.float64))
        matrix = probe.ndim == 2 and probe.shape[1] >= 2
        if task == "classification" and not matrix:
            raise UsageError(f"output '{self.score_out}' gives shape {list(probe.shape)} for one row; a classifier "
                             "without a label output needs a (rows, classes) score output")
        probabilities = matrix and bool(np.all((probe >= 0) & (probe <= 1))) and abs(probe.sum() - 1) < 1e-3
        self.argmax_labels = task == "classification" or probabilities

    def as_classifier(self) -> None:
        """Take the (rows, classes) score output's argmax for the label from now on, as ``task="classification"``
        does (logits), without a second session."""
        self._argmax_task("classification")

    @property
    def is_classifier(self) -> bool:
        return self.label_out is not None or self.argmax_labels

    def _run(self, x: np.ndarray, with_labels: bool = True, pick=None) -> tuple[np.ndarray | None, np.ndarray]:
        """Labels (when ``with_labels``: onnxruntime then also runs the label branch) and scores of ``x``; ``pick``
        (scores, rows) reduces each run's scores of the rows ``rows`` (a slice of ``x``) as they come, so only what
        it keeps is held for every row."""
        from qxc.runtime.session import normalize_output, run

        label_out = self.label_out if with_labels else None
        names = [n for n in (label_out, self.score_out) if n is not None]
        labels, scores = [], None  # scores: every row's, filled run by run (no second copy of them to concatenate)
        fixed = self.table_inputs.fixed_batch  # an export without a dynamic batch axis takes exactly that many rows
        step = fixed or max(1, min(self.batch_size, BATCH_BYTES // max(1, x[:1].nbytes)))
        s = 0
        while s < len(x):
            start = s
            # a first run of one row shows the output's width, which then bounds the rows of every later run
            rows = step if fixed else 1 if self.out_row_bytes is None else max(
                1, min(step, BATCH_BYTES // max(1, self.out_row_bytes)))
            block = x[s : s + rows]
            s += rows
            short = fixed - len(block) if fixed else 0
            if short:  # the last block, padded with its last row; the padding's outputs are dropped
                block = np.concatenate([block, np.repeat(block[-1:], short, axis=0)])
            out = run(self.session, names, self.table_inputs.feeds(block))
            self.calls += 1
            # an unpadded block keeps every row the model gave, so that one giving too many is caught
            keep = slice(None, len(block) - short if short else None)
            if label_out is not None:
                labels.append(np.asarray(out[0])[keep])
            sc = normalize_output(out[-1])
            if self.out_row_bytes is None and len(sc):
                self.out_row_bytes, self.out_item_shape = sc[:1].nbytes, tuple(sc.shape[1:])
            sc = _per_row(sc)[keep]
            if len(sc) != len(block) - short:
                raise ModelError(f"output '{self.score_out}' gave {len(sc)} rows for {len(block) - short} input rows; "
                                 "explanations need one output row per input row (check the exporter's output shape)")
            sc = sc if pick is None else pick(sc, slice(start, start + len(sc)))
            if scores is None:
                scores = np.empty((len(x), *sc.shape[1:]), sc.dtype)
            scores[start : start + len(sc)] = sc
        self.rows_evaluated += len(x)
        sc = scores if scores is not None else np.zeros((0,), np.float32)
        if self.argmax_labels and with_labels:
            labels = [np.argmax(sc, axis=1)] if len(sc) else []
        return (np.concatenate(labels) if labels else None), self._squeezed(sc)

    def _squeezed(self, sc: np.ndarray) -> np.ndarray:
        """A one-column regression output as a vector."""
        return sc[:, 0] if sc.ndim == 2 and sc.shape[1] == 1 and self.label_out is None else sc

    def _checked(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim != 2 or (self.n_features is not None and x.shape[1] != self.n_features):
            raise DataError(f"{self.table_inputs.what} expects {self.n_features} features per row; got shape "
                            f"{x.shape}")
        return x

    def predict(self, x: np.ndarray, with_labels: bool = True) -> Prediction:
        labels, scores = self._run(self._checked(x), with_labels)
        return Prediction(labels, scores)

    def value(self, x: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """The scalar explained per row: the regression output (column ``output`` of a multi-output regressor), or
        the probability of ``classes`` (per row). The label output is not asked for: onnxruntime skips its
        nodes."""
        def pick(scores: np.ndarray, rows: slice) -> np.ndarray:  # each run's explained column, as it comes
            scores = self._squeezed(scores)
            if scores.ndim == 1:
                return scores.astype(np.float64)
            if not self.is_classifier:
                if not 0 <= self.output < scores.shape[1]:
                    raise UsageError(f"output {self.output} to explain: the model's '{self.score_out}' has "
                                     f"{scores.shape[1]} columns (0..{scores.shape[1] - 1})")
                return scores[:, self.output].astype(np.float64)
            cls = classes[rows] if classes is not None else np.argmax(scores, axis=1)
            return scores[np.arange(len(scores)), cls].astype(np.float64)

        x = self._checked(x)
        return self._run(x, with_labels=False, pick=pick)[1]

    @property
    def feature_names(self) -> list[str] | None:
        """The table's column names where the model's inputs give them (one input per column), else None."""
        return self.table_inputs.names

    @property
    def categorical(self) -> np.ndarray:
        """(features,) True for string columns (coded as category indices)."""
        return self.table_inputs.categorical

    @property
    def category_names(self) -> dict[int, list[str]]:
        """String columns' categories by feature index: a coded value v of feature j means category_names[j][v]."""
        out = {}
        for spec, start, _ in self.table_inputs.slices:
            for j, cats in enumerate(self.table_inputs.categories.get(spec.name, [])):
                out[start + j] = [str(c) for c in cats]
        return out

    def table(self, data) -> np.ndarray:
        """The rows x features matrix of a stacked :class:`~qxc.data.Dataset` (learns the string columns'
        categories the first time, unless given)."""
        return self.table_inputs.table(data)


class _TableInputs:
    """How a rows x features table maps onto the model's inputs, and back (see :class:`Predictor`)."""

    def __init__(self, specs, categories: dict[str, list[list[str]]] | None):
        if not specs:
            raise UsageError("the model has no inputs to explain")
        self.specs = specs
        self.fixed_batch = fixed_batch(specs)
        strings = [s for s in specs if s.dtype == np.dtype(object)]
        if len(specs) == 1 and not strings:
            spec = specs[0]
            self.single, self.dtype = spec.name, spec.dtype or np.dtype(np.float32)
            self.what, self.names, self.slices = f"input '{spec.name}'", None, []
            self.item_shape = None  # an image's (channels, height, width): each element a feature
            if spec.shape is not None and len(spec.shape) != 2:
                dims = list(spec.shape)[1:]
                if not dims or not all(isinstance(d, int) for d in dims):
                    raise UsageError(f"input '{spec.name}' has shape {list(spec.shape)}; explanations take [rows, "
                                     "features], or [rows, d1, d2, ...] with fixed d's (each element a feature)")
                self.item_shape = tuple(dims)
                self.names = element_names(spec.name, self.item_shape)
            self.n_features = (math.prod(self.item_shape) if self.item_shape else
                               spec.shape[1] if spec.shape is not None else None)
            self.categorical = np.zeros(self.n_features or 0, bool)
            self.categories = {}
            return
        self.single, self.slices, start = None, [], 0
        for spec in specs:
            if spec.shape is None or len(spec.shape) not in (1, 2) or (len(spec.shape) == 2 and not isinstance(
                    spec.shape[1], int)):
                raise UsageError(f"explanations read a table: each input [rows] or [rows, k] with a fixed k; input "
                                 f"'{spec.name}' has shape {list(spec.shape) if spec.shape is not None else '?'}")
            width = 1 if len(spec.shape) == 1 else spec.shape[1]
            self.slices.append((spec, start, width))
            start += width
        self.n_features = start
        dtypes = {s.dtype for s in specs}
        self.dtype = dtypes.pop() if len(dtypes) == 1 and not strings else np.dtype(np.float64)
        self.names = [s.name if w == 1 else f"{s.name}[{j}]" for s, _, w in self.slices for j in range(w)]
        self.what = f"the table of inputs {', '.join(s.name for s in specs)}"
        self.categorical = np.zeros(self.n_features, bool)
        for spec, start, width in self.slices:
            self.categorical[start : start + width] = spec.dtype == np.dtype(object)
        self.categories = {k: [np.asarray(c, dtype=object) for c in v] for k, v in (categories or {}).items()}

    def table(self, data) -> np.ndarray:
        stacked = data.stacked if data.stacked is not None else _stack_samples(data, self.specs)
        if self.single is not None:
            x = stacked[self.single]
            if self.item_shape is not None:
                if x.shape[1:] != self.item_shape:
                    raise DataError(f"{data.source}: input '{self.single}' must be [rows, "
                                    f"{', '.join(map(str, self.item_shape))}]; got shape {list(x.shape)}")
                return x.reshape(len(x), -1)
            if x.ndim != 2:
                raise DataError(f"{data.source}: input '{self.single}' must be [rows, features]; got shape {x.shape}")
            return x
        parts = []
        for spec, _, width in self.slices:
            col = stacked[spec.name].reshape(len(data), width)
            if spec.dtype == np.dtype(object):
                if spec.name not in self.categories:
                    self.categories[spec.name] = [np.unique(col[:, j].astype(str)).astype(object)
                                                  for j in range(width)]
                codes = np.empty((len(col), width), np.float64)
                for j, cats in enumerate(self.categories[spec.name]):
                    values = col[:, j].astype(str)
                    idx = np.searchsorted(cats.astype(str), values)
                    idx = np.minimum(idx, len(cats) - 1)
                    unknown = cats[idx].astype(str) != values
                    if unknown.any():
                        raise DataError(f"{data.source}: input '{spec.name}' holds '{values[unknown][0]}', a category "
                                        "the explanation's data does not have")
                    codes[:, j] = idx
                parts.append(codes)
            else:
                parts.append(col.astype(self.dtype))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def feeds(self, x: np.ndarray, probe: bool = False) -> dict[str, np.ndarray]:
        if self.single is not None:
            return {self.single: x if self.item_shape is None else x.reshape((len(x),) + self.item_shape)}
        feeds = {}
        for spec, start, width in self.slices:
            part = x[:, start : start + width]
            if spec.dtype == np.dtype(object):
                cats = self.categories.get(spec.name)
                if cats is None and not probe:
                    raise UsageError(f"input '{spec.name}' takes strings, coded in the table as category indices: "
                                     "give the model's feeds (a dict by input name or a DataFrame) so the categories "
                                     "are known")
                if cats is None:  # a probe before any data: the empty string
                    part = np.full(part.shape, "", dtype=object)
                else:
                    part = np.stack([c[np.clip(np.rint(part[:, j]), 0, len(c) - 1).astype(np.int64)]
                                     for j, c in enumerate(cats)], axis=1)
            elif spec.dtype is not None and spec.dtype.kind in "iub" and part.dtype.kind == "f":  # a sampled value between integers: nearest
                part = np.ascontiguousarray(np.rint(part), dtype=spec.dtype)
            else:
                part = np.ascontiguousarray(part, dtype=spec.dtype)
            feeds[spec.name] = part.reshape(len(x)) if len(spec.shape) == 1 else part
        return feeds


def _per_row(scores: np.ndarray) -> np.ndarray:
    """An output of rank 3 or more (a language model's (rows, tokens, vocabulary) logits) as (rows, columns), its
    elements in C order, as an image input's elements are features."""
    return scores.reshape(len(scores), -1) if scores.ndim > 2 else scores


def element_names(name: str, item_shape: tuple[int, ...]) -> list[str]:
    """The features of an image-like input, in C order: ``image[0,3,5]``."""
    return [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*item_shape)]


def _stack_samples(data, specs) -> dict[str, np.ndarray]:
    """The table of per-sample data (a fixed batch of one makes the data a list of one-row feeds)."""
    out = {}
    for spec in specs:
        arrays = [np.asarray(sample[spec.name]) for sample in data.samples]
        rank = len(spec.shape) if spec.shape is not None else arrays[0].ndim
        out[spec.name] = np.concatenate(arrays) if arrays[0].ndim == rank else np.stack(arrays)
    return out
