"""Random-shape occluders: image only, labels bit for bit, reproducible, off at prob 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from microseg.data.shapes import RandShapesd, ShapesConfig, shape_mask
from microseg.errors import ConfigError


def sample(seed: int = 0, channels: int = 2, size: int = 48) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, (1, size, size)).astype(np.uint16)
    return {
        "image": rng.random((channels, size, size)).astype(np.float32),
        "target": labels,
        "weight": rng.random((1, size, size)).astype(np.float32),
    }


def shapes(seed: int, **kw) -> RandShapesd:
    t = RandShapesd(keys="image", **{"prob": 1.0, "max_shapes": 4, "size_range": (0.1, 0.3), **kw})
    t.set_random_state(seed)
    return t


@pytest.mark.parametrize("kinds", [("ellipse",), ("rounded_rect",), ("ellipse", "rounded_rect")])
@pytest.mark.parametrize("soft_edge", [0.0, 3.0])
def test_labels_untouched_and_image_changed_only_inside_the_shapes(kinds, soft_edge):
    d = sample()
    before = {k: v.copy() for k, v in d.items()}
    t = shapes(1, kinds=kinds, soft_edge=soft_edge, intensity_range=(2.0, 3.0))
    out = t(d)
    inside = t.last_alpha.max(axis=0) > 0
    assert inside.any() and not inside.all()
    for k in ("target", "weight"):  # bitwise, under the shapes as well as outside them
        assert out[k].dtype == before[k].dtype
        assert out[k].tobytes() == before[k].tobytes()
        assert d[k].tobytes() == before[k].tobytes()
    assert d["image"].tobytes() == before["image"].tobytes()  # the input is not written to
    changed = out["image"] != before["image"]
    assert changed.any()
    assert not changed[:, ~inside].any()  # outside every shape: the same bits
    # the fill is out of the image's range, so every fully covered pixel changed (all channels)
    core = t.last_alpha.max(axis=0) >= 1
    assert changed[:, core].all()
    assert out["image"].dtype == before["image"].dtype


def test_same_seed_same_shapes_and_different_seed_different_shapes():
    a = shapes(7)(sample())["image"]
    b = shapes(7)(sample())["image"]
    c = shapes(8)(sample())["image"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_compose_seeds_it_like_every_other_rand_transform():
    def run(seed: int) -> np.ndarray:
        pipeline = Compose([RandShapesd(keys="image", prob=1.0)])
        pipeline.set_random_state(seed=seed)
        return np.stack([pipeline(sample(i))["image"] for i in range(3)])

    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_prob_zero_is_the_identity_and_the_config_adds_nothing():
    d = sample()
    t = shapes(0, prob=0.0)
    out = t(d)
    for k in d:
        assert out[k].tobytes() == d[k].tobytes()
    assert t.last_alpha is None
    assert ShapesConfig().transform() is None
    assert isinstance(ShapesConfig(prob=0.5).transform(), RandShapesd)


def test_prob_draws_shapes_on_about_that_share_of_calls():
    t = shapes(5, prob=0.3)
    hits = 0
    for i in range(400):
        t(sample(i % 3, size=16))
        hits += t.last_alpha is not None
    assert 0.22 < hits / 400 < 0.38


def test_torch_tensors_stay_tensors_and_match_numpy():
    d = sample()
    a = shapes(2)(dict(d))["image"]
    b = shapes(2)({k: torch.as_tensor(v.astype(np.float32)) for k, v in d.items()})["image"]
    assert isinstance(b, torch.Tensor) and b.dtype == torch.float32
    np.testing.assert_allclose(b.numpy(), a, rtol=0, atol=1e-6)


def test_shape_masks_have_the_drawn_size():
    m = shape_mask("rounded_rect", (20.0, 30.0), (5.0, 10.0), (64, 64), corner=0.0)
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (15, 25, 20, 40)
    rounded = shape_mask("rounded_rect", (20.0, 30.0), (5.0, 10.0), (64, 64), corner=1.0)
    assert rounded.sum() < m.sum() and not rounded[15, 20] and rounded[20, 30]
    e = shape_mask("ellipse", (32.0, 32.0), (10.0, 10.0), (64, 64))
    assert abs(e.sum() - np.pi * 100) < 0.1 * np.pi * 100


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="kinds"):
        ShapesConfig(prob=0.5, kinds=("star",))
    with pytest.raises(ConfigError, match="prob"):
        ShapesConfig(prob=1.5)
    with pytest.raises(ConfigError, match="unknown shapes keys"):
        ShapesConfig.from_mapping({"probability": 0.5})
    with pytest.raises(ConfigError, match="size_range"):
        ShapesConfig.from_mapping({"size_range": 0.2})


def test_in_the_unet_pipeline_only_the_image_changes():
    """Same seed, with and without occluders: the same crop, the same target and weight map
    bit for bit (the shapes come after the crop), an image that differs."""
    from monai.transforms.utils import map_binary_to_indices

    from microseg.models.unet.train import UnetTrainConfig, patch_transforms

    d = sample(channels=1, size=64)
    d["target"] = (d["target"] % 3).astype(np.float32)
    d["fg"], d["bg"] = map_binary_to_indices(d["target"] > 0)
    model = {"arch": "unet", "features": [4, 8], "num_res_units": 0}
    out = []
    for prob in (0.0, 1.0):
        cfg = UnetTrainConfig(model=model, patch_size=32, augment=False, shapes={"prob": prob})
        pipeline = patch_transforms(cfg)
        assert len(pipeline.transforms) == (2 if prob else 1)
        pipeline.set_random_state(seed=11)
        out.append(pipeline(dict(d))[0])
    plain, occluded = out
    for k in ("target", "weight"):
        assert np.asarray(occluded[k]).tobytes() == np.asarray(plain[k]).tobytes()
    assert not np.array_equal(np.asarray(occluded["image"]), np.asarray(plain["image"]))


def test_in_the_punet_pipeline_spine_and_dendrite_masks_stay():
    from microseg.data.patches import build_augment

    assert build_augment(False, ShapesConfig()) is None
    rng = np.random.default_rng(0)
    item = {
        "image": rng.random((3, 32, 32)).astype(np.float32),
        "spine": (rng.random((1, 32, 32)) > 0.8).astype(np.float32),
        "dendrite": (rng.random((1, 32, 32)) > 0.5).astype(np.float32),
    }
    pipeline = build_augment(False, ShapesConfig(prob=1.0, intensity_range=(2.0, 3.0)))
    pipeline.set_random_state(seed=1)
    out = pipeline(dict(item))
    for k in ("spine", "dendrite"):
        assert np.asarray(out[k]).tobytes() == item[k].tobytes()
    changed = np.asarray(out["image"]) != item["image"]
    assert changed.any() and (changed == changed[:1]).all()  # every context plane alike
