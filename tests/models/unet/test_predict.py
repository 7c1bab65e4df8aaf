"""Sliding-window instance prediction: shapes, Gaussian vs min blending, dataset outputs."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.draw import disk
from torch import nn

from microseg.data.manifest import write_manifest
from microseg.errors import ConfigError
from microseg.io.tiff import read_stack, write_stack
from microseg.models.classical import otsu_watershed
from microseg.models.unet import UnetConfig, build_unet
from microseg.models.unet.predict import (
    InferConfig,
    object_stats,
    predict_dataset,
    predict_instances,
    predict_probs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pointwise(nn.Module):
    """Foreground logits from the intensity, pixel by pixel: the same in every window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 10.0  # interior logit grows with intensity
            self.conv.bias[0] = 3.0
            self.conv.bias[1] = -5.0
            self.conv.bias[2] = -5.0

    def forward(self, x):
        return self.conv(x)


class EdgeHallucination(Pointwise):
    """Like :class:`Pointwise`, plus strong false interior along every window's 3-px border."""

    def forward(self, x):
        out = super().forward(x).clone()
        ring = torch.ones_like(out[:, 1], dtype=torch.bool)
        ring[:, 3:-3, 3:-3] = False
        out[:, 1][ring] = 20.0
        return out


def pointwise_probs(model: nn.Module, image01: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.repeat(image01[None, None], 3, axis=1).astype(np.float32))
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0].numpy()


@pytest.mark.parametrize("blend", ["gaussian", "min"])
@pytest.mark.parametrize("shape", [(50, 70), (20, 24), (64, 64)])
def test_output_shape_equals_input(blend, shape):
    model = build_unet(UnetConfig(arch="unet", features=(4, 8, 16))).eval()
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    labels, probs = predict_instances(model, image, InferConfig(roi=32, blend=blend))
    assert labels.shape == shape and labels.dtype == np.uint16
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("blend", ["gaussian", "min"])
def test_blends_agree_with_a_window_independent_model(blend):
    model = Pointwise().eval()
    image = np.random.default_rng(1).random((45, 61)).astype(np.float32)
    normed = image[None]  # already in [0, 1]: pass as a normalised CYX image
    probs = predict_probs(model, normed, InferConfig(roi=16, blend=blend), normalised=True)
    assert np.allclose(probs, pointwise_probs(model, image), atol=1e-4)


@pytest.mark.parametrize("blend", ["gaussian", "min"])
def test_mirroring_tta_is_flip_equivariant_and_averages_the_flips(blend):
    torch.manual_seed(0)
    model = build_unet(UnetConfig(arch="unet", features=(4, 8, 16))).eval()
    image = np.random.default_rng(2).random((1, 48, 48)).astype(np.float32)
    cfg = InferConfig(roi=48, blend=blend, tta=True)  # one unpadded window: TTA is the only mean
    probs = predict_probs(model, image, cfg, normalised=True)
    flipped = predict_probs(model, image[:, ::-1, :].copy(), cfg, normalised=True)
    assert np.allclose(flipped, probs[:, ::-1, :], atol=1e-5)
    plain = InferConfig(roi=48, blend=blend)
    views = [
        np.flip(predict_probs(model, np.flip(image, d).copy(), plain, normalised=True), d)
        for d in [(), (2,), (1,), (1, 2)]
    ]
    assert np.allclose(probs, np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(probs, views[0], atol=1e-3)  # an untrained net is not symmetric


def test_min_blend_is_conservative_at_window_edges():
    model = EdgeHallucination().eval()
    image = np.zeros((1, 64, 64), np.float32)  # nothing to find
    cfg = {"roi": 32, "overlap": 0.5}
    fg_min = 1 - predict_probs(model, image, InferConfig(blend="min", **cfg), normalised=True)[0]
    fg_gauss = 1 - predict_probs(model, image, InferConfig(**cfg), normalised=True)[0]
    inner = (slice(3, -3), slice(3, -3))  # pixels some window sees away from its edge
    assert fg_min[inner].max() < 0.05
    # Gaussian blending down-weights window edges but keeps some of their artefacts
    assert fg_gauss[inner].max() > 0.1 > 10 * fg_min[inner].max()
    assert np.all(fg_min <= fg_gauss + 1e-5)


def test_infer_config_validation():
    with pytest.raises(ConfigError):
        InferConfig(blend="max")
    with pytest.raises(ConfigError):
        InferConfig.from_mapping({"tile": 3})
    assert InferConfig.from_mapping({"post": {"min_size": 3}}).post.min_size == 3


def test_object_stats():
    labels = np.zeros((10, 10), np.uint16)
    labels[:2, :2] = 1  # 4 px
    labels[5:8, 5:8] = 3  # 9 px (ids need not be consecutive)
    s = object_stats("a", labels)
    assert s["n_objects"] == 2 and s["area_mean"] == 6.5 and s["area_median"] == 6.5
    empty = object_stats("b", np.zeros((4, 4), np.uint16))
    assert empty["n_objects"] == 0 and np.isnan(empty["area_mean"])


def test_predict_dataset_writes_labels_probs_and_objects(tmp_path):
    prepared = tmp_path / "prepared"
    rows = []
    for i, split in enumerate(["val", "val", "train"]):
        labels = np.zeros((40, 48), np.uint16)
        labels[disk((20, 15), 6, shape=labels.shape)] = 1
        labels[disk((20, 33), 6, shape=labels.shape)] = 2
        image = (30 + 180 * (labels > 0)).astype(np.uint8)
        write_stack(prepared / "images" / f"p{i}.tif", image)
        write_stack(prepared / "labels" / f"p{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"p{i}",
                "split": split,
                "image_path": f"images/p{i}.tif",
                "label_path": f"labels/p{i}.tif",
                "label_kind": "instance",
            }
        )
    write_manifest(rows, prepared)

    model = build_unet(UnetConfig(arch="unet", features=(4, 8, 16))).eval()
    cfg = InferConfig(roi=32, save_probs=True)
    table = predict_dataset(model, prepared, "val", tmp_path / "out", cfg, progress=False)
    assert list(table["sample_id"]) == ["p0", "p1"]
    assert {"n_objects", "area_mean", "area_median", "area_p10", "area_p90"} <= set(table)
    assert read_stack(tmp_path / "out" / "labels" / "p0.tif").dtype == np.uint16
    assert read_stack(tmp_path / "out" / "probs" / "p0.tif").shape == (3, 40, 48)
    on_disk = pd.read_csv(tmp_path / "out" / "objects.csv")
    assert len(on_disk) == 2

    baseline = functools.partial(otsu_watershed)
    table = predict_dataset(baseline, prepared, "val", tmp_path / "base", progress=False)
    assert table["n_objects"].tolist() == [2, 2]
    assert not (tmp_path / "base" / "probs").exists()
    with pytest.raises(ConfigError):
        predict_dataset(baseline, prepared, "test", tmp_path / "none", progress=False)
