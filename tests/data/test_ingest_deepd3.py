"""``format: deepd3``: a folder written in DeepD3's own conventions, ingested as the pipeline's
spine dataset (manifest, consensus labels, one point per cluster, raters, the source layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from microseg.config import DatasetConfig, SynthSpinesConfig, load_params
from microseg.data.ingest import SPINE_CLASSES, ingest
from microseg.data.manifest import read_manifest
from microseg.data.synthesize import write_spines
from microseg.errors import DataFormatError, MicrosegError, MissingFileError, ShapeMismatchError
from microseg.io import d3set, points, tiff

SHAPE = (4, 20, 24)
RATERS = ("U", "V", "W")
#: DeepD3's Annotations_and_Clusters.csv columns: Rater, X, Y (pixels), Pos (plane), label
CLICKS = [
    ("U", 2, 3, 1, 0), ("V", 4, 5, 2, 0), ("W", 3, 7, 0, 0),  # one spine, three raters
    ("U", 10, 11, 3, 1),                                      # one rater only
    ("V", 20.5, 1, 1, 2), ("W", 21.5, 2, 2, 2),               # two raters
]  # fmt: skip
CENTROIDS_XYZ = [[3, 5, 1], [10, 11, 3], [21, 1.5, 1.5]]


def _d3set(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, 4000, (3, 16, 18), dtype=np.uint16)
    dend, spine = np.zeros(stack.shape, bool), np.zeros(stack.shape, bool)
    dend[:, 6:9, :], spine[1, 3:6, 4:7] = True, True
    meta = pd.DataFrame([d3set.meta_row(stack.shape, 0.094, 0.5, "tiny.tif", timestamp="t")])
    data = d3set.D3Set({"x0": stack}, {"x0": dend}, {"x0": spine}, meta)
    return d3set.write_d3set(path, data)


def _rater_masks(seed: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {r: (rng.random(SHAPE) > 0.6, rng.random(SHAPE) > 0.4) for r in RATERS}


def _deepd3_folder(root: Path, voxel_meta: bool = True) -> Path:
    """The published layout; rater U's masks 0/255 uint8, V's and W's 0/1."""
    root.mkdir(parents=True)
    _d3set(root / "DeepD3_Training.d3set", 0)
    _d3set(root / "DeepD3_Validation.d3set", 1)
    bench = np.random.default_rng(2).integers(0, 60000, SHAPE, dtype=np.uint16)
    meta = {"spacing": 0.5, "unit": "um", "axes": "ZYX"}  # ImageJ's voxel depth, µm
    kw = {"imagej": True, "resolution": (1 / 0.094, 1 / 0.094), "metadata": meta}
    tifffile.imwrite(root / "DeepD3_Benchmark.tif", bench, **(kw if voxel_meta else {}))
    pd.DataFrame(CLICKS, columns=["Rater", "X", "Y", "Pos", "label"]).to_csv(
        root / "Annotations_and_Clusters.csv"  # with pandas' index column, as DeepD3's file
    )
    for r, (sp, de) in _rater_masks().items():
        scale = 255 if r == "U" else 1
        tifffile.imwrite(root / f"Spine_{r}.tif", sp.astype(np.uint8) * scale)
        tifffile.imwrite(root / f"Dendrite_{r}.tif", de.astype(np.uint8) * scale)
    return root


def _cfg(src: Path, voxel: tuple[float, float, float] | None = None) -> DatasetConfig:
    return DatasetConfig(format="deepd3", source=src, task="spines", voxel_size_nm=voxel)


