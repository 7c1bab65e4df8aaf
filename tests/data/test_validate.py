"""The GE suite passes a clean manifest and names file, expectation and value for each bad one.

GE costs seconds to import but well under one per validation, so every test runs its own
validation on a copy of one shared, hand-made 150-row manifest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from microseg.config import SplitConfig, ValidateConfig
from microseg.data.manifest import normalise, write_manifest
from microseg.data.validate import (
    DOCS_DIR,
    RESULT_NAME,
    split_table,
    validate_dataset,
    validate_manifest,
)
from microseg.errors import ValidationFailed

N_ROWS = 150
CFG = ValidateConfig()
SPLIT = SplitConfig(train=0.7, val=0.15, test=0.15)
#: 14 train, 3 val, 3 test in every 20 rows: 0.72 / 0.14 / 0.14 over 150 rows
SPLIT_PATTERN = ["train"] * 14 + ["val"] * 3 + ["test"] * 3


def _rows(n: int = N_ROWS) -> list[dict]:
    """Realistic rows: every 10th sample unlabelled, every 3rd without physical voxel size."""
    rows = []
    for i in range(n):
        labelled = i % 10 != 0
        voxel = float("nan") if i % 3 == 0 else 250.0
        rows.append(
            {
                "sample_id": f"s{i:03d}",
                "dataset": "toy",
                "task": "nuclei",
                "split": SPLIT_PATTERN[i % 20],
                "image_path": f"images/s{i:03d}.tif",
                "label_path": f"labels/s{i:03d}.tif" if labelled else "",
                "label_kind": "instance" if labelled else "none",
                "axes": "YX",
                "shape": "256,320",
                "label_shape": "256,320" if labelled else "",
                "dtype": "uint8" if i % 2 else "uint16",
                "label_dtype": "uint16" if labelled else "",
                "channels": 1,
                "voxel_size_y_nm": voxel,
                "voxel_size_x_nm": voxel,
                "intensity_min": 3.0,
                "intensity_p1": 5.0,
                "intensity_p50": 40.0,
                "intensity_p99": 200.0,
                "intensity_max": 250.0 + i,
                "n_nonfinite": 0,
                "label_min": 0,
                "label_max": 12 if labelled else 0,
                "n_instances": 12 if labelled else 0,
                "source_path": f"raw/s{i:03d}.png",
                "source_md5": f"{i:032x}",
                "modality": "fluorescence",
            }
        )
    return rows


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    return normalise(_rows())


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple]]:
    """Record and refuse every connection attempt; each test then asserts there were none."""
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"validation tried to reach the network: {attempts}"


def _failed(report_dir: Path) -> dict:
    data = json.loads((report_dir / RESULT_NAME).read_text())
    assert data["success"] is False
    return data


def test_network_guard_catches_a_connection(no_network: list[tuple]) -> None:
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1
    no_network.clear()  # the attempt was ours, not GE's


def test_good_manifest_passes_and_writes_json_and_data_docs(
    good: pd.DataFrame, tmp_path: Path
) -> None:
    report_dir = tmp_path / "reports" / "validation" / "toy"
    report = validate_manifest(good, CFG, SPLIT, report_dir, "toy")

    assert report.success and report.n_failed == 0 and report.failures == []
    assert report.n_expectations >= 25
    assert report.seconds > 0  # timing is measured (speed itself: benchmarks, not tests)
    data = json.loads(report.json_path.read_text())
    assert report.json_path == report_dir / RESULT_NAME
    assert data["success"] is True and data["n_rows"] == N_ROWS
    assert data["n_expectations"] == report.n_expectations
    ge = data["great_expectations"]
    assert set(ge) == {"manifest", "split_fractions"}
    assert all(r["success"] for r in ge.values())
    assert sum(len(r["results"]) for r in ge.values()) == report.n_expectations

    assert report.html_path == report_dir / DOCS_DIR / "index.html"
    index = report.html_path.read_text()
    assert len(index) > 5_000 and "manifest" in index and "split_fractions" in index
    pages = sorted(p.name for p in (report_dir / DOCS_DIR / "validations").rglob("*.html"))
    assert len(pages) == 2, pages
    size = sum(p.stat().st_size for p in report_dir.rglob("*") if p.is_file())
    assert size < 1_000_000, "unreferenced GE demo assets should have been pruned"
    assert (report_dir / DOCS_DIR / "static" / "images" / "favicon.ico").is_file()
    # atomic write: only the finished report folder is left, no temporary siblings
    assert sorted(p.name for p in report_dir.parent.iterdir()) == ["toy"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_manifest_same_report_bytes(good: pd.DataFrame, tmp_path: Path) -> None:
    """Another folder, another second: the same files, byte for byte (no GE run time, load
    time or uuid4 left), so DVC hashes one report on every machine."""
    first = validate_manifest(good, CFG, SPLIT, tmp_path / "a" / "toy", "toy")
    time.sleep(1.1)
    second = validate_manifest(good, CFG, SPLIT, tmp_path / "b" / "toy", "toy")
    digest = _digest(tmp_path / "a" / "toy")
    assert digest == _digest(tmp_path / "b" / "toy")
    assert len(digest) >= 4 and first.seconds > 0 and second.seconds > 0
    text = first.json_path.read_text() + first.html_path.read_text()
    assert str(datetime.date.today().year) not in text.replace("2000-01-01", "")
    # a different manifest is a different report
    other = good.copy()
    other.loc[3, "intensity_max"] = 999.0
    validate_manifest(other, CFG, SPLIT, tmp_path / "c" / "toy", "toy")
    assert _digest(tmp_path / "c" / "toy") != digest


def test_validate_dataset_reads_the_prepared_manifest(good: pd.DataFrame, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared" / "toy"
    bad = good.copy()
    bad.loc[5, "n_nonfinite"] = 12
    bad.loc[11, "voxel_size_x_nm"] = 1.0
    write_manifest(bad, prepared)
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(prepared, CFG, SPLIT, tmp_path / "report", "toy")
    message = str(err.value)
    assert message.startswith(f"{prepared / 'manifest.parquet'}: 2 of ")
    assert err.value.path == prepared / "manifest.parquet"
    # the exact lines: expectation with its bounds, offending file, observed value
    lines = {line.strip() for line in message.splitlines()[1:]}
    assert lines == {
        "- expect_column_values_to_be_between(n_nonfinite, max=0) "
        "failed for images/s005.tif (observed 12)",
        "- expect_column_values_to_be_between(voxel_size_x_nm, min=10, max=5000) "
        "failed for images/s011.tif (observed 1)",
    }


def _set(row: int, **values: object) -> Callable[[pd.DataFrame], None]:
    def mutate(df: pd.DataFrame) -> None:
        for col, value in values.items():
            df.loc[row, col] = value

    return mutate


def _no_val(df: pd.DataFrame) -> None:
    df.loc[df["split"] == "val", "split"] = "train"


BETWEEN = "expect_column_values_to_be_between"

# (case, mutation, {(expectation, first column)} that must fail, offending name, observed)
BAD_CASES = [
    ("nan", _set(5, n_nonfinite=12), {(BETWEEN, "n_nonfinite")}, "images/s005.tif", "12"),
    (
        "constant_image",
        _set(9, intensity_min=7.0, intensity_max=7.0),
        {("expect_column_pair_values_a_to_be_greater_than_b", "intensity_max")},
        "images/s009.tif",
        "intensity_max=7, intensity_min=7",
    ),
    (
        "shape_mismatch",
        _set(7, label_shape="256,319"),
        {("expect_column_pair_values_to_be_equal", "shape")},
        "images/s007.tif",
        "shape=256,320, label_shape=256,319",
    ),
    ("label_min", _set(12, label_min=3), {(BETWEEN, "label_min")}, "images/s012.tif", "3"),
    (
        "image_dtype",
        _set(13, dtype="float64"),
        {("expect_column_values_to_be_in_set", "dtype")},
        "images/s013.tif",
        "float64",
    ),
    (
        "label_dtype",
        _set(14, label_dtype="float32"),
        {
            ("expect_column_values_to_be_in_set", "label_dtype"),
            ("expect_column_values_to_match_regex", "label_dtype"),
        },
        "images/s014.tif",
        "float32",
    ),
    (
        "duplicate_sample_id",
        _set(8, sample_id="s009"),
        {("expect_column_values_to_be_unique", "sample_id")},
        "images/s008.tif",
        "s009",
    ),
    (
        "duplicate_image",
        _set(8, image_path="images/s009.tif"),
        {("expect_column_values_to_be_unique", "image_path")},
        "images/s009.tif",
        "images/s009.tif",
    ),
    (
        "split_fractions",
        _no_val,
        {(BETWEEN, "fraction")},
        "split=val",
        "0, 0 of 150 samples",
    ),
    (
        "split_name",
        _set(4, split="holdout"),
        {("expect_column_values_to_be_in_set", "split")},
        "images/s004.tif",
        "holdout",
    ),
    (
        "voxel_size",
        _set(11, voxel_size_x_nm=1.0),
        {(BETWEEN, "voxel_size_x_nm")},
        "images/s011.tif",
        "1",
    ),
    (
        "instances",
        _set(16, n_instances=9000),
        {(BETWEEN, "n_instances")},
        "images/s016.tif",
        "9000",
    ),
    (
        "null_sample_id",
        _set(17, sample_id=pd.NA),
        {("expect_column_values_to_not_be_null", "sample_id")},
        "images/s017.tif",
        "null",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected", "offender", "observed"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CASES],
)
def test_bad_manifest_fails_naming_file_expectation_and_value(
    good: pd.DataFrame,
    tmp_path: Path,
    mutate: Callable[[pd.DataFrame], None],
    expected: set[tuple[str, str]],
    offender: str,
    observed: str,
) -> None:
    bad = good.copy()
    mutate(bad)
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(bad, CFG, SPLIT, tmp_path, "toy")

    message = str(err.value)
    data = _failed(tmp_path)
    assert message.startswith(f"manifest.parquet: {data['n_failed']} of ")
    lines = [line for line in message.splitlines()[1:] if offender in line]
    assert lines, message
    assert any(f"{offender} (observed {observed}" in line for line in lines), message
    for expectation, column in expected:
        assert any(f"{expectation}({column}" in line for line in lines), message

    assert {(f["expectation"], f["columns"][0]) for f in data["failures"]} == expected
    assert data["n_failed"] == len(data["failures"])
    names = {
        row.get("image_path") or f"split={row.get('split')}"
        for f in data["failures"]
        for row in f["rows"]
    }
    assert offender in names
    assert (tmp_path / DOCS_DIR / "index.html").is_file()


def test_unlabelled_rows_and_missing_voxel_sizes_are_exempt(
    good: pd.DataFrame, tmp_path: Path
) -> None:
    df = good.copy()
    unlabelled = df.index[df["label_path"] == ""]
    assert len(unlabelled) and df["voxel_size_x_nm"].isna().any()
    # shape, dtype and background of a label that does not exist are not checked
    df.loc[unlabelled, ["label_min", "label_shape", "label_dtype"]] = [5, "1,1", "float32"]
    assert validate_manifest(df, CFG, SPLIT, tmp_path, "toy").success


def test_split_fractions_are_skipped_when_the_format_carries_its_split(
    good: pd.DataFrame, tmp_path: Path
) -> None:
    df = good.copy()
    _no_val(df)
    report = validate_manifest(df, CFG, None, tmp_path, "toy")
    assert report.success
    assert set(json.loads(report.json_path.read_text())["great_expectations"]) == {"manifest"}


def test_split_table_has_a_row_for_an_empty_split(good: pd.DataFrame) -> None:
    df = good.copy()
    _no_val(df)
    table = split_table(df, SPLIT).set_index("split")
    assert table.loc["val", "n_samples"] == 0 and table.loc["val", "fraction"] == 0.0
    assert table["n_samples"].sum() == N_ROWS
    assert table.loc["train", "expected"] == pytest.approx(0.7)


def test_missing_column_is_reported(good: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(good.drop(columns=["n_nonfinite"]), CFG, SPLIT, tmp_path, "toy")
    message = str(err.value)
    assert "expect_table_columns_to_match_set" in message
    assert "missing columns: n_nonfinite" in message
    assert "n_nonfinite" in message and "could not run" in message
    failed = {f["expectation"] for f in _failed(tmp_path)["failures"]}
    assert "expect_table_columns_to_match_set" in failed


def test_message_lists_at_most_five_rows_per_expectation(
    good: pd.DataFrame, tmp_path: Path
) -> None:
    bad = good.copy()
    bad["n_nonfinite"] = 3
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(bad, CFG, SPLIT, tmp_path, "toy")
    (line,) = [x for x in str(err.value).splitlines() if "n_nonfinite" in x]
    assert line.count("(observed 3)") == 5 and line.endswith(f"and {N_ROWS - 5} more")
    (failure,) = _failed(tmp_path)["failures"]
    assert len(failure["rows"]) == N_ROWS  # the JSON keeps every offending file


def test_crash_leaves_the_previous_report_untouched(
    good: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_dir = tmp_path / "toy"
    validate_manifest(good, CFG, SPLIT, report_dir, "toy")
    before = (report_dir / RESULT_NAME).read_text()

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-report")

    monkeypatch.setattr("microseg.data.validate.failures_of", crash)
    bad = good.copy()
    bad.loc[5, "n_nonfinite"] = 12
    with pytest.raises(RuntimeError, match="killed mid-report"):
        validate_manifest(bad, CFG, SPLIT, report_dir, "toy")
    assert (report_dir / RESULT_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
