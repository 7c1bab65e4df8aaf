"""Typed view of ``params.yaml``: the one place that reads it.

Stages receive the validated section they need; CLI flags override single values for one run.
DVC tracks the same file (``params:`` in ``dvc.yaml``), so a change here reruns exactly the
stages that read the changed keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from microseg.errors import ConfigError, MissingFileError

DEFAULT_PARAMS = Path("params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowConfig(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlruns"
    experiment_prefix: str = "microseg"


class PathsConfig(_Strict):
    raw: Path = Path("data/raw")
    synthetic: Path = Path("data/synthetic")
    prepared: Path = Path("data/prepared")
    reports: Path = Path("reports")
    metrics: Path = Path("metrics")


class SplitConfig(_Strict):
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


class SynthSpinesConfig(_Strict):
    """How many synthetic spine stacks to make and of what size (``microseg synth spines``)."""

    seed: int = 7
    n_train: int = Field(6, ge=1)
    n_val: int = Field(2, ge=1)
    shape: tuple[int, int, int] = (32, 256, 256)
    benchmark_shape: tuple[int, int, int] = (48, 384, 384)
    #: dendrites in the benchmark stack (its field is larger, so it gets more of them)
    benchmark_dendrites: tuple[int, int] = (3, 5)
    voxel_size_nm: tuple[float, float, float] = (500.0, 94.0, 94.0)
    n_raters: int = Field(3, ge=2)
    #: unseen stacks written to ``batch/`` for batch evaluation by the promoted model
    n_batch: int = Field(2, ge=0)
    #: any other ``SpineSynthConfig`` field, e.g. ``{peak_photons: [10, 20]}``
    generator: dict[str, Any] = Field(default_factory=dict)


class SynthTrackingConfig(_Strict):
    """Synthetic Cell Tracking Challenge sequences (``microseg synth tracking``)."""

    seed: int = 11
    n_sequences: int = Field(3, ge=1)
    n_frames: int = Field(30, ge=2)
    shape: tuple[int, int] = (128, 128)
    #: any other ``TrackingSynthConfig`` field
    generator: dict[str, Any] = Field(default_factory=dict)


class SynthConfig(_Strict):
    spines: SynthSpinesConfig = Field(default_factory=SynthSpinesConfig)
    tracking: SynthTrackingConfig = Field(default_factory=SynthTrackingConfig)


class DatasetConfig(_Strict):
    """One ingestable dataset: where its native files are and how to read them."""

    format: Literal["synthetic_spines", "deepd3", "dsb2018", "ctc", "coco", "png_pairs", "ome-tiff"]
    source: Path
    #: COCO JSON for ``format: coco`` (default ``<source>/annotations.json``)
    annotations: Path | None = None
    task: Literal["spines", "nuclei", "tracking"]
    split: SplitConfig = Field(default_factory=SplitConfig)
    #: formats that carry their own split (d3set train/val files, CTC sequences) ignore ``split``
    voxel_size_nm: tuple[float, float, float] | None = None
    #: ``png_pairs`` masks: ``instance`` keeps the ids; ``binary`` labels 4-connected components
    #: (objects sharing an edge merge); ``auto`` reads a mask whose nonzero pixels share one
    #: value (0/255, 0/1) as binary, any other as instance. Other formats carry instance ids.
    mask_kind: Literal["instance", "binary", "auto"] = "auto"
    #: ``ome-tiff`` (microscope files read through bioio: OME-TIFF, CZI, ND2, LIF, TIFF): the
    #: channel (index or name) holding the nuclei, when the images have several
    channel: int | str | None = None

    @model_validator(mode="after")
    def _mask_kind_only_for_png_pairs(self) -> DatasetConfig:
        if self.mask_kind != "auto" and self.format not in ("png_pairs", "ome-tiff"):
            raise ValueError(
                f"mask_kind applies to formats png_pairs and ome-tiff only, not {self.format}"
            )
        if self.channel is not None and self.format != "ome-tiff":
            raise ValueError(f"channel applies to format ome-tiff only, not {self.format}")
        return self


class RangeConfig(_Strict):
    min: float
    max: float


class ValidateConfig(_Strict):
    allowed_image_dtypes: list[str] = ["uint8", "uint16", "float32"]
    allowed_label_dtypes: list[str] = ["uint8", "uint16", "uint32", "int32"]
    instances: RangeConfig = RangeConfig(min=0, max=5000)
    voxel_size_nm: RangeConfig = RangeConfig(min=10, max=5000)
    #: allowed absolute deviation of each split's fraction from the configured one
    split_tolerance: float = 0.1


class SpinesEvalConfig(_Strict):
    """How spine detections become points and are scored (all methods share it)."""

    #: the ``datasets`` entry the spine stages train and score on (``data/prepared/<name>``)
    dataset: str = "spines"
    match_dist_nm: float = Field(1000.0, gt=0)
    dedup_radius_nm: float = Field(1500.0, ge=0)
    dedup_mode: Literal["nms", "cluster"] = "nms"
    #: the probabilistic segmenter whose samples feed ``predict_punet``, ``uncertainty``,
    #: ``inter_rater``, the fusion and ``microseg predict -m punet``: the flat Prob-UNet
    #: (``punet``) or the hierarchical one (``hpunet``, ``models/hpunet``)
    prob_model: Literal["punet", "hpunet"] = "punet"


class YoloConvertConfig(_Strict):
    min_box_px: int = 10
    max_box_px: int = 5000
    channels: Literal["single", "25d"] = "single"
    box: Literal["head", "component"] = "head"
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    include_empty: bool | float = True
    pad_px: float = 0.0


class YoloTrainConfig(_Strict):
    arch: Literal["n", "s", "m", "l"] = "n"
    epochs: int = Field(40, ge=1)
    imgsz: int = 256
    batch: int = 16
    #: Ultralytics' nominal batch: gradients accumulate over ``nbs / batch`` batches per
    #: optimizer step (its default 64; a short CPU run wants ``nbs = batch``)
    nbs: int = Field(64, ge=1)
    warmup_epochs: float = Field(3.0, ge=0)
    close_mosaic: int = Field(10, ge=0)  # last epochs without mosaic augmentation
    lr0: float = 1e-3
    lrf: float = 0.01
    optimizer: str = "AdamW"
    cos_lr: bool = True
    patience: int = 15
    augment: dict[str, float] = Field(default_factory=dict)
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    #: torch threads when training on the CPU; null: every usable core (Ultralytics' own
    #: choice, cores - 1, is one thread on a 2-core runner)
    num_threads: int | None = Field(None, ge=1)
    #: fine-tuning: a YOLO ``.pt`` (or ``models:/name@alias``) to start from instead of random
    init_from: str | None = None


class YoloPredictConfig(_Strict):
    conf: float = 0.25
    iou: float = 0.5
    #: ``[size, overlap]`` (overlap in px, or a fraction of the tile below 1); null = whole plane
    tile: tuple[int, float] | None = None
    fusion: Literal["nms", "wbf"] = "nms"
    batch_planes: int = 8
    max_det: int = 3000
    #: null: Ultralytics' choice (a GPU when there is one); set by ``--device``, kept out of the
    #: logged params and their hash (where a model runs does not change what it predicts)
    device: str | None = Field(None, exclude=True)


class YoloSweepConfig(_Strict):
    confs: list[float] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7]
    ious: list[float] = [0.3, 0.5, 0.7]


class YoloConfig(_Strict):
    convert: YoloConvertConfig = Field(default_factory=YoloConvertConfig)
    train: YoloTrainConfig = Field(default_factory=YoloTrainConfig)
    predict: YoloPredictConfig = Field(default_factory=YoloPredictConfig)
    sweep: YoloSweepConfig = Field(default_factory=YoloSweepConfig)


class LogBaselineConfig(_Strict):
    """LoG blob baseline: ``grid`` is searched on the validation stacks."""

    grid: dict[str, list[float]] = Field(
        default_factory=lambda: {
            "threshold": [0.05, 0.1, 0.15, 0.2, 0.3],
            "min_sigma": [1.0, 1.5, 2.0],
            "max_sigma": [3.0, 4.0],
        }
    )
    fixed: dict[str, Any] = Field(default_factory=dict)


class PunetPredictConfig(_Strict):
    n_samples: int = Field(24, ge=1)
    temperature: float = Field(1.4, gt=0)
    tile: tuple[int, int] | None = None
    batch_planes: int = 4
    size_thr: int = 40
    prob_thr: float = 0.5
    #: null: where the weights load (the CPU); set by ``--device``, kept out of the logged
    #: params and their hash like ``yolo.predict.device``
    device: str | None = Field(None, exclude=True)


class PunetConfig(_Strict):
    #: keys of ``microseg.models.punet.train.PunetTrainConfig`` (checked there)
    train: dict[str, Any] = Field(default_factory=dict)
    predict: PunetPredictConfig = Field(default_factory=PunetPredictConfig)
    #: planes shown in the uncertainty panels (empty: the middle plane)
    uncertainty_planes: list[int] = Field(default_factory=list)
    #: AUROC/Spearman are computed within this many pixels of any rater's mask
    rater_region_px: int = 3


class HpunetConfig(_Strict):
    """The hierarchical Prob-UNet (``train_hpunet``); it predicts with ``punet.predict``'s
    knobs, so that switching ``spines.prob_model`` changes the model and nothing else."""

    #: keys of ``microseg.models.hpunet.train.HpunetTrainConfig`` (checked there)
    train: dict[str, Any] = Field(default_factory=dict)
    #: ``compare_prob_models`` scores every n-th benchmark plane (the hierarchical model runs
    #: its decoder once per sample: on all 48 planes it costs minutes of CPU)
    compare_plane_stride: int = Field(1, ge=1)


class TrackingSegConfig(_Strict):
    """One segmenter of the tracking benchmark (``train_tracking_seg@<name>``): a registered
    family that segments frames (``unet``) or whole sequences (``lstmunet``)."""

    family: str = "unet"
    description: str = ""
    #: the family's training config keys (unet: ``UnetTrainConfig``, lstmunet:
    #: ``LstmUnetTrainConfig``)
    train: dict[str, Any] = Field(default_factory=dict)
    #: the family's inference keys (unet: ``InferConfig``, lstmunet: ``SequenceInferConfig``)
    infer: dict[str, Any] = Field(default_factory=dict)


def _default_segmenters() -> dict[str, TrackingSegConfig]:
    return {"unet": TrackingSegConfig()}


class TrackingConfig(_Strict):
    #: the ``datasets`` entry (CTC sequences) the tracking stages train and score on
    dataset: str = "tracking"
    #: model: link the masks of every segmenter; gt: link ground-truth masks with shuffled
    #: ids instead (tests the linker alone; every row then scores the same masks)
    masks: Literal["gt", "model"] = "gt"
    split: str = "test"
    #: fields of ``microseg.infer.tracking.LinkConfig``
    link: dict[str, Any] = Field(default_factory=dict)
    #: the linker of every segmenter's masks: ``ours`` (``microseg.infer.tracking``, row
    #: ``<name>``) or ``laptrack`` (the peer, ``microseg.infer.tracking_laptrack``, row
    #: ``<name>+laptrack``)
    linker: Literal["ours", "laptrack"] = "ours"
    #: further linkers run beside ``linker`` on the same masks, one row each
    compare_linkers: list[Literal["ours", "laptrack"]] = Field(default_factory=list)
    #: ``laptrack.LapTrack`` fields over our defaults (squared pixels: its metric is
    #: ``sqeuclidean``); see ``microseg.infer.tracking_laptrack.DEFAULTS``
    laptrack: dict[str, Any] = Field(default_factory=dict)
    #: the segmenters compared on the same sequences (``train_tracking_seg@``/``track@``
    #: iterate over these keys; ``evaluate_tracking`` writes one row per key)
    segmenters: dict[str, TrackingSegConfig] = Field(default_factory=_default_segmenters)

    @model_validator(mode="before")
    @classmethod
    def _no_single_seg(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seg" in data:
            raise ValueError(
                "tracking.seg became tracking.segmenters.<name> (family, train, infer): "
                "move it to tracking.segmenters.unet with family: unet"
            )
        return data

    @model_validator(mode="after")
    def _names(self) -> TrackingConfig:
        if not self.segmenters:
            raise ValueError("tracking.segmenters is empty: name at least one segmenter")
        for name in self.segmenters:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name == "masks":
                raise ValueError(
                    f"tracking segmenter name {name!r} must be letters, digits, _ or - (it "
                    "names folders and DVC stages) and not 'masks'"
                )
        return self


class FusionConfig(_Strict):
    """Optuna study of the YOLO + Prob-UNet fusion thresholds (validation stacks only)."""

    n_trials: int = Field(60, ge=1)
    #: any SQLAlchemy URL: a PostgreSQL URL lets several workers share one study
    storage: str = "sqlite:///optuna.db"
    study_name: str = "fusion"
    timeout: float | None = None


class TargetsConfig(_Strict):
    """3-class targets and U-Net weight maps (``microseg prepare-targets``)."""

    w0: float = 10.0
    sigma: float = 5.0
    max_class_weight: float = 3.0
    percentiles: tuple[float, float] = (1.0, 99.0)


class CellModelConfig(_Strict):
    """One model of the nuclei benchmark: its family and that family's own knobs."""

    #: a registered family (``microseg.models.MODELS``: unet, maskrcnn, classical, ...)
    family: str
    description: str = ""
    #: unet: ``UnetTrainConfig`` keys; maskrcnn: ``MaskRCNNTrainConfig`` keys
    train: dict[str, Any] = Field(default_factory=dict)
    #: unet: ``InferConfig`` keys; maskrcnn: its predict keys; classical: ``ClassicalConfig``
    infer: dict[str, Any] = Field(default_factory=dict)


