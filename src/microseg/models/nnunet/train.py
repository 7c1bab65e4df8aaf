"""nnunet training: fingerprint and plan the targets cache, then train the planned DynUNet with
the unet family's Lightning module and data module (the same patches, augmentation, loss,
schedule, validation and ``best.pt`` format; the plan travels inside ``best.pt``).

``out_dir`` receives ``fingerprint.json`` and ``plans.json`` (atomically, before training)
beside the engine's ``best.pt``/``last.ckpt``/``train_state.json``. A resumed run re-plans
(the fingerprint is deterministic) and refuses a plan whose network or patch differs from the
checkpoint's, before touching the files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError
from microseg.models.nnunet.fingerprint import FINGERPRINT_NAME, compute_fingerprint
from microseg.models.nnunet.planner import (
    PLANNED,
    PLANS_NAME,
    Plan,
    PlannerConfig,
    describe,
    plan_experiment,
    write_plans,
)
from microseg.models.unet.network import save_unet
from microseg.models.unet.train import (
    CHECKPOINT_FORMAT,
    UnetDataModule,
    UnetModule,
    UnetTrainConfig,
)
from microseg.train.engine import LAST, STATE, TrainResult, TrainState, fit
from microseg.train.hooks import HookBase
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)


@dataclass
class NnunetTrainConfig(UnetTrainConfig):
    """The unet family's training knobs, except what the plan decides (:data:`PLANNED`), plus
    the planner's (``plan``) and the network's ``dropout``. Loss: Dice + CE, nnU-Net's."""

    plan: PlannerConfig = field(default_factory=PlannerConfig)
    dropout: float = 0.0
    loss: str = "dice_ce"

    def __post_init__(self) -> None:
        if isinstance(self.plan, Mapping):
            self.plan = PlannerConfig.from_mapping(self.plan)
        super().__post_init__()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NnunetTrainConfig:
        planned = sorted(set(values) & set(PLANNED))
        if planned:
            raise ConfigError(
                f"nnunet plans {planned} itself; steer it with plan.* "
                f"({sorted(f.name for f in fields(PlannerConfig))})"
            )
        return cls(**known_fields(cls, values, "nnunet training"))

    def planned(self, plan: Plan) -> UnetTrainConfig:
        """The unet training config this plan asks for."""
        values = {f.name: getattr(self, f.name) for f in fields(UnetTrainConfig)}
        values.update(
            model=plan.unet_config(self.dropout),
            patch_size=plan.patch_size,
            batch_size=plan.batch_size,
        )
        return UnetTrainConfig(**values)

    def as_dict(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in super().as_dict().items()
            if k != "plan" and k not in PLANNED and not k.startswith("model.")
        }
        return out | {f"plan.{k}": v for k, v in asdict(self.plan).items()}


class PlannedUnetModule(UnetModule):
    """The unet family's module on the planned network; ``best.pt`` also holds the plan."""

    def __init__(self, cfg: UnetTrainConfig, plan: Plan, planner: PlannerConfig) -> None:
        super().__init__(cfg)
        self.plan, self.planner = plan, planner

    def flat_config(self) -> dict[str, Any]:
        return super().flat_config() | {f"plan.{k}": v for k, v in asdict(self.planner).items()}

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        extra = {
            "train_format": CHECKPOINT_FORMAT,
            "epoch": self.current_epoch + 1,
            "metrics": dict(metrics),
            "plan": self.plan.to_dict(),
        }
        save_unet(self.net, path, self.cfg.model, self.cfg.post, extra)


def _guard_resume(out_dir: Path, model_config: dict[str, Any]) -> None:
    """Refuse, before overwriting plans.json, a plan that the checkpoint was not built with."""
    state = TrainState.read(out_dir / STATE) if (out_dir / LAST).is_file() else None
    if state is not None and state.model_config and state.model_config != model_config:
        raise ConfigError(
            f"{out_dir / LAST} was trained on another plan ({state.model_config}); the data "
            f"and planner now give {model_config}; delete {out_dir} or pass resume=False",
            out_dir / LAST,
        )


def train_nnunet(
    targets_dir: str | Path,
    out_dir: str | Path,
    cfg: NnunetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Plan (``fingerprint.json``, ``plans.json``) then train the planned DynUNet on a targets
    cache; ``out_dir/best.pt`` is a unet-format model file with the plan inside."""
    cfg = cfg or NnunetTrainConfig()
    targets_dir, out_dir = Path(targets_dir), Path(out_dir)
    fingerprint = compute_fingerprint(targets_dir, splits=("train",))
    plan = plan_experiment(fingerprint, cfg.plan)
    ucfg = cfg.planned(plan)
    model_config = {
        **ucfg.model.as_dict(),
        "patch_size": plan.patch_size,
        "batch_size": plan.batch_size,
    }
    if resume:
        _guard_resume(out_dir, model_config)
    fingerprint.write(out_dir / FINGERPRINT_NAME)
    write_plans(out_dir / PLANS_NAME, plan, cfg.plan)
    log.info("nnunet plan for %s: %s", targets_dir, describe(plan))
    data = UnetDataModule(targets_dir, ucfg)
    return fit(
        lambda: PlannedUnetModule(ucfg, plan, cfg.plan),
        data,
        ucfg,
        out_dir,
        hooks,
        resume=resume,
        model_config=model_config,
    )
