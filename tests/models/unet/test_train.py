"""U-Net training on a toy targets cache: losses, loop, hooks, checkpoints, resume, stop."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import prepare_targets
from microseg.errors import ConfigError
from microseg.io.tiff import write_stack
from microseg.models.unet import UnetConfig, build_unet, load_unet
from microseg.models.unet.train import (
    PatchSampler,
    UnetTrainConfig,
    _train_items,
    train_unet,
)
from microseg.train.hooks import HookBase
from microseg.train.softmax_losses import LOSSES, build_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY_MODEL = {"arch": "unet", "features": [4, 8, 16], "num_res_units": 0}


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


def tiny_cfg(**kw) -> UnetTrainConfig:
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
    return UnetTrainConfig.from_mapping(values)


class Recorder(HookBase):
    def __init__(self, fail_after: int | None = None, stop_after: int | None = None) -> None:
        self.epochs: list[int] = []
        self.metrics: list[Mapping[str, float]] = []
        self.checkpoints: list[tuple[str, bool]] = []
        self.started = self.finished = 0
        self.fail_after, self.stop_after = fail_after, stop_after
        self.should_stop = False

    def before_train(self, config):
        self.started += 1
        assert "model.arch" in config

    def after_epoch(self, epoch, metrics):
        self.epochs.append(epoch)
        self.metrics.append(dict(metrics))
        if self.fail_after == epoch:
            raise RuntimeError("interrupted by a hook")
        if self.stop_after == epoch:
            self.should_stop = True

    def after_checkpoint(self, path, is_best):
        self.checkpoints.append((Path(path).name, is_best))

    def after_train(self, best, best_path):
        self.finished += 1


# -- losses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_training_loss_decreases_on_toy(name, toy_targets):
    torch.manual_seed(0)
    cfg = tiny_cfg(augment=False, batch_size=4)
    from microseg.data.targets import load_targets

    sampler = PatchSampler(_train_items(load_targets(toy_targets, "train"), cfg), cfg)
    sampler.reseed(0)
    batch = sampler.batch(np.random.default_rng(0))
    model = build_unet(UnetConfig.from_mapping(TINY_MODEL))
    loss_fn = build_loss(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = loss_fn(model(batch["image"]), batch["target"], batch["weight"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_weighted_ce_uses_the_weight_map():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    wce = build_loss("wce")
    plain = wce(logits, target, None)
    assert float(wce(logits, target, torch.zeros(2, 1, 8, 8))) == 0.0
    assert torch.allclose(wce(logits, target, torch.full((2, 1, 8, 8), 2.0)), 2 * plain)
    with pytest.raises(ConfigError, match="unknown"):
        build_loss("hinge")


def test_patch_sampler_is_seeded_and_augments(toy_targets):
    from microseg.data.targets import load_targets

    cfg = tiny_cfg(elastic_prob=1.0)
    items = _train_items(load_targets(toy_targets, "train"), cfg)
    a, b = PatchSampler(items, cfg), PatchSampler(items, cfg)
    a.reseed(1)
    b.reseed(1)
    ba, bb = a.batch(np.random.default_rng(1)), b.batch(np.random.default_rng(1))
    assert ba["image"].shape == (2, 3, 32, 32)
    assert ba["target"].dtype == torch.long and ba["target"].shape == (2, 1, 32, 32)
    assert set(torch.unique(ba["target"]).tolist()) <= {0, 1, 2}
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    b.reseed(2)
    assert not torch.equal(ba["image"], b.batch(np.random.default_rng(2))["image"])


# -- the loop ---------------------------------------------------------------------------------
def test_train_writes_checkpoints_and_reports_through_hooks(toy_targets, tmp_path):
    rec = Recorder()
    result = train_unet(toy_targets, tmp_path / "run", tiny_cfg(), hooks=rec)
    assert result.epochs_completed == 2 and not result.stopped_early
    assert rec.epochs == [0, 1] and rec.started == 1 and rec.finished == 1
    for m in rec.metrics:
        assert {"train_loss", "lr", "val_f1_50", "val_dice"} <= set(m)
        assert 0.0 <= m["val_f1_50"] <= 1.0
    assert ("best.pt", True) in rec.checkpoints
    assert (tmp_path / "run" / "last.ckpt").is_file()
    assert result.best_path == tmp_path / "run" / "best.pt"
    _, cfg, _ = load_unet(result.best_path)
    assert cfg.arch == "unet"
    # a finished run is returned as it is
    again = train_unet(toy_targets, tmp_path / "run", tiny_cfg(), hooks=Recorder())
    assert again.epochs_completed == 2 and again.history == result.history


def test_resume_after_interruption_matches_uninterrupted(toy_targets, tmp_path):
    cfg = tiny_cfg(model={**TINY_MODEL, "dropout": 0.2})
    with pytest.raises(RuntimeError, match="interrupted"):
        train_unet(toy_targets, tmp_path / "cut", cfg, hooks=Recorder(fail_after=0))
    rec = Recorder()
    resumed = train_unet(toy_targets, tmp_path / "cut", cfg, hooks=rec)
    assert resumed.resumed_from_epoch == 1
    assert rec.epochs == [1]  # continues at epoch 1, epoch 0 is not redone
    assert resumed.epochs_completed == 2 and len(resumed.history) == 2

    full = train_unet(toy_targets, tmp_path / "full", cfg)
    a = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == full.global_step == 2 * 3
    assert all(torch.allclose(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed.history[1]["train_loss"] == pytest.approx(full.history[1]["train_loss"])
    assert resumed.best["val_f1_50"] == pytest.approx(full.best["val_f1_50"], abs=1e-6)


def test_early_stop_hook_ends_training_for_good(toy_targets, tmp_path):
    cfg = tiny_cfg(epochs=4)
    result = train_unet(toy_targets, tmp_path / "run", cfg, hooks=Recorder(stop_after=0))
    assert result.stopped_early and result.epochs_completed == 1
    rec = Recorder()
    again = train_unet(toy_targets, tmp_path / "run", cfg, hooks=rec)
    assert again.stopped_early and rec.epochs == []


def test_resume_refuses_another_architecture(toy_targets, tmp_path):
    train_unet(toy_targets, tmp_path / "run", tiny_cfg(epochs=1))
    other = tiny_cfg(epochs=2, model={**TINY_MODEL, "features": [4, 8, 8]})
    with pytest.raises(ConfigError, match="resume=False"):
        train_unet(toy_targets, tmp_path / "run", other)


def test_config_validation():
    with pytest.raises(ConfigError, match="multiple"):
        tiny_cfg(patch_size=30)
    with pytest.raises(ConfigError, match="unknown"):
        UnetTrainConfig.from_mapping({"epochz": 3})
    with pytest.raises(ConfigError, match="loss"):
        tiny_cfg(loss="nope")
    flat = tiny_cfg().as_dict()
    assert flat["model.arch"] == "unet" and flat["patch_size"] == 32


def test_family_trains_and_predicts_through_the_registry(toy_targets, tmp_path):
    from microseg.models import get_model

    family = get_model("unet")
    train = {"model": TINY_MODEL, "patch_size": 32, "batch_size": 2, "epochs": 1}
    result = family.train(toy_targets, tmp_path / "fam", {**train, "steps_per_epoch": 2})
    assert result.best_path is not None
    seg = family.load(result.best_path, train=train, infer={"post": {"min_size": 3}})
    assert seg.infer.roi == 32 and seg.infer.post.min_size == 3
    from microseg.data.targets import load_targets

    image = (load_targets(toy_targets, "val")[0].image[0] * 255).astype(np.uint8)
    labels, fg, scores = seg.as_predictor()(image)
    assert labels.shape == image.shape and fg.shape == image.shape
    assert set(scores) == set(np.unique(labels[labels > 0]).tolist())


def test_modality_balance_weights_and_stratified_validation():
    """0: every image equally likely; 1: every modality; the val subset keeps each modality."""
    from microseg.data.targets import TargetSample
    from microseg.models.unet.train import modality_weights, stratified_samples

    mods = ["f"] * 301 + ["t"] * 63 + ["b"] * 10
    p0 = modality_weights(mods, 0.0)
    assert np.allclose(p0, 1 / len(mods))
    p1 = modality_weights(mods, 1.0)
    mass = {m: p1[np.asarray(mods) == m].sum() for m in "ftb"}
    assert np.allclose(list(mass.values()), 1 / 3)
    p5 = modality_weights(mods, 0.5)
    half = {m: round(float(p5[np.asarray(mods) == m].sum()), 2) for m in "ftb"}
    assert half == {"f": 0.61, "t": 0.28, "b": 0.11}

    def sample(i, m):
        z = np.zeros((1, 2, 2), np.float32)
        return TargetSample(f"s{i}", "val", z, z[0].astype(np.uint8), z[0], z[0], m)

    val = [sample(i, m) for i, m in enumerate(["f"] * 65 + ["t"] * 14 + ["b"] * 2)]
    picked = stratified_samples(val, 16)
    kinds = [s.modality for s in picked]
    assert kinds.count("t") == 3 and kinds.count("b") == 1 and kinds.count("f") == 13
    assert stratified_samples(val, None) == val


def test_same_seed_same_weights(toy_targets, train_twice, same_weights):
    """Two runs on the same data and config end with the same tensors (issue 16)."""
    train = {"model": TINY_MODEL, "patch_size": 32, "batch_size": 2, "epochs": 2}
    a, b = train_twice("unet", toy_targets, {**train, "steps_per_epoch": 3})
    assert same_weights(a.best_path, b.best_path) > 10
    assert same_weights(a.last_path, b.last_path) > 10  # the optimizer state too
