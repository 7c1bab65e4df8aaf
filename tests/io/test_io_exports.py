"""Exports for Fiji, QuPath, napari and spreadsheets, each read back with the tool's own reader
(roifile, ome_zarr, bioio, json, pandas) and checked against skimage on the same labels."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk, ellipse, polygon
from skimage.measure import regionprops

from microseg.errors import DataFormatError, ShapeMismatchError
from microseg.io.exports import (
    object_outlines,
    object_table,
    write_imagej_rois,
    write_labels_ome_tiff,
    write_labels_ome_zarr,
    write_object_csv,
    write_qupath_geojson,
)


def _labels_2d() -> np.ndarray:
    """Shapes that trip contour code: a disk, an ellipse, an L, a 3x3 and a 1-pixel object,
    one touching the border, and ids far apart (regionprops must not walk 0..max)."""
    lab = np.zeros((60, 80), np.int32)
    lab[disk((15, 15), 9, shape=lab.shape)] = 3
    lab[ellipse(40, 55, 10, 18, shape=lab.shape, rotation=0.5)] = 100_000
    lab[5:25, 40:46] = 7
    lab[19:25, 46:60] = 7  # an L
    lab[50:53, 5:8] = 12  # 3x3
    lab[0:6, 70:80] = 9  # touches the border
    lab[57, 70] = 42  # one pixel
    return lab


def _labels_3d() -> np.ndarray:
    lab = np.zeros((4, 30, 40), np.uint16)
    lab[1:3, 5:15, 5:12] = 1
    lab[0:4, 18:26, 20:33] = 2
    return lab


def _polygon_mask(xy: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rasterise a polygon in ImageJ pixel coordinates (pixel centres at +0.5)."""
    mask = np.zeros(shape, bool)
    rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=shape)
    mask[rr, cc] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# -- ImageJ ROIs ---------------------------------------------------------------------------
def test_imagej_rois_read_back_as_the_polygons_written_and_cover_the_objects(tmp_path):
    from roifile import ROI_TYPE, roiread

    lab = _labels_2d()
    path = write_imagej_rois(tmp_path / "rois.zip", lab)
    rois = roiread(path)
    outlines = {str(label): xy for label, _, xy in object_outlines(lab)}
    assert sorted(r.name for r in rois) == sorted(str(i) for i in np.unique(lab)[1:])
    for roi in rois:
        assert roi.roitype == ROI_TYPE.POLYGON
        coords = roi.coordinates()
        np.testing.assert_allclose(coords, outlines[roi.name][:-1], atol=1e-4)  # x, y order
        mask = lab == int(roi.name)
        iou = _iou(_polygon_mask(coords, lab.shape), mask)
        assert iou > 0.9, (roi.name, iou)
    big = next(r for r in rois if r.name == "3")  # a disk of radius 9: the polygon is exact
    assert _iou(_polygon_mask(big.coordinates(), lab.shape), lab == 3) == 1.0


def test_outline_is_x_first_with_imagej_pixel_corners():
    lab = np.zeros((10, 20), np.uint8)
    lab[2:5, 3:13] = 1  # rows 2..4, columns 3..12: x in [3, 13), y in [2, 5)
    [(label, z, xy)] = list(object_outlines(lab))
    assert label == 1 and z is None
    np.testing.assert_array_equal(xy[0], xy[-1])  # closed
    assert xy[:, 0].min() == 3.0 and xy[:, 0].max() == 13.0
    assert xy[:, 1].min() == 2.0 and xy[:, 1].max() == 5.0


def test_imagej_rois_in_3d_carry_their_plane(tmp_path):
    from roifile import roiread

    lab = _labels_3d()
    rois = roiread(write_imagej_rois(tmp_path / "rois3d.zip", lab))
    planes = {(int(r.name.split("-z")[0]), r.z_position - 1) for r in rois}
    expected = {(int(i), z) for z in range(lab.shape[0]) for i in np.unique(lab[z]) if i}
    assert planes == expected
    for roi in rois:
        label, z = int(roi.name.split("-z")[0]), roi.z_position - 1
        assert roi.position == roi.z_position  # plain stacks use position, hyperstacks z
        assert _iou(_polygon_mask(roi.coordinates(), lab.shape[1:]), lab[z] == label) > 0.9


