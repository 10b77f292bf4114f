"""Sample data for calibration, comparison and explanation, checked against the model's inputs.

Formats: ``.npz`` keyed by input name (optional ``labels``), ``.npy`` for single-input models, ``.csv`` for tabular
single-input models (a header column named label/labels/target/y becomes the labels), a dict of arrays, or a list of
feed dicts. An array of the input's rank is a batch stacked along axis 0; one extra leading axis makes it a list of
separate samples (for inputs whose batch axis is not the first, or rank-0 inputs such as a sample rate).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qxc.errors import DataError

LABEL_KEYS = ("labels", "label", "target", "y")


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype | None
    shape: tuple | None  # ints for fixed dims, None for symbolic/unknown


def input_specs(model: ir.Model) -> list[InputSpec]:
    init = set(model.graph.initializers)
    specs = []
    for v in model.graph.inputs:
        if v.name in init:
            continue
        dtype = None
        if v.dtype is not None:
            try:
                dtype = np.dtype(v.dtype.numpy())
            except (TypeError, ValueError, AttributeError):
                dtype = None
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else None for d in v.shape)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs


@dataclass
class Dataset:
    """Validated model feeds: either ``stacked`` arrays (batch on axis 0) or a list of per-sample ``samples``."""

    stacked: dict[str, np.ndarray] | None
    samples: list[dict[str, np.ndarray]] | None
    labels: np.ndarray | None = None
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        if self.stacked is not None:
            return len(next(iter(self.stacked.values())))
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        return list(self.stacked if self.stacked is not None else self.samples[0])

    def batches(self, batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` rows (per-sample data yields one sample per feed)."""
        if self.stacked is not None:
            n = len(self)
            for s in range(0, n, batch_size):
                yield {k: v[s : s + batch_size] for k, v in self.stacked.items()}
        else:
            yield from self.samples

    def slice(self, start: int, stop: int) -> Dataset:
        labels = None if self.labels is None else self.labels[start:stop]
        if self.stacked is not None:
            return Dataset({k: v[start:stop] for k, v in self.stacked.items()}, None, labels, self.source)
        return Dataset(None, self.samples[start:stop], labels, self.source)

    def head(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        if self.stacked is not None:
            return Dataset({k: v[:n] for k, v in self.stacked.items()}, None, labels, self.source)
        return Dataset(None, self.samples[:n], labels, self.source)


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The rows per run of a model exported without a dynamic batch axis (the inputs' fixed first dimension)."""
    dims = {s.shape[0] for s in specs if s.shape}
    return dims.pop() if len(dims) == 1 and isinstance(next(iter(dims)), int) else None


def first_sample(data: Dataset, model) -> dict[str, np.ndarray]:
    """The data's first feed the model takes: one row, or the model's fixed batch of rows."""
    return next(data.batches(fixed_batch(input_specs(model)) or 1))


def _read(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            arrays = {}
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    try:
                        arrays[k] = z[k]
                    except ValueError as e:
                        if "allow_pickle" not in str(e):
                            raise
                        raise DataError(f"{path}: array '{k}' holds Python objects, which qxc does not unpickle; "
                                        "save strings as a str array (np.asarray(a, dtype=str))") from None
            labels = None
            names = {s.name for s in specs}
            for key in LABEL_KEYS:
                if key in arrays and key not in names:
                    labels = arrays.pop(key)
                    break
            meta = {}
            if "feature_names" in arrays and "feature_names" not in names:
                meta["feature_names"] = [str(n) for n in arrays.pop("feature_names")]
            return arrays, labels, meta
        if suffix == ".npy":
            if len(specs) != 1:
                raise DataError(f"{path}: a .npy file feeds single-input models; this one has inputs "
                                f"{', '.join(s.name for s in specs)}; use .npz keyed by input name")
            return {specs[0].name: np.load(path, allow_pickle=False)}, None, {}
        if suffix == ".csv":
            return _read_csv(path, specs)
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read data: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    raise DataError(f"{path}: unknown data format '{suffix}'; use .npz (by input name), .npy or .csv")


def _read_csv(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict]:
    """A table with an optional header; a header column named label/labels/target/y becomes the labels, which may
    be class names. A single-input model reads every other column as a number (an empty cell is missing: NaN); a
    model with one input per column (skl2onnx's DataFrame export: each input [rows, 1]) reads each input from the
    header column of its name, strings for string inputs."""
    import csv

    with open(path, newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: CSV file has no rows")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if not rows:
        raise DataError(f"{path}: CSV file has no data rows")
    width = len(header) if header is not None else len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad + 1 + (header is not None)} has {len(rows[bad])} cells, "
                        f"{'the header' if header is not None else 'the first row'} {width}")
    columns = list(zip(*rows))
    label_col = next((i for i, h in enumerate(header or []) if h.lower() in LABEL_KEYS), None)
    labels = None
    if label_col is not None and label_col < len(columns):
        cells = columns.pop(label_col)
        try:
            labels = np.array([float(c) for c in cells])
        except ValueError:
            labels = np.array(cells)  # class names
        header = [h for i, h in enumerate(header) if i != label_col]
    if len(specs) == 1 and specs[0].dtype != np.dtype(object):
        try:
            table = np.array([[csv_number(c) for c in col] for col in columns], dtype=np.float64).T.reshape(len(rows),
                                                                                                       -1)
        except ValueError as e:
            raise DataError(f"{path}: non-numeric CSV cell ({e}); features must be numbers (a label column may hold "
                            "class names: name it label, labels, target or y)") from None
        return {specs[0].name: table}, labels, ({"feature_names": header} if header else {})
    return _csv_by_input(path, header, columns, specs), labels, {}


def csv_number(cell: str) -> float:
    """A CSV cell as a number; an empty cell is a missing value (NaN), as pandas writes one."""
    return float(cell) if cell.strip() else float("nan")


def _csv_by_input(path: Path, header: list[str] | None, columns: list[tuple[str, ...]], specs: list[InputSpec]
                  ) -> dict[str, np.ndarray]:
    """Each input from the header column of its name (an input of shape [rows, 1] or [rows])."""
    if header is None:
        raise DataError(f"{path}: this model has {len(specs)} inputs ({', '.join(s.name for s in specs)}); the CSV "
                        "needs a header naming a column for each")
    by_name = dict(zip(header, columns))
    arrays = {}
    for spec in specs:
        if spec.shape is not None and (len(spec.shape) > 2 or (len(spec.shape) == 2 and spec.shape[1] != 1)):
            raise DataError(f"{path}: input '{spec.name}' takes shape {_shape_text(spec.shape)}; a CSV column feeds "
                            "inputs of one value per row; use .npz keyed by input name")
        if spec.name not in by_name:
            raise DataError(f"{path}: no CSV column named '{spec.name}' for that model input (columns: "
                            f"{', '.join(header)})")
        cells = by_name.pop(spec.name)
        if spec.dtype == np.dtype(object):
            col = np.array(cells, dtype=object)
        else:
            try:
                col = np.array([csv_number(c) for c in cells], dtype=np.float64)
            except ValueError as e:
                raise DataError(f"{path}: column '{spec.name}': non-numeric cell ({e}) for a "
                                f"{spec.dtype} input") from None
            if spec.dtype is not None and spec.dtype.kind in "iub":
                if np.isnan(col).any():
                    raise DataError(f"{path}: column '{spec.name}' has empty cells, and its {spec.dtype} input cannot "
                                    "take a missing value")
                if not np.array_equal(col, np.round(col)):
                    raise DataError(f"{path}: column '{spec.name}' holds fractions for a {spec.dtype} input")
                col = col.astype(spec.dtype)
        arrays[spec.name] = col if spec.shape is not None and len(spec.shape) == 1 else col[:, None]
    if by_name:
        raise DataError(f"{path}: CSV column '{next(iter(by_name))}' matches no model input (inputs: "
                        f"{', '.join(s.name for s in specs)}; labels go in a column named label)")
    return arrays


def _cast(name: str, arr: np.ndarray, spec: InputSpec, src: str) -> np.ndarray:
    want = spec.dtype
    if want is None or arr.dtype == want:
        return arr
    if want == np.dtype(object) and arr.dtype.kind in "US":
        return arr.astype(object)  # a string input: numpy's fixed-width strings as onnxruntime's objects
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{src}: input '{name}' has dtype {arr.dtype}; the model wants {want}")
    if want.kind == "f":
        if arr.dtype.kind == "f" or arr.dtype.kind in "biu":
            return arr.astype(want)
    if want.kind in "iu" and arr.dtype.kind == "f":  # whole numbers saved as floats (pandas, np.savez of a mix)
        if not np.isfinite(arr).all():
            raise DataError(f"{src}: input '{name}' holds NaN or inf, which its {want} input cannot take")
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{src}: input '{name}' holds fractions for its {want} input; round them or save whole "
                            "numbers")
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(f"{src}: input '{name}' values do not fit the model's {want}")
        return arr.astype(want)
    if want.kind in "iu" and arr.dtype.kind in "iu":
        cast = arr.astype(want)
        if not np.array_equal(cast, arr):
            raise DataError(f"{src}: input '{name}' values do not fit the model's {want}")
        return cast
    if want.kind == "b" and arr.dtype.kind == "b":
        return arr
    raise DataError(f"{src}: input '{name}' has dtype {arr.dtype}; the model wants {want} (no lossless cast)")


def _shape_text(shape: tuple | None) -> str:
    return "?" if shape is None else "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _layout(name: str, arr: np.ndarray, spec: InputSpec, src: str) -> str:
    """'stacked' or 'samples' for this array against the input's declared shape."""
    if spec.shape is None:
        return "stacked"
    rank = len(spec.shape)

    def fits(dims: tuple, shape: tuple) -> bool:
        return len(dims) == len(shape) and all(d is None or d == s for d, s in zip(dims, shape))

    if arr.ndim == rank and rank > 0 and fits(spec.shape[1:], arr.shape[1:]):
        if spec.shape[0] is None or spec.shape[0] == arr.shape[0]:
            return "stacked"
        if spec.shape[0] == 1:
            return "rows"  # a fixed batch of 1: feed the rows one at a time
    if arr.ndim == rank + 1 and fits(spec.shape, arr.shape[1:]):
        return "samples"
    if arr.ndim in (rank, rank + 1) and rank > 0 and arr.ndim == rank:
        bad = [(i, d, s) for i, (d, s) in enumerate(zip(spec.shape, arr.shape)) if d is not None and d != s]
        if len(spec.shape) == 2 and bad and bad[0][0] == 1:
            raise DataError(f"{src}: input '{name}' expects {spec.shape[1]} features per row (shape "
                            f"{_shape_text(spec.shape)}); the data has {arr.shape[1]}")
    raise DataError(f"{src}: input '{name}' expects shape {_shape_text(spec.shape)}; the data array has shape "
                    f"{tuple(arr.shape)} (give a batch of that rank or a list of samples with one more leading axis)")


def make_dataset(arrays: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], model: ir.Model, *,
                 labels: np.ndarray | None = None, source: str = "<memory>") -> Dataset:
    specs = input_specs(model)
    by_name = {s.name: s for s in specs}
    if isinstance(arrays, Sequence) and not isinstance(arrays, Mapping):
        if not arrays:
            raise DataError(f"{source}: no samples")
        samples = [dict(s) for s in arrays]
        keys = set(samples[0])
        arrays = {k: np.stack([np.asarray(s[k]) for s in samples]) for k in keys}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise DataError(f"{source}: array '{unknown[0]}' matches no model input (inputs: "
                        f"{', '.join(by_name)}; labels go under 'labels')")
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise DataError(f"{source}: no data for input '{missing[0]}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    layouts = {}
    fixed = {}
    for name, spec in by_name.items():
        arr = np.asarray(arrays[name])
        if arr.ndim == 0 or len(arr) == 0:
            raise DataError(f"{source}: input '{name}' has zero rows")
        if arr.dtype.kind == "f" and np.isinf(arr).any():  # NaN is a missing value, which models may impute
            raise DataError(f"{source}: input '{name}' holds infinite values")
        if arr.ndim == 1 and spec.shape is not None and len(spec.shape) == 2 and spec.shape[1] == 1:
            arr = arr[:, None]  # a column for a [rows, 1] input (a table export's one input per column)
        fixed[name] = _cast(name, arr, spec, source)
        layouts[name] = _layout(name, fixed[name], spec, source)
    counts = {len(a) for a in fixed.values()}
    if len(counts) != 1:
        raise DataError(f"{source}: inputs have different row counts: "
                        + ", ".join(f"{k}={len(v)}" for k, v in fixed.items()))
    n = counts.pop()
    if labels is not None and len(labels) != n:
        raise DataError(f"{source}: {len(labels)} labels for {n} rows")
    if all(lay == "stacked" for lay in layouts.values()):
        return Dataset(fixed, None, labels, source)
    samples = []
    for i in range(n):
        feed = {}
        for k, a in fixed.items():
            feed[k] = a[i : i + 1] if layouts[k] in ("stacked", "rows") else a[i]
        samples.append(feed)
    return Dataset(None, samples, labels, source)


def load_data(src: Any, model: ir.Model) -> Dataset:
    """A validated :class:`Dataset` from a path, a dict of arrays, a pandas DataFrame or a list of feed dicts."""
    if isinstance(src, Dataset):
        return src
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        arrays, labels, meta = _read(path, input_specs(model))
        dataset = make_dataset(arrays, model, labels=labels, source=str(path))
        dataset.meta.update(meta)
        return dataset
    if hasattr(src, "columns") and hasattr(src, "to_numpy"):  # a pandas DataFrame
        return _from_frame(src, model)
    if isinstance(src, Mapping):
        src = dict(src)
        labels = None
        for key in LABEL_KEYS:
            if key in src and key not in {s.name for s in input_specs(model)}:
                labels = np.asarray(src.pop(key))
        return make_dataset(src, model, labels=labels)
    if isinstance(src, Sequence):
        return make_dataset(list(src), model)
    try:
        return make_dataset(list(src), model)
    except TypeError:
        raise DataError(f"cannot use a {type(src).__name__} as data; give a path, a dict or a list of feeds") from None


def _from_frame(frame: Any, model: ir.Model) -> Dataset:
    """A DataFrame: a column per input (skl2onnx's DataFrame exports; [rows, 1] inputs get a column each), or, for a
    single-input model, its feature columns in order. A column named label/labels/target/y is the labels."""
    specs = input_specs(model)
    columns = [str(c) for c in frame.columns]
    label = next((c for c in frame.columns if str(c).lower() in LABEL_KEYS and str(c) not in {s.name for s in specs}),
                 None)
    labels = None if label is None else frame[label].to_numpy()
    if all(s.name in columns for s in specs):
        arrays = {}
        for s in specs:
            col = frame[s.name].to_numpy()
            arrays[s.name] = col[:, None] if s.shape is not None and len(s.shape) == 2 and col.ndim == 1 else col
        return make_dataset(arrays, model, labels=labels, source="<DataFrame>")
    if len(specs) != 1:
        missing = next(s.name for s in specs if s.name not in columns)
        raise DataError(f"<DataFrame>: no column named '{missing}' for that model input (columns: {', '.join(columns)})")
    features = frame.drop(columns=[label]) if label is not None else frame
    dataset = make_dataset({specs[0].name: features.to_numpy()}, model, labels=labels, source="<DataFrame>")
    dataset.meta["feature_names"] = [str(c) for c in features.columns]
    return dataset
