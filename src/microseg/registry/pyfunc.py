"""MLflow pyfunc wrappers: the spine pipeline and the nuclei U-Net as loadable models.

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(frame)`` then runs without the
repository: every model carries its weights and config as artifacts, the ``microseg`` package
as ``code_paths`` (its own copy, put first on ``sys.path`` at load time) and pinned
requirements read from the environment that logged it. Loading and predicting import only
inference code (``models/``, ``infer/``, ``io/``), never training, tuning or Optuna.

Contract (batch evaluation relies on it; do not change lightly):

* every model's ``metadata["task"]`` is ``"spines"`` or ``"nuclei"``;
* spines: input column ``path`` (a ``ZYX`` TIFF stack), optional ``voxel_size_{z,y,x}_nm``;
  output one row per de-duplicated fused spine: :data:`SPINE_OUTPUT_COLS`, with ``y, x`` in
  voxel-centre coordinates and ``z`` the plane (a centroid in ``cluster`` de-duplication);
* nuclei: input column ``path`` (a 2D PNG/TIFF), ``params={"out_dir": ...}`` (required);
  writes ``<out_dir>/<stem>_labels.tif`` (uint16, the image's YX shape) and returns
  :data:`NUCLEI_OUTPUT_COLS`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema

from microseg.errors import AnnotationError, ConfigError, DataFormatError, MissingFileError

log = logging.getLogger(__name__)

VOXEL_COLS = ("voxel_size_z_nm", "voxel_size_y_nm", "voxel_size_x_nm")
SPINE_OUTPUT_COLS = ["path", "z", "y", "x", "x1", "y1", "x2", "y2", "score", "status"]
NUCLEI_OUTPUT_COLS = ["path", "labels_path", "n_objects", "height", "width"]
IMAGE_SUFFIXES_TIFF = (".tif", ".tiff")

#: distributions the inference code imports (pinned to the logging environment's versions)
SPINE_REQUIREMENTS = (
    "torch",
    "torchvision",
    "ultralytics",
    "opencv-python",
    "monai",
    "numpy",
    "pandas",
    "tifffile",
    "scipy",
    "scikit-image",
    "pillow",
    "pycocotools",
    "pyyaml",
    "tqdm",
    "mlflow",
)
NUCLEI_REQUIREMENTS = tuple(
    r for r in SPINE_REQUIREMENTS if r not in ("ultralytics", "opencv-python")
)


def pinned_requirements(names: Sequence[str]) -> list[str]:
    """``name==version`` for each installed distribution (missing ones are left out)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            log.warning("%s is not installed; left out of the model's requirements", name)
    return out


def package_dir() -> Path:
    """The installed ``microseg`` package folder (shipped with the model as ``code_paths``)."""
    import microseg

    return Path(microseg.__file__).resolve().parent


def _frame(model_input: Any, what: str) -> pd.DataFrame:
    """The model input as a frame with a ``path`` column, or a clear error."""
    if isinstance(model_input, Mapping):
        model_input = pd.DataFrame(dict(model_input))
    if not isinstance(model_input, pd.DataFrame):
        raise DataFormatError(
            f"{what} model input: expected a pandas DataFrame with a 'path' column, "
            f"found {type(model_input).__name__}"
        )
    if "path" not in model_input.columns:
        raise AnnotationError(
            f"{what} model input: expected a column 'path', found columns "
            f"{list(model_input.columns)}"
        )
    return model_input


def _existing(path: Any, what: str) -> Path:
    if path is None or (isinstance(path, float) and math.isnan(path)) or str(path) == "":
        raise AnnotationError(f"{what} model input: a row has an empty 'path'")
    p = Path(str(path))
    if not p.is_file():
        raise MissingFileError(f"{what} model input: expected an image file, found nothing", p)
    return p


