"""Manifest reading refuses ids and paths that would leave the dataset or output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from microseg.data.manifest import read_manifest, write_manifest
from microseg.errors import DataFormatError


def _row(sid: str, image: str = "images/a.tif") -> dict:
    return {"sample_id": sid, "split": "test", "task": "nuclei", "image_path": image,
            "label_path": "labels/a.tif", "label_kind": "instance"}  # fmt: skip


@pytest.mark.parametrize(
    ("row", "named"),
    [
        (_row("../../etc/x"), "sample_id"),
        (_row("/abs"), "sample_id"),
        (_row("a..b"), "sample_id"),
        (_row("ok", image="../../outside.tif"), "image_path"),
        (_row("ok", image="/etc/passwd"), "image_path"),
    ],
)
def test_traversal_in_a_manifest_is_refused(tmp_path: Path, row: dict, named: str) -> None:
    write_manifest([row], tmp_path)
    with pytest.raises(DataFormatError) as err:
        read_manifest(tmp_path)
    assert named in str(err.value) and "manifest.parquet" in str(err.value)


def test_plain_ids_and_paths_pass(tmp_path: Path) -> None:
    write_manifest([_row("seq01_t003"), _row("img 2.v1", image="images/img 2.v1.tif")], tmp_path)
    assert len(read_manifest(tmp_path)) == 2
