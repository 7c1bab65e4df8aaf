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

    Artifacts: ``yolo`` (best.pt), ``punet`` (best.pt of the flat or the hierarchical
    Prob-UNet, whichever ``spines.prob_model`` named), ``fusion`` (tuned_fusion.yaml),
    ``config`` (JSON of :class:`~microseg.infer.spine_pipeline.SpinePipelineConfig`).
    """

    def load_context(self, context: Any) -> None:
        from microseg.infer.spine_pipeline import SpinePipelineConfig, read_fusion_params
        from microseg.models import get_model
        from microseg.models.yolo import YoloSpineDetector

        art = context.artifacts
        self.cfg = SpinePipelineConfig.from_dict(json.loads(Path(art["config"]).read_text()))
        self.fusion_params = read_fusion_params(art["fusion"])
        self.yolo = YoloSpineDetector.load(art["yolo"])
        device = _device() if self.cfg.device == "auto" else self.cfg.device
        # the flat or the hierarchical Prob-UNet (spines.prob_model), told by its format tag
        family = "hpunet" if get_model("hpunet").owns(art["punet"]) else "punet"
        self.punet = get_model(family).load(art["punet"], map_location=device)

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
    """Any nuclei family of :data:`microseg.models.MODELS` behind one pyfunc: the family loads
    its weights with the params sections it was trained and evaluated with, and its predictor
    turns each image into instances.

    Artifacts: ``weights`` (the family's ``best.pt``) and ``config`` (JSON: ``family``,
    ``train``, ``infer`` and ``post``, the post-processing chosen on validation). Models
    logged before families existed (artifact ``unet``, config = the U-Net's ``InferConfig``)
    load as the ``unet`` family.
    """

    def load_context(self, context: Any) -> None:
        art = context.artifacts
        raw = json.loads(Path(art["config"]).read_text())
        if "family" not in raw:  # a U-Net pyfunc of an earlier version
            raw = {"family": "unet", "infer": raw, "post": raw.get("post")}
        self.spec = raw
        self.weights = Path(art["weights"] if "weights" in art else art["unet"])
        self.use_device(raw.get("infer", {}).get("device", "auto"))

    def use_device(self, device: str) -> None:
        """Predict on ``device`` from now on (``batch-eval --device``)."""
        from microseg.models import get_model

        family = get_model(self.spec["family"])
        infer = dict(self.spec.get("infer") or {})
        if getattr(family, "trainable", True):  # a classical family runs where it runs
            infer["device"] = _device() if device == "auto" else device
        self.device = infer.get("device", "cpu")
        train, post = self.spec.get("train") or {}, self.spec.get("post")
        self.model = family.load(self.weights, train=train, infer=infer, post=post)
        self.predictor = self.model.as_predictor()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Label images written to ``params["out_dir"]``; one summary row per input image."""
        from microseg.io.tiff import write_stack

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
            labels, _, _ = self.predictor(image)
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
    weights: str | Path,
    infer_config: Mapping[str, Any] | None = None,
    input_example_path: str | Path | None = None,
    registered_model_name: str | None = None,
    *,
    family: str = "unet",
    train: Mapping[str, Any] | None = None,
    post: Mapping[str, Any] | None = None,
) -> ModelInfo:
    """Log a trained nuclei model of ``family`` as a pyfunc in the active run.

    ``train``/``infer_config`` are its params sections (``cells.models.<name>``) and ``post``
    the post-processing chosen on validation (None: the one saved with the weights), so the
    registered model predicts what ``evaluate_cells`` scored. The model is loaded once here:
    a bad file fails at logging, not at serving. With ``input_example_path`` MLflow runs it
    on that image once, writing labels to a temporary folder.
    """
    from microseg.models import get_model

    _require_run()
    weights = Path(weights)
    if not weights.is_file():
        raise MissingFileError(f"no {family} weights to log", weights)
    spec = {
        "family": family,
        "train": dict(train or {}),
        "infer": dict(infer_config or {}),
        "post": dict(post) if post is not None else None,
    }
    get_model(family).load(weights, train=spec["train"], infer=spec["infer"], post=spec["post"])
    with tempfile.TemporaryDirectory(prefix="microseg-pyfunc-") as tmp:
        config = Path(tmp) / "nuclei_model.json"
        config.write_text(json.dumps(spec, indent=2, default=str) + "\n")
        artifacts = _files({"weights": weights, "config": config})
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
                "model_family": family,
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
