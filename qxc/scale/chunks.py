"""Chunks of data that a worker can load by itself: a row range of an array file, or one shard file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qxc.errors import DataError


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str  # a .npy/.npz file (or "" with ``arrays`` for in-memory data)
    key: str  # array name inside an .npz ("" for .npy)
    start: int
    stop: int
    labels_key: str = ""

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.path.endswith(".csv"):
            return _csv_rows(Path(self.path), self.start, self.stop, self.labels_key)
        if self.path.endswith(".npy"):
            x = np.load(self.path, mmap_mode="r")[self.start : self.stop]
            y = None
            lab = self.path[:-4] + ".labels.npy"
            if self.labels_key and os.path.exists(lab):
                y = np.load(lab, mmap_mode="r")[self.start : self.stop]
            return np.ascontiguousarray(x), None if y is None else np.asarray(y)
        with np.load(self.path) as z:
            x = z[self.key][self.start : self.stop]
            y = z[self.labels_key][self.start : self.stop] if self.labels_key and self.labels_key in z.files else None
        return np.ascontiguousarray(x), y


def _csv_header(path: Path) -> list[str] | None:
    with open(path) as f:
        first = f.readline().strip().split(",")
    try:
        [float(c) for c in first]
        return None
    except ValueError:
        return [c.strip() for c in first]


def _csv_rows(path: Path, start: int, stop: int, labels_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [start, stop) of a numeric CSV (the worker reads them itself); a header column named
    label/labels/target/y holds the labels, which may be class names, and an empty cell is a missing value (NaN), as
    for local CSV data."""
    from qxc.data import LABEL_KEYS, csv_number

    header = _csv_header(path)
    skip = start + (1 if header else 0)
    label = next((i for i, h in enumerate(header or []) if h.lower() in LABEL_KEYS), None)
    features = None if label is None else [i for i in range(len(header)) if i != label]
    read = {"delimiter": ",", "skiprows": skip, "max_rows": stop - start, "ndmin": 2}
    try:
        table = np.loadtxt(path, dtype=np.float64, usecols=features, **read)
    except ValueError:  # empty cells (missing values, as for local CSV data): the slower per-cell reading
        table = np.loadtxt(path, dtype=np.float64, usecols=features,
                           converters=csv_number, **read)
    labels = None
    if label is not None and labels_key:
        cells = np.loadtxt(path, dtype=str, usecols=[label], **read)[:, 0]
        try:
            labels = cells.astype(np.float64)
        except ValueError:
            labels = cells  # class names
    return table, labels


def _rows(path: Path, key: str) -> int:
    if path.suffix == ".csv":
        with open(path) as f:
            n = sum(1 for line in f if line.strip())
        return n - (1 if _csv_header(path) else 0)
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    with np.load(path) as z:
        if key not in z.files:
            raise DataError(f"{path}: no array '{key}' (has: {', '.join(z.files)})")
        return int(z[key].shape[0])


def chunks_of(source: str | os.PathLike, key: str, chunk_rows: int, labels_key: str = "labels") -> list[Chunk]:
    """Row-range chunks of an .npy/.npz/.csv file, or of every shard (sorted *.npy/*.npz/*.csv) of a folder."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_dir():
        shards = sorted(p for p in source.iterdir() if p.suffix in (".npy", ".npz", ".csv")
                        and not p.name.endswith(".labels.npy"))
        if not shards:
            raise DataError(f"{source}: no .npy/.npz/.csv shards in the folder")
        out = []
        for p in shards:
            n = _rows(p, key)
            for s in range(0, n, chunk_rows):
                out.append(Chunk(len(out), str(p), key, s, min(n, s + chunk_rows), labels_key))
        return out
    if source.suffix not in (".npy", ".npz", ".csv"):
        raise DataError(f"{source}: chunked runs read .npy/.npz/.csv files or a folder of shards")
    n = _rows(source, key)
    if n == 0:
        raise DataError(f"{source}: zero rows")
    return [Chunk(i, str(source), key, s, min(n, s + chunk_rows), labels_key)
            for i, s in enumerate(range(0, n, chunk_rows))]
