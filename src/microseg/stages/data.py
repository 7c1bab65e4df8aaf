"""Data stages as ``dvc.yaml`` runs them: ``synth``, ``ingest``, ``validate``,
``convert_yolo`` and ``prepare_targets``, each inside its MLflow run.

The work is in ``microseg.data`` (and ``stages.spines``/``stages.cells``); these functions
add the run, its lineage (the manifest as a dataset input) and the numbers it records.
"""

from __future__ import annotations

from pathlib import Path

from microseg.config import DatasetConfig, Params
from microseg.errors import ConfigError
from microseg.stages.result import StageResult, run_stage

SYNTH_TARGETS = ("spines", "tracking")
#: formats whose samples ``ingest`` splits by ``datasets.<name>.split`` (stratified)
RATIO_SPLIT_FORMATS = ("dsb2018", "coco", "png_pairs", "ome-tiff")


def dataset_config(params: Params, name: str) -> DatasetConfig:
    if name not in params.datasets:
        raise ConfigError(
            f"unknown dataset {name!r}; params.yaml defines {sorted(params.datasets)}"
        )
    return params.datasets[name]


def synth_targets(target: str) -> list[str]:
    """``all`` -> every synthetic dataset; otherwise the one named (checked)."""
    from microseg.data import synthesize

    targets = list(SYNTH_TARGETS) if target == "all" else [target]
    for t in targets:
        if t not in synthesize.WRITERS:
            raise ConfigError(
                f"unknown synth target {t!r}; choose from {sorted(synthesize.WRITERS)}"
            )
    return targets


def run_synth(params: Params, target: str) -> StageResult:
    """One seeded synthetic dataset -> ``<paths.synthetic>/<target>``."""
    from microseg.data import synthesize

    (target,) = synth_targets(target)
    cfg = getattr(params.synth, target)

    def fn() -> StageResult:
        out = synthesize.WRITERS.get(target)(cfg, params.paths.synthetic / target)
        return StageResult(f"synth_{target}", out=Path(out))

    return run_stage(
        params,
        fn,
        stage=f"synth_{target}",
        task=target,
        dataset=f"synthetic_{target}",
        section=cfg,
    )


def run_ingest(params: Params, dataset: str, workers: int | None = None) -> StageResult:
    """Native dataset -> ``data/prepared/<dataset>``; ``metrics`` is the manifest."""
    from microseg.data.ingest import ingest
    from microseg.data.manifest import read_manifest
    from microseg.registry.runs import log_manifest

    cfg = dataset_config(params, dataset)

    def fn() -> StageResult:
        out = ingest(dataset, cfg, params.paths.prepared, params.seed, workers)
        manifest = read_manifest(out)
        log_manifest(manifest, out, dataset, context="ingest")
        counts = {f"n_{split}": int(n) for split, n in manifest["split"].value_counts().items()}
        return StageResult("ingest", metrics=manifest, log_metrics=counts, out=Path(out))

    return run_stage(params, fn, stage="ingest", task=cfg.task, dataset=dataset, section=cfg)


def run_validate(params: Params, dataset: str) -> StageResult:
    """Great Expectations on a prepared dataset; raises ``ValidationFailed`` on bad data
    (the run is tagged ``validation: failed`` and keeps the report)."""
    from microseg.data.manifest import read_manifest
    from microseg.data.validate import validate_manifest
    from microseg.errors import ValidationFailed
    from microseg.registry import stage_logging
    from microseg.registry.runs import log_manifest

    cfg = dataset_config(params, dataset)
    prepared = params.paths.prepared / dataset
    report_dir = params.paths.reports / "validation" / dataset
    manifest = read_manifest(prepared)
    # formats split by ratio at ingest are checked against the ratios; d3set/CTC keep their own
    split = cfg.split if cfg.format in RATIO_SPLIT_FORMATS else None

    def fn() -> StageResult:
        log_manifest(manifest, prepared, dataset, context="validate")
        try:
            report = validate_manifest(
                manifest,
                params.validate_,
                split,
                report_dir,
                dataset,
                source=prepared / "manifest.parquet",
            )
        except ValidationFailed:
            failed = [(report_dir, "validation")] if report_dir.exists() else []
            stage_logging.log_stage_result(
                StageResult("validate", tags={"validation": "failed"}, artifacts=failed)
            )
            raise
        return StageResult(
            "validate",
            metrics=report,
            log_metrics={
                "n_expectations": report.n_expectations,
                "n_failed": report.n_failed,
                "seconds": report.seconds,  # in MLflow only: the report's bytes hold no times
            },
            tags={"validation": "passed"},
            artifacts=[(report_dir, "validation")],
            out=report_dir,
        )

    return run_stage(
        params, fn, stage="validate", task=cfg.task, dataset=dataset, section=params.validate_
    )


def run_convert(params: Params, target: str) -> StageResult:
    """A dataset in a model family's training format (``yolo``: d3set -> Ultralytics)."""
    from microseg.stages import spines

    if target != "yolo":
        raise ConfigError(f"unknown conversion {target!r}; available: yolo")

    def fn() -> StageResult:
        summary = spines.convert_yolo(params)
        return StageResult(
            "convert_yolo",
            summary,
            log_metrics=summary,
            metrics_prefix="convert.",
            out=spines.YOLO_DATA,
        )

    return run_stage(
        params,
        fn,
        stage="convert_yolo",
        task="spines",
        section=params.yolo.convert,
    )


def run_prepare_targets(params: Params) -> StageResult:
    """Nuclei dataset -> normalised images, 3-class targets and weight maps (cached)."""
    from microseg.stages import cells

    def fn() -> StageResult:
        summary = cells.prepare_targets_stage(params)
        return StageResult(
            "prepare_targets", summary, log_metrics=summary, out=cells.targets_dir(params)
        )

    return run_stage(
        params,
        fn,
        stage="prepare_targets",
        task="nuclei",
        section=params.cells.targets,
    )
