"""Great Expectations suite over the manifest: bad data stops the pipeline before training.

The ``validate`` stage runs this on ``data/prepared/<dataset>/manifest.parquet``. Every check is
a GE 1.x expectation built in code and run through :mod:`microseg.data.expectations` (one
ephemeral context, one checkpoint per table), so the HTML Data Docs and the JSON result
describe exactly what was enforced.

Split fractions are a property of the table, not of a row, and GE has no expectation for
"fraction of rows per value". We derive a one-row-per-configured-split table (``split_table``)
and validate it as a second batch with per-split ``expect_column_values_to_be_between`` on its
``fraction`` column; a configured split with no samples still gets a row, so it cannot pass by
being absent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from microseg.config import SplitConfig, ValidateConfig
from microseg.data.expectations import (
    DOCS_SITE,
    INTEGER_DTYPE,
    Failure,
    ephemeral_context,
    failures_of,
    import_gx,
    run_batch,
    scrub_text,
)
from microseg.data.manifest import COLUMNS, MANIFEST_NAME, read_manifest
from microseg.errors import ValidationFailed
from microseg.utils.atomic import atomic_path
from microseg.utils.convert import jsonable

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
RESULT_NAME = "result.json"
DOCS_DIR = "data_docs"
#: columns GE reports for each failing row, so a failure names the offending file
INDEX_COLUMNS: tuple[str, ...] = ("sample_id", "image_path")
#: columns that must be filled in for every sample (GE's value checks skip nulls)
NOT_NULL: tuple[str, ...] = ("sample_id", "image_path", "label_path", "split", "shape", "dtype")
SHAPE_PATTERN = r"^\d+(?:,\d+)*$"


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of one validation run; the files it points at are already on disk."""

    dataset: str
    success: bool
    n_expectations: int
    n_failed: int
    failures: list[Failure]
    json_path: Path
    html_path: Path
    seconds: float


# ---------------------------------------------------------------------------- the suites


def manifest_expectations(cfg: ValidateConfig) -> list[Expectation]:
    """Per-sample checks on the manifest: schema, identity, statistics and physical units."""
    import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    # "labelled" excludes both "" and missing: pandas' query keeps <NA> rows for `!= ''`
    labelled = Column("label_path").is_not_null() & (Column("label_path") != "")
    vox = cfg.voxel_size_nm
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(COLUMNS), exact_match=False),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL),
        gxe.ExpectColumnValueLengthsToBeBetween(column="sample_id", min_value=1),
        gxe.ExpectColumnValueLengthsToBeBetween(column="image_path", min_value=1),
        # one row per sample: a sample can then not sit in two splits, nor an image twice
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),
        gxe.ExpectColumnValuesToBeUnique(column="image_path"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToMatchRegex(column="shape", regex=SHAPE_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=cfg.allowed_image_dtypes),
        gxe.ExpectColumnValuesToBeBetween(column="n_nonfinite", max_value=0),
        # a constant image carries no signal and breaks percentile normalisation
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="intensity_max", column_B="intensity_min", or_equal=False
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="shape", column_B="label_shape", row_condition=labelled
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_dtype", value_set=cfg.allowed_label_dtypes, row_condition=labelled
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="label_dtype", regex=INTEGER_DTYPE, row_condition=labelled
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="label_min", min_value=0, max_value=0, row_condition=labelled
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_instances", min_value=cfg.instances.min, max_value=cfg.instances.max
        ),
        # GE skips nulls in value checks: sources without a physical size (DSB) pass
        *(
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=vox.min, max_value=vox.max)
            for c in ("voxel_size_z_nm", "voxel_size_y_nm", "voxel_size_x_nm")
        ),
    ]


def split_table(manifest: pd.DataFrame, split: SplitConfig) -> pd.DataFrame:
    """One row per configured split: sample count, observed and configured fraction.

    Splits come from the config, not the data, so an empty split is a row with fraction 0.
    """
    counts = manifest["split"].value_counts(dropna=True)
    total = len(manifest)
    rows = []
    for name in SPLITS:
        n = int(counts.get(name, 0))
        rows.append(
            {
                "split": name,
                "n_samples": n,
                "n_total": total,
                "fraction": n / total if total else 0.0,
                "expected": float(getattr(split, name)),
            }
        )
    return pd.DataFrame(rows)


def split_expectations(split: SplitConfig, tolerance: float) -> list[Expectation]:
    """Each split's fraction within ``tolerance`` of the configured one."""
    import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    out = []
    for name in SPLITS:
        want = float(getattr(split, name))
        out.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="fraction",
                min_value=round(max(0.0, want - tolerance), 6),
                max_value=round(min(1.0, want + tolerance), 6),
                row_condition=Column("split") == name,
            )
        )
    return out


