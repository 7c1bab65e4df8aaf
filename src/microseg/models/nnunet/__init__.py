"""The "nnunet" family: nnU-Net v2's self-configuration on top of the unet family.

``fingerprint`` describes the training images (shapes, channels, modalities, spacing,
foreground intensities), ``planner`` turns that into a plan (patch, depth, kernels, strides,
widths, batch size, normalisation; its rules are in the planner's docstring), ``train`` writes
both files into the model folder and trains the planned MONAI DynUNet with the unet family's
Lightning training. Prediction, sliding windows, 3-class targets and the watershed (with
post-processing chosen on validation) are the unet family's: :class:`NnunetSegmenter` is a
:class:`~microseg.models.unet.UnetSegmenter` whose window and normalisation come from the
plan saved in ``best.pt``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models import register_model
from microseg.models.nnunet.fingerprint import (
    FINGERPRINT_NAME,
    Fingerprint,
    compute_fingerprint,
)
from microseg.models.nnunet.planner import (
    PLANNED,
    PLANS_NAME,
    Plan,
    PlannerConfig,
    plan_experiment,
    read_plans,
    write_plans,
)
from microseg.models.unet import InferConfig, UnetSegmenter, load_unet, save_unet
from microseg.utils.devices import model_device
from microseg.utils.torchfiles import read_torch

__all__ = [
    "FINGERPRINT_NAME",
    "PLANS_NAME",
    "Fingerprint",
    "NnunetSegmenter",
    "Plan",
    "PlannerConfig",
    "compute_fingerprint",
    "plan_experiment",
    "read_plans",
    "saved_plan",
    "write_plans",
]


def saved_plan(path: str | Path) -> Plan:
    """The plan stored in an nnunet ``best.pt``."""
    ckpt = read_torch(Path(path), map_location="cpu")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("plan"), dict):
        raise DataFormatError(
            "no nnunet plan in this model file (trained by another family?)", path
        )
    return Plan.from_dict(ckpt["plan"])


@register_model("nnunet")
@dataclass
class NnunetSegmenter(UnetSegmenter):
    """A planned DynUNet behind the ``models`` protocol (the unet façade plus its plan)."""

    plan: Plan | None = None

    train_config = "microseg.models.nnunet.train:NnunetTrainConfig"
    train_function = "microseg.models.nnunet.train:train_nnunet"

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Any = None,
        **_: Any,
    ) -> NnunetSegmenter:
        """The trained network and its plan: window = planned patch, percentiles = planned
        normalisation, overlap/blend from ``train``, then ``infer`` overrides; post-processing
        from ``post`` (chosen on validation), else ``infer["post"]``, else the saved one."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained nnunet weights; run its training stage", path)
        net, cfg, trained_post = load_unet(path)
        plan = saved_plan(path)
        train = dict(train or {})
        base = {
            "roi": plan.patch_size,
            "percentiles": list(plan.percentiles),
            "overlap": train.get("overlap", 0.25),
            "blend": train.get("blend", "gaussian"),
        }
        infer = dict(infer or {})
        chosen = post if post is not None else infer.get("post", asdict(trained_post))
        icfg = InferConfig.from_mapping({**base, **infer, "post": chosen})
        return cls(net.to(model_device(net, icfg.device)), cfg, icfg, plan)

    @classmethod
    def check_train_keys(cls, keys: Iterable[str]) -> None:
        """Also refuse the knobs the plan decides (a study or tuned file must use plan.*)."""
        keys = list(keys)
        planned = sorted(k for k in keys if k.partition(".")[0] in PLANNED)
        if planned:
            raise ConfigError(f"nnunet plans {planned} itself; steer it with plan.* knobs")
        super().check_train_keys(keys)

    def save(self, path: str | Path) -> Path:
        extra = {"plan": self.plan.to_dict()} if self.plan is not None else None
        return save_unet(self.network, path, self.config, self.infer.post, extra)
