"""One Great Expectations context per batch evaluation, its failures keyed by file.

Inputs and outputs are each validated as their own table; a failing row names the file it
came from, so a bad file is reported and skipped rather than ending the batch.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from microseg.data.expectations import (
    Failure,
    ephemeral_context,
    failures_of,
    format_value,
    run_batch,
)
from microseg.errors import MicrosegError
from microseg.utils.convert import jsonable

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

INDEX_COLUMNS = ("sample_id", "image_path")


class Validator:
    """One ephemeral GE context for the run; each table is its own suite and checkpoint."""

    def __init__(self) -> None:
        self._docs = tempfile.TemporaryDirectory(prefix="microseg-ge-")
        self.context = ephemeral_context(Path(self._docs.name))
        self.datasource = self.context.data_sources.add_pandas("batch_eval")

    def run(
        self, name: str, frame: pd.DataFrame, expectations: list[Expectation]
    ) -> tuple[dict[str, list[str]], list[Failure], dict[str, Any]]:
        """``({file name: [reasons]}, failures, GE result JSON)`` for one table."""
        result = run_batch(self.context, self.datasource, name, frame, expectations, INDEX_COLUMNS)
        failures = failures_of(name, result)
        by_file: dict[str, list[str]] = {}
        for f in failures:
            if f.exception or not f.rows:
                raise MicrosegError(f"{name} validation could not judge the files: {f.describe()}")
            for row in f.rows:
                values = ", ".join(f"{c}={format_value(row[c])}" for c in f.columns if c in row)
                reason = f"{f.signature} failed (observed {values})"
                by_file.setdefault(Path(str(row["image_path"])).name, []).append(reason)
        return by_file, failures, jsonable(result.to_json_dict(), default=str)

    def close(self) -> None:
        self._docs.cleanup()


def failure_records(failures: list[Failure]) -> list[dict[str, Any]]:
    return [{**asdict(f), "signature": f.signature, "message": f.describe()} for f in failures]