def test_deepd3_layout_ingested(tmp_path: Path) -> None:
    src = _deepd3_folder(tmp_path / "deepd3")
    out = ingest("real", _cfg(src, (999.0, 999.0, 999.0)), tmp_path / "prepared", seed=0, workers=1)
    m = read_manifest(out).set_index("sample_id")
    assert m.split.to_dict() == {"benchmark": "test", "train_x0": "train", "val_x0": "val"}
    # the TIFF's own voxel size wins over the dataset entry's
    bench = m.loc["benchmark"]
    assert (bench.voxel_size_z_nm, bench.voxel_size_y_nm, bench.voxel_size_x_nm) == pytest.approx(
        (500, 94, 94)
    )
    assert m.loc["train_x0"].voxel_size_x_nm == pytest.approx(94)
    assert bench.points_path == "points/benchmark.csv" and bench.n_instances == 3
    np.testing.assert_array_equal(
        tiff.read_stack(out / "images" / "benchmark.tif"),
        tifffile.imread(src / "DeepD3_Benchmark.tif"),
    )
    # consensus = numpy's majority vote of the three raters; labels: spine wins over dendrite
    raters = _rater_masks()
    spine = np.sum([sp for sp, _ in raters.values()], axis=0) >= 2
    dend = np.sum([de for _, de in raters.values()], axis=0) >= 2
    expected = np.where(spine, SPINE_CLASSES["spine"], np.where(dend, SPINE_CLASSES["dendrite"], 0))
    np.testing.assert_array_equal(tiff.read_stack(out / "labels" / "benchmark.tif"), expected)
    np.testing.assert_array_equal(tiff.read_stack(out / "raters" / "consensus_spines.tif"), spine)
    for r, (sp, de) in raters.items():  # every rater kept, as 0/1
        np.testing.assert_array_equal(tiff.read_stack(out / "raters" / f"rater{r}_spines.tif"), sp)
        np.testing.assert_array_equal(
            tiff.read_stack(out / "raters" / f"rater{r}_dendrites.tif"), de
        )
    # one point per cluster: the hand-computed centroids, in pixels and nm
    pts = points.read_points(out / "points" / "benchmark.csv", shape=SHAPE)
    np.testing.assert_allclose(pts[["x", "y", "z"]], CENTROIDS_XYZ)
    np.testing.assert_allclose(pts[["x_nm", "z_nm"]], [[282, 500], [940, 1500], [1974, 750]])
    assert pts.spine_id.tolist() == [0, 1, 2] and pts.n_raters.tolist() == [3, 1, 2]
    # the synthetic_spines source layout, which the spine stages read, with d3sets as they are
    assert (out / "train.d3set").read_bytes() == (src / "DeepD3_Training.d3set").read_bytes()
    assert (out / "val.d3set").read_bytes() == (src / "DeepD3_Validation.d3set").read_bytes()
    np.testing.assert_array_equal(tiff.read_stack(out / "benchmark" / "spine_mask.tif"), spine)
    assert tiff.open_stack(out / "benchmark" / "stack.tif").voxel_size_nm == pytest.approx(
        (500, 94, 94)
    )
    pd.testing.assert_frame_equal(points.read_points(out / "benchmark" / "spines.csv"), pts)


def test_voxel_size_from_the_entry_when_the_tiff_has_none(tmp_path: Path) -> None:
    src = _deepd3_folder(tmp_path / "deepd3", voxel_meta=False)
    with pytest.raises(DataFormatError, match=r"DeepD3_Benchmark.tif: no voxel size"):
        ingest("real", _cfg(src), tmp_path / "prepared", seed=0, workers=1)
    out = ingest("real", _cfg(src, (200.0, 100.0, 100.0)), tmp_path / "prepared", seed=0, workers=1)
    bench = read_manifest(out).set_index("sample_id").loc["benchmark"]
    assert (bench.voxel_size_z_nm, bench.voxel_size_x_nm) == (200, 100)
    np.testing.assert_allclose(pd.read_csv(out / "points" / "benchmark.csv").y_nm, [500, 1100, 150])


def _remove(name: str):
    return lambda root: (root / name).unlink()


def _rewrite_csv(root: Path) -> None:
    pd.DataFrame(CLICKS, columns=["Rater", "X", "Y", "Pos", "cluster"]).drop(
        columns="cluster"
    ).to_csv(root / "Annotations_and_Clusters.csv")


def _shrink_mask(root: Path) -> None:
    tifffile.imwrite(root / "Dendrite_V.tif", np.zeros((4, 20, 23), np.uint8))


def _grey_mask(root: Path) -> None:
    tifffile.imwrite(
        root / "Spine_W.tif", np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    )


