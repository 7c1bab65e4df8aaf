"""DSB 2018 folders: merging instance masks, modality, errors, and the real sample."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.dsb import (
    dsb_layout,
    iter_dsb_samples,
    list_dsb_samples,
    modality_of,
    pack_dsb,
    read_dsb_sample,
    write_dsb_sample,
)
from microseg.io.png import read_image, read_png

REPO = Path(__file__).resolve().parents[2]
#: the bundled compact copy (after `dvc pull data.dvc`; make test does it)
REAL = REPO / "data/raw/dsb2018"
#: the published files, a sibling of the repository; MICROSEG_DSB_PUBLISHED points elsewhere
#: (a git worktree is not a sibling of ../shared)
PUBLISHED = (
    Path(os.environ.get("MICROSEG_DSB_PUBLISHED", REPO / "../shared/data/dsb2018")).resolve()
    / "stage1_train"
)
N_REAL = 536
#: published masks, and the modalities the published README gives
N_NUCLEI = 22963
MODALITY_COUNTS = {"fluorescence": 431, "tissue": 91, "brightfield": 14}
needs_real = pytest.mark.skipif(
    not (REAL / "labels").is_dir(), reason=f"bundled DSB data not pulled (`dvc pull`): {REAL}"
)
needs_published = pytest.mark.skipif(
    not PUBLISHED.is_dir(), reason=f"published DSB files not found at {PUBLISHED}"
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


# ------------------------------------------------------------------ compact layout, packing
def _published_fake(root: Path) -> Path:
    """Published-layout folder: a greyscale sample with overlapping masks, a colour one."""
    folder = _layout(root, "grey", shape=(20, 20))
    grey = np.random.default_rng(1).integers(0, 255, (20, 20), dtype=np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "images" / "grey.png")
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros((20, 20), bool)
    b[6:12, 6:12] = True  # 4 contested pixels, kept by a (sorted first)
    c = np.zeros((20, 20), bool)
    c[15:18, 1:4] = True
    _mask(folder / "masks" / "m2.png", b)
    _mask(folder / "masks" / "m1.png", a)
    _mask(folder / "masks" / "m3.png", c)
    colour = np.random.default_rng(2).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    lab = np.zeros((16, 24), np.uint16)
    lab[1:5, 1:5], lab[8:14, 10:20] = 1, 2
    write_dsb_sample(root, "colour", colour, lab)
    return root


def test_pack_dsb_fake_folder(tmp_path):
    src = _published_fake(tmp_path / "published")
    report = pack_dsb(src, tmp_path / "compact")
    dst = tmp_path / "compact"
    assert (report.n_samples, report.n_greyscale, report.n_colour) == (2, 1, 1)
    assert report.n_instances == 5 and report.n_overlap_pixels == 4
    assert sorted(p.name for p in dst.iterdir()) == ["images", "labels"]
    assert Image.open(dst / "images" / "grey.png").mode == "L"
    assert Image.open(dst / "images" / "colour.png").mode == "RGB"
    assert read_png(dst / "labels" / "grey.png").dtype == np.uint16
    assert dsb_layout(src) == "published" and dsb_layout(dst) == "compact"
    assert list_dsb_samples(dst) == list_dsb_samples(src) == ["colour", "grey"]
    for sid in ("grey", "colour"):
        packed, published = read_dsb_sample(dst, sid), read_dsb_sample(src, sid)
        np.testing.assert_array_equal(packed.image, published.image)
        np.testing.assert_array_equal(packed.labels, published.labels)
        assert packed.modality == published.modality
        assert packed.image_path == dst / "images" / f"{sid}.png"
    rgba = read_png(src / "grey" / "images" / "grey.png")
    np.testing.assert_array_equal(read_png(dst / "images" / "grey.png"), rgba[..., 0])
    labels = read_png(dst / "labels" / "grey.png")
    assert labels[6, 6] == 1 and labels[10, 10] == 2 and labels[16, 2] == 3  # earlier mask wins
    # the packed folder ingests like the published one, and packing it again is refused
    with pytest.raises(DataFormatError, match="published"):
        pack_dsb(dst, tmp_path / "again")


def test_pack_dsb_refuses_alpha_and_overwrite_and_leaves_nothing(tmp_path):
    src = _published_fake(tmp_path / "published")
    dst = tmp_path / "compact"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(DataFormatError, match="not empty"):
        pack_dsb(src, dst)
    assert (dst / "keep.txt").exists()
    pack_dsb(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists()
    image_path = src / "grey" / "images" / "grey.png"
    rgba = read_png(image_path).copy()
    rgba[0, 0, 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(image_path)
    with pytest.raises(DataFormatError, match=r"grey\.png.*1 non-opaque"):
        pack_dsb(src, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DataFormatError, match="overlaps"):
        pack_dsb(src, src / "inside")


def test_layout_detection_errors_name_the_folder(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "README.md").write_text("x")
    with pytest.raises(DataFormatError, match=r"files.*found neither"):
        list_dsb_samples(tmp_path / "files")
    (tmp_path / "half" / "images").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=r"half.*no labels/"):
        read_dsb_sample(tmp_path / "half", "x")
    compact = tmp_path / "compact"
    (compact / "images").mkdir(parents=True)
    (compact / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(compact / "images" / "a.png")
    with pytest.raises(AnnotationError, match="images without a mask"):
        list_dsb_samples(compact)
    Image.fromarray(np.zeros((8, 9), np.uint16)).save(compact / "labels" / "a.png")
    with pytest.raises(ShapeMismatchError, match=r"labels.a\.png"):
        read_dsb_sample(compact, "a")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(compact / "labels" / "a.png")
    with pytest.raises(AnnotationError, match="at least one instance"):
        read_dsb_sample(compact, "a")


@needs_real
def test_real_data_modalities():
    """The bundled compact copy: 536 images, modalities as the published README counts them."""
    assert dsb_layout(REAL) == "compact"
    ids = list_dsb_samples(REAL)
    assert len(ids) == N_REAL
    counts = Counter(modality_of(read_image(REAL / "images" / f"{i}.png")) for i in ids)
    assert counts == MODALITY_COUNTS


def _check_against_published(sample_id: str) -> int:
    """One compact sample against its published files; returns its number of masks."""
    published = PUBLISHED / sample_id
    rgba = read_png(published / "images" / f"{sample_id}.png")
    assert rgba.ndim == 3 and rgba.shape[-1] == 4 and (rgba[..., 3] == 255).all(), sample_id
    image = read_png(REAL / "images" / f"{sample_id}.png")
    colour = image[..., None] if image.ndim == 2 else image
    assert colour.shape[-1] in (1, 3) and image.dtype == np.uint8, sample_id
    np.testing.assert_array_equal(np.broadcast_to(colour, rgba[..., :3].shape), rgba[..., :3])
    labels = read_png(REAL / "labels" / f"{sample_id}.png")
    assert labels.dtype == np.uint16 and labels.shape == rgba.shape[:2], sample_id
    masks = [read_png(p) > 0 for p in sorted((published / "masks").glob("*.png"))]
    cover = np.sum(masks, axis=0)
    assert (labels[cover == 0] == 0).all(), f"{sample_id}: label outside every mask"
    ids = []
    for k, mask in enumerate(masks):
        own = np.unique(labels[mask & (cover == 1)])  # pixels no other mask claims
        assert own.size == 1 and own[0] != 0, f"{sample_id}: mask {k} -> ids {own}"
        ids.append(int(own[0]))
    assert len(set(ids)) == len(masks), f"{sample_id}: two masks share a label id"
    contested = cover > 1
    if contested.any():  # a contested pixel carries the id of one of the masks claiming it
        claim = np.stack([m[contested] for m in masks])
        chosen = labels[contested]
        assert all(claim[ids.index(int(v)), j] for j, v in enumerate(chosen)), sample_id
    # and exactly the merge the published reader does: ids in sorted order, earlier mask wins
    expected = np.zeros(labels.shape, np.uint16)
    for k, mask in enumerate(masks):
        expected[mask & (expected == 0)] = k + 1
    np.testing.assert_array_equal(labels, expected)
    return len(masks)


@needs_real
@needs_published
def test_compact_files_equal_published_subset():
    """Every 8th sample plus every colour and brightfield one (deterministic, ~30 s on 2 cores);
    the slow test below checks all 536."""
    ids = list_dsb_samples(REAL)
    assert ids == list_dsb_samples(PUBLISHED)
    rare = {
        i for i in ids if modality_of(read_image(REAL / "images" / f"{i}.png")) != "fluorescence"
    }
    subset = [i for k, i in enumerate(ids) if k % 8 == 0 or i in rare]
    for sample_id in subset:
        _check_against_published(sample_id)


@pytest.mark.slow
@needs_real
@needs_published
def test_compact_files_equal_published_all():
    ids = list_dsb_samples(REAL)
    assert ids == list_dsb_samples(PUBLISHED)
    assert sum(_check_against_published(i) for i in ids) == N_NUCLEI


@pytest.mark.slow
@needs_real
def test_real_data_full_read_is_fast():
    start = time.perf_counter()
    samples = list(iter_dsb_samples(REAL, workers=2))
    elapsed = time.perf_counter() - start
    assert sum(len(np.unique(s.labels)) - 1 for s in samples) == N_NUCLEI  # one id per mask
    assert Counter(s.modality for s in samples) == MODALITY_COUNTS
    assert elapsed < 60, f"reading took {elapsed:.1f} s"
