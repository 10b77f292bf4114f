"""Observers: methods differ where they should, memory is flat in the sample count, chunks merge exactly, JSON."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import MODELS

from qxc import ir as qir
from qxc.calibrate import Histogram, MinMax, Ranges, collect_ranges
from qxc.data import load_data
from qxc.errors import UsageError


def _heavy_tail(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_t(df=2, size=n).astype(np.float32)


def test_histogram_methods_clip_heavy_tails_unlike_minmax():
    x = _heavy_tail()
    mm = MinMax()
    mm.update(x)
    h = Histogram(mm.lo, mm.hi)
    h.update(x)
    full = mm.hi - mm.lo
    for lo, hi in (h.percentile(99.9), h.entropy()):
        assert hi - lo < 0.2 * full and lo < 0 < hi
    lo, hi = h.mse("int8", True)  # squared error weighs the outliers heavily: it clips, but less
    assert hi - lo < 0.9 * full and lo < 0 < hi
    relu = np.maximum(x, 0)
    h2 = Histogram(0.0, float(relu.max()))
    h2.update(relu)
    lo, hi = h2.entropy()
    assert lo == 0.0 and 0 < hi < relu.max()  # one-sided for non-negative tensors


def test_chunked_histograms_equal_the_single_pass():
    x = _heavy_tail()
    whole = Histogram(float(x.min()), float(x.max()))
    whole.update(x)
    parts = [Histogram(float(x.min()), float(x.max())) for _ in range(4)]
    for p, chunk in zip(parts, np.array_split(x, 4)):
        p.update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.entropy() == whole.entropy()


def test_observer_memory_is_flat_in_the_sample_count():
    def peak(batches):
        tracemalloc.start()
        h = Histogram(-10.0, 10.0)
        rng = np.random.default_rng(0)
        for _ in range(batches):
            h.update(rng.normal(size=50_000).astype(np.float32))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(40) < 1.2 * peak(5)


def test_ranges_from_a_model_and_json_round_trip(tmp_path):
    model = qir.load(MODELS / "cnn_digits.onnx")
    data = load_data(MODELS / "cnn_digits_train.npz", model).head(200)
    mm = collect_ranges(model, data, method="minmax")
    ent = collect_ranges(model, data, method="entropy", keep_minmax=["logits"])
    assert set(mm.ranges) == {"image", "c1", "r1", "p1", "c2", "r2", "p2", "features", "logits"}
    assert ent["logits"] == mm["logits"]  # kept
    assert ent["c1"][1] < mm["c1"][1]  # entropy clips
    assert mm["r1"][0] == 0.0
    mm.save(tmp_path / "r.json")
    back = Ranges.load(tmp_path / "r.json")
    assert back.ranges == {k: (float(a), float(b)) for k, (a, b) in mm.ranges.items()}
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(UsageError, match="not a qxc ranges file"):
        Ranges.load(tmp_path / "bad.json")


def test_batch_size_does_not_change_minmax_ranges_beyond_float_rounding():
    model = qir.load(MODELS / "digits_mlp.onnx")
    data = load_data(MODELS / "digits_train.npz", model).head(128)
    a = collect_ranges(model, data, batch_size=1)
    b = collect_ranges(model, data, batch_size=128)
    for k in a.ranges:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_tensors_holding_infinities_are_named_and_round_trip(tmp_path):
    """A padding mask's -inf is left out of the range but remembered: insert-qdq keeps such tensors float (a local
    run, a merge of chunks and a saved ranges file all say which)."""
    from helpers import masked_attention_data, masked_attention_model

    a, b = MinMax(), MinMax()
    a.update(np.array([0.0, -np.inf, 2.0], np.float32))
    b.update(np.array([-1.0, 3.0], np.float32))
    merged = a.merge(b)
    assert (a.lo, a.hi, a.infinite, b.infinite) == (0.0, 2.0, True, False)
    assert (merged.lo, merged.hi, merged.infinite) == (-1.0, 3.0, True)
    model = qir.from_proto(masked_attention_model())
    ranges = collect_ranges(model, load_data(masked_attention_data(), model))
    assert ranges.infinite == {"bias", "bias3", "masked"} and np.isfinite(ranges["masked"]).all()
    ranges.save(tmp_path / "r.json")
    assert Ranges.load(tmp_path / "r.json").infinite == ranges.infinite
