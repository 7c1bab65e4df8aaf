"""Great Expectations suite over the manifest: bad data stops the pipeline before training.

The ``validate`` stage runs this on ``data/prepared/<dataset>/manifest.parquet``. Every check is
a GE 1.x expectation built in code and run through an ephemeral context (pandas data source →
dataframe asset → whole-dataframe batch definition → suite → validation definition →
checkpoint), so the HTML Data Docs and the JSON result describe exactly what was enforced.

Split fractions are a property of the table, not of a row, and GE has no expectation for
"fraction of rows per value". We derive a one-row-per-configured-split table (``split_table``)
and validate it as a second batch with per-split ``expect_column_values_to_be_between`` on its
``fraction`` column; a configured split with no samples still gets a row, so it cannot pass by
being absent.

GE is imported lazily (it costs seconds), and its usage statistics are switched off both by
environment and in the context config: the stage must run offline.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from microseg.config import SplitConfig, ValidateConfig
from microseg.data.manifest import COLUMNS, MANIFEST_NAME, read_manifest
from microseg.errors import ValidationFailed
from microseg.utils.atomic import atomic_path
from microseg.utils.convert import jsonable

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
    )
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.datasource.fluent import PandasDatasource
    from great_expectations.expectations import Expectation

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
RESULT_NAME = "result.json"
DOCS_DIR = "data_docs"
DOCS_SITE = "microseg"
#: columns GE reports for each failing row, so a failure names the offending file
INDEX_COLUMNS: tuple[str, ...] = ("sample_id", "image_path")
#: failing rows spelled out per expectation in the exception message (all are in the JSON)
MAX_SHOWN = 5
#: columns that must be filled in for every sample (GE's value checks skip nulls)
NOT_NULL: tuple[str, ...] = ("sample_id", "image_path", "label_path", "split", "shape", "dtype")
INTEGER_DTYPE = r"^u?int(?:8|16|32|64)$"  # no capture groups: pandas warns on them
SHAPE_PATTERN = r"^\d+(?:,\d+)*$"
_BOUND_NAMES = {"min_value": "min", "max_value": "max", "value_set": "set", "regex": "regex"}
_COLUMN_KEYS = ("column", "column_A", "column_B")


@dataclass(frozen=True)
class Failure:
    """One failed expectation, with the rows (files) that broke it."""

    batch: str  # "manifest" or "split_fractions"
    expectation: str
    columns: list[str]
    bounds: dict[str, Any]
    condition: str  # human-readable row condition, "" when the check covers every row
    observed: Any  # table-level observed value; None for per-row checks
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_unexpected: int | None = None
    exception: str | None = None

    @property
    def signature(self) -> str:
        """``expect_column_values_to_be_between(n_nonfinite, max=0)``: what was demanded."""
        args = [*self.columns, *(f"{k}={_fmt(v)}" for k, v in self.bounds.items())]
        text = f"{self.expectation}({', '.join(args)})"
        return f"{text} where {self.condition}" if self.condition else text

    def describe(self, max_rows: int = MAX_SHOWN) -> str:
        """One line that names the expectation, the offending files and what was found."""
        if self.exception:
            return f"{self.signature} could not run ({self.exception})"
        if not self.rows:
            return f"{self.signature} failed (observed {_fmt(self.observed)})"
        shown = [f"{_row_name(r)} (observed {self._observed(r)})" for r in self.rows[:max_rows]]
        more = (self.n_unexpected or len(self.rows)) - len(shown)
        tail = f" and {more} more" if more > 0 else ""
        return f"{self.signature} failed for {', '.join(shown)}{tail}"

    def _observed(self, row: dict[str, Any]) -> str:
        """The checked value(s) of one failing row."""
        values = {c: row[c] for c in self.columns if c in row}
        if len(values) == 1:
            text = _fmt(next(iter(values.values())))
        else:
            text = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        if "n_samples" in row:  # a row of the split table
            text += f", {row['n_samples']} of {row.get('n_total')} samples"
        return text


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
    _import_gx()
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
    _import_gx()
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


# ---------------------------------------------------------------------------- running GE


def _import_gx() -> None:
    """Import GE offline and quietly: analytics off, its import-time INFO chatter muted."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read by GE versions that ship analytics
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # leave a level someone chose on purpose
        gx_logger.setLevel(logging.WARNING)
    import great_expectations  # noqa: F401


