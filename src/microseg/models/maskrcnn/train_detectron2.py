"""The Mask R-CNN family's training on the detectron2 engine, with detectron2's own trainer.

detectron2 is optional and imported only inside these functions. The splits are exported as
COCO (:func:`register_detectron2_dataset`) and trained by a ``DefaultTrainer`` subclass for
``epochs * steps_per_epoch`` iterations (the patches of :mod:`microseg.models.maskrcnn.train`
via a dataset mapper; the same optimizer choice, warm-up, cosine schedule with floor 0.02 and
clipping through ``SOLVER.*``); detectron2's ``COCOEvaluator`` scores the val split every
``val_every`` epochs (``val_segm_AP``, ``val_segm_AP50``, ...) next to our ``val_f1_50``. Our
hooks are called by a detectron2 hook at each epoch boundary, which also writes ``best.pt``
(model format) and ``last.pt`` (model plus history, format ``microseg.maskrcnn.train/1``).
detectron2's own checkpoints (``out_dir/detectron2/model_*.pth``) carry the resume state
(weights, optimizer, scheduler, iteration); unlike the torchvision engine its data stream is
not re-seeded per epoch, so a resumed detectron2 run is not bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microseg.data.targets import TargetSample, match_channels
from microseg.errors import ConfigError
from microseg.evaluate.instances import validation_scores
from microseg.models.maskrcnn.config import MaskRCNNConfig, MaskRCNNPostConfig, resolve_engine
from microseg.models.maskrcnn.network import MODEL_FORMAT, detectron2_cfg
from microseg.models.maskrcnn.predict import predict_image
from microseg.models.maskrcnn.train_data import (
    BEST_METRIC,
    MaskRCNNTrainConfig,
    instance_targets,
    random_patch,
    scale_patch,
)
from microseg.train.checkpoint import load_checkpoint, save_checkpoint
from microseg.train.engine import TrainResult
from microseg.train.hooks import EarlyStopping, HookBase, should_stop

log = logging.getLogger(__name__)

#: detectron2's last.pt (not Lightning's: this engine keeps its own trainer)
CHECKPOINT_FORMAT = "microseg.maskrcnn.train/1"


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


@torch.no_grad()
def validate_maskrcnn(
    model: nn.Module,
    engine: str,
    samples: Sequence[TargetSample],
    scale: float,
    post: MaskRCNNPostConfig,
) -> dict[str, float]:
    """Mean instance F1@0.5 and pixel foreground Dice over whole validation images."""
    rows = [
        validation_scores(s.labels, predict_image(model, engine, s.image, scale, post, True)[0])
        for s in samples
    ]
    if not rows:
        return {}
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {**means, "val_images": float(len(rows))}


def _result(
    ckpt: Mapping[str, Any], paths: tuple[Path, Path], steps: int, **kw: Any
) -> TrainResult:
    last_path, best_path = paths
    return TrainResult(
        best=dict(ckpt.get("best") or {}),
        best_epoch=ckpt.get("best_epoch"),
        best_path=best_path if best_path.is_file() else None,
        last_path=last_path,
        epochs_completed=int(ckpt["epoch"]),
        history=list(ckpt.get("history") or []),
        stopped_early=bool(ckpt.get("stopped_early")),
        global_step=int(ckpt["epoch"]) * steps,
        **kw,
    )


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


def train_detectron2(
    train_samples: Sequence[TargetSample],
    val_samples: Sequence[TargetSample],
    out_dir: str | Path,
    cfg: MaskRCNNTrainConfig,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """detectron2's trainer on our patches; ``out_dir/{best,last}.pt`` (see module)."""
    if cfg.phases:
        raise ConfigError(
            "phases (a staged schedule) need the engine's training loop; the detectron2 "
            "backend has its own: drop phases or train with the torchvision backend"
        )
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
            return _result(ckpt, (last_path, best_path), cfg.steps_per_epoch)
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train_detectron2(
            train_samples, val_samples, cfg, ckpt, hooks, (last_path, best_path), resume
        )
    finally:
        torch.set_num_threads(threads_before)


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
        if not samples:
            raise ConfigError("no training samples: the 'train' split is empty")
        self.samples, self.cfg = list(samples), cfg
        self.rng = np.random.default_rng(cfg.seed)
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
        s = self.samples[int(d["image_id"]) - 1]
        image, labels = random_patch(
            np.asarray(s.image, np.float32),
            self._labels(d),
            self.cfg.patch_size,
            self.rng,
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
    c = detectron2_cfg(cfg.model, cfg.device)
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
            if not stopped and should_stop(hooks):
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
        (last_path, best_path),
        steps,
        resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t_start,
    )
    hooks.after_train(state["best"], result.best_path)
    return result
