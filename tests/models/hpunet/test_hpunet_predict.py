"""The hierarchical Prob-UNet's predictor keeps the flat family's output contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microseg.models.hpunet import HierarchicalProbUNet, HpunetSegmenter, predict_stack_hpunet
from microseg.models.punet import ProbUNet, predict_stack_punet, write_predictions


@pytest.fixture(scope="module")
def net() -> HierarchicalProbUNet:
    torch.manual_seed(0)
    return HierarchicalProbUNet(filters=(4, 8, 16), latent_levels=2, latent_dim=2, head_convs=2)


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, (3, 30, 34)).astype(np.uint16)


def test_result_has_the_flat_familys_keys_and_shapes(net, stack) -> None:
    torch.manual_seed(0)
    flat = ProbUNet(
        filters=(4, 8), latent_filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2
    )
    ref = predict_stack_punet(flat, stack, n_samples=2, progress=False)
    res = predict_stack_hpunet(net, stack, n_samples=4, progress=False)
    assert set(res) == set(ref)
    for key, value in res.items():
        if isinstance(value, np.ndarray):
            assert value.shape == stack.shape and value.dtype == np.float32, key
    n = res["n_samples"]
    for head in ("spine", "dendrite"):
        np.testing.assert_allclose(res[f"prob_{head}"], res[f"sum_p_{head}"] / n, rtol=1e-6)
        var = res[f"sum_p2_{head}"] / n - res[f"prob_{head}"] ** 2
        assert (var > -1e-6).all() and var.max() > 0  # samples differ
        assert ((res[f"prob_{head}"] >= 0) & (res[f"prob_{head}"] <= 1)).all()


def test_planes_do_not_depend_on_batching_and_callbacks_stream(net, stack) -> None:
    seen: dict[int, np.ndarray] = {}
    per_sample: dict[int, dict] = {}
    a = predict_stack_hpunet(net, stack, n_samples=3, batch_planes=1, progress=False, seed=5)
    b = predict_stack_hpunet(
        net, stack, n_samples=3, batch_planes=3, sample_chunk=2, progress=False, seed=5,
        on_plane=lambda z, p: seen.__setitem__(z, p["prob_spine"]),
        on_samples=lambda z, s: per_sample.__setitem__(z, s),
    )  # fmt: skip
    np.testing.assert_allclose(a["prob_spine"], b["prob_spine"], atol=1e-6)
    assert sorted(seen) == [0, 1, 2]
    assert per_sample[1]["spine"].shape == (3, 30, 34)
    np.testing.assert_allclose(per_sample[1]["spine"].mean(0), b["prob_spine"][1], atol=1e-6)


def test_tiled_prediction_and_the_facade(net, stack, tmp_path: Path) -> None:
    seg = HpunetSegmenter(net)
    tiled = seg.predict_stack(stack, n_samples=2, tile=(16, 4), progress=False)
    assert tiled["prob_dendrite"].shape == stack.shape
    assert np.isfinite(tiled["sum_entropy_spine"]).all()
    res = seg.predict([stack], n_samples=2, progress=False)[0]
    paths = write_predictions(tmp_path, res, (500.0, 94.0, 94.0), size_thr=1, model="hpunet")
    assert '"model": "hpunet"' in paths["meta"].read_text()
    assert {"prob_spine", "sum_p2_dendrite", "mask_spine"} <= set(paths)
