"""Uncertainty decomposition: hand-made sample sets with known answers, streaming = one-shot."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.uncertainty import (
    MAP_NAMES,
    UncertaintySums,
    binary_entropy,
    from_samples,
    maps_from_samples,
    uncertainty_maps,
)

LN2 = math.log(2.0)


def test_binary_entropy_known_values_and_units() -> None:
    p = np.array([0.0, 0.5, 1.0, 0.1])
    h = binary_entropy(p)
    ref = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    np.testing.assert_allclose(h, [0.0, LN2, 0.0, ref], rtol=1e-12, atol=0)
    np.testing.assert_allclose(binary_entropy(p, unit="bits"), h / LN2, rtol=1e-12)
    assert binary_entropy(np.float32(0.5)).dtype == np.float32
    assert binary_entropy(np.array([0, 1])).dtype == np.float64
    with pytest.raises(MicrosegError, match="unit"):
        binary_entropy(p, unit="dits")  # type: ignore[arg-type]


def test_identical_samples_have_no_epistemic_part() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (17, 13))
    p[0, :3] = [0.0, 1.0, 1e-9]
    m = uncertainty_maps(from_samples(np.repeat(p[None], 12, axis=0)), dtype=None)
    assert np.abs(m["mutual_information"]).max() < 1e-6
    np.testing.assert_allclose(m["entropy"], m["expected_entropy"], atol=1e-6)
    np.testing.assert_allclose(m["mean"], p, atol=1e-12)
    assert m["variance"].max() < 1e-12
    np.testing.assert_allclose(m["entropy"], binary_entropy(p), atol=1e-12)


def test_rounding_negatives_are_clipped_to_zero() -> None:
    # identical float32 samples: MI is 0 in exact arithmetic, about -1e-7 in float32 rounding
    p = np.random.default_rng(0).uniform(0, 1, 1000).astype(np.float32)
    sums = from_samples(np.repeat(p[None], 7, axis=0), dtype=np.float32)
    raw = binary_entropy(sums.sum_p / np.float32(7)) - sums.sum_entropy / np.float32(7)
    assert raw.min() < 0  # the case this test is about does occur
    m = uncertainty_maps(sums, dtype=None)
    mi = m["mutual_information"]
    assert mi.min() == 0.0 and mi.max() < 1e-6
    assert m["variance"].min() == 0.0  # E[p^2] - E[p]^2 cancellation, clipped too


def test_hard_split_is_pure_epistemic() -> None:
    p = np.zeros((10, 4, 5))
    p[:5] = 1.0  # half the samples say 1, half say 0
    m = uncertainty_maps(from_samples(p), dtype=None)
    np.testing.assert_allclose(m["mutual_information"], LN2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["entropy"], LN2, rtol=0, atol=1e-12)
    assert np.all(m["expected_entropy"] == 0.0)
    np.testing.assert_allclose(m["mean"], 0.5)
    np.testing.assert_allclose(m["variance"], 0.25)
    bits = uncertainty_maps(from_samples(p), unit="bits", dtype=None)
    np.testing.assert_allclose(bits["mutual_information"], 1.0, atol=1e-12)


def test_decomposition_on_random_sets_matches_direct_formulas() -> None:
    rng = np.random.default_rng(1)
    p = 1 / (1 + np.exp(-rng.normal(rng.normal(0, 2, (30, 40)), 1.5, (16, 30, 40))))
    m = uncertainty_maps(from_samples(p), dtype=None)
    assert set(m) == set(MAP_NAMES)
    np.testing.assert_allclose(
        m["entropy"], m["mutual_information"] + m["expected_entropy"], atol=1e-12
    )
    assert m["mutual_information"].min() >= 0
    assert m["mutual_information"].max() > 0.05  # the samples do disagree
    # direct: mean, population variance, entropies of the stack
    np.testing.assert_allclose(m["mean"], p.mean(0), atol=1e-12)
    np.testing.assert_allclose(m["variance"], p.var(0), atol=1e-12)
    np.testing.assert_allclose(m["expected_entropy"], binary_entropy(p).mean(0), atol=1e-12)
    np.testing.assert_allclose(m["entropy"], binary_entropy(p.mean(0)), atol=1e-12)
    m1 = uncertainty_maps(from_samples(p), ddof=1, dtype=None)
    np.testing.assert_allclose(m1["variance"], p.var(0, ddof=1), atol=1e-12)
    # MI never exceeds the total and the total never exceeds ln 2
    assert np.all(m["mutual_information"] <= m["entropy"] + 1e-15)
    assert m["entropy"].max() <= LN2 + 1e-15


def test_streamed_sums_equal_one_shot() -> None:
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, (24, 6, 20, 22)).astype(np.float32)
    ref = uncertainty_maps(from_samples(p), dtype=None)
    # samples arriving in uneven batches ...
    s = UncertaintySums.zeros(p.shape[1:])
    for a, b in [(0, 5), (5, 6), (6, 24)]:
        s.update(p[a:b])
    assert s.n == 24
    # ... or split across two workers and merged ...
    merged = from_samples(p[:10]).merge(from_samples(p[10:]))
    # ... or plane by plane (what a predictor does), maps stacked afterwards
    planes = [uncertainty_maps(from_samples(p[:, z]), dtype=None) for z in range(p.shape[1])]
    for name in MAP_NAMES:
        stacked = np.stack([pl[name] for pl in planes])
        np.testing.assert_allclose(uncertainty_maps(s, dtype=None)[name], ref[name], atol=1e-12)
        np.testing.assert_allclose(
            uncertainty_maps(merged, dtype=None)[name], ref[name], atol=1e-12
        )
        np.testing.assert_allclose(stacked, ref[name], atol=1e-12)


def test_eps_clipping_keeps_mi_non_negative() -> None:
    p = np.zeros((4, 3))
    p[:2] = 1.0
    m = uncertainty_maps(from_samples(p, eps=1e-6), dtype=None)
    assert m["mutual_information"].min() >= 0
    np.testing.assert_allclose(m["mutual_information"], LN2, atol=2e-5)
    assert m["expected_entropy"].min() > 0  # clipped samples carry a sliver of entropy
    with pytest.raises(MicrosegError, match="eps"):
        from_samples(p, eps=0.7)
    with pytest.raises(MicrosegError, match="eps"):
        from_samples(p, eps=1e-6).merge(from_samples(p))


def test_float32_input_stays_float32_and_small() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, (16, 16, 256, 256)).astype(np.float32)  # 64 MiB
    vol = p[0].nbytes  # 4 MiB
    tracemalloc.start()
    try:
        sums = from_samples(p, dtype=np.float32)
        maps = uncertainty_maps(sums)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sums.dtype == np.float32
    assert all(v.dtype == np.float32 for v in maps.values())
    # 3 sums + 5 maps in float32 plus chunk temporaries; no float64 copy of the stack
    # (128 MiB) or of a sample (8 MiB each), nothing the size of the stack at all
    assert peak < 8 * vol + 12 * 2**20, peak / 2**20
    ref = uncertainty_maps(from_samples(p[:, :2]), dtype=None)
    for name in MAP_NAMES:
        np.testing.assert_allclose(maps[name][:2], ref[name], atol=2e-6)
    assert maps_from_samples(p[:, :1]).keys() == set(MAP_NAMES)
    assert maps_from_samples(p[:, :1])["mean"].dtype == np.float32


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from microseg.evaluate import uncertainty

    rng = np.random.default_rng(4)
    p = rng.uniform(0, 1, (5, 7, 11))
    ref = uncertainty_maps(from_samples(p), dtype=None)
    monkeypatch.setattr(uncertainty, "CHUNK", 13)  # chunks that straddle rows
    got = uncertainty_maps(from_samples(p), dtype=None)
    for name in MAP_NAMES:
        np.testing.assert_array_equal(got[name], ref[name])
    np.testing.assert_array_equal(binary_entropy(p), binary_entropy(p.copy()))


def test_bad_inputs_raise() -> None:
    with pytest.raises(MicrosegError, match=r"\[0, 1\]"):
        from_samples(np.array([[2.5, -3.0]]))  # logits, not probabilities
    with pytest.raises(MicrosegError, match=r"\[0, 1\]"):
        from_samples(np.array([[np.nan, 0.5]]))
    s = UncertaintySums.zeros((4, 4))
    with pytest.raises(ShapeMismatchError, match="sample axis first"):
        s.update(np.zeros((4, 4)))
    with pytest.raises(ShapeMismatchError):
        s.merge(UncertaintySums.zeros((4, 5)))
    with pytest.raises(MicrosegError, match="n = 0"):
        uncertainty_maps(s)
    with pytest.raises(MicrosegError, match="n = 1"):
        uncertainty_maps(from_samples(np.zeros((1, 3))), ddof=1)