class PostByModalityConfig(_Strict):
    """Post-processing knobs chosen again on each image kind's own validation images."""

    #: kinds with fewer validation images keep the shared choice
    min_images: int = Field(8, ge=1)
    #: validation images searched per kind: those the shared search saw, topped up to this
    #: many (manifest order); null: all
    max_images: int | None = Field(16, ge=1)


class CellsConfig(_Strict):
    """The nuclei instance benchmark: dataset, targets, models, evaluation."""

    dataset: str = "dsb2018"
    split: str = "test"
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    iou_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)
    n_overlays: int = 2
    #: evaluate only the first N images of the split (smoke runs); null: all
    max_images: int | None = Field(None, ge=1)
    #: U-Net watershed thresholds searched on the validation split before the test split is
    #: predicted (``PostprocessConfig`` keys -> candidate values); empty: the trained defaults
    post_grid: dict[str, list[Any]] = Field(default_factory=dict)
    #: the models of a family named here search its own grid instead (a distance-seeded
    #: watershed has other knobs than an interior-seeded one); kept out of ``models`` so that
    #: changing a search does not retrain a model
    post_grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    #: validation images the post-processing search runs on (stratified by modality); null: all
    post_max_images: int | None = Field(None, ge=1)
    #: then each image kind (tissue, fluorescence, brightfield: read from the pixels) may keep
    #: knobs of its own where its validation images prefer them; null: one choice for all
    post_by_modality: PostByModalityConfig | None = Field(default_factory=PostByModalityConfig)
    #: predicted objects larger than this many pixels are dropped once instances are made
    #: (the neuron seed's outlier filter); ``"p95"`` (any ``"p<q>"``): the q-th percentile of
    #: the training split's true object areas; null: off. Applied by evaluate_cells only:
    #: a registered (packaged) model predicts without it
    max_area: float | str | None = None
    #: learned models (``train_cells@``/``evaluate_cells@`` iterate over these keys)
    models: dict[str, CellModelConfig] = Field(default_factory=dict)
    #: classical references, in every table (``evaluate_baseline@``)
    baselines: dict[str, CellModelConfig] = Field(default_factory=dict)

    def all_models(self) -> dict[str, CellModelConfig]:
        return {**self.baselines, **self.models}

    @model_validator(mode="after")
    def _check_max_area(self) -> CellsConfig:
        v = self.max_area
        if isinstance(v, str):
            m = re.fullmatch(r"p(\d+(?:\.\d+)?)", v)
            if m is None or not 0 < float(m.group(1)) <= 100:
                raise ValueError(
                    f"max_area: a number of pixels, 'p<q>' (0 < q <= 100) or null; found {v!r}"
                )
        elif v is not None and not v > 0:
            raise ValueError(f"max_area must be > 0 pixels; found {v}")
        return self


