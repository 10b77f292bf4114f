"""Streaming range observers: min-max, and histogram-based percentile, entropy (KL) and MSE.

State is O(bins) per tensor, whatever the number of samples. Histogram observers run in two passes: the first finds
each tensor's min/max, the second fills a histogram over that fixed range, so histograms built from different chunks
of the data (batches, Ray workers) merge by adding counts and equal the single-pass result exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qxc.quant.numerics import QType, compute_params, qtype


@dataclass
class MinMax:
    """The range of a tensor's finite values, and whether it also held infinities or NaN (``infinite``: an attention
    mask's -inf, which no rounding may make finite)."""

    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    infinite: bool = False

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.infinite = True
            finite = x[np.isfinite(x)]
            if finite.size == 0:
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += int(x.size)

    def merge(self, other: MinMax) -> MinMax:
        return MinMax(min(self.lo, other.lo), max(self.hi, other.hi), self.count + other.count,
                      self.infinite or other.infinite)

    @property
    def seen(self) -> bool:
        return self.count > 0


@dataclass
class Histogram:
    """Counts of values in ``bins`` equal bins over the fixed range [lo, hi] (both from the min/max pass)."""

    lo: float
    hi: float
    bins: int = 2048
    counts: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = x.reshape(-1)
        x = x[np.isfinite(x)]
        if self.hi <= self.lo:
            self.counts[0] += x.size
            return
        idx = ((x.astype(np.float64) - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def merge(self, other: Histogram) -> Histogram:
        assert (self.lo, self.hi, self.bins) == (other.lo, other.hi, other.bins), "histograms over different ranges"
        return Histogram(self.lo, self.hi, self.bins, self.counts + other.counts)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    # ------------------------------------------------------------------ range choices
    def percentile(self, p: float) -> tuple[float, float]:
        """Two-sided: the (100-p)th and pth percentiles (lower end kept at min for non-negative tensors)."""
        total = self.counts.sum()
        if total == 0:
            return self.lo, self.hi
        cdf = np.cumsum(self.counts) / total
        edges = self.edges
        hi = float(edges[min(self.bins, int(np.searchsorted(cdf, p / 100.0)) + 1)])
        lo = self.lo if self.lo >= 0 else float(edges[int(np.searchsorted(cdf, 1 - p / 100.0))])
        return lo, min(hi, self.hi)

    def entropy(self, levels: int = 128) -> tuple[float, float]:
        """KL-divergence threshold search (TensorRT's method) on the magnitude histogram.

        Non-negative tensors (after Relu) get a one-sided range [0, T] over all 256 uint8 levels; signed tensors a
        symmetric [-T, T]. Candidate thresholds run from ``levels`` bins to all bins of the |x| histogram.
        """
        mags, absmax, one_sided = self._magnitudes()
        if absmax == 0 or mags.sum() == 0:
            return self.lo, self.hi
        n = len(mags)
        target = 2 * levels if one_sided else levels
        best_t, best_kl = n, np.inf
        starts = np.unique(np.linspace(min(target, n), n, num=min(n - min(target, n) + 1, 256)).astype(int))
        for i in starts:
            p = mags[:i].astype(np.float64).copy()
            p[i - 1] += mags[i:].sum()  # clipped outliers pile onto the last bin
            # quantize p into ``target`` levels, then expand each level evenly over its non-empty bins
            edges = np.linspace(0, i, target + 1).astype(int)
            starts_, widths = edges[:-1], np.diff(edges)
            keep = widths > 0
            starts_, widths = starts_[keep], widths[keep]
            nz = (p > 0).astype(np.float64)
            sums = np.add.reduceat(mags[:i].astype(np.float64), starts_)  # Q from the sliced histogram: no outliers
            cnts = np.add.reduceat(nz, starts_)
            per = np.divide(sums, cnts, out=np.zeros_like(sums), where=cnts > 0)
            q = np.repeat(per, widths) * nz
            ps, qs = p.sum(), q.sum()
            if ps == 0 or qs == 0:
                continue
            p /= ps
            q /= qs
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_t = kl, i
        t = absmax * best_t / n
        return (0.0, t) if one_sided else (-t, t)

    def _magnitudes(self) -> tuple[np.ndarray, float, bool]:
        """Histogram of |x| over [0, max|x|] with the same bin count, and whether the tensor is non-negative."""
        if self.lo >= 0:
            absmax = self.hi
            edges = self.edges
            # bins already start at lo >= 0; shift them onto [0, hi]
            width = (self.hi - self.lo) / self.bins if self.hi > self.lo else 0
            mags = np.zeros(self.bins, np.int64)
            if absmax > 0:
                idx = np.clip(((edges[:-1] + width / 2) / absmax * self.bins).astype(int), 0, self.bins - 1)
                np.add.at(mags, idx, self.counts)
            return mags, absmax, True
        absmax = max(abs(self.lo), abs(self.hi))
        centers = (self.edges[:-1] + self.edges[1:]) / 2
        idx = np.clip((np.abs(centers) / absmax * self.bins).astype(int), 0, self.bins - 1)
        mags = np.zeros(self.bins, np.int64)
        np.add.at(mags, idx, self.counts)
        return mags, absmax, False

    def range_for(self, method: str, *, percentile: float = 99.999, qt: QType | str = "uint8",
                  symmetric: bool = False) -> tuple[float, float]:
        """The range a calibration method picks from this histogram ('percentile', 'entropy' or 'mse')."""
        if method == "percentile":
            return self.percentile(percentile)
        if method == "entropy":
            return self.entropy()
        if method == "mse":
            return self.mse(qt, symmetric)
        raise ValueError(f"unknown calibration method '{method}'")

    def mse(self, qt: QType | str = "uint8", symmetric: bool = False, steps: int = 200) -> tuple[float, float]:
        """The range [f*lo, f*hi] with the smallest expected quantization error over the histogram.

        In-range values contribute uniform rounding noise (scale^2 / 12 each); values beyond the range contribute
        their squared clipping distance (from bin centers). The rounding term does not depend on bin width, so the
        estimate stays sound when a few outliers stretch the histogram over a range much wider than the bulk.
        """
        qt = qtype(qt)
        centers = (self.edges[:-1] + self.edges[1:]) / 2
        w = self.counts.astype(np.float64)
        if w.sum() == 0 or self.hi <= self.lo:
            return self.lo, self.hi
        best, best_err = (self.lo, self.hi), np.inf
        for f in np.geomspace(1.0, 1e-3, steps):
            lo, hi = min(self.lo * f, 0.0), max(self.hi * f, 0.0)
            scale, zp = compute_params(np.array([lo]), np.array([hi]), qt, symmetric)
            s = float(scale[0])
            qlo, qhi = (qt.sym_range() if symmetric else (qt.qmin, qt.qmax))
            rlo, rhi = (qlo - float(zp[0])) * s, (qhi - float(zp[0])) * s  # representable range
            clipped = np.clip(centers, rlo, rhi)
            inside = (centers >= rlo) & (centers <= rhi)
            err = float(np.sum(w[inside]) * s * s / 12 + np.sum(w * (centers - clipped) ** 2))
            if err < best_err:
                best, best_err = (float(lo), float(hi)), err
        return best