# -- OME-Zarr ------------------------------------------------------------------------------
def test_ome_zarr_labels_under_the_image_open_with_ome_zarr_and_bioio(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from microseg.io.bioformats import read_image

    lab = _labels_3d()
    image = (lab * 100 + 7).astype(np.uint16)
    path = write_labels_ome_zarr(
        tmp_path / "seg.ome.zarr", lab, (0.5, 0.1, 0.2), image=image, name="nuclei"
    )
    nodes = {str(n.zarr.path).rstrip("/").split("/")[-1]: n for n in Reader(parse_url(path))()}
    label_node = nodes["nuclei"]
    assert label_node.metadata["name"] == "nuclei"
    [[scale, *_]] = label_node.metadata["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [0.5, 0.1, 0.2]}
    assert [a["unit"] for a in label_node.metadata["axes"]] == ["micrometer"] * 3
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), lab)
    attrs = json.loads((path / "labels" / "nuclei" / "zarr.json").read_text())
    assert attrs["attributes"]["ome"]["image-label"]["source"] == {"image": "../../"}
    assert json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"][
        "labels"
    ] == ["nuclei"]

    img = read_image(path)
    np.testing.assert_array_equal(img.array, image)
    np.testing.assert_allclose(img.pixel_size_um, (0.5, 0.1, 0.2))
    seg = read_image(path / "labels" / "nuclei")
    np.testing.assert_array_equal(seg.array, lab)
    np.testing.assert_allclose(seg.pixel_size_um, (0.5, 0.1, 0.2))


def test_ome_zarr_labels_alone_are_the_image(tmp_path):
    from bioio import BioImage

    lab = _labels_2d()
    path = write_labels_ome_zarr(tmp_path / "labels.ome.zarr", lab, (0.25, 0.25))
    img = BioImage(path)
    assert (img.physical_pixel_sizes.Y, img.physical_pixel_sizes.X) == (0.25, 0.25)
    np.testing.assert_array_equal(img.get_image_data("YX"), lab)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_ome_zarr_channel_image_and_bad_shapes(tmp_path):
    from microseg.io.bioformats import read_image

    lab = _labels_2d()
    image = np.stack([lab % 251, lab % 13]).astype(np.uint8)
    path = write_labels_ome_zarr(tmp_path / "c.ome.zarr", lab, None, image=image)
    data = read_image(path, channel=1)
    np.testing.assert_array_equal(data.array, image[1])
    assert data.channel_names == ("Channel:0", "Channel:1")
    np.testing.assert_array_equal(read_image(path / "labels" / "labels").array, lab)
    assert read_image(path / "labels" / "labels").pixel_size_um is None  # no unit, no size
    with pytest.raises(ShapeMismatchError, match="image shape"):
        write_labels_ome_zarr(tmp_path / "bad.ome.zarr", lab, image=image[:, :10])
    with pytest.raises(ShapeMismatchError, match="2 positive numbers"):
        write_labels_ome_zarr(tmp_path / "bad.ome.zarr", lab, (0.5, 0.1, 0.1))


# -- OME-TIFF ------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", ["YX", "ZYX"])
def test_ome_tiff_labels_round_trip_with_sizes(tmp_path, dims):
    from bioio import BioImage

    lab = _labels_2d() if dims == "YX" else _labels_3d()
    sizes = (0.25, 0.2) if dims == "YX" else (0.5, 0.1, 0.2)
    path = write_labels_ome_tiff(tmp_path / "labels.ome.tif", lab, sizes, dims=dims)
    img = BioImage(path)
    np.testing.assert_array_equal(img.get_image_data(dims), lab)
    assert img.dtype == (np.uint32 if lab.max() > 65535 else lab.dtype)
    pps = img.physical_pixel_sizes
    assert sizes[-2:] == (pps.Y, pps.X)  # exact: decimal strings in the OME-XML
    assert (sizes[0] if dims == "ZYX" else None) == pps.Z


