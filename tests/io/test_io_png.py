"""PNG image/mask pairs: lossless 8/16-bit round trip and stem matching."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.png import list_png_pairs, read_png_pair, write_png_pair


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
