"""Synthetic DSB-like nuclei: seeded, valid instances, the ingested layout, and, the point of
the generator, images whose refitted statistics match the real training split they came from.

Real images: the bundled compact copy (``data/raw/dsb2018`` after ``dvc pull``) or the
published files beside the repository, as ``tests/io/test_io_dsb.py`` finds them; a handful
per modality is ingested into a temporary prepared dataset (its own stratified split).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from microseg.config import DatasetConfig
from microseg.data.ingest import ingest
from microseg.data.manifest import COLUMNS, read_manifest
from microseg.data.synth_nuclei import (
    MIN_OBJECT_PX,
    STATS_NAME,
    NucleiStats,
    fit_nuclei_stats,
    generate,
    modality_counts,
    render,
)
from microseg.errors import ConfigError
from microseg.io import dsb
from microseg.io.png import read_image, read_png, to_image
from microseg.io.tiff import read_stack

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "data/raw/dsb2018"
PUBLISHED = (
    Path(os.environ.get("MICROSEG_DSB_PUBLISHED", REPO / "../shared/data/dsb2018")).resolve()
    / "stage1_train"
)
SOURCE = REAL if (REAL / "labels").is_dir() else PUBLISHED
pytestmark = pytest.mark.skipif(
    not SOURCE.is_dir(), reason=f"no real DSB images ({REAL} not pulled, {PUBLISHED} absent)"
)
#: real samples per modality (first in sorted id order): 4 / 4 / 3 of them reach train
SUBSET = {"fluorescence": 6, "tissue": 6, "brightfield": 5}

#: tolerances of synthetic vs real (train split), per modality
INTENSITY_TOL = 0.05 * 255  # mean foreground / background intensity, per channel
AREA_TOL = 0.15  # relative, median nucleus area
COUNT_TOL = 0.20  # relative, mean nuclei per image


def _image_only(root: Path, sid: str) -> np.ndarray:
    if dsb.dsb_layout(root) == "compact":
        return read_image(root / "images" / f"{sid}.png")
    return to_image(read_png(root / sid / "images" / f"{sid}.png"))


def _link_sample(root: Path, sid: str, dst: Path) -> None:
    """The sample's files linked (not copied) into ``dst``, in the source's own layout."""
    if dsb.dsb_layout(root) == "published":
        (dst / sid).symlink_to(root / sid, target_is_directory=True)
        return
    for sub in ("images", "labels"):
        (dst / sub).mkdir(exist_ok=True)
        (dst / sub / f"{sid}.png").symlink_to(root / sub / f"{sid}.png")


@pytest.fixture(scope="module")
def real_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first few real samples of each modality, ingested with the pipeline's ingest."""
    tmp = tmp_path_factory.mktemp("real")
    (tmp / "src").mkdir()
    wanted = dict(SUBSET)
    for sid in dsb.list_dsb_samples(SOURCE):
        modality = dsb.modality_of(_image_only(SOURCE, sid))
        if wanted.get(modality, 0) > 0:
            _link_sample(SOURCE, sid, tmp / "src")
            wanted[modality] -= 1
        if not any(wanted.values()):
            break
    cfg = DatasetConfig(format="dsb2018", source=tmp / "src", task="nuclei")
    return ingest("dsb_subset", cfg, tmp / "prepared", seed=42, workers=1)


@pytest.fixture(scope="module")
def real_stats(real_prepared: Path) -> NucleiStats:
    return fit_nuclei_stats(real_prepared, split="train")


