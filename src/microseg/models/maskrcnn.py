"""The "maskrcnn" family: Mask R-CNN R50-FPN for nuclei, on torchvision or detectron2.

Engines (``MaskRCNNConfig.engine``):

* ``"torchvision"`` -- :func:`torchvision.models.detection.maskrcnn_resnet50_fpn_v2` built
  with ``weights=None, weights_backbone=None`` (never a download; :func:`build_torchvision`
  refuses anything else). ``backbone="resnet18"``/``"resnet34"`` swap in a smaller ResNet-FPN
  (:func:`torchvision.models.detection.backbone_utils.resnet_fpn_backbone`, v1 heads) for
  tests and quick CPU runs.
* ``"detectron2"`` -- detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``
  (the config file packaged with detectron2, no download), ``MODEL.WEIGHTS = ""`` unless a
  local ``weights_path``, one class. Imported only when asked for.
* ``"auto"`` -- detectron2 when ``import detectron2`` works, torchvision otherwise. The
  resolved engine is stored in saved models.

Both engines see the same input: a percentile-normalised ``CYX`` image in [0, 1] (greyscale
repeated to 3 channels, colour kept), resized by one fixed factor ``scale`` and normalised
with the ImageNet mean/std. The networks' own resizing (torchvision's ``min_size``/
``max_size``, detectron2's ``INPUT.MIN_SIZE_*``) is switched off, because it maps every image
to a fixed short side: on DSB 2018, whose images have short sides from 256 to 1024 px, and
between 256 px training crops and whole test images, the same nucleus would reach the network
at up to four different sizes. A fixed ``scale`` keeps nuclei at one size in training and
inference (``scale=2`` gives small nuclei 4x the pixels, at 4x the compute).

Both engines produce the same prediction: raw detections (boxes in image pixels, scores and
28 x 28 mask probabilities, taken before either library pastes full-image masks, which would
cost ``N x H x W`` floats for a few hundred nuclei) are pasted into box-sized crops
(:func:`paste_mask`) and turned into one label image by :func:`resolve_instances`: masks
thresholded at ``mask_thresh``, detections below ``score_thresh`` dropped, overlaps resolved
by score (the higher-scoring detection keeps a contested pixel), objects left with fewer than
``min_size`` pixels removed, ids 1..n in decreasing score order; the scores array holds the
score of id ``k`` at index ``k - 1`` (the order :func:`microseg.io.coco.labels_to_coco_results`
expects).

Images with a side above ``max_size`` (input pixels) are cut into overlapping tiles of that
size (:func:`tile_windows`); every detection belongs to the tile whose core (the tile minus
half the overlap towards each neighbour) holds its box centre, so an object smaller than
``tile_overlap / 2`` in radius is predicted once and whole. Tiles near the training patch
size beat whole images: a resnet18-FPN trained 300 steps on 192 px DSB 2018 patches scored
val F1@0.5 0.495 / segm AP 0.231 with 256 px tiles (5.6 s per image on the shared CPU),
0.460 / 0.196 with 512 px tiles and 0.454 / 0.194 whole (2.6 s); whole images with 3x the
proposals got 0.474 / 0.227, so most of the gap is the fixed proposal budget per forward pass
(1000 boxes for a 520 x 696 image vs. for each 256 px tile). Hence ``max_size=256``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microseg.data.targets import match_channels, percentile_normalise
from microseg.errors import ConfigError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.models import register_model
from microseg.utils.atomic import atomic_path
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

Engine = Literal["auto", "torchvision", "detectron2"]
ENGINES: tuple[str, ...] = ("auto", "torchvision", "detectron2")
BACKBONES: tuple[str, ...] = ("resnet50", "resnet18", "resnet34")
MODEL_FORMAT = "microseg.maskrcnn/1"
D2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# -- configuration ----------------------------------------------------------------------------
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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def architecture(self) -> dict[str, Any]:
        """What training depends on (for resume checks): not the test-time-only settings."""
        test_only = {"weights_path", "box_detections_per_img", "box_score_thresh",
                     "box_nms_thresh", "rpn_pre_nms_top_n_test",
                     "rpn_post_nms_top_n_test"}  # fmt: skip
        return {k: v for k, v in self.as_dict().items() if k not in test_only}


@dataclass(frozen=True)
class MaskRCNNPostConfig:
    """Detections -> instances (:func:`resolve_instances`) and tiling (:func:`tile_windows`).

    ``min_size`` 20 px as for the U-Net family (1 % of DSB 2018 nuclei are smaller);
    ``max_size``/``tile_overlap`` are in input pixels (before ``scale``): tiles about the
    training patch size (see the module docstring), overlapping by more than the largest
    nucleus diameter (~60 px on DSB 2018).
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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- torchvision engine -----------------------------------------------------------------------
def _transform_cls() -> type:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class NoResizeTransform(GeneralizedRCNNTransform):
        """Normalise and batch only: the input scale is fixed by our pre-processing."""

        def resize(self, image, target=None):  # type: ignore[no-untyped-def]
            return image, target

    return NoResizeTransform