@pytest.mark.parametrize(
    ("damage", "error", "named"),
    [
        (_remove("DeepD3_Training.d3set"), MissingFileError, "DeepD3_Training.d3set"),
        (_remove("DeepD3_Validation.d3set"), MissingFileError, "DeepD3_Validation.d3set"),
        (_remove("DeepD3_Benchmark.tif"), MissingFileError, "DeepD3_Benchmark.tif"),
        (_remove("Annotations_and_Clusters.csv"), MissingFileError, "Annotations_and_Clusters"),
        (_remove("Dendrite_W.tif"), MissingFileError, "Dendrite_W.tif"),
        (_remove("Spine_V.tif"), MissingFileError, "Dendrite_V.tif: .*no spine mask"),
        (
            _rewrite_csv,
            DataFormatError,
            r"Annotations_and_Clusters.csv: .*missing \['cluster_id'\]",
        ),
        (_shrink_mask, ShapeMismatchError, r"Dendrite_V.tif: .*\(4, 20, 23\)"),
        (_grey_mask, DataFormatError, "Spine_W.tif: expected a binary mask"),
    ],
)
def test_bad_layout_named_and_nothing_written(
    tmp_path: Path, damage, error: type[MicrosegError], named: str
) -> None:
    src = _deepd3_folder(tmp_path / "deepd3")
    damage(src)
    prepared = tmp_path / "prepared"
    with pytest.raises(error, match=named):
        ingest("real", _cfg(src), prepared, seed=0, workers=1)
    assert not prepared.exists() or list(prepared.iterdir()) == []


def test_spine_stages_read_the_prepared_layout(tmp_path: Path) -> None:
    """Stages reach a dataset's native files through ``dataset_source``: for deepd3 that is
    the prepared folder, where the layout they expect was written."""
    overrides = {"datasets.spines.format": "deepd3", "datasets.spines.source": str(tmp_path)}
    params = load_params("params.yaml", overrides)
    assert params.dataset_source("spines") == params.paths.prepared / params.spines.dataset
    legacy = {"datasets.spines.format": "synthetic_spines"}  # read where it lies
    source = load_params("params.yaml").datasets["spines"].source
    assert load_params("params.yaml", legacy).dataset_source("spines") == source


def test_generator_output_ingests_one_point_per_cluster_and_the_majority(tmp_path: Path) -> None:
    """``microseg synth spines`` writes DeepD3's layout: faint spines, so some are clicked by
    one, two or all three raters; ingest gives one point per cluster (its clicks' centroid, in
    nm too) and labels the benchmark with the raters' majority vote."""
    cfg = SynthSpinesConfig(
        seed=2, n_train=1, n_val=1, shape=(8, 32, 32), benchmark_shape=(8, 64, 64),
        benchmark_dendrites=(1, 1), n_batch=0,
        generator={"n_dendrites": (1, 1), "peak_photons": (10.0, 16.0)},
    )  # fmt: skip
    src = write_spines(cfg, tmp_path / "synthetic")
    clicks = pd.read_csv(src / "Annotations_and_Clusters.csv", index_col=0)
    per_cluster = clicks.groupby("label")
    assert set(per_cluster.size()) == {1, 2, 3} and set(clicks.Rater) == set(RATERS)
    out = ingest("spines", _cfg(src), tmp_path / "prepared", seed=0, workers=1)
    m = read_manifest(out).set_index("sample_id")
    assert m.split.to_dict() == {"benchmark": "test", "train_x0": "train", "val_x0": "val"}
    assert m.loc["benchmark"].n_instances == clicks.label.nunique()
    pts = points.read_points(out / "points" / "benchmark.csv", shape=(8, 64, 64))
    centroids = per_cluster[["X", "Y", "Pos"]].mean()
    np.testing.assert_allclose(pts[["x", "y", "z"]], centroids, atol=1e-6)  # CSV: 6 decimals
    np.testing.assert_allclose(pts[["x_nm", "y_nm", "z_nm"]], centroids * [94, 94, 500], atol=1e-3)
    assert pts.n_raters.tolist() == per_cluster.Rater.nunique().tolist()
    votes = sum(tifffile.imread(src / f"Spine_{r}.tif") > 0 for r in RATERS)
    dend_votes = sum(tifffile.imread(src / f"Dendrite_{r}.tif") > 0 for r in RATERS)
    expected = np.where(votes >= 2, 2, np.where(dend_votes >= 2, 1, 0))
    np.testing.assert_array_equal(tiff.read_stack(out / "labels" / "benchmark.tif"), expected)
    assert (expected == 2).any() and ((votes == 1) & (expected != 2)).any()  # a vote decided
    # the generator's per-stack head points reach the d3set samples (validation needs them)
    for sid in ("train_x0", "val_x0"):
        pd.testing.assert_frame_equal(
            points.read_points(out / "points" / f"{sid}.csv"),
            points.read_points(src / "points" / f"{sid}.csv"),
        )