@pytest.fixture(scope="module")
def synth_dir(real_stats: NucleiStats, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic images per real training image, all in train."""
    n = {m: 2 * s.n_images for m, s in real_stats.modalities.items()}
    out = tmp_path_factory.mktemp("synth") / "dsb_synth"
    return generate(real_stats, out, seed=7, n_per_modality=n, val_fraction=0.0)


def test_fit_reads_the_training_split_only(real_prepared: Path, real_stats: NucleiStats) -> None:
    m = read_manifest(real_prepared)
    train = m[m.split == "train"].modality.value_counts().to_dict()
    assert set(m.split) == {"train", "val", "test"}
    assert {k: v.n_images for k, v in real_stats.modalities.items()} == train
    assert real_stats.modalities["tissue"].channels == 3
    assert real_stats.modalities["fluorescence"].channels == 1
    again = NucleiStats.from_dict(json.loads(json.dumps(real_stats.to_dict())))
    assert again == real_stats


def test_render_is_deterministic_by_seed(real_stats: NucleiStats) -> None:
    for modality in real_stats.modalities:
        a_img, a_lab = render(real_stats, modality, seed=3)
        b_img, b_lab = render(real_stats, modality, seed=3)
        c_img, _ = render(real_stats, modality, seed=4)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
        assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("modality", list(SUBSET))
def test_labels_are_valid_instances_in_ingest_conventions(
    real_stats: NucleiStats, modality: str
) -> None:
    image, labels = render(real_stats, modality, seed=11)
    assert image.dtype == np.uint8 and labels.dtype == np.uint16
    assert image.shape[:2] == labels.shape
    assert image.ndim == (3 if modality == "tissue" else 2)
    assert dsb.modality_of(image) == modality  # ingest would classify it the same way
    ids = np.unique(labels[labels > 0])
    assert ids.size > 0 and ids.tolist() == list(range(1, ids.size + 1))  # 1..N, no gaps
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[sl] == i
        assert ndimage.label(mask)[1] == 1, f"label {i} is not one connected component"
        assert mask.sum() >= MIN_OBJECT_PX


def test_synthetic_statistics_match_the_real_training_split(
    real_stats: NucleiStats, synth_dir: Path
) -> None:
    """The key property: refitted on the synthetic set, intensities, nucleus size and
    crowding are the real split's (tolerances at the top of the module)."""
    synth = fit_nuclei_stats(synth_dir, split="train")
    assert set(synth.modalities) == set(real_stats.modalities)
    for modality, real in real_stats.modalities.items():
        syn = synth.modalities[modality]
        for what in ("fg_mean", "bg_mean"):
            diff = np.abs(np.subtract(getattr(syn, what), getattr(real, what)))
            assert (diff <= INTENSITY_TOL).all(), (modality, what, getattr(syn, what))
        # polarity: bright on dark for fluorescence, dark on light otherwise
        assert (np.mean(syn.fg_mean) > np.mean(syn.bg_mean)) == (modality == "fluorescence")
        assert abs(syn.area_median / real.area_median - 1) <= AREA_TOL, (
            modality,
            syn.area_median,
            real.area_median,
        )
        ratio = syn.objects_per_image_mean / real.objects_per_image_mean
        assert abs(ratio - 1) <= COUNT_TOL, (modality, syn.objects_per_image_mean)


def test_generate_writes_the_ingested_layout(real_prepared: Path, synth_dir: Path) -> None:
    real, synth = read_manifest(real_prepared), read_manifest(synth_dir)
    assert list(synth.columns) == list(COLUMNS)
    assert (synth.task == "nuclei").all() and (synth.label_kind == "instance").all()
    for modality in SUBSET:
        r = real[real.modality == modality].iloc[0]
        s = synth[synth.modality == modality].iloc[0]
        assert (s["axes"], s.dtype, s.channels, s.label_dtype) == (
            r["axes"],
            r.dtype,
            r.channels,
            r.label_dtype,
        )
        image, labels = read_stack(synth_dir / s.image_path), read_stack(synth_dir / s.label_path)
        ref = read_stack(real_prepared / r.image_path)
        assert image.dtype == ref.dtype and image.ndim == ref.ndim
        assert labels.max() == s.label_max and s.n_instances == len(np.unique(labels)) - 1
    record = json.loads((synth_dir / STATS_NAME).read_text())
    assert record["seed"] == 7
    assert NucleiStats.from_dict(record["stats"]).modalities.keys() == set(SUBSET)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cli_is_seeded_and_splits_val(
    real_prepared: Path, real_stats: NucleiStats, tmp_path: Path
) -> None:
    """The command fits the training split and generates; the same seed gives the same bytes
    as a direct call (and so as any other run)."""
    from microseg.cli import app

    out = tmp_path / "a" / "synth"
    args = ["synth-nuclei", str(real_prepared), str(out), "--per-modality", "2", "--seed", "5"]
    res = CliRunner().invoke(app, [*args, "--val-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    again = generate(real_stats, tmp_path / "b" / "synth", 5, 2, val_fraction=0.5)
    assert _digest(out) == _digest(again)
    m = read_manifest(out)
    assert m.groupby("modality").split.value_counts().unstack().to_dict("index") == {
        mod: {"train": 1, "val": 1} for mod in sorted(SUBSET)
    }


def test_counts_and_bad_requests(real_stats: NucleiStats) -> None:
    counts = modality_counts(real_stats, None, total=10)
    assert sum(counts.values()) == 10
    assert counts["fluorescence"] >= counts["brightfield"]
    with pytest.raises(ConfigError):
        modality_counts(real_stats, 1, total=10)
    with pytest.raises(ConfigError):
        render(real_stats, "phase-contrast", seed=0)