def test_ome_tiff_rejects_what_ome_cannot_hold(tmp_path):
    with pytest.raises(DataFormatError, match="uint32"):
        write_labels_ome_tiff(tmp_path / "x.ome.tif", np.full((4, 4), 2**33, np.int64))
    with pytest.raises(DataFormatError, match="integer"):
        write_labels_ome_tiff(tmp_path / "x.ome.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(ShapeMismatchError, match="dims"):
        write_labels_ome_tiff(tmp_path / "x.ome.tif", np.zeros((4, 4), np.uint8), dims="ZYX")
    assert not list(tmp_path.iterdir())  # nothing half-written


# -- table and CSV -------------------------------------------------------------------------
def test_csv_areas_are_regionprops_areas_times_pixel_area(tmp_path):
    lab = _labels_2d()
    table = object_table(lab, (0.2, 0.25))
    csv = pd.read_csv(write_object_csv(tmp_path / "objects.csv", table))
    pd.testing.assert_frame_equal(csv, table, check_dtype=False)
    regions = {r.label: r for r in regionprops(lab)}
    assert list(csv["id"]) == sorted(regions)
    for row in csv.itertuples():
        region = regions[row.id]
        assert row.area_px == region.area
        assert row.area_um2 == pytest.approx(region.area * 0.2 * 0.25)
        assert (row.y_px, row.x_px) == pytest.approx(region.centroid)
        assert (row.y_um, row.x_um) == pytest.approx(
            (region.centroid[0] * 0.2, region.centroid[1] * 0.25)
        )


def test_3d_table_has_volumes(tmp_path):
    lab = _labels_3d()
    table = object_table(lab, (0.5, 0.1, 0.2))
    assert "volume_um3" in table and "area_um2" not in table
    for row, region in zip(table.itertuples(), regionprops(lab), strict=True):
        assert row.id == region.label
        assert row.volume_px == region.area
        assert row.volume_um3 == pytest.approx(region.area * 0.5 * 0.1 * 0.2)
        assert (row.z_um, row.y_um, row.x_um) == pytest.approx(
            np.multiply(region.centroid, (0.5, 0.1, 0.2))
        )


def test_scores_intensity_and_uncertainty_on_a_hand_made_example():
    lab = np.array([[1, 1, 0, 0], [1, 0, 0, 5], [0, 0, 5, 5]], np.uint8)
    intensity = np.array([[10, 20, 99, 99], [30, 99, 99, 4], [99, 99, 6, 8]], float)
    uncertainty = np.array([[0.1, 0.2, 1, 1], [0.6, 1, 1, 0.0], [1, 1, 0.3, 0.6]])
    table = object_table(
        lab, intensity=intensity, scores={5: 0.75, 8: 0.1}, uncertainty=uncertainty
    )
    assert list(table.columns) == [
        "id", "y_px", "x_px", "area_px", "mean_intensity", "score", "mean_uncertainty"
    ]  # fmt: skip
    assert list(table["id"]) == [1, 5]
    assert list(table["area_px"]) == [3, 3]
    np.testing.assert_allclose(table["mean_intensity"], [20.0, 6.0])
    np.testing.assert_allclose(table["mean_uncertainty"], [0.3, 0.3])
    assert np.isnan(table["score"][0]) and table["score"][1] == 0.75  # 8 is not an object
    with pytest.raises(ShapeMismatchError, match="uncertainty"):
        object_table(lab, uncertainty=uncertainty[:2])


def test_bad_labels_and_pixel_sizes():
    with pytest.raises(DataFormatError, match="integer"):
        object_table(np.zeros((3, 3), float))
    with pytest.raises(DataFormatError, match=">= 0"):
        object_table(np.full((3, 3), -1))
    with pytest.raises(ShapeMismatchError, match=r"\(z, y, x\)"):
        object_table(np.zeros((2, 3, 3), np.uint8), (0.1, 0.1))
    with pytest.raises(ShapeMismatchError, match="positive"):
        object_table(np.zeros((3, 3), np.uint8), (0.1, float("nan")))


# -- QuPath GeoJSON ------------------------------------------------------------------------
def test_qupath_geojson_one_closed_polygon_per_object(tmp_path):
    lab = _labels_2d()
    path = write_qupath_geojson(tmp_path / "cells.geojson", lab, (0.2, 0.25))
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(np.unique(lab)) - 1
    outlines = {label: xy for label, _, xy in object_outlines(lab)}
    table = object_table(lab, (0.2, 0.25)).set_index("id")
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"] == {"name": "Nucleus"}
        label = int(props["name"])
        assert feature["geometry"]["type"] == "Polygon"
        [ring] = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) >= 4
        np.testing.assert_allclose(ring, outlines[label])  # pixel coordinates, x first
        assert _iou(_polygon_mask(np.array(ring), lab.shape), lab == label) > 0.9
        assert props["measurements"]["area_um2"] == pytest.approx(table.loc[label, "area_um2"])
        assert props["measurements"]["id"] == label


def test_qupath_geojson_3d_planes_and_no_class(tmp_path):
    lab = _labels_3d()
    doc = json.loads(
        write_qupath_geojson(tmp_path / "q.geojson", lab, classification=None).read_text()
    )
    planes = [(int(f["properties"]["name"]), f["geometry"]["plane"]) for f in doc["features"]]
    expected = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert sorted(planes, key=lambda p: (p[0], p[1]["z"])) == [
        (label, {"c": -1, "z": z, "t": 0}) for label, z in expected
    ]
    assert all("classification" not in f["properties"] for f in doc["features"])


# -- empty ---------------------------------------------------------------------------------
def test_empty_labels_give_empty_outputs(tmp_path):
    from roifile import roiread

    for lab, sizes in ((np.zeros((8, 9), np.uint16), (0.1, 0.1)), (np.zeros((2, 8, 9), int), None)):
        table = object_table(lab, sizes, intensity=np.ones(lab.shape), scores={1: 0.5})
        assert table.empty and {"id", "mean_intensity", "score"} <= set(table.columns)
        csv = pd.read_csv(write_object_csv(tmp_path / f"e{lab.ndim}.csv", table))
        assert csv.empty and list(csv.columns) == list(table.columns)
        assert roiread(write_imagej_rois(tmp_path / f"e{lab.ndim}.zip", lab)) == []
        doc = json.loads(write_qupath_geojson(tmp_path / f"e{lab.ndim}.geojson", lab).read_text())
        assert doc == {"type": "FeatureCollection", "features": []}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_labels_without_background_keep_their_ids():
    """One object filling the image (a tracking frame, a crop): no 0 in the label image."""
    table = object_table(np.full((8, 8), 7, np.uint16), (0.5, 0.5))
    assert table["id"].tolist() == [7] and table["area_um2"].tolist() == [16.0]
