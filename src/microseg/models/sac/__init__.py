"""The "sac" family: transformer encoders (SwinUNETR from scratch, or SAM's pretrained ViT)
predicting background / interior / boundary, + the unet family's seeded watershed.

The seed benchmark's SAM-based row. The networks (:mod:`microseg.models.sac.network`) are
architectures of the unet family (``arch: swinunetr | sam``), so training
(:func:`microseg.models.unet.train.train_unet`), sliding-window prediction and validated
post-processing are the unet family's, reused by import. What this façade adds:

* the family's default architecture is ``swinunetr``; ``sam`` when ``model.options`` names a
  ``checkpoint`` (and no ``arch``); other U-Nets are refused (they are the unet family's);
* which encoder ran is recorded: ``model.options.encoder`` (``swinunetr`` or
  ``sam (<checkpoint file name>)``) is saved in every model file and ``out_dir/encoder.json``
  is written after training; :meth:`SacSegmenter.describe` reads it back;
* loading a trained ``sam`` model does not read the SAM checkpoint (the file's own weights
  replace it), so evaluation needs only ``best.pt``.

Packages: ``einops`` (MONAI's SwinUNETR uses it) and, for ``sam`` only, ``segment-anything``
(code only: the weights are always a local file, never downloaded).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models import register_model
from microseg.models.sac.network import (
    ENCODER_KEY,
    SAC_ARCHS,
    SamSegNet,
    build_sam,
    build_swinunetr,
    checkpoint_init,
    encoder_name,
    load_sac_network,
)
from microseg.models.unet import UnetSegmenter
from microseg.models.unet.network import UnetConfig
from microseg.utils.atomic import write_text

__all__ = [
    "ENCODER_INFO",
    "SAC_ARCHS",
    "SacSegmenter",
    "SamSegNet",
    "build_sam",
    "build_swinunetr",
    "encoder_name",
    "load_sac_network",
    "sac_model_section",
]

#: written next to ``best.pt`` after training: which encoder ran, and from which file
ENCODER_INFO = "encoder.json"


def sac_model_section(model: Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``train.model`` section with the family's defaults and the encoder record filled in:
    arch ``swinunetr`` (``sam`` when a checkpoint is configured), ``options.encoder`` set."""
    values = dict(model or {})
    options = dict(values.get("options") or {})
    values.setdefault("arch", "sam" if options.get("checkpoint") else "swinunetr")
    if values["arch"] not in SAC_ARCHS:
        raise ConfigError(
            f"the sac family runs {list(SAC_ARCHS)}; found arch {values['arch']!r} "
            "(other U-Nets are the unet family's)"
        )
    cfg = UnetConfig.from_mapping({**values, "options": options})
    options[ENCODER_KEY] = encoder_name(cfg)
    return {**values, "options": options}


@register_model("sac")
class SacSegmenter(UnetSegmenter):
    """A SwinUNETR or SAM-encoder network behind the unet family's façade; says which ran."""

    @classmethod
    def build(cls, **params: Any) -> SacSegmenter:
        post = params.pop("post", None)
        """A fresh network (``sam``: encoder initialised from its checkpoint)."""
        return super().build(**sac_model_section(params), post=post)  # type: ignore[return-value]

    @classmethod
    def train(
        cls,
        data: Any,
        out_dir: str | Path,
        train: Mapping[str, Any],
        hooks: Any = None,
        *,
        resume: bool = True,
    ) -> Any:
        """The unet family's training on the targets cache at ``data`` with a ``sac`` network;
        ``out_dir/encoder.json`` says which encoder ran."""
        values = dict(train)
        values["model"] = sac_model_section(values.get("model"))
        result = super().train(data, out_dir, values, hooks, resume=resume)
        cfg = UnetConfig.from_mapping(values["model"])
        info = {
            ENCODER_KEY: encoder_name(cfg),
            "arch": cfg.arch,
            "checkpoint": cfg.options.get("checkpoint"),
            "freeze_encoder": bool(cfg.options.get("freeze_encoder", False)),
        }
        write_text(Path(out_dir) / ENCODER_INFO, json.dumps(info, indent=2) + "\n")
        return result

    @classmethod
    def load(
        cls,
        path: str | Path | None,
        train: Mapping[str, Any] | None = None,
        infer: Mapping[str, Any] | None = None,
        post: Any = None,
        **kw: Any,
    ) -> SacSegmenter:
        """A trained ``sac`` model (see :meth:`UnetSegmenter.load`); the SAM checkpoint it was
        initialised from is not needed."""
        if path is None or not Path(path).is_file():
            raise MissingFileError("no trained sac weights; run its training stage", path)
        with checkpoint_init(False):
            model = super().load(path, train=train, infer=infer, post=post, **kw)
        if model.config.arch not in SAC_ARCHS:
            raise DataFormatError(
                f"not a sac model: arch {model.config.arch!r} (load it with the unet family)", path
            )
        return model  # type: ignore[return-value]

    @property
    def encoder(self) -> str:
        """``swinunetr`` or ``sam (<checkpoint file name>)``: what this model's encoder is."""
        return str(self.config.options.get(ENCODER_KEY) or encoder_name(self.config))

    def describe(self) -> dict[str, Any]:
        """What ran, for reports: encoder, arch, checkpoint, frozen or not, parameter count."""
        return {
            ENCODER_KEY: self.encoder,
            "arch": self.config.arch,
            "checkpoint": self.config.options.get("checkpoint"),
            "freeze_encoder": bool(self.config.options.get("freeze_encoder", False)),
            "n_params": int(sum(p.numel() for p in self.network.parameters())),
        }
