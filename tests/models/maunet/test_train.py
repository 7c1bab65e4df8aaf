"""maunet training on a toy targets cache: the distance target, batches, losses, loop, family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import load_targets, prepare_targets
from microseg.errors import ConfigError, DataFormatError
from microseg.io.tiff import write_stack
from microseg.models import get_model
from microseg.models.maunet import MaunetConfig, build_maunet, load_maunet
from microseg.models.maunet.network import N_CLASSES
from microseg.models.maunet.train import (
    DistanceSampler,
    MaunetModule,
    MaunetTrainConfig,
    distance_loss,
    normalised_distance,
    train_items,
    train_maunet,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = {"features": [4, 8, 8, 16], "decoder_channels": [8, 8, 4, 4, 4]}


def toy_sample(seed: int, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 6):
        labels[disk(rng.uniform(8, shape[0] - 8, 2), rng.uniform(4, 7), shape=shape)] = i
    image = 20 + 160 * (labels > 0) + rng.normal(0, 8, shape)
    return labels, np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def toy_targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        labels, image = toy_sample(i)
        write_stack(root / "prepared" / "images" / f"t{i}.tif", image)
        write_stack(root / "prepared" / "labels" / f"t{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"t{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/t{i}.tif",
                "label_path": f"labels/t{i}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, root / "prepared")
    prepare_targets(root / "prepared", root / "targets", progress=False)
    return root / "targets"


def tiny_cfg(**kw) -> MaunetTrainConfig:
    values = {
        "model": TINY_MODEL,
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 2,
        "steps_per_epoch": 3,
        "warmup_steps": 0,
        "progress": False,
        "seed": 3,
        **kw,
    }
    return MaunetTrainConfig.from_mapping(values)


# -- the distance target ----------------------------------------------------------------------
def naive_distance(labels: np.ndarray) -> np.ndarray:
    """The definition: full-image EDT inside each instance, divided by its maximum."""
    out = np.zeros(labels.shape, np.float64)
    for i in np.unique(labels[labels > 0]):
        d = ndimage.distance_transform_edt(labels == i)
        out[labels == i] = d[labels == i] / d.max()
    return out


def test_distance_target_is_the_per_instance_normalised_edt():
    labels = np.zeros((40, 50), np.uint16)
    labels[disk((20, 14), 9, shape=labels.shape)] = 1
    labels[disk((20, 30), 9, shape=labels.shape)] = 2  # overlaps disc 1: they touch
    labels[0:6, 40:50] = 3  # on two image borders
    labels[30:33, 45:48] = 7  # ids need not be consecutive
    labels[35, 5] = 4  # one pixel
    assert (ndimage.binary_dilation(labels == 1) & (labels == 2)).any()
    dist = normalised_distance(labels)
    assert dist.dtype == np.float32
    np.testing.assert_allclose(dist, naive_distance(labels), atol=1e-6)
    for i in (1, 2, 3, 4, 7):
        assert dist[labels == i].max() == pytest.approx(1.0)
    assert (dist[labels == 0] == 0).all() and (dist[labels > 0] > 0).all()
    # touching discs: each one's distance falls to its own contact line
    contact = (labels == 2) & ndimage.binary_dilation(labels == 1)
    assert dist[contact].max() < 0.2


def test_distance_target_of_a_real_like_crowd():
    labels, _ = toy_sample(11, shape=(80, 90))
    np.testing.assert_allclose(normalised_distance(labels), naive_distance(labels), atol=1e-6)
    assert normalised_distance(np.zeros((8, 8), np.uint16)).max() == 0
    with pytest.raises(DataFormatError):
        normalised_distance(np.zeros((8, 8), np.float32))


# -- batches and losses -----------------------------------------------------------------------
def test_batches_carry_the_distance_through_the_same_augmentations(toy_targets):
    cfg = tiny_cfg(elastic_prob=1.0, batch_size=4)
    items = train_items(load_targets(toy_targets, "train"), cfg)
    sampler = DistanceSampler(items, cfg)
    sampler.reseed(5)
    batch = sampler.batch(np.random.default_rng(5))
    assert set(batch) == {"image", "target", "weight", "distance"}
    assert batch["weight"].shape == batch["distance"].shape == (4, 1, 32, 32)
    # flips, turns and the elastic warp moved distance and target together
    assert torch.equal(batch["distance"] > 0, batch["target"] > 0)
    assert float(batch["distance"].max()) <= 1.0 and float(batch["distance"].max()) > 0.5
    assert float(batch["weight"].min()) >= 1.0  # the weight map, not the distance
    again = DistanceSampler(items, cfg)
    again.reseed(5)
    other = again.batch(np.random.default_rng(5))
    assert all(torch.equal(v, other[k]) for k, v in batch.items())


def test_distance_losses():
    pred, target = torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 4)
    assert float(distance_loss("mse", pred, target)) == pytest.approx(0.25)
    assert float(distance_loss("smooth_l1", pred, target)) == pytest.approx(0.45)
    assert float(distance_loss("mse", target, target)) == 0


def test_the_ensemble_sums_its_members_losses(toy_targets):
    cfg = tiny_cfg(model={**TINY_MODEL, "backbones": ["resnet18", "resnet10"]})
    sampler = DistanceSampler(train_items(load_targets(toy_targets, "train"), cfg), cfg)
    sampler.reseed(0)
    batch = sampler.batch(np.random.default_rng(0))
    torch.manual_seed(0)
    module = MaunetModule(cfg)
    total_seg = total_dist = 0.0
    with torch.no_grad():
        seg, dist = module.losses(batch)
        for member in module.net.members:
            out = member(batch["image"])
            wce = module.loss_fn(out[:, :N_CLASSES], batch["target"], batch["weight"])
            total_seg += float(wce)
            pred = out[:, N_CLASSES:]
            total_dist += float(distance_loss("mse", pred, batch["distance"]))
    assert float(seg) == pytest.approx(total_seg, rel=1e-5)
    assert float(dist) == pytest.approx(total_dist, rel=1e-5)


def test_both_heads_learn_on_a_fixed_batch(toy_targets):
    cfg = tiny_cfg(augment=False, batch_size=4)
    sampler = DistanceSampler(train_items(load_targets(toy_targets, "train"), cfg), cfg)
    sampler.reseed(0)
    batch = sampler.batch(np.random.default_rng(0))
    torch.manual_seed(0)
    module = MaunetModule(cfg)
    opt = torch.optim.Adam(module.net.parameters(), lr=1e-2)
    history = []
    for _ in range(25):
        seg, dist = module.losses(batch)
        opt.zero_grad()
        (seg + dist).backward()
        opt.step()
        history.append((float(seg), float(dist)))
    first, last = np.mean(history[:3], axis=0), np.mean(history[-3:], axis=0)
    assert (last < 0.8 * first).all(), history


def test_config_validation():
    with pytest.raises(ConfigError, match="patch_size"):
        tiny_cfg(patch_size=48)
    with pytest.raises(ConfigError, match="dist_loss"):
        tiny_cfg(dist_loss="l3")
    with pytest.raises(ConfigError, match="unknown"):
        MaunetTrainConfig.from_mapping({"epochz": 3})
    with pytest.raises(ConfigError, match="loss"):
        tiny_cfg(loss="nope")
    cfg = tiny_cfg(post={"t_seed": 0.3})
    assert cfg.post.seeds == "distance" and cfg.post.t_seed == 0.3
    flat = cfg.as_dict()
    assert flat["model.backbone"] == "resnet18" and flat["post.elevation"] == "predicted_distance"


# -- the loop and the family ------------------------------------------------------------------
def test_train_resume_and_load(toy_targets, tmp_path):
    result = train_maunet(toy_targets, tmp_path / "run", tiny_cfg())
    assert result.epochs_completed == 2 and result.best_path == tmp_path / "run" / "best.pt"
    for row in result.history:
        assert {"train_loss", "train_dist_loss", "val_f1_50", "val_dice"} <= set(row)
    _, cfg, post = load_maunet(result.best_path)
    assert cfg == MaunetConfig.from_mapping(TINY_MODEL) and post.seeds == "distance"
    assert (tmp_path / "run" / "last.ckpt").is_file()
    more = train_maunet(toy_targets, tmp_path / "run", tiny_cfg(epochs=3))
    assert more.resumed_from_epoch == 2 and more.epochs_completed == 3
    other = tiny_cfg(epochs=4, model={**TINY_MODEL, "backbone": "resnet34"})
    with pytest.raises(ConfigError, match="resume=False"):
        train_maunet(toy_targets, tmp_path / "run", other)


def test_family_trains_an_ensemble_and_predicts_through_the_registry(toy_targets, tmp_path):
    family = get_model("maunet")
    model = {**TINY_MODEL, "backbones": ["resnet18", "resnet34"]}
    train = {"model": model, "patch_size": 32, "batch_size": 2, "epochs": 1}
    family.check_train_keys(["model.backbones", "dist_weight", "post.t_seed"])
    with pytest.raises(ConfigError, match=r"model\.depth"):
        family.check_train_keys(["model.depth"])
    result = family.train(toy_targets, tmp_path / "fam", {**train, "steps_per_epoch": 2})
    seg = family.load(result.best_path, train=train, infer={"post": {"min_size": 3}})
    assert len(seg.network.members) == 2
    assert seg.infer.roi == 32 and seg.post.min_size == 3 and seg.post.seeds == "distance"
    image = (load_targets(toy_targets, "val")[0].image[0] * 255).astype(np.uint8)
    labels, fg, scores = seg.as_predictor()(image)
    assert labels.shape == image.shape and fg.shape == image.shape
    assert set(scores) == set(np.unique(labels[labels > 0]).tolist())
    assert seg.probabilities(image).shape == (4, *image.shape)
    fresh = build_maunet(MaunetConfig.from_mapping(model))
    trained = seg.network.state_dict()
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert any(k.startswith("members.0.") for k in changed)
    assert any(k.startswith("members.1.") for k in changed)


def test_same_seed_same_weights(toy_targets, train_twice, same_weights):
    """Two runs on the same data and config end with the same tensors (issue 16)."""
    train = {"model": TINY_MODEL, "patch_size": 32, "batch_size": 2, "epochs": 2}
    a, b = train_twice("maunet", toy_targets, {**train, "steps_per_epoch": 3})
    assert same_weights(a.best_path, b.best_path) > 10
