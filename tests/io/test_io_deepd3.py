"""DeepD3's own files: the click CSV as its benchmark code reads it, rater masks, the layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io import deepd3

SHAPE = (4, 20, 24)


def _clicks_csv(path: Path, rows: list[tuple], columns=("Rater", "X", "Y", "Pos", "label")) -> Path:
    # DeepD3 writes the table with pandas' index column (its code reads index_col=0)
    pd.DataFrame(rows, columns=list(columns)).to_csv(path)
    return path


def test_reads_deepd3_columns_and_collapses_clusters(tmp_path: Path) -> None:
    csv = _clicks_csv(
        tmp_path / "a.csv",
        [("U", 2, 3, 1, 7), ("V", 4, 5, 2, 7), ("W", 3, 7, 0, 7), ("U", 10, 11, 3, 2),
         ("U", 20.5, 1, 1, 9), ("W", 21.5, 2, 2, 9)],
    )  # fmt: skip
    clicks = deepd3.read_annotations(csv, SHAPE)
    assert list(clicks.columns) == ["x", "y", "z", "cluster_id", "rater"]
    pts = deepd3.collapse_clusters(clicks, (500.0, 94.0, 94.0))
    # by hand: cluster 2 = (10, 11, 3); 7 = mean of three clicks; 9 = mean of two
    assert pts.spine_id.tolist() == [2, 7, 9]
    np.testing.assert_allclose(pts[["x", "y", "z"]], [[10, 11, 3], [3, 5, 1], [21, 1.5, 1.5]])
    np.testing.assert_allclose(pts.x_nm, [940, 282, 1974])
    np.testing.assert_allclose(pts.z_nm, [1500, 500, 750])
    assert pts.n_clicks.tolist() == [1, 3, 2] and pts.n_raters.tolist() == [1, 3, 2]


def test_lower_case_columns_without_rater(tmp_path: Path) -> None:
    csv = tmp_path / "a.csv"
    pd.DataFrame({"x": [1, 3], "y": [2, 2], "z": [0, 2], "cluster_id": [5, 5]}).to_csv(
        csv, index=False
    )
    pts = deepd3.collapse_clusters(deepd3.read_annotations(csv, SHAPE), (200.0, 100.0, 100.0))
    np.testing.assert_allclose(pts[["x", "y", "z", "y_nm"]].to_numpy(), [[2, 2, 1, 200]])
    assert pts.n_raters.tolist() == [2]  # no rater column: clicks count


@pytest.mark.parametrize(
    ("columns", "problem"),
    [(("Rater", "X", "Y", "Pos"), "cluster_id"), (("Rater", "X", "Y", "label"), "'z'")],
)
def test_csv_without_needed_columns(tmp_path: Path, columns: tuple, problem: str) -> None:
    csv = _clicks_csv(tmp_path / "Annotations_and_Clusters.csv", [("U", 1, 2, 3)], columns)
    with pytest.raises(DataFormatError, match=problem) as err:
        deepd3.read_annotations(csv, SHAPE)
    assert "Annotations_and_Clusters.csv" in str(err.value)


def test_clicks_outside_the_stack(tmp_path: Path) -> None:
    csv = _clicks_csv(tmp_path / "a.csv", [("U", 1, 2, 1, 0), ("V", 30, 2, 1, 0)])
    with pytest.raises(AnnotationError, match=r"outside \(lines 3\)"):
        deepd3.read_annotations(csv, SHAPE)


def test_rater_masks(tmp_path: Path) -> None:
    good = np.zeros(SHAPE, np.uint8)
    good[1, 2:5, 3:6] = 255
    tifffile.imwrite(tmp_path / "Spine_U.tif", good)
    np.testing.assert_array_equal(deepd3.read_rater_mask(tmp_path / "Spine_U.tif", SHAPE), good > 0)
    tifffile.imwrite(tmp_path / "Spine_V.tif", good[:, :10])
    with pytest.raises(ShapeMismatchError, match=r"Spine_V.tif: .*\(4, 10, 24\)"):
        deepd3.read_rater_mask(tmp_path / "Spine_V.tif", SHAPE)
    good[0, 0, 0] = 1
    tifffile.imwrite(tmp_path / "Spine_W.tif", good)
    with pytest.raises(
        DataFormatError, match=r"Spine_W.tif: expected a binary mask.*\[0, 1, 255\]"
    ):
        deepd3.read_rater_mask(tmp_path / "Spine_W.tif", SHAPE)


def test_majority_is_more_than_half() -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random((3, 5, 5)) > 0.5 for _ in range(3)]
    np.testing.assert_array_equal(deepd3.majority(masks), np.sum(masks, axis=0) >= 2)
    assert not deepd3.majority([masks[0], ~masks[0]]).any()  # a tie is not a majority


def test_find_files_names_the_missing_dendrite_mask(tmp_path: Path) -> None:
    names = (deepd3.TRAINING, deepd3.VALIDATION, deepd3.BENCHMARK, deepd3.ANNOTATIONS)
    for name in (*names, "Spine_U.tif", "Spine_V.tif", "Dendrite_U_dendrite.tif"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(MissingFileError, match=r"Dendrite_V.tif: rater V .*Dendrite_V_dendrite"):
        deepd3.find_files(tmp_path)


def test_points_from_mask_are_the_3d_components_centroids() -> None:
    spine = np.zeros((5, 30, 40), bool)
    spine[1:3, 2:6, 3:7] = True  # centroid z 1.5, y 3.5, x 4.5
    spine[4, 20:23, 30:33] = True  # z 4, y 21, x 31
    pts = deepd3.points_from_mask(spine, (500.0, 100.0, 100.0))
    got = pts.sort_values("x")[["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(got, [[4.5, 3.5, 1.5], [31.0, 21.0, 4.0]])
    np.testing.assert_allclose(pts.sort_values("x")["z_nm"], [750.0, 2000.0])
    assert deepd3.points_from_mask(np.zeros((2, 4, 4), bool), (1.0, 1.0, 1.0)).empty
