"""What a Mask R-CNN is built from (:class:`MaskRCNNConfig`), how its detections become
instances (:class:`MaskRCNNPostConfig`), and which engine builds it (:func:`resolve_engine`).

Engines (``MaskRCNNConfig.engine``): ``"torchvision"`` (always there), ``"detectron2"``
(imported only when asked for) and ``"auto"`` (detectron2 when ``import detectron2`` works,
torchvision otherwise). The resolved engine is what saved models store.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from microseg.errors import ConfigError
from microseg.utils.fields import known_fields

Engine = Literal["auto", "torchvision", "detectron2"]
ENGINES: tuple[str, ...] = ("auto", "torchvision", "detectron2")
BACKBONES: tuple[str, ...] = ("resnet50", "resnet18", "resnet34")


def detectron2_available() -> bool:
    """Whether ``import detectron2`` can work (checked without importing it)."""
    return importlib.util.find_spec("detectron2") is not None


def resolve_engine(engine: str) -> str:
    """``auto`` -> ``detectron2`` when importable, else ``torchvision``; checks the name."""
    if engine not in ENGINES:
        raise ConfigError(f"maskrcnn engine must be one of {ENGINES}; found {engine!r}")
    if engine == "auto":
        return "detectron2" if detectron2_available() else "torchvision"
    if engine == "detectron2" and not detectron2_available():
        raise ConfigError(
            "maskrcnn engine 'detectron2' asked for, but detectron2 is not installed "
            "(import detectron2 failed); install it or set engine: torchvision (or auto)"
        )
    return engine


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Which network to build; sized for nuclei (5 to 60 px across at ``scale=1``).

    ``anchor_sizes`` are one size per FPN level (P2..P6, strides 4..64): 8..128 px instead of
    COCO's 32..512. ``box_detections_per_img`` 400 and 1000 proposals at test time leave room
    for the densest DSB 2018 images (up to 198 nuclei in our split, a few hundred in stage 2).
    ``trainable_backbone_layers`` (0..5, torchvision's meaning) only matters with
    ``weights_path``; from scratch all layers train. Lower ``box_batch_size_per_image`` and
    ``rpn_post_nms_top_n_test`` make CPU runs fast (the mask head's four 256-wide convs on
    every sampled positive RoI dominate a training step).
    """

    engine: Engine = "auto"
    backbone: str = "resnet50"
    scale: float = 1.0
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_detections_per_img: int = 400
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_test: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    trainable_backbone_layers: int | None = None  # None: 5 from scratch, 3 with weights_path
    weights_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_sizes", tuple(int(s) for s in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        if self.weights_path is not None:
            object.__setattr__(self, "weights_path", str(self.weights_path))
        if self.engine not in ENGINES:
            raise ConfigError(f"maskrcnn engine must be one of {ENGINES}; found {self.engine!r}")
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"maskrcnn backbone must be one of {BACKBONES}; found {self.backbone!r}"
            )
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) < 1:
            raise ConfigError(
                f"anchor_sizes must give 5 positive sizes (FPN P2..P6); found {self.anchor_sizes}"
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ConfigError(f"aspect_ratios must be positive; found {self.aspect_ratios}")
        if not 0.25 <= self.scale <= 8.0:
            raise ConfigError(f"maskrcnn scale must be in [0.25, 8]; found {self.scale}")
        tbl = self.trainable_backbone_layers
        if tbl is not None and not 0 <= tbl <= 5:
            raise ConfigError(f"trainable_backbone_layers must be in 0..5; found {tbl}")
        positive = ("box_detections_per_img", "box_batch_size_per_image",
                    "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test")  # fmt: skip
        bad = [k for k in positive if getattr(self, k) < 1]
        if bad:
            raise ConfigError(f"maskrcnn {bad} must be >= 1")

    @property
    def trainable_layers(self) -> int:
        if self.trainable_backbone_layers is not None:
            return self.trainable_backbone_layers
        return 3 if self.weights_path else 5

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaskRCNNConfig:
        return cls(**known_fields(cls, values, "maskrcnn model"))

    def as_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def architecture(self) -> dict[str, Any]:
        """What training depends on (for resume checks): not the test-time-only settings."""
        test_only = {"weights_path", "box_detections_per_img", "box_score_thresh",
                     "box_nms_thresh", "rpn_pre_nms_top_n_test",
                     "rpn_post_nms_top_n_test"}  # fmt: skip
        return {k: v for k, v in self.as_dict().items() if k not in test_only}


@dataclass(frozen=True)
class MaskRCNNPostConfig:
    """Detections -> instances (:func:`~microseg.models.maskrcnn.predict.resolve_instances`)
    and tiling (:func:`~microseg.models.maskrcnn.predict.tile_windows`).

    ``min_size`` 20 px as for the U-Net family (1 % of DSB 2018 nuclei are smaller);
    ``max_size``/``tile_overlap`` are in input pixels (before ``scale``): tiles about the
    training patch size (see :mod:`microseg.models.maskrcnn.predict`), overlapping by more
    than the largest nucleus diameter (~60 px on DSB 2018).
    """

    score_thresh: float = 0.5
    mask_thresh: float = 0.5
    min_size: int = 20
    max_size: int = 256
    tile_overlap: int = 64
    percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        for name in ("score_thresh", "mask_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]; found {getattr(self, name)}")
        if self.max_size < 32 or not 0 <= self.tile_overlap < self.max_size // 2:
            raise ConfigError(
                f"max_size must be >= 32 and tile_overlap in [0, max_size/2); found "
                f"max_size={self.max_size}, tile_overlap={self.tile_overlap}"
            )
        if self.min_size < 0:
            raise ConfigError(f"min_size must be >= 0; found {self.min_size}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaskRCNNPostConfig:
        return cls(**known_fields(cls, values, "maskrcnn post-processing"))

    def as_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))
