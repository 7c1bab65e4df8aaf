"""DSB 2018 folders: merging instance masks, modality, errors, and the real sample."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.dsb import (
    iter_dsb_samples,
    list_dsb_samples,
    modality_of,
    read_dsb_sample,
    write_dsb_sample,
)
from microseg.io.png import read_image

REPO = Path(__file__).resolve().parents[2]
REAL = next(
    (
        p
        for p in (
            REPO / "data/raw/dsb2018/stage1_train",  # after `dvc pull` (make test does it)
            REPO.parent / "shared/data/dsb2018/stage1_train",
        )
        if p.is_dir()
    ),
    REPO / "data/raw/dsb2018/stage1_train",
)


def _labels(shape=(40, 50)) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    labels[2:10, 3:12] = 1
    labels[15:25, 20:30] = 2
    labels[30:38, 5:9] = 3
    return labels


def test_round_trip_fluorescence(tmp_path):
    image = np.full((40, 50), 10, np.uint8)
    image[_labels() > 0] = 200
    write_dsb_sample(tmp_path, "abc", image, _labels())
    assert list_dsb_samples(tmp_path) == ["abc"]
    assert Image.open(tmp_path / "abc" / "images" / "abc.png").mode == "RGBA"
    sample = read_dsb_sample(tmp_path, "abc")
    assert sample.image.shape == (40, 50) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.image, image)
    assert sample.labels.dtype == np.uint16
    np.testing.assert_array_equal(sample.labels, _labels())
    assert sample.modality == "fluorescence"
    assert sample.n_overlap_pixels == 0


def test_colour_is_tissue_and_bright_grey_is_brightfield(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    write_dsb_sample(tmp_path, "he", colour, _labels())
    tissue = read_dsb_sample(tmp_path, "he")
    assert tissue.modality == "tissue" and tissue.image.shape == (40, 50, 3)
    np.testing.assert_array_equal(tissue.image, colour)
    bright = np.full((40, 50), 220, np.uint8)
    bright[_labels() > 0] = 60
    write_dsb_sample(tmp_path, "bf", bright, _labels())
    assert read_dsb_sample(tmp_path, "bf").modality == "brightfield"
    assert modality_of(np.full((4, 4), 3, np.uint8)) == "brightfield"
    assert modality_of(np.eye(4, dtype=np.uint8) * 255) == "fluorescence"


def _mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _layout(root: Path, sample_id: str, shape=(20, 20)) -> Path:
    folder = root / sample_id
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((*shape, 4), np.uint8)).save(folder / "images" / f"{sample_id}.png")
    return folder


def test_overlap_keeps_earlier_mask_and_warns(tmp_path, caplog):
    folder = _layout(tmp_path, "ov")
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros((20, 20), bool)
    b[6:12, 6:12] = True  # 2x2 = 4 pixels shared with a
    _mask(folder / "masks" / "b_second.png", b)
    _mask(folder / "masks" / "a_first.png", a)
    with caplog.at_level(logging.WARNING):
        sample = read_dsb_sample(tmp_path, "ov")
    assert sample.n_overlap_pixels == 4
    assert "4 pixels" in caplog.text
    assert (sample.labels[a] == 1).all()  # sorted order: a_first is instance 1
    assert (sample.labels[b & ~a] == 2).all()
    assert sample.labels.max() == 2


def test_mask_shape_mismatch_names_the_mask(tmp_path):
    folder = _layout(tmp_path, "sh")
    _mask(folder / "masks" / "good.png", np.ones((20, 20), bool))
    _mask(folder / "masks" / "wrong.png", np.ones((20, 21), bool))
    with pytest.raises(ShapeMismatchError, match=r"wrong\.png.*\(20, 21\)"):
        read_dsb_sample(tmp_path, "sh")


def test_no_masks_and_missing_image(tmp_path):
    _layout(tmp_path, "empty")
    with pytest.raises(AnnotationError, match="empty"):
        read_dsb_sample(tmp_path, "empty")
    (tmp_path / "noimage" / "images").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="noimage"):
        list_dsb_samples(tmp_path)
    with pytest.raises(MissingFileError):
        read_dsb_sample(tmp_path, "noimage")
    with pytest.raises(MissingFileError):
        list_dsb_samples(tmp_path / "absent")


def test_corrupt_png(tmp_path):
    folder = _layout(tmp_path, "bad")
    (folder / "masks" / "m.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=r"m\.png"):
        read_dsb_sample(tmp_path, "bad")


def test_corrupt_png_after_ultralytics_patched_pillow(tmp_path):
    """Ultralytics replaces PIL.Image.open with one that tries to install a HEIF plugin on an
    unidentified file; our reader must still give the clear error (and no install attempt)."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)
    from PIL import Image

    assert Image.open.__module__ == "ultralytics.utils.patches"
    folder = _layout(tmp_path, "bad")
    (folder / "masks" / "m.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=r"m\.png"):
        read_dsb_sample(tmp_path, "bad")


@pytest.mark.skipif(not REAL.is_dir(), reason="real DSB sample not pulled (run `dvc pull`)")
def test_real_sample_modalities():
    """Modality counts given by the sample's README: 97 fluorescence, 27 tissue, 2 brightfield."""
    ids = list_dsb_samples(REAL)
    assert len(ids) == 126
    counts = Counter()
    for sample_id in ids:  # images only: masks are not needed for the modality
        image = read_image(REAL / sample_id / "images" / f"{sample_id}.png")
        counts[modality_of(image)] += 1
    assert counts == {"fluorescence": 97, "tissue": 27, "brightfield": 2}
    sample = read_dsb_sample(REAL, ids[0])
    assert sample.labels.max() == len(list((REAL / ids[0] / "masks").glob("*.png")))


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason="real DSB sample not pulled (run `dvc pull`)")
def test_real_sample_full_ingest_is_fast():
    start = time.perf_counter()
    samples = list(iter_dsb_samples(REAL, workers=2))
    elapsed = time.perf_counter() - start
    assert sum(int(s.labels.max()) for s in samples) == 5406  # one instance per mask PNG
    assert Counter(s.modality for s in samples)["tissue"] == 27
    assert elapsed < 60, f"ingest took {elapsed:.1f} s"
