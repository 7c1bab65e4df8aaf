"""Training for the Mask R-CNN family (:mod:`microseg.models.maskrcnn`), both engines.

Input: :class:`microseg.data.targets.TargetSample` lists (``load_targets(dir, "train")`` and
``"val"``): normalised ``CYX`` images and instance labels (the 3-class maps are not used).

Patches: one random ``patch_size`` crop per draw (images smaller than a patch are zero-padded),
with random flips on both axes and a random multiple of 90 degrees when ``augment``; instances
cut by the crop to fewer than ``min_instance_pixels`` pixels are left out of the targets (their
pixels count as background for the mask head). The crop is resized by the model's ``scale``
(bilinear image, nearest labels) so training sees nuclei at the size inference does.

torchvision engine (:func:`train_maskrcnn`): one epoch = ``steps_per_epoch`` batches of
``batch_size`` patches; the loss is the sum of torchvision's five Mask R-CNN losses
(RPN objectness and box, classifier, box regression, mask BCE). SGD with momentum (or AdamW),
linear warm-up then cosine decay per step, gradient-norm clipping. Validation every
``val_every`` epochs: every val image whole through :func:`~microseg.models.maskrcnn.
predict_image` (tiled above ``post.max_size``), then the mean instance F1 at IoU 0.5
(``val_f1_50``, :func:`microseg.evaluate.instances.image_scores`) and foreground Dice.
``best.pt`` holds the weights of the best ``val_f1_50``, ``last.pt`` everything needed to go
on (optimizer, scheduler, epoch, history, early-stopping state); both load with
:func:`~microseg.models.maskrcnn.load_maskrcnn`. Calling again on the same ``out_dir``
continues an unfinished ``last.pt``; the patch sampler and torch are re-seeded from
``(seed, epoch)`` every epoch, so a resumed run draws the batches an uninterrupted one would.

detectron2 engine (same function, ``cfg.model.engine == "detectron2"``): the splits are
exported as COCO (:func:`~microseg.models.maskrcnn.register_detectron2_dataset`) and trained
by a ``DefaultTrainer`` subclass for ``epochs * steps_per_epoch`` iterations (same patches,
via a dataset mapper; same optimizer choice, warm-up, cosine schedule and clipping through
``SOLVER.*``); detectron2's ``COCOEvaluator`` scores the val split every ``val_every``
epochs (``val_segm_AP``, ``val_segm_AP50``, ...) next to our ``val_f1_50``. Our hooks are
called by a detectron2 hook at each epoch boundary, which also writes ``best.pt``/``last.pt``
in our format. detectron2's own checkpoints (``out_dir/detectron2/model_*.pth``) carry the
resume state (weights, optimizer, scheduler, iteration); unlike the torchvision loop its data
stream is not re-seeded per epoch, so a resumed detectron2 run is not bit-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from microseg.data.targets import TargetSample, match_channels
from microseg.errors import ConfigError
from microseg.evaluate.instances import image_scores
from microseg.models.maskrcnn import (
    MODEL_FORMAT,
    MaskRCNNConfig,
    MaskRCNNPostConfig,
    build_network,
    predict_image,
    register_detectron2_dataset,
    resolve_engine,
)
from microseg.train.checkpoint import load_checkpoint, save_checkpoint
from microseg.train.hooks import EarlyStopping, HookBase, Hooks
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.maskrcnn.train/1"
BEST_METRIC = "val_f1_50"


@dataclass
class MaskRCNNTrainConfig:
    """Every knob of :func:`train_maskrcnn` (``model``/``post`` are the family's configs)."""

    model: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    post: MaskRCNNPostConfig = field(default_factory=MaskRCNNPostConfig)
    # data
    patch_size: int = 256
    batch_size: int = 4
    augment: bool = True
    min_instance_pixels: int = 4
    # schedule
    epochs: int = 12
    steps_per_epoch: int = 100
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip_norm: float | None = 10.0
    # validation
    val_every: int = 1
    val_max_images: int | None = None
    early_stop_patience: int = 0  # 0: off
    # run
    seed: int = 42
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = MaskRCNNConfig.from_mapping(self.model)
        if isinstance(self.post, Mapping):
            self.post = MaskRCNNPostConfig.from_mapping(self.post)
        checks = {
            "epochs": self.epochs >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 1,
            "batch_size": self.batch_size >= 1,
            "patch_size": self.patch_size >= 32,
            "lr": self.lr > 0,
            "optimizer": self.optimizer in ("sgd", "adamw"),
            "warmup_steps": self.warmup_steps >= 0,
            "val_every": self.val_every >= 1,
            "early_stop_patience": self.early_stop_patience >= 0,
            "min_instance_pixels": self.min_instance_pixels >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid maskrcnn training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MaskRCNNTrainConfig:
        """From a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "maskrcnn training"))

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly (``model.*``, ``post.*`` prefixed) for logging as params."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict):
                out.update(
                    {f"{k}.{kk}": list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                )
            else:
                out[k] = v
        return out


@dataclass
class TrainResult:
    """What a finished (or already finished) training run leaves behind."""

    best: dict[str, float]
    best_epoch: int | None
    best_path: Path | None
    last_path: Path
    epochs_completed: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    seconds: float = 0.0


# -- patches ----------------------------------------------------------------------------------
def random_patch(
    image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, augment: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size`` crop of a ``CYX`` image and its labels (zero-padded when smaller),
    flipped and rotated by a multiple of 90 degrees when ``augment``."""
    h, w = labels.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        labels = np.pad(labels, ((0, ph), (0, pw)))
        h, w = labels.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    image, labels = image[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]
    if augment:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[::-1]
        if rng.random() < 0.5:
            image, labels = image[:, :, ::-1], labels[:, ::-1]
        k = int(rng.integers(0, 4))
        image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels)


def scale_patch(
    image: np.ndarray, labels: np.ndarray, scale: float
) -> tuple[torch.Tensor, np.ndarray]:
    """``3 x H x W`` tensor and labels resized by ``scale`` (bilinear / nearest)."""
    x = torch.from_numpy(np.ascontiguousarray(match_channels(image, 3)))
    if scale == 1.0:
        return x, labels
    x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
    lab = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    lab = F.interpolate(lab, size=tuple(x.shape[-2:]), mode="nearest")[0, 0]
    return x, lab.numpy().astype(labels.dtype)


def instance_targets(labels: np.ndarray, min_pixels: int = 1) -> dict[str, torch.Tensor]:
    """torchvision detection targets (boxes ``x0, y0, x1, y1``, labels 1, uint8 masks)."""
    labels = np.asarray(labels)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[areas >= min_pixels]
    h, w = labels.shape
    masks = np.zeros((len(ids), h, w), np.uint8)
    boxes = np.zeros((len(ids), 4), np.float32)
    for i, v in enumerate(ids):
        m = labels == v
        ys, xs = np.nonzero(m)
        masks[i] = m
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }


