"""The dataset fingerprint of a prepared dataset and of a targets cache, and its file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from microseg.errors import DataFormatError, MissingFileError
from microseg.models.nnunet.fingerprint import Fingerprint, compute_fingerprint

FG = 200  # conftest's nucleus intensity (uint8, no noise)


def test_prepared_fingerprint_summarises_the_train_split(toy_prepared: Path):
    fp = compute_fingerprint(toy_prepared)
    assert fp.source == "prepared" and fp.intensity_space == "raw"
    assert [im.sample_id for im in fp.images] == ["t0", "t1", "t2", "t3"]  # no val, no test
    assert fp.median_shape == (64.0, 64.0)
    assert fp.min_shape == (48, 64) and fp.max_shape == (80, 96)
    assert fp.n_pixels == 64 * 64 + 64 * 96 + 48 * 64 + 80 * 64
    assert fp.modalities == {"brightfield": 1, "fluorescence": 3}
    assert fp.channel_counts == {1: 4}
    assert fp.median_spacing == (250.0, 250.0)  # from the two images that know it
    assert fp.images[2].spacing == (None, None)  # NaN in the manifest
    assert 0 < fp.images[0].foreground_fraction < 0.5
    (stats,) = fp.intensity["fluorescence"]
    assert (stats.mean, stats.std, stats.median) == (FG, 0.0, FG)  # foreground only
    assert stats.percentile_00_5 == stats.percentile_99_5 == FG and stats.n_images == 3
    assert fp.cache_percentiles is None
    both = compute_fingerprint(toy_prepared, splits=("train", "val"))
    assert len(both.images) == 5


def test_targets_fingerprint_is_in_normalised_units(toy_targets: Path):
    fp = compute_fingerprint(toy_targets)
    assert fp.source == "targets" and fp.intensity_space == "percentile_normalised"
    assert fp.cache_percentiles == (1.0, 99.0)
    assert len(fp.images) == 4 and fp.median_shape == (64.0, 64.0)
    assert fp.median_spacing == (None, None)  # the cache knows no pixel size
    (stats,) = fp.intensity["fluorescence"]
    assert stats.mean == pytest.approx(1.0)  # FG is the 99th percentile -> 1 after clipping


def test_fingerprint_file_round_trip_is_strict_json(toy_prepared: Path, tmp_path: Path):
    fp = compute_fingerprint(toy_prepared)
    path = fp.write(tmp_path / "fingerprint.json")

    def no_nan(name: str) -> float:
        raise AssertionError(f"{name} in fingerprint.json")

    data = json.loads(path.read_text(), parse_constant=no_nan)
    assert data["median_spacing"] == [250.0, 250.0] and data["images"][2]["spacing"] == [None, None]
    assert data["channels"] == {"1": 4} and data["median_shape"] == [64.0, 64.0]
    assert Fingerprint.read(path) == fp
    assert not math.isnan(Fingerprint.read(path).intensity["fluorescence"][0].std)


def test_fingerprint_errors(tmp_path: Path, toy_prepared: Path):
    with pytest.raises(MissingFileError, match="targets cache"):
        compute_fingerprint(tmp_path)
    with pytest.raises(DataFormatError, match="no images"):
        compute_fingerprint(toy_prepared, splits=("nope",))
    (tmp_path / "f.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataFormatError, match="fingerprint"):
        Fingerprint.read(tmp_path / "f.json")