@contextlib.contextmanager
def no_weight_downloads() -> Iterator[None]:
    """Inside, any torchvision weight enum that tries to fetch its file raises ConfigError."""
    from torchvision.models._api import WeightsEnum

    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(f"maskrcnn never downloads weights (asked for {self}); use weights_path")

    original = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original  # type: ignore[method-assign]


def build_torchvision(cfg: MaskRCNNConfig) -> nn.Module:
    """A fresh torchvision Mask R-CNN (2 classes: background, nucleus); never downloads."""
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.rpn import RPNHead

    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes),
        aspect_ratios=(cfg.aspect_ratios,) * len(cfg.anchor_sizes),
    )
    kwargs: dict[str, Any] = {
        "num_classes": 2,
        "box_detections_per_img": cfg.box_detections_per_img,
        "box_score_thresh": cfg.box_score_thresh,
        "box_nms_thresh": cfg.box_nms_thresh,
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "rpn_pre_nms_top_n_test": cfg.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": cfg.rpn_post_nms_top_n_test,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    with no_weight_downloads():
        if cfg.backbone == "resnet50":
            model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kwargs)
            # v2 hard-wires COCO's anchors; ours are nuclei-sized (the RPN head follows their count)
            model.rpn.anchor_generator = anchors
            n_anchors = anchors.num_anchors_per_location()[0]
            model.rpn.head = RPNHead(model.backbone.out_channels, n_anchors, conv_depth=2)
        else:
            backbone = resnet_fpn_backbone(
                backbone_name=cfg.backbone,
                weights=None,
                norm_layer=nn.BatchNorm2d,
                trainable_layers=5,
            )
            model = MaskRCNN(backbone, rpn_anchor_generator=anchors, **kwargs)
    model.transform = _transform_cls()(1, 1, list(IMAGENET_MEAN), list(IMAGENET_STD), 32)
    return model


def freeze_backbone(model: nn.Module, trainable_layers: int) -> int:
    """Freeze the ResNet body except its last ``trainable_layers`` stages (torchvision's rule).

    Returns the number of frozen parameter tensors.
    """
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages.append("bn1")
    frozen = 0
    for name, p in model.backbone.body.named_parameters():
        if not any(name.startswith(s) for s in stages):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise DataFormatError("expected a state dict or a checkpoint with 'model'/'state_dict'", path)


