"""Which model ``microseg predict`` and ``microseg.load`` run: a name, a path or a registry URI
becomes one :class:`ModelSpec` (task, family, weights, params sections).

* a **name** is a ``cells.models``/``cells.baselines`` entry (nuclei; weights in
  ``models/cells/<name>/best.pt`` with the post-processing ``evaluate_cells`` chose on
  validation), a ``tracking.segmenters`` entry (tracking; ``models/tracking_seg/<name>/``),
  ``yolo`` or ``punet`` (spines; ``models/<name>/best.pt``), or a registered family (its
  defaults; weights from ``--weights``);
* a **path** is a model file (the family read from the file's ``format`` record; Ultralytics
  files are YOLO) or a model folder (``best.pt`` + ``train_info.json``, or an MLflow model
  folder); a folder named like a params entry of the same family gets that entry's sections;
* a ``models:/`` or ``runs:/`` **URI** is downloaded through :mod:`microseg.registry.resolve`.

The task follows from the family where the caller does not say it: ``lstmunet`` segments
time-lapses (tracking), ``yolo``/``punet`` find spines, every other family segments nuclei;
any nuclei model can also be asked to track (it segments frame by frame).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError, DataFormatError, MissingFileError

TASKS = ("nuclei", "spines", "tracking")
SPINE_FAMILIES = ("yolo", "punet")
#: the spine pipeline registered as one model (YOLO + Prob-UNet + tuned fusion)
FUSION_FAMILY = "yolo+punet-fusion"
#: families whose models see a whole time-lapse in order (``predict_sequence``)
SEQUENCE_FAMILIES = ("lstmunet",)
WEIGHTS_NAME = "best.pt"
INFO_NAME = "train_info.json"
POSTPROCESS_NAME = "postprocess.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load one model, whatever named it."""

    name: str
    task: str
    family: str
    weights: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)
    infer: dict[str, Any] = field(default_factory=dict)
    #: post-processing chosen on validation (None: the one saved with the weights)
    post: dict[str, Any] | None = None
    #: spine pipeline files of a registered spine model: yolo, punet, fusion, config
    files: dict[str, Path] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: params | path | registry
    source: str = "params"


def family_task(family: str) -> str:
    """The task a family's models do unless told otherwise."""
    if family in SPINE_FAMILIES or family == FUSION_FAMILY:
        return "spines"
    return "tracking" if family in SEQUENCE_FAMILIES else "nuclei"


def default_model(params: Params, task: str | None) -> str:
    """``--model`` when not given: the registered nuclei model, the first tracking segmenter,
    else YOLO (what ``predict`` ran before it knew other tasks)."""
    if task == "nuclei":
        return params.registry.nuclei_model
    if task == "tracking":
        return next(iter(params.tracking.segmenters))
    return "yolo"


