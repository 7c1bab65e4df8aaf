"""The Great Expectations runner shared by manifest validation and batch evaluation.

Both judge a pandas table with a suite built in code and want the same things from GE: an
offline, in-memory context, one checkpoint per table, and failures as flat records that name
the offending file. This module is that engine; the suites themselves stay with their callers
(:mod:`microseg.data.validate`, :mod:`microseg.registry.batch_inputs`).

GE is imported lazily (it costs seconds), and its usage statistics are switched off both by
environment and in the context config: the stages must run offline.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from microseg.utils.convert import jsonable

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
    )
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.datasource.fluent import PandasDatasource
    from great_expectations.expectations import Expectation

DOCS_SITE = "microseg"
#: failing rows spelled out per expectation in the exception message (all are in the JSON)
MAX_SHOWN = 5
INTEGER_DTYPE = r"^u?int(?:8|16|32|64)$"  # no capture groups: pandas warns on them
_BOUND_NAMES = {"min_value": "min", "max_value": "max", "value_set": "set", "regex": "regex"}
_COLUMN_KEYS = ("column", "column_A", "column_B")


@dataclass(frozen=True)
class Failure:
    """One failed expectation, with the rows (files) that broke it."""

    batch: str  # the table's name: "manifest", "split_fractions", "inputs", "outputs"
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
        args = [*self.columns, *(f"{k}={format_value(v)}" for k, v in self.bounds.items())]
        text = f"{self.expectation}({', '.join(args)})"
        return f"{text} where {self.condition}" if self.condition else text

    def describe(self, max_rows: int = MAX_SHOWN) -> str:
        """One line that names the expectation, the offending files and what was found."""
        if self.exception:
            return f"{self.signature} could not run ({self.exception})"
        if not self.rows:
            return f"{self.signature} failed (observed {format_value(self.observed)})"
        shown = [f"{_row_name(r)} (observed {self._observed(r)})" for r in self.rows[:max_rows]]
        more = (self.n_unexpected or len(self.rows)) - len(shown)
        tail = f" and {more} more" if more > 0 else ""
        return f"{self.signature} failed for {', '.join(shown)}{tail}"

    def _observed(self, row: dict[str, Any]) -> str:
        """The checked value(s) of one failing row."""
        values = {c: row[c] for c in self.columns if c in row}
        if len(values) == 1:
            text = format_value(next(iter(values.values())))
        else:
            text = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
        if "n_samples" in row:  # a row of the split table
            text += f", {row['n_samples']} of {row.get('n_total')} samples"
        return text


def import_gx() -> None:
    """Import GE offline and quietly: analytics off, its import-time INFO chatter muted."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read by GE versions that ship analytics
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # leave a level someone chose on purpose
        gx_logger.setLevel(logging.WARNING)
    import great_expectations  # noqa: F401


def ephemeral_context(docs_dir: Path) -> EphemeralDataContext:
    """In-memory stores, one file-backed Data Docs site, no analytics, no progress bars."""
    import_gx()
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


#: the run time every report carries: the report is a DVC output, so it holds no wall clock
#: (the stage's MLflow run records when it ran)
FIXED_RUN_TIME = "2000-01-01T00:00:00+00:00"


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMES = (  # GE's batch load time and any clock time that escaped the fixed run id
    (re.compile(r"\d{8}T\d{6}\.\d{6}Z"), "20000101T000000.000000Z"),
    (re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(\+00:00|Z)?"), FIXED_RUN_TIME),
)


def scrub_text(text: str, ids: dict[str, str]) -> str:
    """GE's output without its clock and random ids: uuid4s become ids numbered in the order
    they first appear (``ids`` carries the numbering across the files of one report), times
    become :data:`FIXED_RUN_TIME`. Reports are DVC outputs; MLflow keeps when they ran."""

    def stable(m: re.Match[str]) -> str:
        return ids.setdefault(m.group(0), str(uuid.uuid5(uuid.NAMESPACE_OID, str(len(ids)))))

    text = _UUID.sub(stable, text)
    for pattern, fixed in _TIMES:
        text = pattern.sub(fixed, text)
    return text


def fixed_run_id() -> Any:
    """GE's run identifier with a fixed name and time (it names the Data Docs pages)."""
    from datetime import datetime

    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name="microseg", run_time=datetime.fromisoformat(FIXED_RUN_TIME))


def run_batch(
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
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=fixed_run_id())
    return next(iter(result.run_results.values()))


def failures_of(batch: str, result: ExpectationSuiteValidationResult) -> list[Failure]:
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


def _row_name(row: dict[str, Any]) -> str:
    """The file a failing row stands for: image path, else sample id, else its key values."""
    for key in ("image_path", "sample_id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    if "split" in row:
        return f"split={row['split']}"
    return "row"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value else "''"
    if value is None or value is pd.NA:
        return "null"
    return str(value)
