"""A lab's own data in the pipeline: ``microseg dataset add``, ``verify`` and ``list``.

``add`` writes a ``datasets.<name>`` entry into ``params.yaml`` (comments kept, validated
before writing, atomic); ``dvc.yaml`` ingests and validates every entry (``foreach``), and
``--use`` points the task's stages (``cells.dataset``, ``spines.dataset``,
``tracking.dataset``) at it, so the next ``dvc repro`` trains and scores on it.

``verify`` is nnU-Net's ``--verify_dataset_integrity``: ingest into a scratch folder and run
the Great Expectations suites, then print what was found and every problem in one report,
without touching the pipeline's outputs.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microseg.config import DatasetConfig, Params
from microseg.errors import ConfigError, MicrosegError, MissingFileError, ValidationFailed
from microseg.utils.atomic import write_text

#: what ``--task`` selects: the params key naming the task's dataset
TASK_KEYS = {"nuclei": ("cells", "dataset"), "spines": ("spines", "dataset"),
             "tracking": ("tracking", "dataset")}  # fmt: skip
#: ``--format`` spellings users know -> the ingester's name
FORMAT_ALIASES = {"d3set": "synthetic_spines"}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def check_name(name: str) -> str:
    """A dataset name becomes a folder (``data/prepared/<name>``) and a DVC stage key:
    lower-case letters, digits, ``_`` and ``-`` only (no path tricks)."""
    if not name or not set(name) <= NAME_CHARS or name[0] in "-_":
        raise ConfigError(
            f"dataset name {name!r}: use lower-case letters, digits, '_' and '-' "
            "(it names data/prepared/<name> and the DVC stages ingest@<name>)"
        )
    return name


def dataset_entry(
    task: str,
    fmt: str,
    source: str | Path,
    *,
    split: tuple[float, float, float] | None = None,
    voxel_size_nm: tuple[float, float, float] | None = None,
    mask_kind: str | None = None,
    annotations: str | Path | None = None,
    channel: int | str | None = None,
) -> dict[str, Any]:
    """The ``datasets.<name>`` mapping, checked by the same model the stages load."""
    entry: dict[str, Any] = {
        "format": FORMAT_ALIASES.get(fmt, fmt),
        "source": str(source),
        "task": task,
    }
    if split is not None:
        entry["split"] = dict(zip(("train", "val", "test"), (float(v) for v in split), strict=True))
    if voxel_size_nm is not None:
        entry["voxel_size_nm"] = [float(v) for v in voxel_size_nm]
    if mask_kind is not None:
        entry["mask_kind"] = mask_kind
    if annotations is not None:
        entry["annotations"] = str(annotations)
    if channel is not None:
        entry["channel"] = int(channel) if str(channel).isdigit() else str(channel)
    try:
        DatasetConfig.model_validate(entry)
    except Exception as exc:  # pydantic's message lists each bad field
        raise ConfigError(f"dataset entry is not valid: {exc}") from None
    return entry


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 100
    return y


def add_dataset(
    params_path: Path,
    name: str,
    entry: dict[str, Any],
    *,
    use: bool = False,
    replace: bool = False,
) -> list[str]:
    """Write ``datasets.<name>`` (and with ``use`` the task's dataset key) into
    ``params_path``; returns the dotted keys written. The whole file is validated first."""
    import yaml

    check_name(name)
    if not params_path.is_file():
        raise MissingFileError("params file not found", params_path)
    source = Path(entry["source"])
    if not source.exists():
        raise MissingFileError("dataset source not found", source)
    y = _yaml()
    doc = y.load(params_path.read_text())
    datasets = doc.setdefault("datasets", {})
    if name in datasets and not replace:
        raise ConfigError(f"dataset {name!r} already exists in {params_path} (--replace)")
    datasets[name] = entry
    written = [f"datasets.{name}"]
    if use:
        section, key = TASK_KEYS[entry["task"]]
        doc.setdefault(section, {})[key] = name
        written.append(f"{section}.{key}")
    buf = io.StringIO()
    y.dump(doc, buf)
    Params.model_validate(yaml.safe_load(buf.getvalue()))
    write_text(params_path, buf.getvalue())
    return written


@dataclass
class VerifyReport:
    """What ``verify`` found: the dataset's shape and every problem, ingest's or GX's."""

    name: str
    ok: bool
    n_samples: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    instances: tuple[int, float, int] | None = None  # min, mean, max per sample
    voxel_sizes: dict[str, int] = field(default_factory=dict)
    n_expectations: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The readable report ``microseg dataset verify`` prints."""
        out = [f"dataset {self.name}: {self.n_samples} samples"]

        def counts(title: str, c: dict[str, int]) -> None:
            if c:
                out.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in c.items()))

        counts("splits", self.splits)
        counts("modalities", self.modalities)
        counts("image dtypes", self.dtypes)
        counts("image shapes", self.shapes)
        counts("voxel size (nm)", self.voxel_sizes)
        if self.instances is not None:
            lo, mean, hi = self.instances
            out.append(f"  instances per sample: min {lo}, mean {mean:.1f}, max {hi}")
        if self.n_expectations:
            n_bad = sum(p.startswith("expectation") for p in self.problems)
            out.append(f"  Great Expectations: {self.n_expectations - n_bad} of "
                       f"{self.n_expectations} checks passed")  # fmt: skip
        out += [f"  problem: {p}" for p in self.problems]
        out.append("  OK: the pipeline can use it" if self.ok else "  NOT OK: fix the above")
        return out


def _top(values: Any, n: int = 5) -> dict[str, int]:
    return {str(k): int(v) for k, v in Counter(values).most_common(n)}


def verify_dataset(params: Params, name: str, report_dir: Path | None = None) -> VerifyReport:
    """Ingest ``name`` into a scratch folder and run the data checks; the pipeline's own
    ``data/prepared`` and ``reports/validation`` stay untouched. ``report_dir`` keeps the
    Great Expectations report (Data Docs) when given."""
    from microseg.data.ingest import ingest
    from microseg.data.manifest import read_manifest
    from microseg.data.validate import validate_manifest
    from microseg.stages.data import RATIO_SPLIT_FORMATS, dataset_config

    cfg = dataset_config(params, check_name(name))
    report = VerifyReport(name, ok=False)
    scratch = Path(tempfile.mkdtemp(prefix=f"microseg-verify-{name}-"))
    try:
        try:
            prepared = ingest(name, cfg, scratch, params.seed)
        except MicrosegError as exc:
            report.problems.append(f"ingest: {exc}")
            return report
        m = read_manifest(prepared)
        report.n_samples = len(m)
        report.splits = _top(m["split"], 10)
        if "modality" in m:
            report.modalities = _top(m["modality"].fillna("unknown"))
        report.dtypes = _top(m["dtype"])
        report.shapes = _top(m["shape"])
        if "n_instances" in m and m["n_instances"].notna().any():
            n = m["n_instances"].dropna()
            report.instances = (int(n.min()), float(n.mean()), int(n.max()))
        vox = m[["voxel_size_z_nm", "voxel_size_y_nm", "voxel_size_x_nm"]]
        if vox.notna().any().any():
            report.voxel_sizes = _top(vox.astype(str).agg(",".join, axis=1))
        split = cfg.split if cfg.format in RATIO_SPLIT_FORMATS else None
        target = report_dir or scratch / "validation"
        try:
            result = validate_manifest(m, params.validate_, split, target, name)
            report.n_expectations = result.n_expectations
        except ValidationFailed as exc:
            import json

            summary = json.loads((target / "result.json").read_text())
            report.n_expectations = int(summary["n_expectations"])
            report.problems += [f"expectation {f['message']}" for f in summary["failures"]]
            report.problems = report.problems or [f"expectation failed: {exc}"]
            return report
        report.ok = not report.problems
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def list_datasets(params: Params) -> list[dict[str, Any]]:
    """One row per ``datasets`` entry, with the task stages that use it."""
    used = {params.cells.dataset: "nuclei", params.spines.dataset: "spines",
            params.tracking.dataset: "tracking"}  # fmt: skip
    return [
        {
            "name": n,
            "task": d.task,
            "format": d.format,
            "source": str(d.source),
            "used_by": used.get(n, ""),
        }
        for n, d in params.datasets.items()
    ]
