"""Spine point CSVs: accepted dialects, validation, round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from microseg.errors import AnnotationError, DataFormatError, MissingFileError
from microseg.io.points import read_points, write_points


def _write(tmp_path, text: str, name: str = "p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lower_case_columns_reordered_to_zyx(tmp_path):
    df = read_points(_write(tmp_path, "x,y,z\n1.5,2,3\n4,5,6\n"))
    assert list(df.columns) == ["z", "y", "x"]
    assert df.dtypes.tolist() == [np.float64] * 3
    np.testing.assert_array_equal(df.to_numpy(), [[3, 2, 1.5], [6, 5, 4]])


def test_upper_case_index_column_and_extras(tmp_path):
    text = ",X,Y,Z,cluster_id,rater\n0,10,20,3,7,a\n1,11,21,4,7,b\n"
    df = read_points(_write(tmp_path, text))
    assert list(df.columns) == ["z", "y", "x", "cluster_id", "rater"]
    assert df["cluster_id"].tolist() == [7, 7]
    assert df["rater"].tolist() == ["a", "b"]
    assert df.loc[1, ["z", "y", "x"]].tolist() == [4, 21, 11]


def test_round_trip_writes_xyz_first(tmp_path):
    df = pd.DataFrame({"z": [1.0, 2.25], "y": [3.0, 4.0], "x": [5.0, 6.125], "cluster_id": [1, 2]})
    path = write_points(tmp_path / "out.csv", df)
    assert path.read_text().splitlines()[0] == "x,y,z,cluster_id"
    pd.testing.assert_frame_equal(read_points(path), df)


def test_inside_shape_uses_voxel_centres(tmp_path):
    shape = (10, 20, 30)
    ok = _write(tmp_path, "x,y,z\n29.4,19.4,9.4\n0,0,0\n")
    assert len(read_points(ok, shape=shape)) == 2
    bad = _write(tmp_path, "x,y,z\n1,1,1\n29.5,3,3\n", "bad.csv")
    with pytest.raises(AnnotationError, match=r"bad\.csv.*outside.*lines 3"):
        read_points(bad, shape=shape)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("x,y,z\n1,2,-1\n", AnnotationError, "non-negative.*line.* 2"),
        ("x,y,z\n1,2,3\n1,,3\n", AnnotationError, "finite.*lines 3"),
        ("x,y,z\n1,2,inf\n", AnnotationError, "finite"),
        ("x,y,z\n1,two,3\n", AnnotationError, "column y must be numeric.*'two'"),
        ("x,y,q\n1,2,3\n", DataFormatError, r"missing \['z'\]"),
        ("x,y,z,X\n1,2,3,4\n", DataFormatError, "appears twice"),
        ('x,y,z\n1,2,"3\n', DataFormatError, "parse"),
    ],
)
def test_bad_content(tmp_path, text, error, match):
    path = _write(tmp_path, text, "bad.csv")
    with pytest.raises(error, match=match) as info:
        read_points(path)
    assert "bad.csv" in str(info.value)


def test_empty_files(tmp_path):
    for text in ("", "x,y,z\n"):
        path = _write(tmp_path, text)
        with pytest.raises(AnnotationError, match=r"p\.csv"):
            read_points(path)
        empty = read_points(path, allow_empty=True)
        assert empty.empty and list(empty.columns)[:3] == ["z", "y", "x"]


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.csv"):
        read_points(tmp_path / "nope.csv")


def test_write_requires_xyz(tmp_path):
    with pytest.raises(DataFormatError, match="missing columns"):
        write_points(tmp_path / "a.csv", pd.DataFrame({"x": [1.0], "y": [2.0]}))
    assert not (tmp_path / "a.csv").exists()