def _row_voxel(row: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """The row's voxel size when all three columns hold a number, else None (file/default)."""
    vals = [row.get(c) for c in VOXEL_COLS]
    try:
        nums = [float(v) for v in vals]
    except (TypeError, ValueError):
        return None
    return (nums[0], nums[1], nums[2]) if all(math.isfinite(v) for v in nums) else None


def spine_output_frame(rows: Sequence[pd.DataFrame] = ()) -> pd.DataFrame:
    """Concatenate per-stack outputs into :data:`SPINE_OUTPUT_COLS` with fixed dtypes."""
    parts = [r for r in rows if len(r)]
    if not parts:
        empty = {c: pd.Series(dtype="float64") for c in SPINE_OUTPUT_COLS}
        empty["path"] = pd.Series(dtype="object")
        empty["status"] = pd.Series(dtype="object")
        return pd.DataFrame(empty)
    out = pd.concat(parts, ignore_index=True)[SPINE_OUTPUT_COLS]
    return out.astype({c: "float64" for c in SPINE_OUTPUT_COLS if c not in ("path", "status")})


def _device() -> str:
    """``auto``'s device here (CUDA, MPS or the CPU; one resolver: ``utils.devices``)."""
    from microseg.utils.devices import auto_device

    return auto_device()


class SpineModel(PythonModel):
    """YOLO + Prob-UNet + tuned fusion (:func:`microseg.infer.spine_pipeline.predict_spines`).

    Artifacts: ``yolo`` (best.pt), ``punet`` (best.pt), ``fusion`` (tuned_fusion.yaml),
    ``config`` (JSON of :class:`~microseg.infer.spine_pipeline.SpinePipelineConfig`).
    """

    def load_context(self, context: Any) -> None:
        from microseg.infer.spine_pipeline import SpinePipelineConfig, read_fusion_params
        from microseg.models.punet import PunetSegmenter, load_punet
        from microseg.models.yolo import YoloSpineDetector

        art = context.artifacts
        self.cfg = SpinePipelineConfig.from_dict(json.loads(Path(art["config"]).read_text()))
        self.fusion_params = read_fusion_params(art["fusion"])
        self.yolo = YoloSpineDetector.load(art["yolo"])
        device = _device() if self.cfg.device == "auto" else self.cfg.device
        self.punet = PunetSegmenter(load_punet(art["punet"], map_location=device))

    def use_device(self, device: str) -> None:
        """Predict on ``device`` from now on (``batch-eval --device``)."""
        self.cfg = dataclasses.replace(self.cfg, device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per fused spine of every input stack (:data:`SPINE_OUTPUT_COLS`)."""
        from microseg.infer.spine_pipeline import predict_spines

        frame = _frame(model_input, "spine")
        parts = []
        for row in frame.to_dict("records"):
            path = _existing(row["path"], "spine")
            result = predict_spines(
                path, self.yolo, self.punet, self.fusion_params, self.cfg, _row_voxel(row)
            )
            d = result.dedup
            parts.append(d.assign(path=str(row["path"]))[SPINE_OUTPUT_COLS])
        return spine_output_frame(parts)


def _read_2d(path: Path) -> np.ndarray:
    """A 2D image (``YX`` or ``YXC``, alpha dropped) from PNG/JPEG or TIFF."""
    from microseg.io.png import read_png, to_image

    if path.suffix.lower() in IMAGE_SUFFIXES_TIFF:
        from microseg.io.tiff import read_stack

        image = read_stack(path)
    else:
        image = read_png(path)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4))):
        raise DataFormatError(
            f"expected a 2D image (YX or YX + colour channels), found shape {image.shape}",
            path,
        )
    return to_image(image)


class NucleiModel(PythonModel):
    """3-class U-Net + seeded watershed (:func:`microseg.infer.instances.predict_instances`).

    Artifacts: ``unet`` (a :func:`microseg.models.unet.save_unet` file) and ``config`` (JSON of
    :class:`~microseg.infer.instances.InferConfig`, post-processing included).
    """

    def load_context(self, context: Any) -> None:
        from microseg.models.unet import load_unet
        from microseg.models.unet.predict import InferConfig

        art = context.artifacts
        raw = json.loads(Path(art["config"]).read_text())
        device = raw.get("device", "auto")
        device = _device() if device == "auto" else device
        self.model, self.unet_config, post = load_unet(art["unet"], map_location=device)
        raw.setdefault("post", dataclasses.asdict(post))
        self.cfg = InferConfig.from_mapping(raw)

    def use_device(self, device: str) -> None:
        """Predict on ``device`` from now on (``batch-eval --device``)."""
        device = _device() if device == "auto" else device
        self.model.to(device)
        self.cfg = dataclasses.replace(self.cfg, device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Label images written to ``params["out_dir"]``; one summary row per input image."""
        from microseg.io.tiff import write_stack
        from microseg.models.unet.predict import predict_instances

        frame = _frame(model_input, "nuclei")
        out_dir = (params or {}).get("out_dir")
        if not out_dir:
            raise ConfigError(
                "nuclei model: params={'out_dir': <folder>} is required (where the label "
                f"images go); found params={params!r}"
            )
        out = Path(str(out_dir))
        rows = []
        for row in frame.to_dict("records"):
            path = _existing(row["path"], "nuclei")
            image = _read_2d(path)
            labels, _ = predict_instances(self.model, image, self.cfg)
            labels = np.asarray(labels, dtype=np.uint16)
            target = write_stack(out / f"{path.stem}_labels.tif", labels)
            rows.append(
                {
                    "path": str(row["path"]),
                    "labels_path": str(target),
                    "n_objects": int(np.count_nonzero(np.unique(labels))),
                    "height": int(labels.shape[0]),
                    "width": int(labels.shape[1]),
                }
            )
        counts = dict.fromkeys(("n_objects", "height", "width"), "int64")
        return pd.DataFrame(rows, columns=NUCLEI_OUTPUT_COLS).astype(counts)


# --------------------------------------------------------------------------- signatures


def spine_signature() -> ModelSignature:
    """``path`` required, voxel sizes optional; output :data:`SPINE_OUTPUT_COLS`."""
    example_out = spine_output_frame(
        [
            pd.DataFrame(
                {
                    "path": ["stack.tif"],
                    **{c: [0.0] for c in SPINE_OUTPUT_COLS if c not in ("path", "status")},
                    "status": ["high"],
                }
            )
        ]
    )
    sig = infer_signature(pd.DataFrame({"path": ["stack.tif"]}), example_out)
    inputs = Schema(
        [ColSpec("string", "path"), *(ColSpec("double", c, required=False) for c in VOXEL_COLS)]
    )
    return ModelSignature(inputs=inputs, outputs=sig.outputs)


def nuclei_signature() -> ModelSignature:
    example_out = pd.DataFrame(
        {"path": ["a.png"], "labels_path": ["a_labels.tif"], "n_objects": [1]}
        | {"height": [1], "width": [1]}
    )
    with warnings.catch_warnings():
        # MLflow's hint about integer columns and missing values: outputs never miss counts
        warnings.simplefilter("ignore", UserWarning)
        return infer_signature(
            pd.DataFrame({"path": ["a.png"]}), example_out, params={"out_dir": ""}
        )


# --------------------------------------------------------------------------- logging


def _require_run() -> None:
    if mlflow.active_run() is None:
        raise ConfigError("logging a model needs an active MLflow run (open the stage run first)")


def _files(named: Mapping[str, str | Path]) -> dict[str, str]:
    out = {}
    for key, path in named.items():
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"model artifact {key!r}: expected a file, found nothing", p)
        out[key] = str(p.resolve())
    return out


def log_spine_model(
    name: str,
    yolo_weights: str | Path,
    punet_weights: str | Path,
    fusion_yaml: str | Path,
    cfg: Any,
    input_example_path: str | Path | None = None,
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log the spine pipeline as a pyfunc model in the active run (``name``: its name there).

    ``cfg``: a :class:`~microseg.infer.spine_pipeline.SpinePipelineConfig` (or its dict). With
    ``input_example_path`` MLflow stores ``{"path": [...]}`` as the example and runs the model
    on it once to check it serves (a full stack costs a full prediction).
    """
    from microseg.infer.spine_pipeline import SpinePipelineConfig, read_fusion_params

    _require_run()
    if isinstance(cfg, Mapping):
        cfg = SpinePipelineConfig.from_dict(cfg)
    read_fusion_params(fusion_yaml)  # a bad file fails here, not at load time
    with tempfile.TemporaryDirectory(prefix="microseg-pyfunc-") as tmp:
        config = Path(tmp) / "spine_pipeline.json"
        config.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        artifacts = _files(
            {"yolo": yolo_weights, "punet": punet_weights, "fusion": fusion_yaml, "config": config}
        )
        example = None
        if input_example_path is not None:
            example = pd.DataFrame({"path": [str(Path(input_example_path).resolve())]})
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=SpineModel(),
            artifacts=artifacts,
            signature=spine_signature(),
            input_example=example,
            pip_requirements=pinned_requirements(SPINE_REQUIREMENTS),
            code_paths=[str(package_dir())],
            metadata={
                "task": "spines",
                "model_family": "yolo+punet-fusion",
                "output_columns": SPINE_OUTPUT_COLS,
            },
            registered_model_name=registered_model_name,
        )


def log_nuclei_model(
    name: str,
    unet_weights: str | Path,
    infer_config: Any = None,
    input_example_path: str | Path | None = None,
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log the nuclei U-Net as a pyfunc model in the active run.

    ``infer_config``: an :class:`~microseg.infer.instances.InferConfig`, its mapping, or None
    (defaults); a mapping without ``post`` and None take the checkpoint's post-processing.
    With ``input_example_path`` MLflow runs the model on it once, writing labels to a temporary
    folder.
    """
    from microseg.models.unet import load_unet
    from microseg.models.unet.predict import InferConfig

    _require_run()
    _, unet_cfg, post = load_unet(unet_weights)  # a bad file fails here, not at load time
    if infer_config is None:
        infer_config = InferConfig(post=post)
    elif isinstance(infer_config, Mapping):
        # post-processing not given: the checkpoint's (tuned with the network), not defaults
        infer_config = InferConfig.from_mapping({"post": post, **infer_config})
    raw = dataclasses.asdict(infer_config)
    raw["percentiles"] = list(raw["percentiles"])
    with tempfile.TemporaryDirectory(prefix="microseg-pyfunc-") as tmp:
        config = Path(tmp) / "nuclei_infer.json"
        config.write_text(json.dumps(raw, indent=2) + "\n")
        artifacts = _files({"unet": unet_weights, "config": config})
        example = None
        if input_example_path is not None:
            frame = pd.DataFrame({"path": [str(Path(input_example_path).resolve())]})
            example = (frame, {"out_dir": str(Path(tmp) / "example_labels")})
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=NucleiModel(),
            artifacts=artifacts,
            signature=nuclei_signature(),
            input_example=example,
            pip_requirements=pinned_requirements(NUCLEI_REQUIREMENTS),
            code_paths=[str(package_dir())],
            metadata={
                "task": "nuclei",
                "model_family": "unet",
                "arch": unet_cfg.arch,
                "output_columns": NUCLEI_OUTPUT_COLS,
            },
            registered_model_name=registered_model_name,
        )


__all__: Sequence[str] = (
    "NUCLEI_OUTPUT_COLS",
    "SPINE_OUTPUT_COLS",
    "VOXEL_COLS",
    "NucleiModel",
    "SpineModel",
    "log_nuclei_model",
    "log_spine_model",
    "nuclei_signature",
    "pinned_requirements",
    "spine_signature",
)
