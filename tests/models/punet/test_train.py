"""Probabilistic U-Net training loop: learning, hooks, checkpoints, resume, divergence."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import microseg.train.punet as punet_train
from microseg.errors import ConfigError
from microseg.io.d3set import D3Set, meta_row
from microseg.models.punet import load_punet
from microseg.train.hooks import HookBase, Hooks
from microseg.train.punet import (
    PunetTrainConfig,
    TrainingDiverged,
    train_punet,
    validate_punet,
)


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
    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt("simulated kill after epoch 0")


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
    assert result.best_path == tmp_path / "best.pt"
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
    assert [m["beta"] < 1.0 for m in rec.metrics][:1] == [True]  # KL warm-up ramps beta
    assert rec.metrics[-1]["beta"] == 1.0
    assert rec.config is not None and rec.config["patch_size"] == 32
    assert rec.checkpoints.count(("last.pt", False)) == 4
    assert ("best.pt", True) in rec.checkpoints
    assert len(rec.trained) == 1 and rec.trained[0][1] == tmp_path / "best.pt"
    model = load_punet(result.best_path)
    metrics = validate_punet(model, punet_train.labeled_stacks([val]), batch_planes=3)
    assert metrics["val_spine_dice"] == pytest.approx(result.best["val_spine_dice"])


def test_resume_after_interrupt_matches_uninterrupted_run(data, tmp_path: Path) -> None:
    train, val = data
    cfg = tiny_cfg()
    straight = train_punet(train, val, tmp_path / "straight", cfg)

    with pytest.raises(KeyboardInterrupt):
        train_punet(train, val, tmp_path / "resumed", cfg, Interrupt())
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    saved_opt = ckpt["optimizer"]["state"]

    loaded_opt = {}
    original = torch.optim.AdamW.load_state_dict

    def spy(self, state):
        loaded_opt.update(
            {k: {n: t.clone() for n, t in v.items()} for k, v in state["state"].items()}
        )
        return original(self, state)

    rec = Recorder()
    torch.optim.AdamW.load_state_dict = spy
    try:
        resumed = train_punet(train, val, tmp_path / "resumed", cfg, rec)
    finally:
        torch.optim.AdamW.load_state_dict = original
    assert resumed.resumed_from_epoch == 1
    assert rec.epochs == [1, 2]
    assert resumed.epochs_completed == straight.epochs_completed == 3
    for k, v in saved_opt.items():
        torch.testing.assert_close(loaded_opt[k]["exp_avg"], v["exp_avg"], rtol=0, atol=0)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]

    again = Recorder()
    done = train_punet(train, val, tmp_path / "resumed", cfg, again)
    assert again.epochs == [] and done.epochs_completed == 3  # finished: nothing to do


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
    with pytest.raises(TrainingDiverged, match="epoch 0"):
        train_punet(bad, val, tmp_path, tiny_cfg(max_nonfinite_steps=1))


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


def test_geco_schedule_runs_and_reports_its_multiplier(data, tmp_path: Path) -> None:
    train, val = data
    cfg = tiny_cfg(epochs=2, kl_schedule="geco", geco_goal=0.1, val_every=2)
    result = train_punet(train, val, tmp_path, cfg)
    assert "geco_lambda" in result.history[0]
    assert "val_spine_dice" not in result.history[0]  # validated every 2nd epoch only
    assert "val_spine_dice" in result.history[1]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["geco"]["lam"] == pytest.approx(result.history[-1]["geco_lambda"])


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        PunetTrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="multiple of 4"):
        PunetTrainConfig(patch_size=30)
    with pytest.raises(ConfigError, match="unknown"):
        PunetTrainConfig.from_mapping({"epochs": 2, "nope": 1})
    cfg = PunetTrainConfig.from_mapping({"filters": [8, 16], "context": 1})
    assert cfg.filters == (8, 16)
    assert cfg.model_config()["in_channels"] == 3
