"""Probabilistic U-Net stack prediction: running sums, streaming memory, written files."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from microseg.io.tiff import open_stack, write_stack
from microseg.models.punet.network import HEADS, ProbUNet
from microseg.models.punet.predict import (
    bernoulli_entropy_from_logits,
    mask_name,
    predict_stack_punet,
    remove_small,
    write_predictions,
)

VOXEL = (500.0, 94.0, 94.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread beats two on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> ProbUNet:
    torch.manual_seed(0)
    m = ProbUNet(filters=(4, 8, 16), latent_dim_spine=3, latent_dim_dendrite=2, head_convs=3)
    with torch.no_grad():  # spread the prior so that samples differ visibly
        m.prior_net.to_params.bias[3:6] = 1.0
        m.prior_net.to_params.bias[8:10] = 1.0
        for head in m.heads.values():
            head.first.weight.mul_(5.0)
    return m.eval()


def stack(depth: int = 5, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(50, 1000, (depth, size, size)).astype(np.uint16)


def test_outputs_are_consistent_running_sums(model: ProbUNet) -> None:
    r = predict_stack_punet(model, stack(), n_samples=6, temperature=1.4, progress=False)
    assert r["n_samples"] == 6 and r["temperature"] == 1.4 and r["shape"] == (5, 40, 40)
    for k in HEADS:
        p, s1, s2, h = (r[f"{n}_{k}"] for n in ("prob", "sum_p", "sum_p2", "sum_entropy"))
        for arr in (p, s1, s2, h):
            assert arr.shape == (5, 40, 40) and arr.dtype == np.float32
        assert ((p >= 0) & (p <= 1)).all()
        np.testing.assert_allclose(p, s1 / 6, rtol=1e-6)
        var = s2 / 6 - p**2
        assert var.min() > -1e-6
        assert var.max() > 1e-6, "samples should differ"
        assert (h >= 0).all() and (h <= 6 * math.log(2) + 1e-5).all()


def test_samples_streamed_per_plane_agree_with_the_sums(model: ProbUNet) -> None:
    seen = {}

    def on_samples(z, samples):
        seen[z] = {k: v.copy() for k, v in samples.items()}

    r = predict_stack_punet(model, stack(), n_samples=5, on_samples=on_samples, progress=False)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    for z, samples in seen.items():
        for k in HEADS:
            assert samples[k].shape == (5, 40, 40)
            np.testing.assert_allclose(samples[k].mean(0), r[f"prob_{k}"][z], atol=1e-6)
            np.testing.assert_allclose((samples[k] ** 2).sum(0), r[f"sum_p2_{k}"][z], atol=1e-5)


def test_results_do_not_depend_on_plane_batching(model: ProbUNet) -> None:
    s = stack(depth=5)
    a = predict_stack_punet(model, s, n_samples=4, batch_planes=1, progress=False)
    b = predict_stack_punet(model, s, n_samples=4, batch_planes=3, sample_chunk=3, progress=False)
    for k in HEADS:
        np.testing.assert_allclose(a[f"prob_{k}"], b[f"prob_{k}"], atol=1e-6)
        np.testing.assert_allclose(a[f"sum_entropy_{k}"], b[f"sum_entropy_{k}"], atol=1e-5)
    c = predict_stack_punet(model, s, n_samples=4, seed=1, progress=False)
    assert not np.allclose(a["prob_spine"], c["prob_spine"])


def test_lazy_tiff_and_two_and_a_half_d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ProbUNet(in_channels=3, filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2)
    write_stack(tmp_path / "s.tif", stack(depth=3, size=36), VOXEL)
    with open_stack(tmp_path / "s.tif") as st:
        r = predict_stack_punet(m, st, n_samples=2, progress=False)
    assert r["prob_dendrite"].shape == (3, 36, 36)


def test_sliding_window_mode(model: ProbUNet) -> None:
    r = predict_stack_punet(model, stack(depth=2, size=40), n_samples=4, tile=(16, 4))
    for k in HEADS:
        np.testing.assert_allclose(r[f"prob_{k}"], r[f"sum_p_{k}"] / 4, rtol=1e-5)
        assert ((r[f"prob_{k}"] >= 0) & (r[f"prob_{k}"] <= 1)).all()
    with pytest.raises(ValueError, match="multiple"):
        predict_stack_punet(model, stack(depth=1), n_samples=2, tile=(18, 4))


def _peak_bytes(model: ProbUNet, arr: np.ndarray, collect: bool) -> int:
    planes = []
    tracemalloc.start()
    try:
        predict_stack_punet(
            model,
            arr,
            n_samples=4,
            batch_planes=2,
            collect=collect,
            on_plane=lambda z, stats: planes.append(z),
            progress=False,
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert planes == list(range(len(arr)))


def test_streaming_memory_does_not_grow_with_depth(model: ProbUNet) -> None:
    shallow, deep = stack(depth=8, size=64), stack(depth=32, size=64)
    assert _peak_bytes(model, deep, collect=False) < 1.3 * _peak_bytes(
        model, shallow, collect=False
    )
    # the measurement can see growth: collected outputs are 10 float32 volumes
    assert _peak_bytes(model, deep, collect=True) > 2 * _peak_bytes(model, shallow, collect=True)


def test_mask_name_matches_deepd3() -> None:
    assert mask_name("spine", 24, 1.4, 40, 0.5) == "mask_spine_prior_S24_T1.40_size40_thr0.50.tif"
    assert (
        mask_name("dendrite", 8, 1.0, 10, 0.25, source="post")
        == "mask_dendrite_post_S8_T1.00_size10_thr0.25.tif"
    )


def test_write_predictions(tmp_path: Path) -> None:
    shape = (4, 20, 20)
    prob = np.zeros(shape, np.float32)
    prob[1:3, 2:8, 2:8] = 0.9  # 72 voxels: kept
    prob[0, 15, 15] = 0.8  # 1 voxel: removed as small
    result = {"n_samples": 24, "temperature": 1.4, "intensity": (1.0, 2.0)}
    for k in HEADS:
        result[f"prob_{k}"] = prob
        result[f"sum_p_{k}"] = prob * 24
        result[f"sum_p2_{k}"] = prob**2 * 24
        result[f"sum_entropy_{k}"] = np.zeros(shape, np.float32)
    paths = write_predictions(tmp_path, result, VOXEL, size_thr=40, prob_thr=0.5)
    spine_mask = tmp_path / "mask_spine_prior_S24_T1.40_size40_thr0.50.tif"
    assert paths["mask_spine"] == spine_mask
    mask = tifffile.imread(spine_mask)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask.sum() == 72 and mask[0, 15, 15] == 0
    with open_stack(tmp_path / "prob_spine.tif") as st:
        assert st.dtype == np.float32
        assert st.voxel_size_nm == pytest.approx(VOXEL)
    for name in ("sum_p", "sum_p2", "sum_entropy"):
        for k in HEADS:
            assert (tmp_path / f"{name}_{k}.tif").is_file()
    meta = json.loads((tmp_path / "punet_prediction.json").read_text())
    assert meta["n_samples"] == 24 and meta["entropy_unit"] == "nats"
    assert meta["files"]["mask_dendrite"] == "mask_dendrite_prior_S24_T1.40_size40_thr0.50.tif"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"
    with pytest.raises(ValueError, match="collect=True"):
        write_predictions(tmp_path, {"n_samples": 1, "temperature": 1.0}, VOXEL)


def test_remove_small_is_three_dimensional() -> None:
    m = np.zeros((3, 10, 10), bool)
    m[:, 1:4, 1:4] = True  # 27 voxels across planes
    m[1, 8, 8] = True
    out = remove_small(m, 20)
    assert out.sum() == 27 and not out[1, 8, 8]
    assert remove_small(m, 0).sum() == 28


def test_entropy_from_logits_is_stable() -> None:
    logits = torch.tensor([-100.0, -2.0, 0.0, 3.0, 100.0])
    p = torch.sigmoid(logits[1:4])
    expected = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    h = bernoulli_entropy_from_logits(logits)
    torch.testing.assert_close(h[1:4], expected)
    assert h[2].item() == pytest.approx(math.log(2))
    assert torch.isfinite(h).all() and h[0] < 1e-30 and h[4] < 1e-30


def test_device_is_resolved_in_one_place(model: ProbUNet) -> None:
    from microseg.errors import ConfigError

    r = predict_stack_punet(model, stack(2), n_samples=2, device="cpu", progress=False)
    assert r["prob_spine"].shape == (2, 40, 40)
    with pytest.raises(ConfigError, match="device"):
        predict_stack_punet(model, stack(2), n_samples=2, device="gpu0", progress=False)


def test_old_import_path_is_a_re_export() -> None:
    import microseg.infer.punet_predict as old
    import microseg.models.punet.predict as new

    assert old.predict_stack_punet is new.predict_stack_punet
    assert old.write_predictions is new.write_predictions