class PatchSampler:
    """Batches of augmented patches; re-seeded per epoch so that resume is deterministic."""

    def __init__(self, samples: Sequence[TargetSample], cfg: MaskRCNNTrainConfig) -> None:
        if not samples:
            raise ConfigError("no training samples: the 'train' split is empty")
        self.samples, self.cfg = list(samples), cfg
        self.rng = np.random.default_rng(cfg.seed)

    def reseed(self, epoch: int) -> None:
        self.rng = np.random.default_rng((self.cfg.seed * 1_000_003 + epoch * 7919) % 2**31)

    def patch(self, index: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """One scaled patch ``(3 x P x P image, labels)`` of sample ``index`` (random if None)."""
        if index is None:
            index = int(self.rng.integers(0, len(self.samples)))
        s = self.samples[index]
        image, labels = random_patch(
            np.asarray(s.image, np.float32),
            np.asarray(s.labels),
            self.cfg.patch_size,
            self.rng,
            self.cfg.augment,
        )
        return scale_patch(image, labels, self.cfg.model.scale)

    def batch(self) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        images, targets = [], []
        for _ in range(self.cfg.batch_size):
            x, labels = self.patch()
            images.append(x)
            targets.append(instance_targets(labels, self.cfg.min_instance_pixels))
        return images, targets


# -- validation -------------------------------------------------------------------------------
@torch.no_grad()
def validate_maskrcnn(
    model: nn.Module,
    engine: str,
    samples: Sequence[TargetSample],
    scale: float,
    post: MaskRCNNPostConfig,
) -> dict[str, float]:
    """Mean instance F1@0.5 and pixel foreground Dice over whole validation images."""
    f1s, dices = [], []
    for s in samples:
        labels, _ = predict_image(model, engine, s.image, scale, post, normalised=True)
        row = image_scores(s.labels, labels, (0.5,), dsb_thresholds=(), with_rand=False)
        f1s.append(float(row["f1_50"]))
        dices.append(float(row["dice"]))
    if not f1s:
        return {}
    return {
        BEST_METRIC: float(np.mean(f1s)),
        "val_dice": float(np.mean(dices)),
        "val_images": float(len(f1s)),
    }


# -- helpers ----------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _seed_epoch(seed: int, epoch: int) -> None:
    s = (seed * 1_000_003 + epoch * 7919 + 1) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2 % at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: MaskRCNNTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _iter_hooks(hook: HookBase | None):
    if hook is None:
        return
    yield hook
    if isinstance(hook, Hooks):
        for h in hook.hooks:
            yield from _iter_hooks(h)


def _should_stop(hook: HookBase | None) -> bool:
    return any(getattr(h, "should_stop", False) for h in _iter_hooks(hook))


def _result(ckpt: Mapping[str, Any], best_path: Path, last_path: Path, **kw: Any) -> TrainResult:
    return TrainResult(
        best=dict(ckpt.get("best") or {}),
        best_epoch=ckpt.get("best_epoch"),
        best_path=best_path if best_path.is_file() else None,
        last_path=last_path,
        epochs_completed=int(ckpt["epoch"]),
        history=list(ckpt.get("history") or []),
        stopped_early=bool(ckpt.get("stopped_early")),
        **kw,
    )


def train_loss(
    model: nn.Module, images: list[torch.Tensor], targets: list[dict]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed torchvision Mask R-CNN losses of one batch (model in train mode) and the parts."""
    parts = model(images, targets)
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


# -- the entry point --------------------------------------------------------------------------
def train_maskrcnn(
    train_samples: Sequence[TargetSample],
    val_samples: Sequence[TargetSample],
    out_dir: str | Path,
    cfg: MaskRCNNTrainConfig | None = None,
    hooks: HookBase | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train Mask R-CNN; checkpoints in ``out_dir/{last,best}.pt`` (see module docstring).

    With ``resume`` (default) an unfinished ``out_dir/last.pt`` is continued; a finished one
    is returned as is unless ``cfg.epochs`` grew. ``resume=False`` starts over.
    """
    cfg = cfg or MaskRCNNTrainConfig()
    engine = resolve_engine(cfg.model.engine)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engine=engine))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if cfg.val_max_images is not None:
        val_samples = list(val_samples)[: cfg.val_max_images]

    ckpt = (
        load_checkpoint(last_path, CHECKPOINT_FORMAT, "train_format")
        if resume and last_path.is_file()
        else None
    )
    if ckpt is not None:
        stored = MaskRCNNConfig.from_mapping(ckpt["model_config"]).architecture()
        if stored != cfg.model.architecture():
            raise ConfigError(
                f"{last_path} holds a model built as {stored}, but the config asks for "
                f"{cfg.model.architecture()}; delete {out_dir} or pass resume=False",
                last_path,
            )
        if ckpt["epoch"] >= cfg.epochs or ckpt.get("stopped_early"):
            log.info("%s: training already finished (%d epochs)", last_path, ckpt["epoch"])
            return _result(ckpt, best_path, last_path)

    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        run = _train_detectron2 if engine == "detectron2" else _train_torchvision
        return run(train_samples, val_samples, cfg, ckpt, hooks, (last_path, best_path), resume)
    finally:
        torch.set_num_threads(threads_before)


