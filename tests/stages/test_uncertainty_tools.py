"""`uncertainty_tools`: inter-rater numbers on user files, cross-checked against statsmodels,
scikit-learn and direct numpy formulas on the same voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from microseg.config import load_params
from microseg.errors import ConfigError
from microseg.evaluate.inter_rater import fleiss_kappa, pairwise_dice
from microseg.io.tiff import read_stack, write_stack
from microseg.stages.uncertainty_tools import inter_rater_on_stack, parse_planes

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 32, 32)


def _raters(seed: int, n: int, shape: tuple[int, ...] = SHAPE) -> list[np.ndarray]:
    """``n`` raters who mostly agree on two blobs and each add their own noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    truth[1:3, 8:14, 8:14] = truth[:, 20:25, 18:24] = True
    return [truth ^ (rng.uniform(size=shape) < 0.04) for _ in range(n)]


@pytest.mark.parametrize(("n_raters", "seed"), [(2, 0), (3, 1), (5, 2)])
def test_fleiss_kappa_matches_statsmodels(n_raters: int, seed: int) -> None:
    masks = _raters(seed, n_raters)
    table, _ = aggregate_raters(np.stack([m.ravel() for m in masks], axis=1).astype(int))
    expected = sm_fleiss_kappa(table, method="fleiss")
    assert fleiss_kappa(masks, min_raters=2) == pytest.approx(expected, abs=1e-10)


def test_pairwise_dice_matches_numpy() -> None:
    masks = _raters(3, 4)
    df = pairwise_dice(masks, min_raters=2)
    for row in df.itertuples():
        a, b = masks[int(row.rater_a[-1])], masks[int(row.rater_b[-1])]
        assert row.dice == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()), abs=1e-12)
    assert len(df) == 6


def test_parse_planes() -> None:
    stack = Path("s.tif")
    assert parse_planes(None, 4, stack) == (0, 4)
    assert parse_planes("1:3", 4, stack) == (1, 3)
    assert parse_planes(":2", 4, stack) == (0, 2) and parse_planes("2:", 4, stack) == (2, 4)
    assert parse_planes("3", 4, stack) == (3, 4)
    for bad in ("3:9", "2:2", "-1:2", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match="--planes"):
            parse_planes(bad, 4, stack)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_punet_and_stack) -> Path:
    root = tmp_path_factory.mktemp("unc_tools")
    tiny_punet_and_stack(root, SHAPE)
    for i, m in enumerate(_raters(7, 3)):
        write_stack(root / f"rater_{'uvw'[i]}.tif", (m * 255).astype(np.uint8))  # 0/255 masks
    return root


def test_inter_rater_files_match_trusted_implementations(files: Path) -> None:
    torch.set_num_threads(1)
    params = load_params(REPO / "params.yaml", {"punet.predict.batch_planes": 4})
    raters = [files / f"rater_{c}.tif" for c in "uvw"]
    out = files / "ir"
    res = inter_rater_on_stack(
        params, files / "stack.tif", raters, weights=files / "punet.pt", samples=3, out=out
    ).metrics
    masks = [read_stack(p) > 0 for p in raters]
    k = np.sum(masks, axis=0)
    # disagreement: fraction of raters against the majority; consensus: the majority vote
    dis = read_stack(out / "disagreement.tif")
    assert dis.dtype == np.float32 and dis.shape == SHAPE
    np.testing.assert_allclose(dis, np.minimum(k, 3 - k) / 3, atol=1e-7)
    np.testing.assert_array_equal(read_stack(out / "consensus.tif"), (2 * k > 3).astype(np.uint8))
    table, _ = aggregate_raters(np.stack([m.ravel() for m in masks], axis=1).astype(int))
    assert res["fleiss_kappa"] == pytest.approx(sm_fleiss_kappa(table), abs=1e-10)
    for row in res["pairwise_dice"]:
        a, b = masks["uvw".index(row["rater_a"][-1])], masks["uvw".index(row["rater_b"][-1])]
        assert row["dice"] == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()))
    # AUROC of each written map on the voxels near any rater's mask, as scikit-learn has it
    r = res["region_px"]
    region = ndimage.maximum_filter(np.any(masks, axis=0), size=(1, 2 * r + 1, 2 * r + 1))
    y = (k % 3 != 0)[region]
    assert 0 < y.sum() < y.size and res["n_pixels_scored"] == region.sum()
    for name in ("entropy", "mutual_information", "variance", "expected_entropy", "mean"):
        score = read_stack(out / f"spine_{name}.tif")[region]
        assert res["auroc"][name] == pytest.approx(roc_auc_score(y, score), abs=1e-12), name
    assert (out / "roc_spine.png").exists() and (out / "panel_spine.png").exists()
