"""YOLOv8 with a stride-4 (P2) head as a spine detector, trained from scratch, offline.

One class, :class:`YoloSpineDetector`, registered as ``"yolo"``: build from
``yolov8{n,s,m,l,x}-p2.yaml`` (no pretrained weights: nothing is downloaded), train with
Ultralytics' trainer, predict boxes for batches of uint8 planes, save and load checkpoints.
The stages and studies train it like every family, from a params section
(:meth:`YoloSpineDetector.train`); :meth:`~YoloSpineDetector.fit` is the detector's own call.
No MLflow and no CLI here: logging reaches training through ``hooks``
(``models/yolo/callbacks.py`` translates Ultralytics' callbacks into them).

Resume: a run lives in ``<out_dir>/<name>/``; an interrupted one (:func:`.runs.run_state`)
is continued by :meth:`YoloSpineDetector.fit` with Ultralytics' ``resume`` (same arguments,
from the next epoch); a finished run is not trained again; anything else starts fresh.
Ultralytics is kept offline while it trains (:func:`.runs.offline_guards`). A run that
finishes is normalised (:func:`.runs.normalise_run`: no absolute paths, dates or wall-clock
times in its files), so the same training leaves the same bytes.

Channels: images are uint8 ``HxW`` (greyscale, replicated to three channels) or ``HxWx3``
with channels in dataset order (for 2.5D: planes ``z-1, z, z+1``, as written to the PNGs).
Ultralytics reads PNGs as BGR and flips them to RGB; :meth:`predict` flips ours to BGR before
handing them over, so the network sees the same channel order in training and inference.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microseg.errors import ConfigError, MissingFileError, ShapeMismatchError
from microseg.models import register_model
from microseg.models.yolo.runs import (
    TrainResult,
    _load_ckpt,
    cpu_threads,
    is_resumable,
    network_classes,
    normalise_run,
    offline_guards,
    quiet_bars,
    run_state,
    ultralytics_args,
)
from microseg.train.hooks import HookBase
from microseg.utils.atomic import atomic_path
from microseg.utils.devices import ultralytics_device
from microseg.utils.progress import progress_enabled

__all__ = [
    "ARCHS",
    "DEFAULT_AUGMENT",
    "FIT_ARGS",
    "TrainResult",
    "YoloSpineDetector",
    "is_resumable",
    "native_imgsz",
    "network_classes",
    "normalise_run",
    "offline_guards",
    "run_state",
    "ultralytics_args",
]

log = logging.getLogger(__name__)

ARCHS = ("n", "s", "m", "l", "x")

#: augmentation defaults (DeepD3-V2's tuning for small dense spines; no hue/saturation
#: jitter: the images are greyscale or stacked planes, colour shifts would mix the planes)
DEFAULT_AUGMENT: dict[str, float] = {
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.2,
    "degrees": 10.0,
    "translate": 0.05,
    "scale": 0.15,
    "shear": 0.0,
    "perspective": 0.0,
    "flipud": 0.5,
    "fliplr": 0.5,
    "bgr": 0.0,
    "mosaic": 0.8,
    "mixup": 0.0,
    "cutmix": 0.0,
}


#: :meth:`YoloSpineDetector.fit` arguments microseg sets itself (not params keys)
_MANAGED = frozenset({"data_yaml", "out_dir", "hooks", "resume", "name", "extra", "self"})
#: train-section keys refused: microseg sets them (or Ultralytics' own spelling of them)
_REFUSED = _MANAGED | {"project", "exist_ok", "data", "model"}


def _vetted(path: str | Path) -> str:
    """``init_from`` weights for Ultralytics, which unpickles them: vetted first (runs.py)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("init_from: YOLO weights (.pt) not found", path)
    network_classes(path)
    return str(path.resolve())


def _bgr3(image: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx3 (dataset channel order) -> contiguous HxWx3 BGR for Ultralytics."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ShapeMismatchError(f"expected uint8 images, found dtype {arr.dtype}")
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr[:, :, ::-1])
    raise ShapeMismatchError(f"expected an HxW or HxWx3 image, found shape {arr.shape}")