def _payloads(
    model: nn.Module, cfg: MaskRCNNTrainConfig, epoch: int, state: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model-only payload for best.pt, full payload for last.pt)."""
    model_part = {
        "format": MODEL_FORMAT,
        "train_format": CHECKPOINT_FORMAT,
        "model_config": cfg.model.as_dict(),
        "post": cfg.post.as_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    full = {**model_part, "train_config": cfg.as_dict(), "epoch": epoch, **state}
    return model_part, full


def _train_torchvision(
    train_samples: Sequence[TargetSample],
    val_samples: Sequence[TargetSample],
    cfg: MaskRCNNTrainConfig,
    ckpt: dict[str, Any] | None,
    hooks: HookBase | None,
    paths: tuple[Path, Path],
    resume: bool,
) -> TrainResult:
    last_path, best_path = paths
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    hooks = hooks or HookBase()
    sampler = PatchSampler(train_samples, cfg)
    if not val_samples:
        log.warning("maskrcnn: no 'val' samples; best.pt will be the last epoch")
    log.info(
        "maskrcnn (torchvision, %s) training: %d train / %d val images on %s",
        cfg.model.backbone,
        len(train_samples),
        len(val_samples),
        device,
    )

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    total = cfg.epochs * cfg.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg.warmup_steps)
    )
    stopper = (
        EarlyStopping(BEST_METRIC, cfg.early_stop_patience) if cfg.early_stop_patience else None
    )

    start_epoch, best, best_epoch, history = 0, {}, None, []
    resumed_from = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        best, best_epoch = dict(ckpt.get("best") or {}), ckpt.get("best_epoch")
        history = list(ckpt.get("history") or [])
        if stopper is not None and ckpt.get("early_stopping"):
            stopper.best, stopper.bad_epochs = ckpt["early_stopping"]
        resumed_from = start_epoch
        log.info("resuming maskrcnn training from %s at epoch %d", last_path, start_epoch)

    hooks.before_train(cfg.as_dict())
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.reseed(epoch)
        _seed_epoch(cfg.seed, epoch)
        model.train()
        losses: list[float] = []
        parts_sum: dict[str, float] = {}
        bar = tqdm(
            range(cfg.steps_per_epoch),
            disable=not cfg.progress,
            desc=f"maskrcnn epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
        )
        for _ in bar:
            images, targets = sampler.batch()
            images = [x.to(device) for x in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            loss, parts = train_loss(model, images, targets)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                log.warning("non-finite loss at epoch %d (%s); step skipped", epoch, parts)
                scheduler.step()
                continue
            loss.backward()
            if cfg.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        metrics: dict[str, float] = {
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"train_{k}": v / max(1, len(losses)) for k, v in parts_sum.items()},
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_seconds": time.perf_counter() - t0,
        }
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            tv = time.perf_counter()
            metrics.update(
                validate_maskrcnn(model, cfg.model.engine, val_samples, cfg.model.scale, cfg.post)
            )
            metrics["val_seconds"] = time.perf_counter() - tv
        if val_samples:
            is_best = BEST_METRIC in metrics and (
                not best or metrics[BEST_METRIC] > best.get(BEST_METRIC, -1.0)
            )
        else:  # nothing to validate on: the latest weights are the best we know
            is_best = True
        if is_best:
            best, best_epoch = {k: float(v) for k, v in metrics.items()}, epoch
        if stopper is not None:
            stopper.after_epoch(epoch, metrics)
            stopped = stopper.should_stop
        history.append({"epoch": float(epoch), **metrics})
        log.info(
            "maskrcnn epoch %d/%d: %s",
            epoch + 1,
            cfg.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
        )
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best": best,
            "best_epoch": best_epoch,
            "history": history,
            "early_stopping": (stopper.best, stopper.bad_epochs) if stopper else None,
            "stopped_early": stopped,
        }
        model_part, payload = _payloads(model, cfg, epoch + 1, state)
        save_checkpoint(last_path, payload)
        hooks.after_checkpoint(last_path, False)
        if is_best:
            save_checkpoint(best_path, {**model_part, "epoch": epoch + 1, "metrics": best})
            hooks.after_checkpoint(best_path, True)
        hooks.after_epoch(epoch, metrics)
        if not stopped and _should_stop(hooks):
            stopped = True
            payload["stopped_early"] = True
            save_checkpoint(last_path, payload)
        if stopped:
            log.info("early stop after epoch %d (best %s at epoch %s)", epoch + 1, best, best_epoch)
            break

    final = {"epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "history": history}
    final["stopped_early"] = stopped
    result = _result(
        final,
        best_path,
        last_path,
        resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t_start,
    )
    hooks.after_train(best, result.best_path)
    return result


# -- detectron2 -------------------------------------------------------------------------------
class _StopTraining(Exception):
    """Raised by the epoch hook to end detectron2's loop early."""