def load_local_weights(model: nn.Module, path: str | Path) -> tuple[int, int]:
    """Copy the tensors of a local state dict (or checkpoint) whose names and shapes match.

    Mismatched heads (a COCO-trained model has 91 classes) are skipped and logged. Returns
    ``(loaded, skipped)`` tensor counts. Only local files: a URL is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a local weights file (state dict or .pt checkpoint)", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataFormatError(
            f"not a readable torch file ({type(exc).__name__}: {exc})", path
        ) from exc
    source = _state_dict_from(obj, path)
    own = model.state_dict()
    take = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not take:
        raise DataFormatError("no tensor matches the network (wrong architecture?)", path)
    model.load_state_dict(take, strict=False)
    skipped = len(source) - len(take)
    log.info("%s: loaded %d tensors, skipped %d (name or shape differ)", path, len(take), skipped)
    return len(take), skipped


# -- detectron2 engine ------------------------------------------------------------------------
def detectron2_cfg(cfg: MaskRCNNConfig, device: str = "cpu") -> Any:
    """detectron2's R50-FPN 3x config, re-sized for nuclei and one class (no download)."""
    resolve_engine("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    c = get_cfg()
    c.merge_from_file(model_zoo.get_config_file(D2_CONFIG))
    c.MODEL.WEIGHTS = ""
    c.MODEL.DEVICE = str(device)
    c.MODEL.ROI_HEADS.NUM_CLASSES = 1
    c.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in cfg.anchor_sizes]
    c.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(cfg.aspect_ratios)]
    c.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.box_score_thresh
    c.MODEL.ROI_HEADS.NMS_THRESH_TEST = cfg.box_nms_thresh
    c.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = cfg.box_batch_size_per_image
    c.MODEL.RPN.PRE_NMS_TOPK_TEST = cfg.rpn_pre_nms_top_n_test
    c.MODEL.RPN.POST_NMS_TOPK_TEST = cfg.rpn_post_nms_top_n_test
    c.TEST.DETECTIONS_PER_IMAGE = cfg.box_detections_per_img
    c.MODEL.BACKBONE.FREEZE_AT = 5 - cfg.trainable_layers
    # from scratch, frozen BN would be an identity; train BN statistics instead
    c.MODEL.RESNETS.NORM = "FrozenBN" if cfg.weights_path else "BN"
    if cfg.backbone != "resnet50":
        c.MODEL.RESNETS.DEPTH = int(cfg.backbone.removeprefix("resnet"))
        c.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    c.INPUT.FORMAT = "RGB"
    c.INPUT.MASK_FORMAT = "bitmask"
    c.INPUT.MIN_SIZE_TEST = 0  # no resizing: the scale is ours
    c.MODEL.PIXEL_MEAN = [255.0 * m for m in IMAGENET_MEAN]
    c.MODEL.PIXEL_STD = [255.0 * s for s in IMAGENET_STD]
    return c


def build_detectron2(cfg: MaskRCNNConfig) -> nn.Module:
    """A fresh detectron2 ``GeneralizedRCNN`` on the CPU (move it with ``.to``)."""
    from detectron2.modeling import build_model

    return build_model(detectron2_cfg(cfg, "cpu"))


def build_network(cfg: MaskRCNNConfig) -> nn.Module:
    """The network of ``cfg.engine`` (resolved), with local weights when ``weights_path``."""
    engine = resolve_engine(cfg.engine)
    if engine == "detectron2":
        model = build_detectron2(cfg)
        if cfg.weights_path:
            from detectron2.checkpoint import DetectionCheckpointer

            if not Path(cfg.weights_path).is_file():
                raise MissingFileError("expected a local weights file", cfg.weights_path)
            DetectionCheckpointer(model).load(cfg.weights_path)
        return model
    model = build_torchvision(cfg)
    if cfg.weights_path:
        load_local_weights(model, cfg.weights_path)
    if cfg.trainable_layers < 5:
        freeze_backbone(model, cfg.trainable_layers)
    return model


