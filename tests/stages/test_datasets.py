"""``microseg dataset add|verify|list``: params entries written safely, problems reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage import io as skio

from microseg.config import load_params
from microseg.errors import ConfigError, MissingFileError
from microseg.stages.datasets import add_dataset, dataset_entry, list_datasets, verify_dataset

ROOT = Path(__file__).resolve().parents[2]


def make_png_pairs(root: Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """``images/*.png`` + binary ``masks/*.png`` (0/255) with 3-6 disks each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.integers(8, size - 8, 2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(3, 7) ** 2
        image = (mask * 150 + rng.normal(30, 10, mask.shape)).clip(0, 255).astype(np.uint8)
        skio.imsave(root / "images" / f"img{i:02d}.png", image, check_contrast=False)
        skio.imsave(root / "masks" / f"img{i:02d}.png", (mask * 255).astype(np.uint8),
                    check_contrast=False)  # fmt: skip
    return root


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_add_keeps_comments_and_validates(params_file: Path, tmp_path: Path) -> None:
    src = make_png_pairs(tmp_path / "mine")
    before = params_file.read_text()
    entry = dataset_entry("nuclei", "png_pairs", src, split=(0.6, 0.2, 0.2), mask_kind="binary")
    written = add_dataset(params_file, "mine", entry, use=True)
    assert written == ["datasets.mine", "cells.dataset"]
    text = params_file.read_text()
    assert "# The one knob file." in text and len(text) > len(before)
    params = load_params(params_file)
    assert params.cells.dataset == "mine"
    assert params.task_dataset("nuclei") == "mine"
    assert params.datasets["mine"].mask_kind == "binary"
    assert params.datasets["dsb2018"].format == "dsb2018"  # the others untouched
    rows = {r["name"]: r for r in list_datasets(params)}
    assert rows["mine"]["used_by"] == "nuclei" and rows["dsb2018"]["used_by"] == ""


@pytest.mark.parametrize("name", ["../x", "Mine", "a/b", "", "_x"])
def test_names_that_would_escape_or_clash_are_refused(params_file, tmp_path, name) -> None:
    src = make_png_pairs(tmp_path / "mine", n=3)
    with pytest.raises(ConfigError, match="dataset name"):
        add_dataset(params_file, name, dataset_entry("nuclei", "png_pairs", src))


def test_bad_entries_are_refused_before_writing(params_file: Path, tmp_path: Path) -> None:
    before = params_file.read_text()
    with pytest.raises(MissingFileError, match="source not found"):
        add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", tmp_path / "no"))
    with pytest.raises(ConfigError, match="not valid"):
        dataset_entry("nuclei", "tiffs", tmp_path)
    with pytest.raises(ConfigError, match="not valid"):  # mask_kind is for png_pairs only
        dataset_entry("nuclei", "dsb2018", tmp_path, mask_kind="binary")
    src = make_png_pairs(tmp_path / "mine", n=3)
    add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", src))
    with pytest.raises(ConfigError, match="already exists"):
        add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", src))
    assert yaml.safe_load(params_file.read_text())["datasets"].keys() == (
        yaml.safe_load(before)["datasets"].keys() | {"mine"}
    )


def test_task_dataset_names_a_missing_or_wrong_entry(params_file: Path) -> None:
    params = load_params(params_file, {"cells.dataset": "nope"})
    with pytest.raises(ConfigError, match="microseg dataset add"):
        params.task_dataset("nuclei")
    params = load_params(params_file, {"cells.dataset": "tracking"})
    with pytest.raises(ConfigError, match="tracking dataset, not nuclei"):
        params.task_dataset("nuclei")


def test_verify_reports_a_good_dataset(params_file: Path, tmp_path: Path) -> None:
    src = make_png_pairs(tmp_path / "mine")
    add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", src, mask_kind="binary"))
    params = load_params(params_file).model_copy()
    report = verify_dataset(params, "mine", tmp_path / "report")
    assert report.ok, report.lines()
    assert report.n_samples == 12 and sum(report.splits.values()) == 12
    assert report.n_expectations > 10
    assert (tmp_path / "report" / "result.json").is_file()
    text = "\n".join(report.lines())
    assert "12 samples" in text and "OK: the pipeline can use it" in text
    assert not (Path("data/prepared/mine")).exists()


def test_verify_names_the_bad_file(params_file: Path, tmp_path: Path) -> None:
    src = make_png_pairs(tmp_path / "mine", n=4)
    skio.imsave(src / "masks" / "img02.png", np.zeros((32, 32), np.uint8), check_contrast=False)
    add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", src))
    report = verify_dataset(load_params(params_file), "mine")
    assert not report.ok
    assert any("img02" in p and "shape" in p for p in report.problems), report.problems
    assert "NOT OK" in report.lines()[-1]


def test_verify_reports_failed_expectations(params_file: Path, tmp_path: Path) -> None:
    src = make_png_pairs(tmp_path / "mine")
    add_dataset(params_file, "mine", dataset_entry("nuclei", "png_pairs", src))
    params = load_params(params_file, {"validate.instances.max": 2})
    report = verify_dataset(params, "mine")
    assert not report.ok
    assert any(p.startswith("expectation") and "n_instances" in p for p in report.problems)
