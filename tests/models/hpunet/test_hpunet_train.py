"""Hierarchical Prob-UNet training: stable at tiny scale over 3 seeds (KL finite every step,
GECO multiplier inside its clamp), and a run through the registry and the Lightning engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.models.punet.test_train import toy_d3set

from microseg.data.patches import labeled_stacks
from microseg.errors import ConfigError
from microseg.models.hpunet.train import HpunetModule, HpunetTrainConfig, validate_hpunet
from microseg.models.punet.train import PatchBatches
from microseg.train.family import seed_globals


def tiny_cfg(**kw) -> HpunetTrainConfig:
    base = {
        "filters": (4, 8, 16),
        "posterior_filters": (4, 8, 8),
        "latent_levels": 2,
        "latent_dim": 2,
        "head_convs": 2,
        "patch_size": 32,
        "batch_size": 4,
        "epochs": 1,
        "steps_per_epoch": 2,
        "lr": 1e-2,
        "lr_warmup_steps": 0,
        "device": "cpu",
        "progress": False,
        "num_threads": 1,
        "augment": False,
    }
    base.update(kw)
    return HpunetTrainConfig(**base)


@pytest.fixture(scope="module")
def stacks():
    return labeled_stacks([toy_d3set(2, seed=0)])


def run_steps(cfg: HpunetTrainConfig, stacks, steps: int) -> list[dict[str, float]]:
    """``steps`` optimizer steps of the family's own ``training_step`` (no Lightning loop)."""
    seed_globals(cfg.seed)
    module = HpunetModule(cfg)
    batches = PatchBatches(stacks, cfg)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr)
    trace = []
    for i in range(steps):
        loss = module.training_step(batches.batch(rng), i)
        assert loss is not None, f"step {i} skipped: non-finite loss"
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        pending = module._pending or {}
        trace.append(
            {
                "loss": float(loss.detach()),
                "kl": float(pending["train_kl"]),
                "kl_scales": [float(pending[f"train_kl_scale{k}"]) for k in range(2)],
                "lam": module.geco.lam,
            }
        )
    return trace


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_training_does_not_diverge(stacks, seed: int) -> None:
    cfg = tiny_cfg(seed=seed, geco_lambda_min=0.1, geco_lambda_max=10.0, geco_step_size=0.5)
    trace = run_steps(cfg, stacks, 15)
    for step in trace:
        assert math.isfinite(step["loss"]) and math.isfinite(step["kl"])
        assert all(math.isfinite(k) and k >= -1e-5 for k in step["kl_scales"])
        assert 0.1 <= step["lam"] <= 10.0
    assert step["kl"] == pytest.approx(sum(step["kl_scales"]), rel=1e-5)
    assert len({round(s["lam"], 9) for s in trace}) > 1  # the multiplier does move


def test_geco_multiplier_stops_at_its_clamp(stacks) -> None:
    """An unreachable goal drives lambda up; the clamp holds it (no runaway step sizes)."""
    cfg = tiny_cfg(geco_goal=0.0, geco_step_size=5.0, geco_alpha=0.0, geco_lambda_max=3.0)
    trace = run_steps(cfg, stacks, 6)
    assert trace[-1]["lam"] == 3.0
    assert all(math.isfinite(s["loss"]) for s in trace)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="latent_levels"):
        tiny_cfg(latent_levels=3)
    with pytest.raises(ConfigError, match="geco_lambda_max"):
        tiny_cfg(geco_lambda_max=0.5)
    with pytest.raises(ConfigError, match="unknown"):
        HpunetTrainConfig.from_mapping({"latent_level": 2})
    cfg = HpunetTrainConfig.from_mapping({"filters": [8, 16], "latent_levels": 1, "context": 1})
    assert cfg.model_config()["in_channels"] == 3 and cfg.kl_schedule == "geco"


def test_family_trains_through_the_registry(tmp_path: Path) -> None:
    from microseg.io.d3set import write_d3set
    from microseg.models import get_model

    for split, seed in (("train", 0), ("val", 1)):
        write_d3set(tmp_path / f"{split}.d3set", toy_d3set(1, shape=(2, 32, 32), seed=seed))
    section = {k: v for k, v in tiny_cfg().as_dict().items() if k != "progress"}
    family = get_model("hpunet")
    result = family.train(tmp_path, tmp_path / "run", section)
    assert result.epochs_completed == 1 and result.best_path == tmp_path / "run" / "best.pt"
    for key in ("train_kl", "train_kl_scale0", "train_kl_scale1", "geco_lambda"):
        assert math.isfinite(result.history[-1][key]), key
    seg = family.load(result.best_path)
    assert seg.network.config == tiny_cfg().model_config()
    metrics = validate_hpunet(seg.network, labeled_stacks([tmp_path / "val.d3set"]))
    assert 0.0 <= metrics["val_spine_dice"] <= 1.0