def register_detectron2_dataset(
    name: str, samples: Sequence[Any], json_path: str | Path, category: str = "nucleus"
) -> str:
    """Export ``samples``' instance labels as COCO (RLE) and register them in ``DatasetCatalog``.

    Uses :func:`microseg.io.coco.labels_to_coco` and detectron2's ``register_coco_instances``
    (image id ``i + 1`` is ``samples[i]``; ``file_name`` is the sample id: images are taken
    from memory by the mapper, never read from disk). A name already registered is replaced.
    """
    resolve_engine("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from microseg.io.coco import labels_to_coco, write_coco

    coco = labels_to_coco(
        ((i + 1, str(s.sample_id), np.asarray(s.labels)) for i, s in enumerate(samples)),
        category_name=category,
        mode="rle",
    )
    write_coco(json_path, coco)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_path), "")
    return name


# -- post-processing --------------------------------------------------------------------------
@dataclass
class Detections:
    """Detections of one image: per detection a score, an ``x0, y0, x1, y1`` box and a mask
    crop (probabilities or booleans) whose top-left pixel is at ``offsets`` (row, col)."""

    scores: np.ndarray
    boxes: np.ndarray
    masks: list[np.ndarray]
    offsets: np.ndarray

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.offsets = np.asarray(self.offsets, np.int64).reshape(-1, 2)
        n = len(self.scores)
        if not (len(self.boxes) == len(self.masks) == len(self.offsets) == n):
            raise ShapeMismatchError(
                f"detections disagree: {n} scores, {len(self.boxes)} boxes, "
                f"{len(self.masks)} masks, {len(self.offsets)} offsets"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0), np.zeros((0, 4)), [], np.zeros((0, 2)))

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: Sequence[float]) -> Detections:
        """Full-image masks ``(N, H, W)`` (offsets 0); boxes from their true pixels."""
        masks = np.asarray(masks)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m >= 0.5 if m.dtype.kind == "f" else m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if ys.size else [0] * 4)
        return cls(np.asarray(scores), np.asarray(boxes), list(masks), np.zeros((len(masks), 2)))

    def select(self, keep: np.ndarray) -> Detections:
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        return Detections(
            self.scores[idx], self.boxes[idx], [self.masks[i] for i in idx], self.offsets[idx]
        )

    def shifted(self, dy: int, dx: int) -> Detections:
        return Detections(
            self.scores,
            self.boxes + np.float32([dx, dy, dx, dy]),
            self.masks,
            self.offsets + np.int64([dy, dx]),
        )

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            [m for p in parts for m in p.masks],
            np.concatenate([p.offsets for p in parts]),
        )


