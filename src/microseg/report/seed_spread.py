"""``metrics/seeds.json``, the committed seed spread of the nuclei models, as the report reads
it. Written by :mod:`microseg.stages.seeds` (``microseg seeds``); kept here so the report
stage can read it without the stage that trains the seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_NAME = "seeds.json"


def read_spread(path: Path) -> dict[str, Any] | None:
    """The committed ``metrics/seeds.json`` (None when there is none)."""
    return json.loads(path.read_text()) if path.is_file() else None


def seed_differences(spread: Mapping[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """``(model, baseline, group) -> per-seed mean differences`` of a ``metrics/seeds.json``,
    what the benchmark report needs to hold a claim to the seed spread."""
    baseline = str(spread.get("baseline", ""))
    return {
        (model, baseline, group): [float(v) for v in stats["diff"]["per_seed"]]
        for model, row in spread.get("models", {}).items()
        for group, stats in row.get("groups", {}).items()
        if "diff" in stats
    }
