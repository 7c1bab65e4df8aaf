"""Ingest: canonical layout on good data; bad input names the file and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import flammkuchen as fl
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from microseg.config import DatasetConfig, SplitConfig
from microseg.data.ingest import SPINE_CLASSES, assign_splits, ingest
from microseg.data.manifest import read_manifest
from microseg.errors import (
    AnnotationError,
    DataFormatError,
    MicrosegError,
    ShapeMismatchError,
)
from microseg.io import coco, dsb, png, tiff
from microseg.io.d3set import _numpy2_aliases


def _spines_cfg(src: Path) -> DatasetConfig:
    return DatasetConfig(format="synthetic_spines", source=src, task="spines")


def _assert_nothing_written(prepared: Path) -> None:
    leftovers = list(prepared.iterdir()) if prepared.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


def _dsb_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 40, (32, 40), dtype=np.uint8)
        lab = np.zeros((32, 40), np.uint16)
        lab[4:10, 4:12], lab[15:25, 20:30] = 1, 2
        img[lab > 0] += 150
        dsb.write_dsb_sample(root, f"s{i:02d}", img, lab)
    return root


def test_spines_canonical_layout(tiny_spines: Path, tmp_path: Path) -> None:
    out = ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    m = read_manifest(out)
    assert list(m.sample_id) == ["benchmark", "train_x0", "val_x0"]
    assert dict(zip(m.sample_id, m.split, strict=True)) == {
        "benchmark": "test",
        "train_x0": "train",
        "val_x0": "val",
    }
    row = m.set_index("sample_id").loc["benchmark"]
    assert row.voxel_size_z_nm == 500 and row.voxel_size_x_nm == 94
    assert row.points_path == "points/benchmark.csv" and row.n_instances > 0
    labels = tiff.read_stack(out / row.label_path)
    assert set(np.unique(labels)) <= set(SPINE_CLASSES.values())
    assert labels.shape == tiff.read_stack(out / row.image_path).shape
    assert (out / "points" / "train_x0.csv").exists()


def test_dsb_ingest_splits_and_instances(tmp_path: Path) -> None:
    src = _dsb_folder(tmp_path / "dsb")
    cfg = DatasetConfig(format="dsb2018", source=src, task="nuclei")
    out = ingest("dsb", cfg, tmp_path / "prepared", seed=1, workers=2)
    m = read_manifest(out)
    assert len(m) == 6 and (m.n_instances == 2).all()
    assert set(m.split) == {"train", "val", "test"}
    # same seed, same split; it depends on the ids, not on the order of the listing
    again = ingest("dsb", cfg, tmp_path / "prepared2", seed=1, workers=1)
    assert list(read_manifest(again).split) == list(m.split)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("fmt", ["dsb2018", "synthetic_spines", "ctc"])
def test_ingest_outputs_are_byte_identical(
    fmt: str, tiny_spines: Path, tiny_tracking: Path, tmp_path: Path
) -> None:
    """The same source ingested twice, into other folders, a second apart and with another
    number of workers: every file the same bytes (no times or host names in TIFF, parquet,
    CSV), so a DVC cache or remote is reused across machines."""
    source = {
        "dsb2018": lambda: _dsb_folder(tmp_path / "dsb"),
        "synthetic_spines": lambda: tiny_spines,
        "ctc": lambda: tiny_tracking,
    }[fmt]()
    task = {"dsb2018": "nuclei", "synthetic_spines": "spines", "ctc": "tracking"}[fmt]
    cfg = DatasetConfig(format=fmt, source=source, task=task)
    first = ingest("d", cfg, tmp_path / "one", seed=3, workers=1)
    time.sleep(1.1)
    second = ingest("d", cfg, tmp_path / "two", seed=3, workers=2)
    digest = _digest(first)
    assert "manifest.parquet" in digest and len(digest) >= 4
    assert digest == _digest(second)


def test_assign_splits_fractions_and_stability() -> None:
    ids = [f"id{i}" for i in range(200)]
    s = assign_splits(ids, SplitConfig(train=0.7, val=0.15, test=0.15), seed=3)
    counts = {k: list(s.values()).count(k) for k in ("train", "val", "test")}
    assert counts == {"train": 140, "val": 30, "test": 30}
    fewer = assign_splits(ids[:150], SplitConfig(), seed=3)
    moved = [i for i in ids[:150] if fewer[i] == "train" and s[i] == "test"]
    assert len(moved) < 15, "removing samples must not reshuffle the rest"


def test_ctc_ingest(tiny_tracking: Path, tmp_path: Path) -> None:
    cfg = DatasetConfig(format="ctc", source=tiny_tracking, task="tracking")
    m = read_manifest(ingest("trk", cfg, tmp_path / "prepared", seed=0, workers=1))
    assert list(m.split) == ["train", "val", "test"] and (m["axes"] == "TYX").all()
    assert (m.mask_kind == "").all()


def test_coco_ingest(tmp_path: Path) -> None:
    src = tmp_path / "coco"
    samples = []
    for i in range(3):
        img = np.full((24, 24), 10, np.uint8)
        lab = np.zeros((24, 24), np.uint16)
        lab[2:8, 2:8], lab[12:20, 10:22] = 1, 2
        img[lab > 0] = 200
        from PIL import Image

        src.mkdir(exist_ok=True)
        Image.fromarray(img).save(src / f"im{i}.png")
        samples.append((i + 1, f"im{i}.png", lab))
    coco.write_coco(src / "annotations.json", coco.labels_to_coco(samples))
    cfg = DatasetConfig(format="coco", source=src, task="nuclei")
    m = read_manifest(ingest("c", cfg, tmp_path / "prepared", seed=0, workers=1))
    assert (m.n_instances == 2).all() and len(m) == 3 and (m.mask_kind == "").all()


def test_dsb_compact_layout_ingests_like_published(tmp_path: Path) -> None:
    src = _dsb_folder(tmp_path / "dsb")
    dsb.pack_dsb(src, tmp_path / "compact")
    cfg = DatasetConfig(format="dsb2018", source=src, task="nuclei")
    published = read_manifest(ingest("p", cfg, tmp_path / "prepared", seed=1, workers=1))
    cfg = DatasetConfig(format="dsb2018", source=tmp_path / "compact", task="nuclei")
    out = ingest("c", cfg, tmp_path / "prepared", seed=1, workers=2)
    compact = read_manifest(out)
    same = ["sample_id", "split", "shape", "modality", "n_instances", "intensity_p50", "mask_kind"]
    pd.testing.assert_frame_equal(compact[same], published[same])
    assert compact.source_path.str.contains("compact/images/").all()
    assert (compact.mask_kind == "").all()  # DSB masks carry instances by construction
    for row in compact.itertuples():
        want = dsb.read_dsb_sample(src, row.sample_id).labels
        np.testing.assert_array_equal(tiff.read_stack(out / row.label_path), want)


def _png_pairs(root: Path) -> Path:
    """Three pairs: a 0/255 mask with corner-touching objects, a 0/1 mask with separate ones,
    an instance mask whose ids 3 and 7 share an edge."""
    rng = np.random.default_rng(0)
    corner = np.zeros((16, 16), np.uint8)
    corner[2:6, 2:6], corner[6:10, 6:10] = 255, 255  # touch at one corner only
    separate = np.zeros((16, 16), np.uint8)
    separate[1:4, 1:4], separate[8:12, 2:5], separate[10:14, 9:15] = 1, 1, 1
    touching = np.zeros((16, 16), np.uint16)
    touching[2:10, 2:6], touching[2:10, 6:10] = 3, 7
    for stem, mask in (("corner", corner), ("separate", separate), ("touching", touching)):
        image = rng.integers(0, 50, (16, 16), dtype=np.uint8)
        image[mask > 0] = 200
        png.write_png_pair(
            root / "images" / f"{stem}.png", root / "masks" / f"{stem}.png", image, mask
        )
    return root


@pytest.mark.parametrize(
    ("mask_kind", "expected"),
    [
        ("auto", {"corner": ("binary", 2), "separate": ("binary", 3), "touching": ("instance", 2)}),
        ("binary", {"corner": ("binary", 2), "separate": ("binary", 3), "touching": ("binary", 1)}),
        (
            "instance",
            {"corner": ("instance", 1), "separate": ("instance", 1), "touching": ("instance", 2)},
        ),
    ],
)
def test_png_pairs_mask_kind(tmp_path: Path, mask_kind: str, expected: dict) -> None:
    src = _png_pairs(tmp_path / "pairs")
    cfg = DatasetConfig(format="png_pairs", source=src, task="nuclei", mask_kind=mask_kind)
    out = ingest("pp", cfg, tmp_path / "prepared", seed=0, workers=1)
    m = read_manifest(out).set_index("sample_id")
    got = {sid: (row.mask_kind, row.n_instances) for sid, row in m.iterrows()}
    assert got == expected
    if mask_kind != "binary":  # instance ids survive ingest unchanged
        labels = tiff.read_stack(out / m.loc["touching", "label_path"])
        assert sorted(np.unique(labels)) == [0, 3, 7]


def test_mask_kind_is_for_png_pairs_only(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="png_pairs"):
        DatasetConfig(format="coco", source=tmp_path, task="nuclei", mask_kind="binary")
    assert DatasetConfig(format="ctc", source=tmp_path, task="tracking").mask_kind == "auto"


def test_manifest_without_mask_kind_still_reads(tmp_path: Path) -> None:
    """Manifests written before the column existed read with it empty."""
    src = _dsb_folder(tmp_path / "dsb", n=3)
    cfg = DatasetConfig(format="dsb2018", source=src, task="nuclei")
    out = ingest("d", cfg, tmp_path / "prepared", seed=0, workers=1)
    pd.read_parquet(out / "manifest.parquet").drop(columns="mask_kind").to_parquet(
        out / "manifest.parquet"
    )
    assert (read_manifest(out).mask_kind == "").all()


# ------------------------------------------------------------------------------ bad input
def test_truncated_tiff(tiny_spines: Path, tmp_path: Path) -> None:
    stack = tiny_spines / "benchmark" / "stack.tif"
    stack.write_bytes(stack.read_bytes()[: stack.stat().st_size // 2])
    with pytest.raises(DataFormatError) as err:
        ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    assert "stack.tif" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_image_label_shape_mismatch(tiny_spines: Path, tmp_path: Path) -> None:
    tiff.write_stack(tiny_spines / "benchmark" / "spine_mask.tif", np.zeros((8, 60, 64), np.uint8))
    with pytest.raises(ShapeMismatchError) as err:
        ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    assert "spine_mask.tif" in str(err.value) or "dendrite_mask.tif" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_dsb_mask_shape_mismatch(tmp_path: Path) -> None:
    src = _dsb_folder(tmp_path / "dsb", n=3)
    from PIL import Image

    bad = src / "s01" / "masks" / "bad.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    cfg = DatasetConfig(format="dsb2018", source=src, task="nuclei")
    with pytest.raises(ShapeMismatchError, match=r"bad\.png"):
        ingest("dsb", cfg, tmp_path / "prepared", seed=0, workers=1)
    _assert_nothing_written(tmp_path / "prepared")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("", AnnotationError),
        ("x,y,z\n", AnnotationError),
        ("a;b\n1;2\n", DataFormatError),
        ("x,y,z\n1,2,oops\n", AnnotationError),
    ],
)
def test_bad_annotation_csv(
    tiny_spines: Path, tmp_path: Path, content: str, error: type[MicrosegError]
) -> None:
    (tiny_spines / "benchmark" / "spines.csv").write_text(content)
    with pytest.raises(error) as err:
        ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    assert "spines.csv" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_image_with_nan(tiny_spines: Path, tmp_path: Path) -> None:
    stack = tiny_spines / "benchmark" / "stack.tif"
    img = tiff.read_stack(stack).astype(np.float32)
    img[3, 10, 10:13] = np.nan
    tiff.write_stack(stack, img, voxel_size_nm=(500, 94, 94))
    with pytest.raises(DataFormatError) as err:
        ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    assert "stack.tif" in str(err.value) and "NaN" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_d3set_missing_key(tiny_spines: Path, tmp_path: Path) -> None:
    path = tiny_spines / "val.d3set"
    d = fl.load(str(path))
    del d["data"]["spines"]
    path.unlink()
    with _numpy2_aliases():
        fl.save(str(path), d, compression="blosc")
    with pytest.raises(DataFormatError) as err:
        ingest("spines", _spines_cfg(tiny_spines), tmp_path / "prepared", seed=0, workers=1)
    assert "val.d3set" in str(err.value) and "spines" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_coco_unknown_image_id(tmp_path: Path) -> None:
    src = tmp_path / "coco"
    src.mkdir()
    lab = np.zeros((16, 16), np.uint16)
    lab[2:6, 2:6] = 1
    doc = coco.labels_to_coco([(1, "a.png", lab)])
    doc["annotations"][0]["image_id"] = 99
    (src / "annotations.json").write_text(json.dumps(doc))
    cfg = DatasetConfig(format="coco", source=src, task="nuclei")
    with pytest.raises(AnnotationError) as err:
        ingest("c", cfg, tmp_path / "prepared", seed=0, workers=1)
    assert "annotations.json" in str(err.value) and "99" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_failed_reingest_keeps_previous_output(tiny_spines: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    out = ingest("spines", _spines_cfg(tiny_spines), prepared, seed=0, workers=1)
    before = sorted(p.name for p in out.rglob("*"))
    (tiny_spines / "benchmark" / "stack.tif").write_bytes(b"not a tiff")
    with pytest.raises(MicrosegError):
        ingest("spines", _spines_cfg(tiny_spines), prepared, seed=0, workers=1)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in prepared.iterdir()] == ["spines"]


@pytest.mark.parametrize("defect", ["same_stem", "no_segmentation"])
def test_coco_ingest_refuses_what_it_would_drop_silently(tmp_path: Path, defect: str) -> None:
    """Issue 18: two images with one stem overwrote each other; an annotation without
    `segmentation` was a KeyError traceback."""
    src = tmp_path / "coco"
    (src / "x").mkdir(parents=True)
    lab = np.zeros((16, 16), np.uint16)
    lab[2:6, 2:6] = 1
    names = ["a.png", "x/a.png"] if defect == "same_stem" else ["a.png", "b.png"]
    doc = coco.labels_to_coco([(i + 1, n, lab) for i, n in enumerate(names)])
    if defect == "no_segmentation":
        del doc["annotations"][1]["segmentation"]
    (src / "annotations.json").write_text(json.dumps(doc))
    cfg = DatasetConfig(format="coco", source=src, task="nuclei")
    with pytest.raises(AnnotationError) as err:
        ingest("c", cfg, tmp_path / "prepared", seed=0, workers=1)
    said = "share the file stem" if defect == "same_stem" else "no 'segmentation'"
    assert said in str(err.value) and "annotations.json" in str(err.value)
    _assert_nothing_written(tmp_path / "prepared")


def test_ome_tiff_dataset_channel_and_pixel_size_from_metadata(tmp_path: Path) -> None:
    """Issue 17: `--format ome-tiff`: two-channel OME-TIFFs (nuclei in channel 1, 0.5 µm
    pixels in the metadata) with instance masks; the channel is picked and the size kept."""
    from bioio.writers import OmeTiffWriter
    from bioio_base.types import PhysicalPixelSizes

    src = tmp_path / "lab"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        lab = np.zeros((32, 40), np.uint16)
        lab[4:10, 4:12], lab[18:28, 20:30] = 1, 2 + i % 2
        nuclei = (lab > 0) * 180 + rng.integers(0, 20, lab.shape)
        cyx = np.stack([np.full(lab.shape, 5), nuclei]).astype(np.uint16)
        OmeTiffWriter.save(cyx, src / "images" / f"im{i}.ome.tif", dim_order="CYX",
                           channel_names=["BF", "DAPI"],
                           physical_pixel_sizes=PhysicalPixelSizes(None, 0.5, 0.5))  # fmt: skip
        tiff.write_stack(src / "masks" / f"im{i}.tif", lab)
    cfg = DatasetConfig(format="ome-tiff", source=src, task="nuclei", channel="DAPI",
                        mask_kind="instance")  # fmt: skip
    m = read_manifest(ingest("lab", cfg, tmp_path / "prepared", seed=0, workers=1))
    assert len(m) == 6 and (m.n_instances == 2).all() and set(m.split) == {"train", "val", "test"}
    assert (m.voxel_size_y_nm == 500).all() and m.voxel_size_z_nm.isna().all()
    first = tiff.read_stack(tmp_path / "prepared" / "lab" / "images" / "im0.tif")
    assert first.ndim == 2 and first.max() >= 180  # channel 1, not the flat channel 0
    with pytest.raises(ValueError, match="channel applies to format ome-tiff"):
        DatasetConfig(format="png_pairs", source=src, task="nuclei", channel=1)