def resolve_instances(
    detections: Detections, shape: tuple[int, int], cfg: MaskRCNNPostConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One ``uint16`` label image and the score of each id (index ``id - 1``).

    Pure function: masks >= ``mask_thresh`` (booleans as they are), detections below
    ``score_thresh`` dropped, painted in decreasing score order onto free pixels only (the
    higher score wins a contested pixel; ties keep input order), instances left with fewer
    than ``min_size`` pixels removed, ids 1..n by decreasing score.
    """
    cfg = cfg or MaskRCNNPostConfig()
    h, w = int(shape[0]), int(shape[1])
    labels = np.zeros((h, w), np.int32)
    order = np.argsort(-detections.scores, kind="stable")
    order = order[detections.scores[order] >= cfg.score_thresh]
    kept_scores: list[float] = []
    for i in order:
        m = np.asarray(detections.masks[i])
        m = m >= cfg.mask_thresh if m.dtype != bool else m
        y0, x0 = (int(v) for v in detections.offsets[i])
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + m.shape[0], h), min(x0 + m.shape[1], w)
        if yb <= ya or xb <= xa:
            continue
        m = m[ya - y0 : yb - y0, xa - x0 : xb - x0]
        region = labels[ya:yb, xa:xb]
        free = m & (region == 0)
        if not free.any():
            continue
        kept_scores.append(float(detections.scores[i]))
        region[free] = len(kept_scores)
    scores = np.asarray(kept_scores, np.float32)
    if cfg.min_size > 1 and scores.size:
        areas = np.bincount(labels.ravel(), minlength=scores.size + 1)
        keep = areas[1:] >= cfg.min_size
        lut = np.zeros(scores.size + 1, np.int32)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
        labels, scores = lut[labels], scores[keep]
    if scores.size > np.iinfo(np.uint16).max:
        raise DataFormatError(f"{scores.size} instances do not fit uint16")
    return labels.astype(np.uint16), scores


def paste_mask(
    prob: np.ndarray, box: Sequence[float], shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``M x M`` mask probability pasted into its box: ``(crop, (row, col))``, clipped.

    Same geometry as torchvision's ``paste_masks_in_image`` (mask padded by one pixel, box
    expanded to match, bilinear resize) but only the box region is materialised.
    """
    m = torch.as_tensor(np.asarray(prob, np.float32))
    size = m.shape[-1]
    m = F.pad(m, (1, 1, 1, 1))
    s = (size + 2) / size
    x0, y0, x1, y1 = (float(v) for v in box)
    xc, yc, wh, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * s, (y1 - y0) / 2 * s
    bx0, by0, bx1, by1 = (int(v) for v in (xc - wh, yc - hh, xc + wh, yc + hh))
    bw, bh = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
    crop = F.interpolate(m[None, None], size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
    ya, xa = max(by0, 0), max(bx0, 0)
    yb, xb = min(by0 + bh, shape[0]), min(bx0 + bw, shape[1])
    if yb <= ya or xb <= xa:
        return np.zeros((0, 0), np.float32), (ya, xa)
    return crop[ya - by0 : yb - by0, xa - bx0 : xb - bx0].numpy(), (ya, xa)


def _raw_to_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    probs: np.ndarray,
    shape: tuple[int, int],
    post: MaskRCNNPostConfig,
) -> Detections:
    keep = np.flatnonzero(scores >= post.score_thresh)
    masks, offsets = [], []
    for i in keep:
        crop, off = paste_mask(probs[i], boxes[i], shape)
        masks.append(crop >= post.mask_thresh)
        offsets.append(off)
    return Detections(scores[keep], boxes[keep], masks, np.asarray(offsets).reshape(-1, 2))


# -- detection per engine ---------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]


@contextlib.contextmanager
def _score_floor(model: nn.Module, engine: str, score_thresh: float | None) -> Iterator[None]:
    """Raise the box score threshold for one call: the mask head then skips what we drop."""
    if engine == "detectron2":
        owner, attr = model.roi_heads.box_predictor, "test_score_thresh"
    else:
        owner, attr = model.roi_heads, "score_thresh"
    before = getattr(owner, attr)
    if score_thresh is not None:
        setattr(owner, attr, max(float(before), float(score_thresh)))
    try:
        yield
    finally:
        setattr(owner, attr, before)


@torch.no_grad()
def raw_detections(
    model: nn.Module,
    engine: str,
    image: torch.Tensor,
    scale: float = 1.0,
    score_thresh: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes N x 4 in image pixels, scores N, mask probabilities N x M x M)`` of one
    normalised ``3 x H x W`` image in [0, 1], without full-image mask pasting.

    ``score_thresh`` (when above the model's own box threshold) drops weaker boxes before
    the mask head runs on them.
    """
    with _score_floor(model, engine, score_thresh):
        return _raw_detections(model, engine, image, scale)


def _raw_detections(
    model: nn.Module, engine: str, image: torch.Tensor, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = image.shape[-2:]
    x = _scaled(image.to(_device_of(model)), scale)
    sy, sx = h / x.shape[-2], w / x.shape[-1]
    if engine == "detectron2":
        out = model.inference(
            [{"image": x * 255.0, "height": h, "width": w}], do_postprocess=False
        )[0]
        boxes = out.pred_boxes.tensor
        scores, probs = out.scores, out.pred_masks[:, 0]
    else:
        images, _ = model.transform([x])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        det = model.roi_heads(features, proposals, images.image_sizes)[0][0]
        boxes, scores, probs = det["boxes"], det["scores"], det["masks"][:, 0]
    boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
    return boxes.float().cpu().numpy(), scores.float().cpu().numpy(), probs.float().cpu().numpy()


def tile_windows(size: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(start, core_start, core_end)`` per tile along one axis of length ``size``.

    Tiles of ``tile`` pixels overlapping by at least ``overlap``; the cores split every
    overlap at its middle and together cover ``[0, size)`` exactly once.
    """
    if size <= tile:
        return [(0, 0, size)]
    step = max(1, tile - overlap)
    starts = [*range(0, size - tile, step), size - tile]
    cuts = [0, *((b + a + tile) // 2 for a, b in itertools.pairwise(starts)), size]
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def detect_tiled(
    detect: Callable[[torch.Tensor], Detections],
    image: torch.Tensor,
    max_size: int,
    overlap: int,
) -> Detections:
    """Detections of a whole image, tiling it when a side exceeds ``max_size`` (see module)."""
    h, w = image.shape[-2:]
    if h <= max_size and w <= max_size:
        return detect(image)
    parts = []
    for y, cy0, cy1 in tile_windows(h, max_size, overlap):
        for x, cx0, cx1 in tile_windows(w, max_size, overlap):
            d = detect(image[..., y : y + max_size, x : x + max_size]).shifted(y, x)
            xc = (d.boxes[:, 0] + d.boxes[:, 2]) / 2
            yc = (d.boxes[:, 1] + d.boxes[:, 3]) / 2
            parts.append(d.select((yc >= cy0) & (yc < cy1) & (xc >= cx0) & (xc < cx1)))
    return Detections.concat(parts)


def prepare_image(
    image: np.ndarray, normalised: bool, percentiles: Sequence[float]
) -> torch.Tensor:
    """Raw ``YX``/``YXC`` (or normalised ``CYX``) image -> ``3 x H x W`` float tensor in [0, 1]."""
    if normalised:
        x = np.asarray(image, np.float32)
        x = x[None] if x.ndim == 2 else x
    else:
        lo, hi = percentiles
        x = percentile_normalise(image, lo, hi)
    return torch.from_numpy(np.ascontiguousarray(match_channels(x, 3)))


def predict_image(
    model: nn.Module,
    engine: str,
    image: np.ndarray,
    scale: float = 1.0,
    post: MaskRCNNPostConfig | None = None,
    normalised: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels uint16 H x W, scores float32 per id)`` of one image (see module docstring)."""
    post = post or MaskRCNNPostConfig()
    x = prepare_image(image, normalised, post.percentiles)

    def detect(tile: torch.Tensor) -> Detections:
        boxes, scores, probs = raw_detections(model, engine, tile, scale, post.score_thresh)
        return _raw_to_detections(boxes, scores, probs, tuple(tile.shape[-2:]), post)

    was_training = model.training
    model.eval()
    try:
        dets = detect_tiled(detect, x, post.max_size, post.tile_overlap)
    finally:
        model.train(was_training)
    return resolve_instances(dets, tuple(x.shape[-2:]), post)


# -- save / load ------------------------------------------------------------------------------
def save_maskrcnn(
    model: nn.Module,
    path: str | Path,
    cfg: MaskRCNNConfig,
    post: MaskRCNNPostConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Weights + model config (engine resolved) + post-processing in one ``.pt``, atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "model_config": cfg.as_dict(),
        "post": (post or MaskRCNNPostConfig()).as_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_maskrcnn(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, MaskRCNNConfig, MaskRCNNPostConfig]:
    """A network (eval mode) from :func:`save_maskrcnn` or a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a maskrcnn model file (.pt), found nothing", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataFormatError(
            f"not a readable torch file ({type(exc).__name__}: {exc})", path
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        raise DataFormatError(f"expected a {MODEL_FORMAT} file with model_config/model", path)
    values = dict(ckpt["model_config"])
    values["weights_path"] = None  # the stored weights replace whatever it started from
    cfg = MaskRCNNConfig.from_mapping(values)
    post = MaskRCNNPostConfig.from_mapping(ckpt.get("post") or {})
    if cfg.engine == "detectron2" and not detectron2_available():
        raise ConfigError(f"{path} holds a detectron2 model, but detectron2 is not installed")
    model = build_network(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(map_location).eval()
    return model, cfg, post


def weights_digest(model: nn.Module) -> str:
    """A short hash of all weights (to compare runs in tests and logs)."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the registered family --------------------------------------------------------------------
@register_model("maskrcnn")
@dataclass
class MaskRCNNSegmenter:
    """Mask R-CNN (torchvision or detectron2 engine) with its post-processing."""

    network: nn.Module
    config: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    post: MaskRCNNPostConfig = field(default_factory=MaskRCNNPostConfig)

    @property
    def engine(self) -> str:
        return self.config.engine

    @classmethod
    def build(cls, **params: Any) -> MaskRCNNSegmenter:
        """From ``MaskRCNNConfig`` keys plus ``post`` (a mapping); ``engine`` is resolved."""
        post = MaskRCNNPostConfig.from_mapping(params.pop("post", None) or {})
        cfg = MaskRCNNConfig.from_mapping(params)
        cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg.engine))
        return cls(build_network(cfg), cfg, post)

    def train(self, data: str | Path, out_dir: str | Path, **params: Any) -> Any:
        """:func:`microseg.train.maskrcnn.train_maskrcnn` on a targets cache (train/val splits);
        adopts the best weights."""
        from microseg.data.targets import load_targets
        from microseg.train.maskrcnn import MaskRCNNTrainConfig, train_maskrcnn

        hooks = params.pop("hooks", None)
        resume = params.pop("resume", True)
        base = {"model": self.config.as_dict(), "post": self.post.as_dict()}
        cfg = MaskRCNNTrainConfig.from_mapping({**base, **params})
        train_s, val_s = load_targets(data, "train"), load_targets(data, "val")
        result = train_maskrcnn(train_s, val_s, out_dir, cfg, hooks=hooks, resume=resume)
        if result.best_path is not None and Path(result.best_path).is_file():
            self.network, self.config, self.post = load_maskrcnn(result.best_path)
        return result

    def predict(self, images: Sequence[Any], **params: Any) -> list[Any]:
        """``(labels uint16 H x W, scores float32 per id)`` per image.

        Images are raw ``YX``/``YXC`` unless ``normalised=True`` (``CYX`` in [0, 1] from the
        targets cache). Other keys override :class:`MaskRCNNPostConfig` for this call;
        ``device`` moves the network first.
        """
        normalised = bool(params.pop("normalised", False))
        device = params.pop("device", None)
        if device is not None and device != "auto":
            self.network.to(device)
        elif device == "auto" and torch.cuda.is_available():
            self.network.to("cuda")
        post = MaskRCNNPostConfig.from_mapping({**self.post.as_dict(), **params})
        return [
            predict_image(self.network, self.engine, im, self.config.scale, post, normalised)
            for im in images
        ]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Raw image -> labels, the callable :func:`microseg.infer.instances.predict_dataset`
        takes."""
        return self.predict([image])[0][0]

    def save(self, path: str | Path) -> Path:
        return save_maskrcnn(self.network, path, self.config, self.post)

    @classmethod
    def load(cls, path: str | Path, **params: Any) -> MaskRCNNSegmenter:
        """From :func:`save` or ``best.pt``/``last.pt``; ``map_location`` (or ``device``) says
        where the weights go, other keys override the stored :class:`MaskRCNNPostConfig`."""
        device = params.pop("device", None)
        map_location = params.pop("map_location", None) or device or "cpu"
        if map_location == "auto":
            map_location = "cuda" if torch.cuda.is_available() else "cpu"
        network, cfg, post = load_maskrcnn(path, map_location)
        post = MaskRCNNPostConfig.from_mapping({**post.as_dict(), **params})
        return cls(network, cfg, post)