def _d2_instances(labels: np.ndarray, min_pixels: int) -> Any:
    from detectron2.structures import BitMasks, Boxes, Instances

    t = instance_targets(labels, min_pixels)
    inst = Instances(tuple(labels.shape))
    inst.gt_boxes = Boxes(t["boxes"])
    inst.gt_classes = torch.zeros(len(t["labels"]), dtype=torch.int64)
    inst.gt_masks = BitMasks(t["masks"].bool())
    return inst


class _D2TrainMapper:
    """Dataset dict (from our COCO export) -> one random augmented, scaled training patch.

    The label image is decoded from the dict's RLE annotations (cached per image); the pixels
    come from the in-memory sample, since the export holds normalised float images no image
    reader of detectron2 can open.
    """

    def __init__(self, samples: Sequence[TargetSample], cfg: MaskRCNNTrainConfig) -> None:
        self.sampler = PatchSampler(samples, cfg)
        self.cfg = cfg
        self.labels: dict[int, np.ndarray] = {}

    def _labels(self, d: Mapping[str, Any]) -> np.ndarray:
        from microseg.io.coco import coco_to_labels

        image_id = int(d["image_id"])
        if image_id not in self.labels:
            coco = {
                "images": [{"id": image_id, "height": d["height"], "width": d["width"]}],
                "annotations": [
                    {"image_id": image_id, "segmentation": a["segmentation"]}
                    for a in d.get("annotations", [])
                ],
            }
            self.labels[image_id] = coco_to_labels(coco, image_id)
        return self.labels[image_id]

    def __call__(self, d: Mapping[str, Any]) -> dict[str, Any]:
        s = self.sampler.samples[int(d["image_id"]) - 1]
        image, labels = random_patch(
            np.asarray(s.image, np.float32),
            self._labels(d),
            self.cfg.patch_size,
            self.sampler.rng,
            self.cfg.augment,
        )
        x, labels = scale_patch(image, labels, self.cfg.model.scale)
        h, w = labels.shape
        return {
            "image": x * 255.0,
            "instances": _d2_instances(labels, self.cfg.min_instance_pixels),
            "height": h,
            "width": w,
            "image_id": d["image_id"],
        }