def _ephemeral_context(docs_dir: Path) -> EphemeralDataContext:
    """In-memory stores, one file-backed Data Docs site, no analytics, no progress bars."""
    _import_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # init_temp_docs_sites=False: no default site in a stray temp dir, only ours
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_batch(
    context: EphemeralDataContext,
    datasource: PandasDatasource,
    name: str,
    frame: pd.DataFrame,
    expectations: Iterable[Expectation],
    index_columns: Sequence[str],
) -> ExpectationSuiteValidationResult:
    """Validate ``frame`` as its own asset and suite through its own checkpoint.

    One checkpoint per batch: ``Checkpoint.run`` hands the same ``batch_parameters`` (our
    dataframe) to every validation definition it holds, so two tables need two checkpoints.
    They carry no ``UpdateDataDocsAction``: the caller builds the docs once for both results,
    which saves a second full render (~0.1 s of jinja per build).
    """
    import great_expectations as gx

    batch = datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[],
            result_format={
                "result_format": "COMPLETE",
                # GE errors on index columns the frame lacks; the column-set check reports them
                "unexpected_index_column_names": [c for c in index_columns if c in frame],
                "return_unexpected_index_query": False,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


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


def _failures(batch: str, result: ExpectationSuiteValidationResult) -> list[Failure]:
    """Turn GE's result objects into our flat, JSON-friendly failure records."""
    out = []
    for r in result.results:
        if r.success:
            continue
        kwargs = dict(r.expectation_config.kwargs)
        res = jsonable(dict(r.result or {}), default=str)
        info = r.exception_info or {}
        exception = None
        if info.get("raised_exception"):
            exception = info.get("exception_message")
        elif info and "raised_exception" not in info:  # {metric_id: ExceptionInfo} form
            messages = [getattr(v, "exception_message", None) for v in info.values()]
            exception = "; ".join(dict.fromkeys(m for m in messages if m)) or None
        columns = [str(kwargs[k]) for k in _COLUMN_KEYS if kwargs.get(k) is not None]
        bounds = {
            _BOUND_NAMES[k]: jsonable(v, default=str)
            for k, v in kwargs.items()
            if k in _BOUND_NAMES and v is not None
        }
        observed: Any = res.get("observed_value")
        if r.expectation_config.type == "expect_table_columns_to_match_set":
            bounds = {"required": "manifest.COLUMNS"}
            missing = (res.get("details") or {}).get("mismatched", {}).get("missing", [])
            observed = f"missing columns: {', '.join(missing)}"
        out.append(
            Failure(
                batch=batch,
                expectation=r.expectation_config.type,
                columns=columns,
                bounds=bounds,
                condition=_condition_text(kwargs.get("row_condition")),
                observed=observed,
                rows=list(res.get("unexpected_index_list") or []),
                n_unexpected=res.get("unexpected_count"),
                exception=exception,
            )
        )
    return out


def _condition_text(cond: Any) -> str:
    """``label_path is not null and label_path != ''`` from a GE Condition (object or dict)."""
    if cond is None:
        return ""
    if hasattr(cond, "dict"):
        cond = cond.dict()
    if isinstance(cond, str):
        return cond
    kind = cond.get("type")
    if kind == "comparison":
        return f"{cond['column']['name']} {cond['operator']} {cond['parameter']!r}"
    if kind == "nullity":
        return f"{cond['column']['name']} is {'' if cond['is_null'] else 'not '}null"
    if kind in ("and", "or"):
        return f" {kind} ".join(_condition_text(c) for c in cond["conditions"])
    return str(cond.get("pass_through_filter", cond))


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
        context = _ephemeral_context(tmp / DOCS_DIR)
        datasource = context.data_sources.add_pandas("microseg")
        results = {
            "manifest": _run_batch(
                context, datasource, "manifest", manifest, manifest_expectations(cfg), INDEX_COLUMNS
            )
        }
        if split is not None and "split" in manifest and len(manifest):
            results["split_fractions"] = _run_batch(
                context,
                datasource,
                "split_fractions",
                split_table(manifest, split),
                split_expectations(split, cfg.split_tolerance),
                ("split", "n_samples", "n_total"),
            )
        context.build_data_docs(site_names=[DOCS_SITE])  # both suites and results, one index
        _prune_static(tmp / DOCS_DIR)
        failures = [f for batch, res in results.items() for f in _failures(batch, res)]
        n_expectations = sum(len(res.results) for res in results.values())
        seconds = time.perf_counter() - started
        summary = {
            "dataset": dataset,
            "source": str(source),
            "success": not failures,
            "n_rows": len(manifest),
            "n_expectations": n_expectations,
            "n_failed": len(failures),
            "seconds": round(seconds, 3),
            "failures": [
                {**asdict(f), "signature": f.signature, "message": f.describe()} for f in failures
            ],
            "great_expectations": {b: r.to_json_dict() for b, r in results.items()},
        }
        (tmp / RESULT_NAME).write_text(json.dumps(jsonable(summary, default=str), indent=2) + "\n")
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


# ---------------------------------------------------------------------------- formatting


def _row_name(row: dict[str, Any]) -> str:
    """The file a failing row stands for: image path, else sample id, else its key values."""
    for key in ("image_path", "sample_id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    if "split" in row:
        return f"split={row['split']}"
    return "row"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value else "''"
    if value is None or value is pd.NA:
        return "null"
    return str(value)