def native_imgsz(shape: Sequence[int], stride: int = 32) -> int:
    """The inference size that keeps pixels at their native scale: max side, up to a stride."""
    return int(math.ceil(max(int(shape[0]), int(shape[1])) / stride) * stride)


@register_model("yolo")
class YoloSpineDetector:
    """An ``ultralytics.YOLO`` detection model plus the conventions of this project.

    Trained by Ultralytics' own trainer (not the Lightning engine), with our hooks attached
    through :mod:`microseg.models.yolo.callbacks` and the same ``device`` spelling.
    """

    trainable = True
    #: a hook's ``should_stop`` ends Ultralytics' loop normally (loaders closed, checkpoints
    #: finalised), so a study prunes through it rather than by raising inside the loop
    stops_on_request = True

    def __init__(self, yolo: Any, meta: Mapping[str, Any] | None = None) -> None:
        self.yolo = yolo
        self.meta: dict[str, Any] = dict(meta or {})

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def build(cls, arch: str = "n", **meta: Any) -> YoloSpineDetector:
        """A fresh ``yolov8<arch>-p2`` (random weights); ``meta`` (e.g. channels) rides along."""
        from ultralytics import YOLO

        if arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}; found {arch!r}")
        return cls(YOLO(f"yolov8{arch}-p2.yaml", task="detect"), {"arch": arch, **meta})

    @classmethod
    def load(cls, weights_path: str | Path, **meta: Any) -> YoloSpineDetector:
        """A detector from a ``.pt`` written by :meth:`save` or by Ultralytics' trainer."""
        from ultralytics import YOLO

        path = Path(weights_path)
        if not path.is_file():
            raise MissingFileError("expected YOLO weights (.pt), found nothing", path)
        network_classes(path)  # Ultralytics unpickles it: vetted first (see runs.py)
        yolo = YOLO(str(path), task="detect")
        stored = (getattr(yolo, "ckpt", None) or {}).get("microseg") or {}
        return cls(yolo, {**stored, **meta})

    def save(self, path: str | Path) -> Path:
        """Write the weights (with ``meta`` under the checkpoint key ``microseg``) atomically."""
        path = Path(path)
        if self.yolo.ckpt is None:
            self.yolo.ckpt = {}
        self.yolo.ckpt["microseg"] = dict(self.meta)
        with atomic_path(path) as tmp:
            self.yolo.save(tmp)
        return path

    @property
    def stride(self) -> int:
        return int(max(getattr(self.yolo.model, "stride", [32])))

    # ------------------------------------------------------------------ training
    @classmethod
    def train(
        cls,
        data: str | Path,
        out_dir: str | Path,
        train: Mapping[str, Any],
        hooks: HookBase | None = None,
        *,
        resume: bool = True,
    ) -> TrainResult:
        """A fresh detector fitted on the dataset yaml ``data`` from a ``yolo.train`` section.

        ``arch`` picks the model and ``meta`` (e.g. ``{"channels": "25d"}``) rides along in
        its checkpoints; keys that are :meth:`fit` arguments go there, any other key (and the
        ``extra`` mapping) is passed to Ultralytics as ``extra``.
        """
        cfg = dict(train)
        meta = dict(cfg.pop("meta", None) or {})
        arch = cfg.pop("arch", "n")
        extra = dict(cfg.pop("extra", None) or {})
        names = set(FIT_ARGS)
        kwargs = {k: v for k, v in cfg.items() if k in names}
        extra.update({k: v for k, v in cfg.items() if k not in names})
        det = cls.build(arch, **meta)
        return det.fit(data, out_dir, hooks=hooks, resume=resume, extra=extra or None, **kwargs)

    @classmethod
    def check_train_keys(cls, keys: Iterable[str]) -> None:
        """Refuse dotted ``yolo.train`` keys :meth:`train` would not accept (a study's space,
        a tuned params file), so typos fail before any training."""
        known_ultralytics = ultralytics_args()
        known = set(FIT_ARGS) | known_ultralytics | {"arch"}
        bad = []
        for k in keys:
            head, _, rest = k.partition(".")
            ok = rest in known_ultralytics if head == "augment" else k in known
            if not ok or k in _REFUSED:
                bad.append(k)
        if bad:
            raise ConfigError(
                f"unknown yolo training knob(s) {sorted(bad)}; expected YoloSpineDetector.fit "
                "arguments, Ultralytics arguments or augment.<key>"
            )

    @classmethod
    def train_defaults(cls, keys: Iterable[str]) -> dict[str, Any]:
        """What :meth:`train` uses for dotted keys a section leaves out (:meth:`fit`'s
        defaults, :data:`DEFAULT_AUGMENT` over Ultralytics' for ``augment.<key>``, Ultralytics'
        for the rest), so a study's baseline trial trains exactly the default; unknown keys
        are left out."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        fit = inspect.signature(cls.fit).parameters
        out: dict[str, Any] = {}
        for k in keys:
            head, _, rest = k.partition(".")
            if head == "augment" and rest:
                if rest in DEFAULT_AUGMENT or rest in DEFAULT_CFG_DICT:
                    out[k] = DEFAULT_AUGMENT.get(rest, DEFAULT_CFG_DICT.get(rest))
            elif k in FIT_ARGS:
                out[k] = fit[k].default
            elif k in DEFAULT_CFG_DICT:
                out[k] = DEFAULT_CFG_DICT[k]
        return out

    def fit(
        self,
        data_yaml: str | Path,
        out_dir: str | Path,
        *,
        epochs: int = 60,
        imgsz: int = 256,
        batch: int = 16,
        lr0: float = 1e-3,
        lrf: float = 0.01,
        optimizer: str = "AdamW",
        cos_lr: bool = True,
        patience: int = 15,
        augment: Mapping[str, float] | None = None,
        device: str | int | None = "auto",
        workers: int = 0,
        seed: int = 0,
        num_threads: int | None = None,
        init_from: str | Path | None = None,
        hooks: HookBase | None = None,
        resume: bool = True,
        name: str = "train",
        extra: Mapping[str, Any] | None = None,
    ) -> TrainResult:
        """Train on an Ultralytics dataset yaml; checkpoints in ``<out_dir>/<name>/weights``.

        ``augment`` overrides :data:`DEFAULT_AUGMENT` (any Ultralytics augmentation key);
        ``extra`` passes further Ultralytics train arguments (``box``, ``cls``,
        ``close_mosaic``, ``warmup_epochs``, ``val`` ...). ``patience`` epochs without a better
        fitness stop the run early. With ``resume`` an interrupted run in the same place
        continues (see module notes) and a finished one is returned as it is.
        """
        from ultralytics import YOLO

        from microseg.models.yolo.callbacks import attach_hooks, disable_ultralytics_mlflow

        device = ultralytics_device(device)
        data_yaml = Path(data_yaml).resolve()
        if not data_yaml.is_file():
            raise MissingFileError("expected an Ultralytics dataset yaml, found nothing", data_yaml)
        out_dir = Path(out_dir).resolve()
        save_dir = out_dir / name
        last, best = save_dir / "weights" / "last.pt", save_dir / "weights" / "best.pt"
        aug = {**DEFAULT_AUGMENT, **(augment or {})}
        self._check_args(aug, extra or {})

        state = run_state(last) if resume else "missing"
        resumed = state == "interrupted"
        if state == "finished":
            log.info("%s holds a finished run; not training again", save_dir)
            return self._finished(save_dir, last, best)
        if resumed:
            log.info("resuming the interrupted run in %s", save_dir)
            model = YOLO(str(last), task="detect")
            # Ultralytics restores every other argument from the checkpoint; these it lets
            # a resumed run change (hardware, patience)
            args: dict[str, Any] = {
                "resume": True,
                "data": str(data_yaml),
                "imgsz": imgsz,
                "batch": batch,
                "device": device,
                "workers": workers,
                "patience": patience,
                "plots": False,
            }
        else:
            model = self.yolo
            args = {
                "data": str(data_yaml),
                "epochs": epochs,
                "imgsz": imgsz,
                "batch": batch,
                "lr0": lr0,
                "lrf": lrf,
                "optimizer": optimizer,
                "cos_lr": cos_lr,
                "patience": patience,
                "device": device,
                "workers": workers,
                "seed": seed,
                "project": str(out_dir),
                "name": name,
                "exist_ok": True,
                # fine-tuning: Ultralytics copies the tensors that match by name and shape
                "pretrained": _vetted(init_from) if init_from else False,
                "plots": False,
                "single_cls": True,
                "verbose": False,
                **aug,
                **(extra or {}),
            }
        disable_ultralytics_mlflow(model)
        if hooks is not None:
            attach_hooks(model, hooks)
        caches_before = set(data_yaml.parent.rglob("*.cache"))
        try:
            quiet = quiet_bars(not progress_enabled(sys.stdout))
            with offline_guards(), cpu_threads(num_threads), quiet:
                model.train(**args)
        finally:  # Ultralytics caches its label scan inside the dataset (a DVC output)
            for cache in set(data_yaml.parent.rglob("*.cache")) - caches_before:
                cache.unlink(missing_ok=True)
        if run_state(last) == "finished":  # an interrupted run keeps what resume needs
            normalise_run(save_dir)
        self.yolo = model
        metrics = {}
        trainer = getattr(model, "trainer", None)
        if trainer is not None:
            from microseg.models.yolo.callbacks import val_metrics

            metrics = val_metrics(getattr(trainer, "metrics", None))
            metrics["fitness"] = float(trainer.best_fitness or 0.0)
        return TrainResult(save_dir, best if best.exists() else None, last, metrics, resumed)

    def _check_args(self, aug: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        from ultralytics.cfg import DEFAULT_CFG_DICT

        unknown = sorted(k for k in {**aug, **extra} if k not in DEFAULT_CFG_DICT)
        if unknown:
            raise ConfigError(f"unknown Ultralytics train argument(s) {unknown}")
        managed = {"project", "name", "exist_ok", "resume", "data", "model"} & set(extra)
        if managed:
            raise ConfigError(f"train arguments {sorted(managed)} are set by microseg, not extra")

    def _finished(self, save_dir: Path, last: Path, best: Path) -> TrainResult:
        from ultralytics import YOLO

        from microseg.models.yolo.callbacks import val_metrics

        weights = best if best.exists() else last
        ckpt = _load_ckpt(weights)  # vetted before Ultralytics unpickles it
        self.yolo = YOLO(str(weights), task="detect")
        metrics = val_metrics(ckpt.get("train_metrics"))
        return TrainResult(
            save_dir, best if best.exists() else None, last, metrics, already_finished=True
        )

    # ------------------------------------------------------------------ inference
    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int | None = None,
        max_det: int = 300,
        device: str | int | None = None,
    ) -> list[np.ndarray]:
        """Boxes per image as ``(N, 5)`` float32 ``x1, y1, x2, y2, score`` in input pixels.

        One batched forward pass for the list. ``imgsz=None`` predicts at the native scale
        (largest side rounded up to the stride); ``iou`` is the NMS threshold (1.0: no NMS).
        """
        if len(images) == 0:
            return []
        batch = [_bgr3(im) for im in images]
        size = imgsz or native_imgsz(batch[0].shape, max(self.stride, 32))
        kwargs: dict[str, Any] = {
            "conf": conf,
            "iou": iou,
            "imgsz": size,
            "max_det": max_det,
            "verbose": False,
            "save": False,
        }
        if device is not None:
            kwargs["device"] = ultralytics_device(device)
        with cpu_threads(0):  # the caller's threads, not Ultralytics' cores - 1
            results = self.yolo.predict(source=batch, **kwargs)
        out = []
        for r in results:
            boxes = r.boxes
            if boxes is None or len(boxes) == 0:
                out.append(np.zeros((0, 5), np.float32))
                continue
            xyxy = boxes.xyxy.cpu().numpy().astype(np.float32)
            score = boxes.conf.cpu().numpy().astype(np.float32)
            out.append(np.column_stack([xyxy, score]))
        return out


#: the :meth:`YoloSpineDetector.fit` arguments a ``yolo.train`` section may set
FIT_ARGS: tuple[str, ...] = tuple(
    p for p in inspect.signature(YoloSpineDetector.fit).parameters if p not in _MANAGED
)