# ---------------------------------------------------------------------------- Data Docs


def _prune_static(docs_dir: Path) -> None:
    """Drop the site's static files that no page or stylesheet names (4 MB of GE demo GIFs).

    The report is a DVC output and an MLflow artifact of every run, so dead weight multiplies.
    """
    static = docs_dir / "static"
    pages = [*docs_dir.rglob("*.html"), *static.rglob("*.css")]
    text = "\n".join(p.read_text(errors="ignore") for p in pages)
    for path in static.rglob("*"):
        if path.is_file() and path.suffix != ".css" and path.name not in text:
            path.unlink()


def _scrub(report_dir: Path) -> None:
    """No wall clock and no random id in the report's bytes: the same manifest gives the same
    report on any machine, so DVC hashes it once (issue 16)."""
    ids: dict[str, str] = {}
    for path in sorted(report_dir.rglob("*")):
        if path.suffix not in (".json", ".html") or not path.is_file():
            continue
        text = path.read_text()
        new = scrub_text(text, ids)
        if new != text:
            path.write_text(new)


# ---------------------------------------------------------------------------- public API


def validate_manifest(
    manifest: pd.DataFrame,
    cfg: ValidateConfig,
    split: SplitConfig | None,
    report_dir: Path,
    dataset: str,
    *,
    source: str | Path = MANIFEST_NAME,
) -> ValidationReport:
    """Run the suites, write ``result.json`` and Data Docs atomically, raise on failure.

    ``split`` is None for formats that carry their own split (d3set, CTC): then only the
    split names are checked, not the fractions. ``source`` names the manifest in messages.
    """
    report_dir = Path(report_dir)
    started = time.perf_counter()
    with atomic_path(report_dir) as tmp:
        tmp.mkdir(parents=True)
        context = ephemeral_context(tmp / DOCS_DIR)
        datasource = context.data_sources.add_pandas("microseg")
        results = {
            "manifest": run_batch(
                context, datasource, "manifest", manifest, manifest_expectations(cfg), INDEX_COLUMNS
            )
        }
        if split is not None and "split" in manifest and len(manifest):
            results["split_fractions"] = run_batch(
                context,
                datasource,
                "split_fractions",
                split_table(manifest, split),
                split_expectations(split, cfg.split_tolerance),
                ("split", "n_samples", "n_total"),
            )
        context.build_data_docs(site_names=[DOCS_SITE])  # both suites and results, one index
        _prune_static(tmp / DOCS_DIR)
        failures = [f for batch, res in results.items() for f in failures_of(batch, res)]
        n_expectations = sum(len(res.results) for res in results.values())
        seconds = time.perf_counter() - started
        summary = {
            "dataset": dataset,
            "source": str(source),
            "success": not failures,
            "n_rows": len(manifest),
            "n_expectations": n_expectations,
            "n_failed": len(failures),
            "failures": [
                {**asdict(f), "signature": f.signature, "message": f.describe()} for f in failures
            ],
            "great_expectations": {b: r.to_json_dict() for b, r in results.items()},
        }
        (tmp / RESULT_NAME).write_text(json.dumps(jsonable(summary, default=str), indent=2) + "\n")
        _scrub(tmp)
    report = ValidationReport(
        dataset=dataset,
        success=not failures,
        n_expectations=n_expectations,
        n_failed=len(failures),
        failures=failures,
        json_path=report_dir / RESULT_NAME,
        html_path=report_dir / DOCS_DIR / "index.html",
        seconds=seconds,
    )
    logger.info(
        "validated %s (%d rows): %d/%d expectations passed in %.2f s; report %s",
        dataset,
        len(manifest),
        n_expectations - len(failures),
        n_expectations,
        seconds,
        report.html_path,
    )
    if failures:
        lines = [f"  - {f.describe()}" for f in failures]
        raise ValidationFailed(
            f"{len(failures)} of {n_expectations} expectations failed "
            f"(report: {report.json_path}, {report.html_path}):\n" + "\n".join(lines),
            source,
        )
    return report


def validate_dataset(
    prepared_dir: Path,
    cfg: ValidateConfig,
    split: SplitConfig | None,
    report_dir: Path,
    dataset: str,
) -> ValidationReport:
    """Validate ``prepared_dir/manifest.parquet`` (written by ``ingest``)."""
    manifest = read_manifest(prepared_dir)
    return validate_manifest(
        manifest, cfg, split, report_dir, dataset, source=Path(prepared_dir) / MANIFEST_NAME
    )
