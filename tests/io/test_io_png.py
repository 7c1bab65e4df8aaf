"""PNG image/mask pairs: lossless 8/16-bit round trip and stem matching."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.errors import (
    AnnotationError,
    ConfigError,
    DataFormatError,
    MissingFileError,
    ShapeMismatchError,
)
from microseg.io.png import (
    instance_labels,
    is_binary_mask,
    list_png_pairs,
    read_png_pair,
    write_png_pair,
)


def _pair(dtype_image="uint8", dtype_mask="uint16", rgb=False):
    rng = np.random.default_rng(0)
    shape = (24, 31, 3) if rgb else (24, 31)
    image = rng.integers(0, np.iinfo(dtype_image).max, shape, endpoint=True).astype(dtype_image)
    mask = rng.integers(0, 1000 if dtype_mask == "uint16" else 256, (24, 31)).astype(dtype_mask)
    return image, mask


@pytest.mark.parametrize(
    ("dtype_image", "dtype_mask", "rgb"),
    [("uint8", "uint16", False), ("uint16", "uint8", False), ("uint8", "uint16", True)],
)
def test_round_trip_is_lossless(tmp_path, dtype_image, dtype_mask, rgb):
    image, mask = _pair(dtype_image, dtype_mask, rgb)
    write_png_pair(tmp_path / "images/a.png", tmp_path / "masks/a.png", image, mask)
    got_image, got_mask = read_png_pair(tmp_path / "images/a.png", tmp_path / "masks/a.png")
    assert got_image.dtype == image.dtype and got_mask.dtype == mask.dtype
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_mask, mask)
    assert got_mask.max() > 255 or dtype_mask == "uint8"


def test_list_pairs_matches_stems(tmp_path):
    image, mask = _pair()
    for stem in ("b", "a", "c"):
        write_png_pair(tmp_path / f"images/{stem}.png", tmp_path / f"masks/{stem}.png", image, mask)
    pairs = list_png_pairs(tmp_path)
    assert [(i.name, m.parent.name) for i, m in pairs] == [
        ("a.png", "masks"),
        ("b.png", "masks"),
        ("c.png", "masks"),
    ]


def test_unmatched_stems_are_named(tmp_path):
    image, mask = _pair()
    write_png_pair(tmp_path / "images/a.png", tmp_path / "masks/a.png", image, mask)
    write_png_pair(tmp_path / "images/lonely.png", tmp_path / "masks/x.png", image, mask)
    with pytest.raises(
        AnnotationError, match=r"without a mask: \['lonely'\].*without an image: \['x'\]"
    ):
        list_png_pairs(tmp_path)


def test_shape_and_dtype_errors(tmp_path):
    image, mask = _pair()
    with pytest.raises(ShapeMismatchError, match=r"m\.png"):
        write_png_pair(tmp_path / "i.png", tmp_path / "m.png", image, mask[:, :-1])
    with pytest.raises(DataFormatError, match="mask"):
        write_png_pair(tmp_path / "i.png", tmp_path / "m.png", image, mask.astype(np.int32))
    with pytest.raises(DataFormatError, match="image"):
        write_png_pair(tmp_path / "i.png", tmp_path / "m.png", image.astype(np.float32), mask)
    assert list(tmp_path.iterdir()) == []
    write_png_pair(tmp_path / "i.png", tmp_path / "m.png", image, mask)
    write_png_pair(tmp_path / "j.png", tmp_path / "n.png", image[:, :-1], mask[:, :-1])
    with pytest.raises(ShapeMismatchError, match=r"n\.png.*differs from image i\.png"):
        read_png_pair(tmp_path / "i.png", tmp_path / "n.png")


def test_corrupt_and_missing(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataFormatError, match=r"bad\.png"):
        read_png_pair(tmp_path / "bad.png", tmp_path / "bad.png")
    with pytest.raises(MissingFileError):
        read_png_pair(tmp_path / "none.png", tmp_path / "bad.png")
    with pytest.raises(MissingFileError):
        list_png_pairs(tmp_path)


# ------------------------------------------------------------------ binary vs instance masks
def _touching() -> np.ndarray:
    """0/255 mask: two squares touching at one corner, a separate bar, a lone pixel."""
    mask = np.zeros((12, 14), np.uint8)
    mask[1:4, 1:4] = 255
    mask[4:7, 4:7] = 255  # shares only the corner (3, 3)-(4, 4) with the first square
    mask[9:11, 2:12] = 255
    mask[0, 13] = 255
    return mask


def test_binary_mask_components_are_4_connected():
    labels, kind = instance_labels(_touching(), "auto")
    assert kind == "binary" and labels.dtype == np.uint16
    assert labels.max() == 4 and len(np.unique(labels)) == 5  # corner-touching stay apart
    assert labels[2, 2] != labels[5, 5]
    assert np.array_equal(labels > 0, _touching() > 0)
    same, kind = instance_labels((_touching() > 0).astype(np.uint8), "binary")  # 0/1 alike
    assert kind == "binary" and np.array_equal(same, labels)


def test_binary_mask_cannot_split_objects_sharing_an_edge():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 1:4], mask[1:5, 4:7] = 255, 255
    labels, _ = instance_labels(mask, "auto")
    assert labels.max() == 1


def test_instance_mask_with_touching_ids_is_kept():
    mask = np.zeros((6, 8), np.uint16)
    mask[1:5, 1:4], mask[1:5, 4:7], mask[5, 7] = 3, 7, 300  # 3 and 7 share an edge
    for mask_kind in ("instance", "auto"):
        labels, kind = instance_labels(mask, mask_kind)
        assert kind == "instance" and labels.dtype == np.uint16
        np.testing.assert_array_equal(labels, mask)
    # forcing binary merges the touching pair and renumbers in raster order
    labels, kind = instance_labels(mask, "binary")
    assert kind == "binary" and sorted(np.unique(labels)) == [0, 1, 2]


def test_mask_kind_auto_edge_cases_and_errors(tmp_path):
    assert not is_binary_mask(np.zeros((3, 3), np.uint8))  # empty: nothing to label
    assert is_binary_mask(np.array([[0, 1], [1, 0]], bool))
    labels, kind = instance_labels(np.zeros((3, 3), np.uint8), "auto")
    assert kind == "instance" and not labels.any()
    with pytest.raises(DataFormatError, match=r"m\.png"):
        instance_labels(np.zeros((3, 3, 3), np.uint8), "auto", tmp_path / "m.png")
    with pytest.raises(ConfigError, match="mask_kind"):
        instance_labels(np.zeros((3, 3), np.uint8), "blobs")  # type: ignore[arg-type]