def resolve_spec(
    params: Params,
    model: str | Path,
    *,
    task: str | None = None,
    weights: Path | None = None,
    device: str | None = None,
) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` (see the module docstring); ``weights`` replaces
    the default weights; ``device`` goes into the sections of a trainable family."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    text = str(model)
    from microseg.registry.resolve import is_registry_uri

    bare = not any(sep in text for sep in ("/", "\\")) and not text.endswith((".pt", ".pth"))
    if is_registry_uri(text):
        spec = _from_registry(params, text)
    elif bare and _is_name(params, text):  # a folder `otsu` in the cwd is `./otsu`
        spec = _from_name(params, text, task)
    elif Path(text).exists():
        spec = _from_path(params, Path(text))
    elif any(sep in text for sep in ("/", "\\")) or text.endswith((".pt", ".pth")):
        raise MissingFileError("expected a model file or folder, found nothing", text)
    else:
        spec = _from_name(params, text, task)
    if weights is not None:
        if not Path(weights).exists():
            raise MissingFileError("--weights: expected a model file, found nothing", weights)
        spec = replace(spec, weights=_weights_file(Path(weights)), source="path")
    spec = _with_task(spec, task)
    if device is not None and _trainable(spec.family):
        spec = replace(spec, infer={**spec.infer, "device": device})
    return spec


def _trainable(family: str) -> bool:
    if family in SPINE_FAMILIES or family == FUSION_FAMILY:
        return False  # their devices come from params (yolo.predict / punet.predict)
    from microseg.models import get_model

    return bool(getattr(get_model(family), "trainable", True))


def _with_task(spec: ModelSpec, task: str | None) -> ModelSpec:
    """``spec`` for ``task`` (a nuclei model may track; spines and the others do not mix)."""
    if task is None or task == spec.task:
        return spec
    spines = spec.task == "spines"
    if spines or task == "spines":
        raise ConfigError(
            f"model {spec.name!r} ({spec.family}) does {spec.task}, not {task}; spines models "
            "(yolo, punet) and nuclei/tracking models do not stand in for each other"
        )
    return replace(spec, task=task)


# ------------------------------------------------------------------------------- names
def _is_name(params: Params, name: str) -> bool:
    from microseg.models import MODELS

    return (
        name in SPINE_FAMILIES
        or name in params.cells.all_models()
        or name in params.tracking.segmenters
        or name in MODELS
    )


def _from_name(params: Params, name: str, task: str | None) -> ModelSpec:
    from microseg.models import MODELS
    from microseg.stages import cells, punet, spines, tracking

    if name == "hpunet":  # the hierarchical Prob-UNet runs where a Prob-UNet runs
        return ModelSpec(name, "spines", "punet", punet.HPUNET_DIR / WEIGHTS_NAME)
    if name in SPINE_FAMILIES:
        # ``punet``: the probabilistic segmenter ``spines.prob_model`` names (flat or hierarchical)
        folder = spines.YOLO_MODEL_DIR if name == "yolo" else punet.prob_model_dir(params)
        return ModelSpec(name, "spines", name, folder / WEIGHTS_NAME)
    cell_models = params.cells.all_models()
    segmenters = params.tracking.segmenters
    if name in segmenters and (task == "tracking" or name not in cell_models):
        sc = segmenters[name]
        weights = tracking.SEG_MODEL_DIR / name / WEIGHTS_NAME
        return ModelSpec(name, "tracking", sc.family, weights, dict(sc.train), dict(sc.infer))
    if name in cell_models:
        mc = cell_models[name]
        weights = cells.MODELS_ROOT / name / WEIGHTS_NAME if _trainable(mc.family) else None
        post = cells.chosen_postprocess(name)
        return ModelSpec(name, "nuclei", mc.family, weights, dict(mc.train), dict(mc.infer), post)
    if name in MODELS:  # a family by name: its defaults (weights from --weights)
        return ModelSpec(name, family_task(name), name)
    known = sorted({*cell_models, *segmenters, *SPINE_FAMILIES})
    raise ConfigError(
        f"unknown model {name!r}: expected a cells.models/baselines or tracking.segmenters "
        f"name of params.yaml ({', '.join(known)}), a family ({', '.join(MODELS.names())}), "
        "a model file or folder, or a models:/ URI"
    )


# ------------------------------------------------------------------------------- paths
def _weights_file(path: Path) -> Path:
    """A weights file, or the ``best.pt`` of a model folder."""
    if path.is_dir():
        found = path / WEIGHTS_NAME
        if not found.is_file():
            raise MissingFileError(f"expected a model folder holding {WEIGHTS_NAME}", path)
        return found
    return path


def _from_path(params: Params, path: Path) -> ModelSpec:
    from microseg.stages import cells, tracking

    if path.is_dir() and (path / "MLmodel").is_file():
        from microseg.registry.resolve import read_model_folder

        return _from_local(read_model_folder(path), str(path))
    weights = _weights_file(path)
    folder = weights.parent
    info = _read_json(folder / INFO_NAME) if path.is_dir() else {}
    family = str(info.get("family") or checkpoint_family(weights))
    if family == "hpunet":  # a Prob-UNet either way: ``stages.punet.load_prob_model`` reads it
        family = "punet"
    name = folder.name if path.is_dir() or weights.name == WEIGHTS_NAME else weights.stem
    post = _read_json(folder / POSTPROCESS_NAME) or None
    train: dict[str, Any] = {}
    infer: dict[str, Any] = {}
    # a pipeline folder (models/cells/<name>, models/tracking_seg/<name>) keeps its params
    segmenter = folder.parent.name == tracking.SEG_MODEL_DIR.name
    cell_models = {} if segmenter else params.cells.all_models()
    entry = cell_models.get(name) or params.tracking.segmenters.get(name)
    if entry is not None and entry.family == family:
        train, infer = dict(entry.train), dict(entry.infer)
        if post is None and name in cell_models:
            post = cells.chosen_postprocess(name)
    return ModelSpec(name, family_task(family), family, weights, train, infer, post, source="path")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"not valid JSON ({exc})", path) from exc
    return data if isinstance(data, dict) else {}


def checkpoint_family(path: Path) -> str:
    """The family that wrote a model file: our files name it in their ``format`` record
    (``microseg.<family>/<version>``; a U-Net file with a plan is nnU-Net's, with a
    transformer arch the sac family's); an Ultralytics file is YOLO. Read without unpickling
    anything (``weights_only``, and only the pickle's text for Ultralytics)."""
    import torch

    if _is_ultralytics(path):
        return "yolo"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        msg = f"not a readable model file ({type(exc).__name__}: {str(exc)[:200]})"
        raise DataFormatError(msg, path) from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("microseg."):
        raise DataFormatError(
            "expected a microseg model file (a 'format' record such as microseg.unet/1) or "
            f"Ultralytics YOLO weights; found {type(ckpt).__name__} without one",
            path,
        )
    family = fmt.removeprefix("microseg.").split("/")[0].split(".")[0]
    if family == "unet":
        if isinstance(ckpt.get("plan"), dict):
            return "nnunet"
        from microseg.models.sac import SAC_ARCHS

        if (ckpt.get("model_config") or {}).get("arch") in SAC_ARCHS:
            return "sac"
    from microseg.models import MODELS

    if family not in MODELS:
        raise DataFormatError(f"format {fmt!r} names no registered family", path)
    return family


def _is_ultralytics(path: Path) -> bool:
    """An Ultralytics checkpoint: a torch zip whose pickle names ``ultralytics`` classes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        return any(b"ultralytics" in archive.read(n) for n in pickles)


# ------------------------------------------------------------------------------- registry
def _from_registry(params: Params, uri: str) -> ModelSpec:
    from microseg.registry.resolve import resolve_registered_model

    return _from_local(resolve_registered_model(uri, params=params), uri)


def _from_local(local: Any, name: str) -> ModelSpec:
    """A :class:`~microseg.registry.resolve.LocalModel` as a spec."""
    if local.task == "spines":
        return ModelSpec(
            name, "spines", FUSION_FAMILY, local.artifacts.get("yolo"),
            files=dict(local.artifacts), config=dict(local.config), source="registry",
        )  # fmt: skip
    cfg = local.config
    return ModelSpec(
        name,
        family_task(str(cfg["family"])),
        str(cfg["family"]),
        local.artifacts.get("weights"),
        dict(cfg.get("train") or {}),
        dict(cfg.get("infer") or {}),
        cfg.get("post"),
        source="registry",
    )


# ------------------------------------------------------------------------------- loading
def load_segmenter(spec: ModelSpec) -> Any:
    """The family's model (nuclei and tracking) with the spec's sections."""
    from microseg.models import get_model

    family = get_model(spec.family)
    if _trainable(spec.family) and (spec.weights is None or not Path(spec.weights).is_file()):
        hint = (
            f"train it first (microseg train -m {spec.name})"
            if spec.source == "params"
            else "give --weights"
        )
        raise MissingFileError(f"no trained weights of {spec.name!r}: {hint}", spec.weights)
    return family.load(spec.weights, train=spec.train, infer=spec.infer, post=spec.post)


__all__ = [
    "FUSION_FAMILY",
    "SEQUENCE_FAMILIES",
    "SPINE_FAMILIES",
    "TASKS",
    "ModelSpec",
    "checkpoint_family",
    "default_model",
    "family_task",
    "load_segmenter",
    "resolve_spec",
]
