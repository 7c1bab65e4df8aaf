"""Prob-UNet training on the Lightning engine: learning, hooks, checkpoints, resume, divergence."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import microseg.models.punet.train as punet_train
from microseg.data.patches import labeled_stacks
from microseg.errors import ConfigError
from microseg.io.d3set import D3Set, meta_row
from microseg.models.punet import MODEL_FORMAT, load_punet
from microseg.models.punet.train import (
    CHECKPOINT_FORMAT,
    PunetTrainConfig,
    TrainingDiverged,
    train_punet,
    validate_punet,
)
from microseg.train.hooks import HookBase, Hooks


def toy_d3set(n: int = 2, shape=(4, 64, 64), seed: int = 0) -> D3Set:
    """Noisy background, a bright dendrite band, brighter 3x3 spines next to it."""
    rng = np.random.default_rng(seed)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i in range(n):
        img = rng.normal(100, 5, shape).clip(0, None)
        den = np.zeros(shape, bool)
        den[:, 28:34, :] = True
        sp = np.zeros(shape, bool)
        for z in range(shape[0]):
            for x in rng.choice(np.arange(4, 60, 6), size=4, replace=False):
                y = int(rng.integers(37, 42))
                sp[z, y - 1 : y + 2, x - 1 : x + 2] = True
        img[den] += 300
        img[sp] += 600
        key = f"x{i}"
        stacks[key], dendrites[key], spines[key] = img.astype(np.uint16), den, sp
        rows.append(meta_row(shape, 0.094, 0.5, timestamp="20260101_000000"))
    return D3Set(stacks, dendrites, spines, pd.DataFrame(rows))


def tiny_cfg(**kw) -> PunetTrainConfig:
    base = {
        "filters": (4, 8, 16),
        "latent_filters": (4, 8),
        "latent_dim_spine": 2,
        "latent_dim_dendrite": 2,
        "head_convs": 2,
        "patch_size": 32,
        "batch_size": 4,
        "epochs": 3,
        "steps_per_epoch": 3,
        "lr": 1e-2,
        "lr_warmup_steps": 0,
        "kl_warmup_epochs": 1,
        "seed": 0,
        "device": "cpu",
        "progress": False,
        "num_threads": 1,  # tiny tensors: one thread beats two on a busy 2-core machine
    }
    base.update(kw)
    return PunetTrainConfig(**base)


class Recorder(HookBase):
    def __init__(self) -> None:
        self.config: dict | None = None
        self.epochs: list[int] = []
        self.metrics: list[dict] = []
        self.checkpoints: list[tuple[str, bool]] = []
        self.trained: list[tuple[dict, Path | None]] = []

    def before_train(self, config: Mapping) -> None:
        self.config = dict(config)

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append(epoch)
        self.metrics.append(dict(metrics))

    def after_checkpoint(self, path: Path, is_best: bool) -> None:
        self.checkpoints.append((path.name, is_best))

    def after_train(self, best, best_path) -> None:
        self.trained.append((dict(best), best_path))


class Interrupt(HookBase):
    """A hook that raises after epoch 0 (as ``optuna.TrialPruned`` would). Not
    ``KeyboardInterrupt``: Lightning turns that into ``sys.exit(1)`` and ignores SIGINT."""

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch == 0:
            raise RuntimeError("simulated kill after epoch 0")


@pytest.fixture(scope="module")
def data() -> tuple[D3Set, D3Set]:
    return toy_d3set(2, seed=0), toy_d3set(1, seed=1)


def test_training_learns_a_trivial_toy(data, tmp_path: Path) -> None:
    train, val = data
    cfg = tiny_cfg(epochs=4, steps_per_epoch=12, head_convs=3, lr=3e-2)
    rec = Recorder()
    result = train_punet(train, val, tmp_path, cfg, rec)
    first, last = result.history[0], result.history[-1]
    assert last["train_recon"] < 0.9 * first["train_recon"]
    assert result.best["val_dendrite_dice"] > 0.5  # chance level is ~0.1
    assert result.best["val_spine_dice"] > 0.3  # chance level is ~0.03
    assert result.epochs_completed == 4 and not result.stopped_early
    assert result.global_step == 4 * 12
    assert result.best_path == tmp_path / "best.pt" and (tmp_path / "last.ckpt").is_file()
    for m in rec.metrics:
        for key in (
            "train_loss",
            "train_recon",
            "train_kl",
            "train_kl_spine",
            "beta",
            "lr",
            "nonfinite_steps",
            "val_spine_dice",
            "val_dendrite_dice",
        ):
            assert np.isfinite(m[key]), key
    assert rec.metrics[0]["beta"] < 1.0  # KL warm-up ramps beta
    assert rec.metrics[-1]["beta"] == 1.0
    assert rec.config is not None and rec.config["patch_size"] == 32
    assert rec.config["n_parameters"] > 0
    assert ("best.pt", True) in rec.checkpoints
    assert len(rec.trained) == 1 and rec.trained[0][1] == tmp_path / "best.pt"
    # best.pt is in the family's model format: plain data, loadable without Lightning
    payload = torch.load(result.best_path, weights_only=True)
    assert payload["format"] == MODEL_FORMAT and payload["train_format"] == CHECKPOINT_FORMAT
    assert payload["epoch"] == result.best_epoch + 1
    model = load_punet(result.best_path)
    metrics = validate_punet(model, labeled_stacks([val]), batch_planes=3)
    assert metrics["val_spine_dice"] == pytest.approx(result.best["val_spine_dice"])


def test_lr_warms_up_then_decays_to_the_floor_or_stays(data, tmp_path: Path) -> None:
    train, val = data
    cosine = train_punet(train, val, tmp_path / "c", tiny_cfg(lr_warmup_steps=2, epochs=2))
    lrs = [h["lr"] for h in cosine.history]
    assert lrs[-1] == pytest.approx(1e-2 * 0.05)  # the 5% floor at the last step
    const = tiny_cfg(lr_warmup_steps=2, epochs=2, lr_schedule="constant")
    flat = train_punet(train, val, tmp_path / "k", const)
    assert [h["lr"] for h in flat.history] == pytest.approx([1e-2, 1e-2])


def test_resume_after_interrupt_matches_uninterrupted_run(data, tmp_path: Path) -> None:
    train, val = data
    cfg = tiny_cfg()
    straight = train_punet(train, val, tmp_path / "straight", cfg)

    with pytest.raises(RuntimeError, match="simulated kill"):
        train_punet(train, val, tmp_path / "resumed", cfg, Interrupt())
    ckpt = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert ckpt["train_format"] == CHECKPOINT_FORMAT
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3  # epoch 0 done, saved in its end

    rec = Recorder()
    resumed = train_punet(train, val, tmp_path / "resumed", cfg, rec)
    assert resumed.resumed_from_epoch == 1
    assert rec.epochs == [1, 2]  # epoch 0 is not redone
    assert resumed.epochs_completed == straight.epochs_completed == 3
    assert resumed.global_step == straight.global_step == 3 * 3
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history], rel=1e-5
    )
    for key in ("val_spine_dice", "val_dendrite_dice"):
        assert resumed.history[-1][key] == pytest.approx(straight.history[-1][key], abs=1e-6)

    again = Recorder()
    done = train_punet(train, val, tmp_path / "resumed", cfg, again)
    assert again.epochs == [] and again.config is None  # finished: returned as it is
    assert done.epochs_completed == 3 and done.history == resumed.history


def test_resume_refuses_a_different_model(data, tmp_path: Path) -> None:
    train, val = data
    train_punet(train, val, tmp_path, tiny_cfg(epochs=1, steps_per_epoch=1))
    with pytest.raises(ConfigError, match="resume=False"):
        train_punet(train, val, tmp_path, tiny_cfg(epochs=2, filters=(4, 8)))
    fresh = train_punet(
        train, val, tmp_path, tiny_cfg(epochs=1, steps_per_epoch=1, filters=(4, 8)), resume=False
    )
    assert fresh.resumed_from_epoch is None


class StopNow(HookBase):
    should_stop = False

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.should_stop = True


def test_a_hook_can_stop_training_early(data, tmp_path: Path) -> None:
    train, val = data
    result = train_punet(train, val, tmp_path, tiny_cfg(epochs=5), Hooks([StopNow()]))
    assert result.stopped_early and result.epochs_completed == 1
    rerun = Recorder()
    train_punet(train, val, tmp_path, tiny_cfg(epochs=5), rerun)
    assert rerun.epochs == []


def test_nan_data_stops_with_an_error_naming_the_epoch(data, tmp_path: Path) -> None:
    train, val = data
    bad = D3Set(
        {k: v.astype(np.float32) * np.nan for k, v in train.stacks.items()},
        train.dendrites,
        train.spines,
        train.meta,
    )
    with pytest.raises(TrainingDiverged, match="epoch 0: 2 steps"):
        train_punet(bad, val, tmp_path / "a", tiny_cfg(max_nonfinite_steps=1))
    # an epoch without one finite step diverges even below the limit
    with pytest.raises(TrainingDiverged, match="epoch 0"):
        train_punet(bad, val, tmp_path / "b", tiny_cfg(max_nonfinite_steps=5))


def test_an_occasional_nan_step_is_skipped_and_counted(data, tmp_path, monkeypatch) -> None:
    train, val = data
    calls = {"n": 0}
    real = punet_train.TverskyLoss

    class FlakyLoss(real):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(punet_train, "TverskyLoss", FlakyLoss)
    result = train_punet(train, val, tmp_path, tiny_cfg(epochs=1, steps_per_epoch=3))
    assert result.history[0]["nonfinite_steps"] == 1.0
    assert np.isfinite(result.history[0]["train_loss"])


def test_a_non_finite_gradient_skips_the_step(data, tmp_path, monkeypatch) -> None:
    train, val = data
    real = punet_train.PunetModule.training_step
    steps = {"n": 0}

    def poisoned(self, batch, batch_idx):
        loss = real(self, batch, batch_idx)
        steps["n"] += 1
        if steps["n"] == 2:  # a finite loss (+ 0) whose gradient is NaN (0 / 0)
            w = self.net.heads["spine"].first.bias
            loss = loss + torch.sqrt(w - w).sum()
        return loss

    monkeypatch.setattr(punet_train.PunetModule, "training_step", poisoned)
    result = train_punet(train, val, tmp_path, tiny_cfg(epochs=1, steps_per_epoch=3))
    assert result.history[0]["nonfinite_steps"] == 1.0
    weights = torch.load(result.best_path, weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_geco_schedule_runs_and_reports_its_multiplier(data, tmp_path: Path) -> None:
    train, val = data
    cfg = tiny_cfg(epochs=2, kl_schedule="geco", geco_goal=0.1, val_every=2)
    result = train_punet(train, val, tmp_path, cfg)
    assert "geco_lambda" in result.history[0]
    assert "val_spine_dice" not in result.history[0]  # validated every 2nd epoch only
    assert "val_spine_dice" in result.history[1]
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["geco"]["lam"] == pytest.approx(result.history[-1]["geco_lambda"])


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        PunetTrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="multiple of 4"):
        PunetTrainConfig(patch_size=30)
    with pytest.raises(ConfigError, match="unknown"):
        PunetTrainConfig.from_mapping({"epochs": 2, "nope": 1})
    with pytest.raises(ConfigError, match="device"):
        PunetTrainConfig(device="gpu0")
    cfg = PunetTrainConfig.from_mapping({"filters": [8, 16], "context": 1})
    assert cfg.filters == (8, 16) and cfg.device == "auto"
    assert cfg.model_config()["in_channels"] == 3


def test_family_trains_through_the_registry(tmp_path: Path) -> None:
    from microseg.io.d3set import write_d3set
    from microseg.models import get_model

    family = get_model("punet")
    for split, seed in (("train", 0), ("val", 1)):
        write_d3set(tmp_path / f"{split}.d3set", toy_d3set(1, shape=(2, 32, 32), seed=seed))
    section = {k: v for k, v in tiny_cfg().as_dict().items() if k != "progress"}
    section.update(epochs=1, steps_per_epoch=1, batch_size=2)
    result = family.train(tmp_path, tmp_path / "run", section)
    assert result.epochs_completed == 1 and result.best_path == tmp_path / "run" / "best.pt"
    seg = family.load(result.best_path)
    assert seg.network.config == tiny_cfg().model_config()
    again = family.train(tmp_path / "train.d3set", tmp_path / "run", section)
    assert again.history == result.history  # finished: returned as it is


def test_same_seed_same_weights(tmp_path: Path, train_twice, same_weights) -> None:
    """Two runs on the same d3sets and config end with the same tensors (issue 16)."""
    from microseg.io.d3set import write_d3set

    for split, seed in (("train", 0), ("val", 1)):
        write_d3set(tmp_path / f"{split}.d3set", toy_d3set(1, shape=(2, 32, 32), seed=seed))
    section = {k: v for k, v in tiny_cfg().as_dict().items() if k != "progress"}
    section.update(epochs=2, steps_per_epoch=2, batch_size=2)
    a, b = train_twice("punet", tmp_path, section)
    assert same_weights(a.best_path, b.best_path) > 10
