"""Sparsity numerics: exact magnitude masks (per layer or one global threshold), N:M patterns, channel norms,
and the allocation of per-layer sparsity from measured sensitivities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def magnitude_prune(w: np.ndarray, count: int) -> np.ndarray:
    """A copy of ``w`` with exactly ``count`` smallest-|w| entries zeroed (ties broken by position, deterministic)."""
    flat = np.abs(w).reshape(-1)
    count = int(min(max(count, 0), flat.size))
    out = w.copy()
    if count:
        idx = np.argsort(flat, kind="stable")[:count]
        out.reshape(-1)[idx] = 0
    return out


def global_counts(weights: Sequence[np.ndarray], sparsity: float) -> list[int]:
    """How many entries of each tensor one global magnitude threshold removes so that exactly
    round(sparsity * total) entries go overall (ties at the threshold go to the earlier tensors)."""
    total = sum(w.size for w in weights)
    k = int(round(sparsity * total))
    if k <= 0:
        return [0] * len(weights)
    sorted_abs = [np.sort(np.abs(w).reshape(-1)) for w in weights]
    everything = np.concatenate(sorted_abs)
    threshold = np.partition(everything, k - 1)[k - 1]
    del everything
    below = [int(np.searchsorted(s, threshold, side="left")) for s in sorted_abs]
    equal = [int(np.searchsorted(s, threshold, side="right")) - b for s, b in zip(sorted_abs, below)]
    need = k - sum(below)
    counts = []
    for b, e in zip(below, equal):
        take = min(e, need)
        need -= take
        counts.append(b + take)
    return counts


def nm_prune(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the ``n`` largest-|w| of every ``m`` consecutive entries along ``axis`` (the reduction axis)."""
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % m:
        raise ValueError(f"axis of length {moved.shape[-1]} is not a multiple of {m}")
    groups = moved.reshape(-1, m)
    order = np.argsort(-np.abs(groups), axis=1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    pruned = np.where(mask, groups, 0).reshape(moved.shape)
    return np.moveaxis(pruned, -1, axis).astype(w.dtype)


def nm_holds(w: np.ndarray, n: int, m: int, axis: int) -> bool:
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % m:
        return False
    return bool(np.all(np.count_nonzero(moved.reshape(-1, m), axis=1) <= n))


def channel_norms(w: np.ndarray, axis: int, norm: str = "l1") -> np.ndarray:
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    return np.abs(moved).sum(axis=1) if norm == "l1" else np.sqrt((moved**2).sum(axis=1))


def keep_channels(norms: np.ndarray, sparsity: float) -> np.ndarray:
    """Sorted indices of the channels kept: the round((1 - sparsity) * C) largest norms (at least one)."""
    c = len(norms)
    keep = max(1, int(round((1 - sparsity) * c)))
    order = np.argsort(-norms, kind="stable")[:keep]
    return np.sort(order)


def allocate(errors: np.ndarray, levels: np.ndarray, sizes: np.ndarray, target: float) -> np.ndarray:
    """Per-layer sparsities from ``levels`` that meet ``target`` (fraction of all parameters) at minimum total error.

    ``errors[l, j]`` is the output error with layer ``l`` alone pruned to ``levels[j]``. A Lagrangian sweep picks, for
    each multiplier, every layer's level minimising error - lambda * removed parameters; bisection finds the smallest
    multiplier that removes at least the target. Layers then get their level; the last layer to move is trimmed so
    the total is met (levels are interpolated linearly for it).
    """
    sizes = np.asarray(sizes, np.float64)
    need = target * sizes.sum()

    def pick(lam: float) -> np.ndarray:
        cost = errors - lam * levels[None, :] * sizes[:, None] / sizes.sum()
        return levels[np.argmin(cost, axis=1)]

    lo, hi = 0.0, 1.0
    while (pick(hi) * sizes).sum() < need and hi < 1e12:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if (pick(mid) * sizes).sum() >= need:
            hi = mid
        else:
            lo = mid
    alloc = pick(hi).astype(np.float64)
    below = pick(lo).astype(np.float64)
    # trim layers that the last multiplier step moved, so the total is exactly the target
    excess = (alloc * sizes).sum() - need
    for layer in np.argsort(-(alloc - below)):
        if excess <= 0:
            break
        step = (alloc[layer] - below[layer]) * sizes[layer]
        if step <= 0:
            continue
        cut = min(excess, step)
        alloc[layer] -= cut / sizes[layer]
        excess -= cut
    return np.clip(alloc, 0.0, float(levels.max()))