class RegistryTaskConfig(_Strict):
    """How one task's model is registered and when it is promoted to ``champion``."""

    name: str
    #: key of the flattened evaluation metrics, e.g. ``benchmark.f1``
    metric: str
    min_delta: float = Field(0.005, ge=0)
    higher_is_better: bool = True


class RegistryConfig(_Strict):
    spines: RegistryTaskConfig = Field(
        default_factory=lambda: RegistryTaskConfig(name="microseg-spines", metric="benchmark.f1")
    )
    nuclei: RegistryTaskConfig = Field(
        default_factory=lambda: RegistryTaskConfig(name="microseg-nuclei", metric="f1_50")
    )
    #: the nuclei model that is packaged and registered (a key of ``cells.models``)
    nuclei_model: str = "unet"


class EngineParams(_Strict):
    """Where and how every Lightning-trained family trains (``microseg.train.engine``).

    A model's own ``train`` section may set any of these keys for that model alone.
    """

    #: auto | cpu | cuda | cuda:N | mps (auto: CUDA, else Apple MPS, else the CPU)
    device: str = "auto"
    #: devices per node; 2+ runs DDP (``strategy: auto`` picks it)
    devices: int | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    #: auto | ddp | ddp_spawn | fsdp ... (Lightning's strategies)
    strategy: str = "auto"
    #: auto: bf16-mixed on a GPU that has it, 16-mixed on older GPUs, 32-true on CPU/MPS
    precision: str = "auto"
    #: torch's deterministic algorithms: warn (use them, warn where an op has none) | true | false
    deterministic: bool | Literal["warn"] = "warn"

    def train_section(self, section: dict[str, Any]) -> dict[str, Any]:
        """A family's ``train`` section with these keys as defaults."""
        return {**self.model_dump(), **section}