class _D2TestMapper:
    """Dataset dict -> the whole (scaled) val image, outputs resized back to its size."""

    def __init__(self, samples: Sequence[TargetSample], scale: float) -> None:
        self.samples, self.scale = list(samples), scale

    def __call__(self, d: Mapping[str, Any]) -> dict[str, Any]:
        s = self.samples[int(d["image_id"]) - 1]
        x = torch.from_numpy(np.ascontiguousarray(match_channels(np.asarray(s.image), 3)))
        h, w = x.shape[-2:]
        if self.scale != 1.0:
            x = F.interpolate(x[None], scale_factor=self.scale, mode="bilinear")[0]
        return {"image": x * 255.0, "height": h, "width": w, "image_id": d["image_id"]}


def detectron2_train_cfg(
    cfg: MaskRCNNTrainConfig, out_dir: Path, train_name: str, val_name: str | None
) -> Any:
    """The detectron2 config of a run: the model's (:func:`detectron2_cfg`) plus SOLVER etc."""
    from microseg.models.maskrcnn import detectron2_cfg

    c = detectron2_cfg(cfg.model, str(resolve_device(cfg.device)))
    if cfg.model.weights_path:
        c.MODEL.WEIGHTS = str(cfg.model.weights_path)
    c.DATASETS.TRAIN = (train_name,)
    c.DATASETS.TEST = (val_name,) if val_name else ()
    c.DATALOADER.NUM_WORKERS = 0
    c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    c.DATALOADER.ASPECT_RATIO_GROUPING = False
    c.SOLVER.IMS_PER_BATCH = cfg.batch_size
    c.SOLVER.BASE_LR = cfg.lr
    c.SOLVER.MOMENTUM = cfg.momentum
    c.SOLVER.WEIGHT_DECAY = cfg.weight_decay
    c.SOLVER.MAX_ITER = cfg.epochs * cfg.steps_per_epoch
    c.SOLVER.STEPS = ()
    c.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    c.SOLVER.BASE_LR_END = 0.02 * cfg.lr
    c.SOLVER.WARMUP_ITERS = cfg.warmup_steps
    c.SOLVER.WARMUP_FACTOR = 1.0 / max(1, cfg.warmup_steps)
    c.SOLVER.CHECKPOINT_PERIOD = cfg.steps_per_epoch
    c.SOLVER.CLIP_GRADIENTS.ENABLED = bool(cfg.grad_clip_norm)
    c.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    c.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = float(cfg.grad_clip_norm or 1.0)
    c.TEST.EVAL_PERIOD = 0  # the epoch hook runs the COCOEvaluator itself (and our F1)
    c.OUTPUT_DIR = str(out_dir)
    c.SEED = cfg.seed
    return c


