"""YOLO label files: normalisation, round trip, line-numbered errors."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.yolo import read_yolo_labels, write_yolo_labels

HW = (480, 640)


def test_round_trip_and_text_format(tmp_path):
    boxes = np.array([[10, 20, 50, 60], [0, 0, 640, 480], [100.5, 200.25, 101.5, 210.75]])
    path = write_yolo_labels(tmp_path / "a.txt", boxes, [0, 2, 1], HW)
    lines = path.read_text().splitlines()
    assert lines[0] == "0 0.046875 0.083333 0.062500 0.083333"
    assert lines[1] == "2 0.500000 0.500000 1.000000 1.000000"
    got, classes = read_yolo_labels(path, HW)
    np.testing.assert_allclose(got, boxes, atol=640 * 1e-6)
    assert classes.tolist() == [0, 2, 1] and classes.dtype == np.int64


def test_zero_boxes_give_an_empty_file(tmp_path):
    path = write_yolo_labels(tmp_path / "e.txt", np.zeros((0, 4)), [], HW)
    assert path.read_text() == ""
    boxes, classes = read_yolo_labels(path, HW)
    assert boxes.shape == (0, 4) and classes.shape == (0,)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n", r"line 2: expected 5 columns"),
        ("0 0.5 0.5 0.1 0.1\n\n1 1.2 0.5 0.1 0.1\n", r"line 3: expected normalised.*\[0, 1\]"),
        ("a 0.5 0.5 0.1 0.1\n", r"line 1: expected an integer class"),
        ("-1 0.5 0.5 0.1 0.1\n", r"line 1: expected class >= 0"),
        ("0 0.5 0.5 0 0.1\n", r"line 1: expected positive width"),
        ("0 0.5 0.5 0.1 0.1 0.2 0.3\n", r"line 1: expected 5 columns.*found 7"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=match) as info:
        read_yolo_labels(path, HW)
    assert "bad.txt" in str(info.value)


def test_write_validates(tmp_path):
    with pytest.raises(ShapeMismatchError, match="one class per box"):
        write_yolo_labels(tmp_path / "a.txt", np.array([[1, 1, 5, 5]]), [0, 1], HW)
    with pytest.raises(DataFormatError, match="box 1"):
        write_yolo_labels(
            tmp_path / "b.txt", np.array([[1, 1, 5, 5], [600, 1, 641, 5]]), [0, 0], HW
        )
    with pytest.raises(DataFormatError, match="box 0"):
        write_yolo_labels(tmp_path / "c.txt", np.array([[5, 1, 5, 5]]), [0], HW)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError):
        read_yolo_labels(tmp_path / "x.txt", HW)
