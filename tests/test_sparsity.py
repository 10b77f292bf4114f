"""Sparsity numerics: exact counts, global thresholds, N:M patterns, allocation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qxc.sparsity import allocate, global_counts, keep_channels, magnitude_prune, nm_holds, nm_prune


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 400), st.floats(0, 0.99), st.integers(0, 2**31))
def test_magnitude_prune_is_exact_even_with_ties(n, sparsity, seed):
    w = np.random.default_rng(seed).integers(-3, 4, n).astype(np.float32)  # many ties and zeros
    k = int(round(sparsity * n))
    out = magnitude_prune(w, k)
    assert np.count_nonzero(out == 0) >= k
    changed = np.count_nonzero(out != w)
    assert changed <= k
    kept = np.abs(out[out != 0])
    removed = np.abs(w[(out == 0) & (w != 0)])
    if kept.size and removed.size:
        assert removed.max() <= kept.min()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=5), st.floats(0, 0.95), st.integers(0, 2**31))
def test_global_counts_remove_exactly_the_target(sizes, sparsity, seed):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=s).astype(np.float32) for s in sizes]
    counts = global_counts(ws, sparsity)
    assert sum(counts) == int(round(sparsity * sum(sizes)))
    pruned = [magnitude_prune(w, c) for w, c in zip(ws, counts)]
    kept = np.concatenate([np.abs(p[p != 0]) for p in pruned] + [np.zeros(0)])
    gone = np.concatenate([np.abs(w[p == 0]) for w, p in zip(ws, pruned)])
    if kept.size and gone.size:
        assert gone.max() <= kept.min()


def test_nm_pattern_along_an_axis():
    w = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    out = nm_prune(w, 2, 4, axis=0)
    assert nm_holds(out, 2, 4, 0) and not nm_holds(w, 2, 4, 0)
    groups = np.moveaxis(out, 0, -1).reshape(-1, 4)
    assert np.all(np.count_nonzero(groups, axis=1) == 2)


def test_keep_channels_and_allocation():
    assert keep_channels(np.array([3.0, 1.0, 2.0, 0.5]), 0.5).tolist() == [0, 2]
    levels = np.array([0.25, 0.5, 0.75])
    # layer 0 hurts a lot when pruned, layer 1 barely: the allocation prunes layer 1 harder
    errors = np.array([[0.1, 1.0, 5.0], [0.01, 0.02, 0.05]])
    alloc = allocate(errors, levels, np.array([100, 100]), 0.5)
    assert alloc[1] > alloc[0] and abs((alloc * 100).sum() - 100) < 1e-6