def _train_detectron2(
    train_samples: Sequence[TargetSample],
    val_samples: Sequence[TargetSample],
    cfg: MaskRCNNTrainConfig,
    ckpt: dict[str, Any] | None,
    hooks: HookBase | None,
    paths: tuple[Path, Path],
    resume: bool,
) -> TrainResult:
    from detectron2.data import (
        DatasetCatalog,
        build_detection_test_loader,
        build_detection_train_loader,
    )
    from detectron2.data.samplers import TrainingSampler
    from detectron2.engine import DefaultTrainer
    from detectron2.engine import HookBase as D2HookBase
    from detectron2.evaluation import COCOEvaluator
    from detectron2.solver import build_optimizer as d2_build_optimizer
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    last_path, best_path = paths
    t_start = time.perf_counter()
    hooks = hooks or HookBase()
    if not train_samples:
        raise ConfigError("no training samples: the 'train' split is empty")
    d2_dir = last_path.parent / "detectron2"
    key = hashlib.sha1(str(last_path.parent.resolve()).encode()).hexdigest()[:10]
    train_name = register_detectron2_dataset(
        f"microseg_train_{key}", train_samples, d2_dir / "train_coco.json"
    )
    val_name = (
        register_detectron2_dataset(f"microseg_val_{key}", val_samples, d2_dir / "val_coco.json")
        if val_samples
        else None
    )
    c = detectron2_train_cfg(cfg, d2_dir, train_name, val_name)
    train_mapper = _D2TrainMapper(train_samples, cfg)
    test_mapper = _D2TestMapper(val_samples, cfg.model.scale)
    steps = cfg.steps_per_epoch

    class Trainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, c: Any) -> Any:
            dataset = DatasetCatalog.get(train_name)
            return build_detection_train_loader(
                dataset=dataset,
                mapper=train_mapper,
                sampler=TrainingSampler(len(dataset), seed=cfg.seed),
                total_batch_size=cfg.batch_size,
                aspect_ratio_grouping=False,
                num_workers=0,
            )

        @classmethod
        def build_test_loader(cls, c: Any, dataset_name: str) -> Any:
            return build_detection_test_loader(
                DatasetCatalog.get(dataset_name), mapper=test_mapper, num_workers=0
            )

        @classmethod
        def build_evaluator(cls, c: Any, dataset_name: str) -> Any:
            return COCOEvaluator(
                dataset_name,
                tasks=("segm", "bbox"),
                distributed=False,
                output_dir=str(d2_dir / "eval"),
                max_dets_per_image=c.TEST.DETECTIONS_PER_IMAGE,
                use_fast_impl=False,
            )

        @classmethod
        def build_optimizer(cls, c: Any, model: nn.Module) -> Any:
            if cfg.optimizer == "adamw":
                return torch.optim.AdamW(
                    [p for p in model.parameters() if p.requires_grad],
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                )
            return d2_build_optimizer(c, model)

        def build_writers(self) -> list[Any]:
            return [CommonMetricPrinter(self.max_iter), JSONWriter(str(d2_dir / "metrics.json"))]

    state: dict[str, Any] = {
        "best": dict((ckpt or {}).get("best") or {}),
        "best_epoch": (ckpt or {}).get("best_epoch"),
        "history": list((ckpt or {}).get("history") or []),
        "stopped": False,
    }
    stopper = (
        EarlyStopping(BEST_METRIC, cfg.early_stop_patience) if cfg.early_stop_patience else None
    )
    if stopper is not None and ckpt is not None and ckpt.get("early_stopping"):
        stopper.best, stopper.bad_epochs = ckpt["early_stopping"]

    class EpochHook(D2HookBase):
        """Our hooks, validation and best/last.pt at each epoch boundary of detectron2's loop."""

        def before_train(self) -> None:
            self.t0 = time.perf_counter()
            self.losses: list[float] = []

        def after_step(self) -> None:
            trainer = self.trainer
            latest = trainer.storage.latest()
            if "total_loss" in latest:
                self.losses.append(float(latest["total_loss"][0]))
            it = trainer.iter + 1
            if it % steps:
                return
            epoch = it // steps - 1
            metrics: dict[str, float] = {
                "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                "lr": float(trainer.optimizer.param_groups[0]["lr"]),
                "train_seconds": time.perf_counter() - self.t0,
            }
            if val_samples and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                tv = time.perf_counter()
                model = trainer.model
                metrics.update(
                    validate_maskrcnn(model, "detectron2", val_samples, cfg.model.scale, cfg.post)
                )
                coco = trainer.test(trainer.cfg, model)  # COCOEvaluator on the val split
                model.train()
                for task, res in (coco or {}).items():
                    for k, v in res.items():
                        if isinstance(v, int | float) and math.isfinite(v) and "-" not in k:
                            metrics[f"val_{task}_{k}"] = float(v) / 100.0
                metrics["val_seconds"] = time.perf_counter() - tv
            best = state["best"]
            if val_samples:
                is_best = BEST_METRIC in metrics and (
                    not best or metrics[BEST_METRIC] > best.get(BEST_METRIC, -1.0)
                )
            else:
                is_best = True
            if is_best:
                state["best"], state["best_epoch"] = dict(metrics), epoch
            stopped = False
            if stopper is not None:
                stopper.after_epoch(epoch, metrics)
                stopped = stopper.should_stop
            state["history"].append({"epoch": float(epoch), **metrics})
            extra = {
                "best": state["best"],
                "best_epoch": state["best_epoch"],
                "history": state["history"],
                "early_stopping": (stopper.best, stopper.bad_epochs) if stopper else None,
                "stopped_early": stopped,
            }
            model_part, payload = _payloads(trainer.model, cfg, epoch + 1, extra)
            save_checkpoint(last_path, payload)
            hooks.after_checkpoint(last_path, False)
            if is_best:
                save_checkpoint(
                    best_path, {**model_part, "epoch": epoch + 1, "metrics": state["best"]}
                )
                hooks.after_checkpoint(best_path, True)
            hooks.after_epoch(epoch, metrics)
            if not stopped and _should_stop(hooks):
                stopped = True
                payload["stopped_early"] = True
                save_checkpoint(last_path, payload)
            self.t0, self.losses = time.perf_counter(), []
            if stopped:
                state["stopped"] = True  # detectron2 saved this iteration's checkpoint
                raise _StopTraining

    torch.manual_seed(cfg.seed)
    trainer = Trainer(c)
    trainer.register_hooks([EpochHook()])
    trainer.resume_or_load(resume=resume and ckpt is not None)
    resumed_from = trainer.start_iter // steps if trainer.start_iter else None
    hooks.before_train(cfg.as_dict())
    try:
        trainer.train()
    except _StopTraining:
        log.info("early stop (best %s at epoch %s)", state["best"], state["best_epoch"])
    history = state["history"]
    final = {
        "epoch": int(history[-1]["epoch"]) + 1 if history else 0,
        "best": state["best"],
        "best_epoch": state["best_epoch"],
        "history": history,
        "stopped_early": state["stopped"],
    }
    result = _result(
        final,
        best_path,
        last_path,
        resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t_start,
    )
    hooks.after_train(state["best"], result.best_path)
    return result