class ScaleConfig(_Strict):
    """Where ``batch-eval``, ``predict`` and ``fuse --input`` run their inputs
    (:class:`microseg.utils.engine.EngineOptions`; ``--engine``/``--address`` override)."""

    #: local: one process, inputs in order; ray: Ray actors, the model loaded once in each
    engine: Literal["local", "ray"] = "local"
    #: Ray cluster to join (auto, host:port, ray://host:10001); null starts a local one
    address: str | None = None
    num_workers: int = Field(2, ge=1)
    #: GPUs reserved per Ray actor (0.5: two actors share a GPU)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    #: restarts of a dead actor, and retries of the input it held
    max_retries: int = Field(3, ge=0)


class Params(_Strict):
    #: which training profile this params file holds (``microseg profile``): demo | full
    profile: str = "demo"
    seed: int = 42
    engine: EngineParams = Field(default_factory=EngineParams)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    spines: SpinesEvalConfig = Field(default_factory=SpinesEvalConfig)
    yolo: YoloConfig = Field(default_factory=YoloConfig)
    baseline_log: LogBaselineConfig = Field(default_factory=LogBaselineConfig)
    punet: PunetConfig = Field(default_factory=PunetConfig)
    hpunet: HpunetConfig = Field(default_factory=HpunetConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    cells: CellsConfig = Field(default_factory=CellsConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    #: training studies per target: ``microseg.tune.training.TrainStudyConfig`` keys, validated
    #: when a study starts (so a CLI call that does not tune does not import Optuna)
    tune: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: ``microseg seeds``: the seed spread's models, seeds and pipelines (read by stages/seeds*)
    seeds: dict[str, Any] = Field(default_factory=dict)
    #: ``microseg synth-study``: arms, seeds and budget of the synthetic-data study, validated
    #: by ``microseg.stages.synth_study.StudyConfig`` when the study starts
    synth_study: dict[str, Any] = Field(default_factory=dict)

    # a typo'd section (``yollo:``) must fail, not fall back to the defaults silently
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _dataset_names_are_folder_names(self) -> Params:
        """Dataset keys become ``data/prepared/<name>`` and DVC stage keys: no path tricks."""
        for name in self.datasets:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(
                    f"datasets key {name!r}: use lower-case letters, digits, '_' and '-' (it "
                    "names data/prepared/<name>)"
                )
        return self

    def task_dataset(self, task: str) -> str:
        """The ``datasets`` entry a task's stages use: ``cells.dataset`` (nuclei),
        ``spines.dataset``, ``tracking.dataset``; ``dvc.yaml`` names the same keys."""
        section = {"nuclei": self.cells, "spines": self.spines, "tracking": self.tracking}
        if task not in section:
            raise ConfigError(f"unknown task {task!r}; choose nuclei, spines or tracking")
        name = section[task].dataset
        if name not in self.datasets:
            key = "cells" if task == "nuclei" else task
            raise ConfigError(
                f"{key}.dataset is {name!r}, which params.yaml `datasets` does not define "
                f"(defined: {sorted(self.datasets)}); add it with `microseg dataset add`"
            )
        if self.datasets[name].task != task:
            raise ConfigError(
                f"dataset {name!r} is a {self.datasets[name].task} dataset, not {task}"
            )
        return name

    def prepared_dir(self, task: str) -> Path:
        """``<paths.prepared>/<the task's dataset>``: what ``ingest`` wrote for it."""
        return self.paths.prepared / self.task_dataset(task)

    def dataset_source(self, task: str) -> Path:
        """The native files of the task's dataset (``datasets.<name>.source``); for ``deepd3``
        the prepared folder, where ingest rewrote them in the ``synthetic_spines`` layout."""
        name = self.task_dataset(task)
        if self.datasets[name].format == "deepd3":
            return self.paths.prepared / name
        return Path(self.datasets[name].source)

    def with_device(self, device: str | None) -> Params:
        """A copy whose every training and inference ``device`` is ``device`` (None: self).

        ``--device`` of ``train``, ``predict``, ``fuse``, ``evaluate`` and ``batch-eval``:
        ``yolo.train``/``yolo.predict``, ``punet.train``/``punet.predict``, ``train``/``infer``
        of every segmenter of ``tracking.segmenters`` and of every learned model of
        ``cells.models`` (classical ones run on the CPU and have no device).
        """
        if device is None:
            return self
        device = check_device(device)
        yolo_device = device  # models.yolo turns it into Ultralytics' spelling

        def put(section: dict[str, Any]) -> dict[str, Any]:
            return {**section, "device": device}

        y, p, tr = self.yolo, self.punet, self.tracking
        yolo = y.model_copy(
            update={
                "train": y.train.model_copy(update={"device": yolo_device}),
                "predict": y.predict.model_copy(
                    update={"device": None if device == "auto" else device}
                ),
            }
        )
        punet = p.model_copy(
            update={
                "train": put(p.train),
                "predict": p.predict.model_copy(update={"device": device}),
            }
        )
        segmenters = {
            name: sc.model_copy(update={"train": put(sc.train), "infer": put(sc.infer)})
            for name, sc in tr.segmenters.items()
        }
        models = {
            name: mc
            if mc.family == "classical"
            else mc.model_copy(update={"train": put(mc.train), "infer": put(mc.infer)})
            for name, mc in self.cells.models.items()
        }
        return self.model_copy(
            update={
                "engine": self.engine.model_copy(update={"device": device}),
                "yolo": yolo,
                "punet": punet,
                "hpunet": self.hpunet.model_copy(update={"train": put(self.hpunet.train)}),
                "tracking": tr.model_copy(update={"segmenters": segmenters}),
                "cells": self.cells.model_copy(update={"models": models}),
            }
        )


def check_device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (the one check:
    :func:`microseg.utils.devices.check_device`); else a ``ConfigError`` naming ``--device``."""
    from microseg.utils import devices

    try:
        return devices.check_device(device)
    except ConfigError:
        raise ConfigError(f"--device expects {devices.SPELLINGS}; got {device!r}") from None


#: where the wheel carries the repository's params.yaml (pyproject's hatch force-include)
PACKAGED_PARAMS = ("defaults", "params.yaml")


def packaged_params_path() -> Path | None:
    """The params.yaml shipped inside the installed package (None in a source checkout)."""
    from importlib.resources import files

    resource = files("microseg").joinpath(*PACKAGED_PARAMS)
    return Path(str(resource)) if resource.is_file() else None


def source_params_path() -> Path | None:
    """The repository's params.yaml beside ``src/`` in a source or editable install."""
    here = Path(__file__).resolve()
    if here.parents[1].name != "src":  # installed into site-packages: no repository around
        return None
    path = here.parents[2] / DEFAULT_PARAMS.name
    return path if path.is_file() else None


def default_params_path() -> Path:
    """``./params.yaml`` when there is one, else the packaged defaults, else (a source or
    editable install) the repository's params.yaml: so every command also runs outside the
    pipeline's folder. Relative paths inside it (``models/``, ``reports/``) still resolve
    against the working directory."""
    if DEFAULT_PARAMS.is_file():
        return DEFAULT_PARAMS
    for found in (packaged_params_path(), source_params_path()):
        if found is not None:
            return found
    raise MissingFileError(
        "params file not found here, and this installation carries no default params.yaml",
        DEFAULT_PARAMS,
    )


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` use dotted keys (``seed=1``)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError("params file not found", path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", path) from exc
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"--set {key}: {section} is a value ({node!r}), not a section with keys"
                )
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid params: {describe_errors(exc)}", path) from None


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line, ``key.path: what`` each (an unknown key says so)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        what = "unknown key (a typo?)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {what}")
    return "; ".join(parts)
