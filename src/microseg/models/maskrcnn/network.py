"""Mask R-CNN networks for nuclei on two engines, and the family's model file.

* ``"torchvision"`` -- :func:`torchvision.models.detection.maskrcnn_resnet50_fpn_v2` built
  with ``weights=None, weights_backbone=None`` (never a download; :func:`build_torchvision`
  refuses anything else). ``backbone="resnet18"``/``"resnet34"`` swap in a smaller ResNet-FPN
  (:func:`torchvision.models.detection.backbone_utils.resnet_fpn_backbone`, v1 heads) for
  tests and quick CPU runs.
* ``"detectron2"`` -- detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``
  (the config file packaged with detectron2, no download), ``MODEL.WEIGHTS = ""`` unless a
  local ``weights_path``, one class. Imported only when asked for.

Both engines see the same input: a percentile-normalised ``CYX`` image in [0, 1] (greyscale
repeated to 3 channels, colour kept), resized by one fixed factor ``scale`` and normalised
with the ImageNet mean/std. The networks' own resizing (torchvision's ``min_size``/
``max_size``, detectron2's ``INPUT.MIN_SIZE_*``) is switched off, because it maps every image
to a fixed short side: on DSB 2018, whose images have short sides from 256 to 1024 px, and
between 256 px training crops and whole test images, the same nucleus would reach the network
at up to four different sizes. A fixed ``scale`` keeps nuclei at one size in training and
inference (``scale=2`` gives small nuclei 4x the pixels, at 4x the compute).

The model file (``microseg.maskrcnn/1``, :func:`save_maskrcnn`) holds only tensors, strings,
numbers, lists and dicts, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models.maskrcnn.config import (
    MaskRCNNConfig,
    MaskRCNNPostConfig,
    detectron2_available,
    resolve_engine,
)
from microseg.utils.atomic import write_torch
from microseg.utils.devices import resolve_device
from microseg.utils.torchfiles import read_torch

log = logging.getLogger(__name__)

MODEL_FORMAT = "microseg.maskrcnn/1"
D2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    obj = read_torch(path, map_location="cpu")
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
def detectron2_cfg(cfg: MaskRCNNConfig, device: str = "auto") -> Any:
    """detectron2's R50-FPN 3x config, re-sized for nuclei and one class (no download);
    ``device`` is resolved by :func:`microseg.utils.devices.resolve_device`."""
    resolve_engine("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    c = get_cfg()
    c.merge_from_file(model_zoo.get_config_file(D2_CONFIG))
    c.MODEL.WEIGHTS = ""
    c.MODEL.DEVICE = str(resolve_device(device))
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


# -- save / load ------------------------------------------------------------------------------
def save_maskrcnn(
    model: nn.Module,
    path: str | Path,
    cfg: MaskRCNNConfig,
    post: MaskRCNNPostConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Weights + model config (engine resolved) + post-processing in one ``.pt``, atomically.

    ``extra`` (epoch, metrics) must be plain data too, so the file loads with
    ``weights_only=True``."""
    payload = {
        "format": MODEL_FORMAT,
        "model_config": cfg.as_dict(),
        "post": (post or MaskRCNNPostConfig()).as_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **dict(extra or {}),
    }
    write_torch(path, payload)
    return Path(path)


def load_maskrcnn(
    path: str | Path, map_location: str | torch.device = "auto"
) -> tuple[nn.Module, MaskRCNNConfig, MaskRCNNPostConfig]:
    """A network (eval mode) from :func:`save_maskrcnn` (``best.pt``); ``map_location`` is a
    device string (``auto`` picks the best this machine has) or a ``torch.device``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a maskrcnn model file (.pt), found nothing", path)
    device = resolve_device(map_location)
    ckpt = read_torch(path, map_location="cpu")
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
    model.to(device).eval()
    return model, cfg, post


def weights_digest(model: nn.Module) -> str:
    """A short hash of all weights (to compare runs in tests and logs)."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
