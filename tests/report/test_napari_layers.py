"""Result folders as napari layers: layer tuples checked against the files' writers and
trusted libraries (scikit-image centroids, scipy entropies), then a headless napari model."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.stats import entropy
from skimage.measure import regionprops_table

from microseg.errors import AnnotationError, DataFormatError, MicrosegError, MissingFileError
from microseg.io.ctc import read_track_file, write_ctc_gt, write_ctc_result
from microseg.io.tiff import write_stack
from microseg.report.napari_image import image_layers
from microseg.report.napari_layers import ctc_tracks, result_layers

VS = (500.0, 94.0, 94.0)
SPINES = pd.DataFrame(
    {
        "x": [3.0, 10.5, 30.0],
        "y": [4.0, 20.0, 7.25],
        "z": [1.0, 4.0, 2.0],
        "score": [0.9, 0.4, 0.65],
        "uncertainty": [0.1, 0.3, 0.2],
    }
)
# mother 1 divides into 2 and 3 at frame 2; 4 lives alone from frame 1
TRACKS = pd.DataFrame(
    [[1, 0, 1, 0], [2, 2, 4, 1], [3, 2, 3, 1], [4, 1, 4, 0]], columns=list("LBEP")
)


def by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def write_image(path: Path, voxel=VS) -> Path:
    data = np.random.default_rng(0).integers(0, 200, (6, 32, 40), dtype=np.uint16)
    return write_stack(path, data, voxel)


def ctc_masks() -> np.ndarray:
    """Blobs of uneven shape (centroids off the pixel grid) in the frames of TRACKS."""
    masks = np.zeros((5, 30, 36), np.uint16)
    for k, row in enumerate(TRACKS.itertuples()):
        y, x = 3 + 6 * k, 4 + 7 * k
        for t in range(row.B, row.E + 1):
            masks[t, y : y + 3 + t % 2, x + t : x + 4 + t] = row.L
            masks[t, y + 3 + t % 2, x + t] = row.L  # a tail: not a rectangle
    return masks


# -- spine points --------------------------------------------------------------------------------
def test_spine_points_line_up_with_the_image_in_nm(tmp_path: Path) -> None:
    stack = write_image(tmp_path / "stack.tif")
    folder = tmp_path / "pred"
    folder.mkdir()
    SPINES.to_csv(folder / "spines.csv", index=False)
    layers = result_layers(folder, image=stack)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("stack", "image"),
        ("spines", "points"),
    ]
    (img, img_kw, _), (pts, pts_kw, _) = layers
    np.testing.assert_array_equal(img, tifffile.imread(stack))
    np.testing.assert_array_equal(pts, SPINES[["z", "y", "x"]].to_numpy())
    pd.testing.assert_frame_equal(pts_kw["features"], SPINES[["score", "uncertainty"]])
    assert pts_kw["face_color"] == "score"
    for kw in (img_kw, pts_kw):  # one scale for all: the image's voxel size, world in nm
        assert kw["scale"] == pytest.approx(VS)
        assert kw["units"] == ("nm", "nm", "nm")
        assert kw["axis_labels"] == ("z", "y", "x")


def test_without_a_voxel_size_everything_is_in_pixels(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((6, 32, 40), np.uint16))  # no metadata
    folder = tmp_path / "pred"
    folder.mkdir()
    SPINES.to_csv(folder / "spines.csv", index=False)
    layers = result_layers(folder, image=tmp_path / "stack.tif")
    assert all(kw["scale"] == (1.0, 1.0, 1.0) and "units" not in kw for _, kw, _ in layers)
    # a voxel size known in the plane only cannot scale a stack: pixels, not a mix
    write_stack(tmp_path / "plane.tif", np.zeros((32, 40), np.uint16), VS)
    assert np.isnan(image_layers(tmp_path / "plane.tif")[1][0])
    layers = result_layers(folder, image=tmp_path / "plane.tif")
    assert {kw["scale"] for _, kw, _ in layers} == {(1.0, 1.0), (1.0, 1.0, 1.0)}


def test_fused_spines_are_the_box_centres_fusion_computes(tmp_path: Path) -> None:
    from microseg.infer.fusion import FusionParams, fuse_with_probabilities, write_fusion_outputs

    rng = np.random.default_rng(1)
    n = 12
    x1, y1 = rng.uniform(0, 50, n), rng.uniform(0, 40, n)
    det = pd.DataFrame(
        {
            "z": rng.integers(0, 8, n),
            "x1": x1,
            "y1": y1,
            "x2": x1 + rng.uniform(3, 9, n),
            "y2": y1 + rng.uniform(3, 9, n),
            "score": rng.uniform(0.2, 1.0, n),
        }
    )
    result = fuse_with_probabilities(det, rng.uniform(0, 1, n), FusionParams(), VS)
    write_fusion_outputs(tmp_path, result)
    ((pts, kw, kind),) = result_layers(tmp_path)
    assert (kind, kw["name"]) == ("points", "fused spines")
    np.testing.assert_allclose(pts, result.dedup[["z", "y", "x"]].to_numpy(float))
    np.testing.assert_allclose(kw["features"]["score"], result.dedup["score"])
    assert list(kw["features"]["status"]) == list(result.dedup["status"])


def test_points_take_the_uncertainty_maps_value_at_their_voxel(tmp_path: Path) -> None:
    mi = np.random.default_rng(2).random((6, 32, 40)).astype(np.float32)
    write_stack(tmp_path / "spine_mutual_information.tif", mi, VS)
    far = pd.DataFrame({"x": [1.0], "y": [1.0], "z": [9.0]})  # beyond the map's 6 planes
    pd.concat([SPINES, far]).to_csv(tmp_path / "spines.csv", index=False)
    layers = by_name(result_layers(tmp_path))
    _, mi_kw, _ = layers["spine mutual_information"]
    assert mi_kw["visible"] is False and mi_kw["scale"] == pytest.approx(VS)
    feature = layers["spines"][1]["features"]["spine_mutual_information"].to_numpy()
    z, y, x = (np.rint(SPINES[c]).astype(int) for c in "zyx")
    np.testing.assert_array_equal(feature[:3], mi[z, y, x])
    assert np.isnan(feature[3])


# -- Prob-UNet maps ------------------------------------------------------------------------------
PUNET_VS = (300.0, 50.0, 50.0)
PUNET_LAYERS = {
    "spine probability": "image",
    "dendrite probability": "image",
    "spine mask": "labels",
    "dendrite mask": "labels",
    **{
        f"{h} {m}": "image"
        for h in ("spine", "dendrite")
        for m in ("variance", "entropy", "mutual_information", "expected_entropy")
    },
}


def punet_samples() -> dict[str, np.ndarray]:
    """S probabilities per voxel for each head, as the Prob-UNet would draw them."""
    rng = np.random.default_rng(3)
    spine = rng.beta(0.5, 0.5, (8, 4, 10, 12))
    return {"spine": spine, "dendrite": spine[::-1] ** 2}


def punet_result(samples: dict[str, np.ndarray]) -> dict:
    """What ``predict_stack_punet`` returns: mean probability and running sums per head."""
    result = {"n_samples": 8, "temperature": 1.0}
    for head, p in samples.items():
        result[f"prob_{head}"] = p.mean(0).astype(np.float32)
        result[f"sum_p_{head}"] = p.sum(0).astype(np.float32)
        result[f"sum_p2_{head}"] = (p * p).sum(0).astype(np.float32)
        result[f"sum_entropy_{head}"] = entropy([p, 1 - p], axis=0).sum(0).astype(np.float32)
    return result


def write_punet_folder(folder: Path, result: dict) -> None:
    """The files ``models.punet.predict.write_predictions`` writes (its names, by hand: the
    writer imports torch, too slow here; the slow test below runs the writer itself)."""
    for head in ("spine", "dendrite"):
        write_stack(folder / f"prob_{head}.tif", result[f"prob_{head}"], PUNET_VS)
        mask = (result[f"prob_{head}"] >= 0.5).astype(np.uint8)
        write_stack(folder / f"mask_{head}_prior_S8_T1.00_size1_thr0.50.tif", mask, PUNET_VS)
        for stat in ("sum_p", "sum_p2", "sum_entropy"):
            write_stack(folder / f"{stat}_{head}.tif", result[f"{stat}_{head}"], PUNET_VS)
    meta = {"model": "punet", "n_samples": 8, "voxel_size_nm": list(PUNET_VS)}
    (folder / "punet_prediction.json").write_text(json.dumps(meta))


def test_punet_folder_gives_probabilities_masks_and_uncertainty(tmp_path: Path) -> None:
    samples = punet_samples()
    write_punet_folder(tmp_path, punet_result(samples))
    layers = by_name(result_layers(tmp_path))
    assert {k: v[2] for k, v in layers.items()} == PUNET_LAYERS
    assert all(kw["scale"] == pytest.approx(PUNET_VS) for _, kw, _ in layers.values())
    assert not any(layers[f"spine {m}"][1]["visible"] for m in ("entropy", "variance"))
    # the maps against scipy's entropies of the samples themselves
    spine = samples["spine"]
    mean = spine.mean(0)
    total = entropy([mean, 1 - mean], axis=0)
    aleatoric = entropy([spine, 1 - spine], axis=0).mean(0)
    np.testing.assert_allclose(layers["spine entropy"][0], total, atol=1e-5)
    np.testing.assert_allclose(layers["spine expected_entropy"][0], aleatoric, atol=1e-5)
    np.testing.assert_allclose(
        layers["spine mutual_information"][0], np.maximum(total - aleatoric, 0), atol=1e-5
    )
    np.testing.assert_allclose(layers["spine variance"][0], spine.var(0), atol=1e-5)
    np.testing.assert_array_equal(layers["spine mask"][0], mean >= 0.5)


@pytest.mark.slow
def test_punet_folder_from_the_real_writer(tmp_path: Path) -> None:
    from microseg.models.punet.predict import write_predictions

    write_predictions(tmp_path, punet_result(punet_samples()), PUNET_VS, size_thr=1)
    layers = by_name(result_layers(tmp_path))
    assert {k: v[2] for k, v in layers.items()} == PUNET_LAYERS
    assert all(kw["scale"] == pytest.approx(PUNET_VS) for _, kw, _ in layers.values())


# -- nuclei --------------------------------------------------------------------------------------
def nuclei_labels() -> np.ndarray:
    labels = np.zeros((40, 50), np.uint16)
    labels[3:10, 4:12], labels[20:31, 30:36], labels[25:28, 5:9] = 1, 2, 7
    return labels


def test_nuclei_labels_and_objects_as_microseg_predict_writes_them(tmp_path: Path) -> None:
    from microseg.io.exports import object_table, write_labels_ome_tiff, write_object_csv

    labels = nuclei_labels()
    prob = np.random.default_rng(4).random(labels.shape).astype(np.float32)
    write_labels_ome_tiff(tmp_path / "img1_labels.tif", labels, (0.2, 0.25))
    write_stack(tmp_path / "img1_probability.tif", prob, (np.nan, 200.0, 250.0))
    table = object_table(labels, (0.2, 0.25), scores={1: 0.9, 2: 0.8, 7: 0.3})
    write_object_csv(tmp_path / "img1_objects.csv", table)
    layers = by_name(result_layers(tmp_path))
    assert {k: v[2] for k, v in layers.items()} == {
        "img1_probability": "image",
        "img1_labels": "labels",
        "img1_objects": "points",
    }
    data, kw, _ = layers["img1_labels"]
    assert kw["axis_labels"] == ("y", "x")
    np.testing.assert_array_equal(data, labels)
    # centroids in pixels, as scikit-image finds them; the table's other columns as features
    pts, pkw, _ = layers["img1_objects"]
    props = pd.DataFrame(regionprops_table(labels, properties=("label", "centroid")))
    np.testing.assert_allclose(pts, props[["centroid-0", "centroid-1"]].to_numpy())
    assert list(pkw["features"]["id"]) == [1, 2, 7]
    np.testing.assert_allclose(pkw["features"]["score"], [0.9, 0.8, 0.3])
    # the OME pixel size (micrometres) scales everything, in nm
    assert {kw["scale"] for _, kw, _ in layers.values()} == {(200.0, 250.0)}


@pytest.mark.slow
def test_nuclei_labels_as_ome_zarr(tmp_path: Path) -> None:
    from microseg.io.exports import write_labels_ome_zarr

    write_labels_ome_zarr(tmp_path / "img1_labels.ome.zarr", nuclei_labels(), (0.2, 0.25))
    ((data, kw, kind),) = result_layers(tmp_path)
    assert (kw["name"], kind, kw["scale"]) == ("img1_labels", "labels", (200.0, 250.0))
    np.testing.assert_array_equal(data, nuclei_labels())


def test_an_image_shows_only_its_own_results(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.random.default_rng(5).integers(0, 255, (40, 50, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img1.png")
    out = tmp_path / "out"
    for name in ("img1", "img2"):
        write_stack(out / f"{name}_labels.tif", nuclei_labels())
    layers = result_layers(out, image=tmp_path / "img1.png")
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("img1", "image"),
        ("img1_labels", "labels"),
    ]
    np.testing.assert_array_equal(layers[0][0], rgb)
    assert layers[0][1]["rgb"] is True


# -- tracking ------------------------------------------------------------------------------------
def test_ctc_result_gives_masks_and_tracks_with_the_division_graph(tmp_path: Path) -> None:
    masks = ctc_masks()
    res = write_ctc_result(tmp_path, "01", masks, TRACKS)
    layers = by_name(result_layers(res))
    assert {k: v[2] for k, v in layers.items()} == {"masks": "labels", "tracks": "tracks"}
    np.testing.assert_array_equal(layers["masks"][0], masks)
    data, kw, _ = layers["tracks"]
    table = read_track_file(res / "res_track.txt")
    assert kw["graph"] == {int(r.L): [int(r.P)] for r in table.itertuples() if r.P}
    assert kw["graph"] == {2: [1], 3: [1]}
    # one row per label and frame B..E, at scikit-image's centroid, sorted by id then time
    expected = [
        (p["label"], t, p["centroid-0"], p["centroid-1"])
        for t, frame in enumerate(masks)
        for p in pd.DataFrame(regionprops_table(frame, properties=("label", "centroid"))).to_dict(
            "records"
        )
    ]
    expected.sort(key=lambda r: (r[0], r[1]))
    np.testing.assert_allclose(data, np.array(expected, float))
    assert len(data) == sum(r.E - r.B + 1 for r in table.itertuples())
    assert kw["axis_labels"] == ("t", "y", "x") and kw["scale"] == (1.0, 1.0, 1.0)


def test_ctc_ground_truth_with_its_frames_as_the_image(tmp_path: Path) -> None:
    masks = ctc_masks()
    frames = (masks * 40 + 5).astype(np.uint16)
    gt = write_ctc_gt(tmp_path, "02", frames, masks, TRACKS)
    layers = result_layers(gt / "TRA", image=tmp_path / "02")
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("02", "image"),
        ("masks", "labels"),
        ("tracks", "tracks"),
    ]
    np.testing.assert_array_equal(layers[0][0], frames)
    assert layers[0][1]["axis_labels"] == ("t", "y", "x")


def test_predict_tracking_output_folder_shows_the_image_own_res_folder(tmp_path: Path) -> None:
    masks = ctc_masks()
    movie = write_stack(tmp_path / "seq1.tif", (masks * 30).astype(np.uint16), axes="TYX")
    out = tmp_path / "out"
    write_ctc_result(out, "seq1", masks, TRACKS)
    write_ctc_result(out, "seq2", masks[:, ::-1].copy(), TRACKS)
    layers = result_layers(out, image=movie)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("seq1", "image"),
        ("seq1_RES masks", "labels"),
        ("seq1_RES tracks", "tracks"),
    ]
    assert all(kw["axis_labels"] == ("t", "y", "x") for _, kw, _ in layers)
    assert len(result_layers(out)) == 4  # without an image: both sequences


def test_ctc_tracks_keep_parents_that_end_before_daughters() -> None:
    data, graph = ctc_tracks(ctc_masks(), TRACKS)
    starts = {int(i): data[data[:, 0] == i, 1].min() for i in np.unique(data[:, 0])}
    ends = {int(i): data[data[:, 0] == i, 1].max() for i in np.unique(data[:, 0])}
    assert all(ends[p] < starts[d] for d, (p,) in graph.items())


# -- errors --------------------------------------------------------------------------------------
def test_bad_folders_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="no folder"):
        result_layers(tmp_path / "nothing")
    (tmp_path / "01_RES").mkdir()
    with pytest.raises(MissingFileError, match="subfolders: 01_RES"):
        result_layers(tmp_path)
    with pytest.raises(MissingFileError, match="expected the image"):
        result_layers(tmp_path / "01_RES", image=tmp_path / "missing.tif")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spines.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataFormatError, match=r"spines\.csv.*expected columns x, y, z"):
        result_layers(bad)


def test_inconsistent_ctc_results_are_refused(tmp_path: Path) -> None:
    res = write_ctc_result(tmp_path, "01", ctc_masks(), TRACKS)
    (res / "res_track.txt").write_text("1 0 1 0\n2 2 4 9\n3 2 3 1\n4 1 4 0\n")
    with pytest.raises(AnnotationError, match="parent 9"):
        result_layers(res)
    (res / "mask002.tif").unlink()
    with pytest.raises(DataFormatError, match=r"missing \[2\]"):
        result_layers(res)


def test_punet_json_must_be_json(tmp_path: Path) -> None:
    (tmp_path / "punet_prediction.json").write_text("{nope")
    write_stack(tmp_path / "prob_spine.tif", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataFormatError, match=r"punet_prediction\.json"):
        result_layers(tmp_path)


# -- napari ------------------------------------------------------------------------------------
def test_build_viewer_model_holds_the_layers(tmp_path: Path) -> None:
    pytest.importorskip("napari", reason="napari is the optional 'viewer' extra")
    from microseg.report.napari_viewer import build_viewer_model

    stack = write_image(tmp_path / "stack.tif")
    SPINES.to_csv(tmp_path / "spines.csv", index=False)
    model = build_viewer_model(tmp_path, image=stack)
    assert [(layer.name, type(layer).__name__) for layer in model.layers] == [
        ("stack", "Image"),
        ("spines", "Points"),
    ]
    points = model.layers["spines"]
    np.testing.assert_allclose(points.features["uncertainty"], SPINES["uncertainty"])
    np.testing.assert_allclose(points.scale, VS)
    np.testing.assert_allclose(model.layers["stack"].scale, VS)
    assert model.dims.current_step[0] == 3  # the middle of 6 planes

    res = write_ctc_result(tmp_path / "trk", "01", ctc_masks(), TRACKS)
    model = build_viewer_model(res)
    assert [type(layer).__name__ for layer in model.layers] == ["Labels", "Tracks"]
    assert model.layers["tracks"].graph == {2: [1], 3: [1]}


def test_missing_napari_is_one_line_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from microseg.report.napari_viewer import build_viewer_model

    monkeypatch.setitem(sys.modules, "napari", None)  # import napari -> ImportError
    with pytest.raises(MicrosegError, match=r"uv sync --extra viewer.*microseg\[viewer\]"):
        build_viewer_model(".")


def _qt_reason() -> str | None:
    if importlib.util.find_spec("napari") is None:
        return "napari is not installed (the optional 'viewer' extra)"
    try:
        import qtpy  # noqa: F401
    except ImportError as exc:
        return f"no Qt binding for napari to draw with ({exc})"
    if sys.platform == "linux" and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (napari draws only a shown window; try xvfb-run)"
    return None


@pytest.mark.skipif(_qt_reason() is not None, reason=str(_qt_reason()))
def test_screenshot_draws_the_points_on_the_image(tmp_path: Path) -> None:
    from PIL import Image

    from microseg.report.napari_viewer import save_screenshot

    stack = write_image(tmp_path / "stack.tif")
    SPINES.to_csv(tmp_path / "spines.csv", index=False)
    png = save_screenshot(tmp_path, tmp_path / "shot.png", image=stack)
    with Image.open(png) as im:
        pixels = np.asarray(im)
    assert im.format == "PNG" and min(pixels.shape[:2]) > 50
    assert pixels[..., :3].std() > 0  # something was drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png", "spines.csv", "stack.tif"]


@pytest.mark.skipif(
    importlib.util.find_spec("napari") is None or importlib.util.find_spec("qtpy") is None,
    reason="needs napari and qtpy (the error is about the Qt binding qtpy looks for)",
)
def test_screenshot_without_qt_says_how_to_install_it(tmp_path: Path) -> None:
    try:
        import qtpy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("a Qt binding is installed here: nothing is missing")
    from microseg.report.napari_viewer import save_screenshot

    SPINES.to_csv(tmp_path / "spines.csv", index=False)
    with pytest.raises(MicrosegError, match=r"no Qt binding.*uv sync --extra viewer"):
        save_screenshot(tmp_path, tmp_path / "shot.png")
    assert not (tmp_path / "shot.png").exists()
