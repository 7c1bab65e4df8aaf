"""COCO JSON: RLE and polygon round trips, pycocotools interoperability, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from skimage.draw import ellipse

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.coco import (
    coco_to_labels,
    labels_to_coco,
    labels_to_coco_results,
    read_coco,
    validate_coco,
    write_coco,
)


def _blobs(shape=(64, 80), seed=0, n=6) -> np.ndarray:
    """Non-overlapping ellipses, some touching the border, labels 1..n."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    value = 0
    while value < n:
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        rr, cc = ellipse(r, c, rng.integers(4, 9), rng.integers(4, 9), shape=shape)
        if (labels[rr, cc] == 0).all():
            value += 1
            labels[rr, cc] = value
    return labels


def test_rle_round_trip_is_exact():
    samples = [(7, "a.png", _blobs(seed=1)), (9, "b.png", _blobs(seed=2, n=3))]
    coco = labels_to_coco(samples, mode="rle")
    assert [im["id"] for im in coco["images"]] == [7, 9]
    assert len(coco["annotations"]) == 9
    ann = coco["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str)
    assert ann["iscrowd"] == 0 and ann["category_id"] == 1
    for image_id, _, labels in samples:
        np.testing.assert_array_equal(coco_to_labels(coco, image_id), labels)


def test_bbox_and_area_follow_coco_convention():
    labels = np.zeros((10, 12), np.uint16)
    labels[2:5, 3:9] = 1  # rows 2..4, cols 3..8
    (ann,) = labels_to_coco([(1, "x.png", labels)])["annotations"]
    assert ann["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert ann["area"] == 18


def test_polygon_round_trip_iou():
    labels = _blobs(seed=3, n=8)
    coco = labels_to_coco([(1, "p.png", labels)], mode="polygon")
    assert all(isinstance(a["segmentation"], list) for a in coco["annotations"])
    back = coco_to_labels(coco, 1)
    ious = []
    for value in range(1, 9):
        a, b = labels == value, back == value
        ious.append((a & b).sum() / (a | b).sum())
        assert ious[-1] > 0.85, f"instance {value}: IoU {ious[-1]:.3f}"
    assert np.mean(ious) > 0.99  # contours on pixel edges (+0.5 shift) rasterise back exactly


def test_non_consecutive_labels_are_renumbered_in_order():
    labels = np.zeros((20, 20), np.uint16)
    labels[1:5, 1:5] = 40
    labels[10:15, 10:15] = 7
    back = coco_to_labels(labels_to_coco([(1, "x.png", labels)]), 1)
    assert back[2, 2] == 2 and back[12, 12] == 1  # increasing label order: 7 -> 1, 40 -> 2


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def test_uncompressed_rle_and_polygons_decode():
    labels = _blobs(seed=4, n=2)
    labels[:12, :12] = 0
    square = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0, 1.0, 9.0]]  # pixel edges: covers rows/cols 1..8
    segmentations = [_uncompressed_rle(labels == 1), _uncompressed_rle(labels == 2), square]
    coco = {
        "images": [{"id": 1, "height": 64, "width": 80}],
        "annotations": [
            {"id": i, "image_id": 1, "category_id": 1, "segmentation": seg}
            for i, seg in enumerate(segmentations, start=1)
        ],
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    back = coco_to_labels(coco, 1)
    np.testing.assert_array_equal(back[12:], labels[12:])
    np.testing.assert_array_equal(back[:, 12:], labels[:, 12:])
    expected = np.zeros((12, 12), np.uint16)
    expected[1:9, 1:9] = 3
    assert (back[:12, :12] != expected).sum() <= 8  # rasterised edge pixels may differ


def test_rle_size_mismatch():
    coco = labels_to_coco([(1, "a.png", _blobs())])
    coco["images"][0]["height"] = 65
    with pytest.raises(ShapeMismatchError, match="RLE size"):
        coco_to_labels(coco, 1)


def test_pycocotools_loads_and_scores_what_we_write(tmp_path):
    labels = {1: _blobs(seed=5), 2: _blobs(seed=6)}
    gt_path = write_coco(
        tmp_path / "gt.json", labels_to_coco([(i, f"{i}.png", lab) for i, lab in labels.items()])
    )
    results = []
    for image_id, lab in labels.items():
        results += labels_to_coco_results(image_id, lab, np.linspace(0.9, 0.5, int(lab.max())))
    res_path = write_coco(tmp_path / "res.json", results)
    gt = COCO(str(gt_path))
    assert len(gt.getAnnIds()) == 12 and gt.loadCats(1)[0]["name"] == "nucleus"
    assert gt.annToMask(gt.loadAnns(1)[0]).sum() == (labels[1] == 1).sum()
    dt = gt.loadRes(str(res_path))
    evaluator = COCOeval(gt, dt, iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # perfect predictions: AP = 1
    assert read_coco(gt_path) == json.loads(gt_path.read_text())


def test_results_scores_by_mapping_and_count_check():
    labels = _blobs(n=3)
    results = labels_to_coco_results(5, labels, {1: 0.1, 2: 0.2, 3: 0.3})
    assert [r["score"] for r in results] == [0.1, 0.2, 0.3]
    assert all(r["image_id"] == 5 for r in results)
    with pytest.raises(ShapeMismatchError, match="one score per instance"):
        labels_to_coco_results(5, labels, [0.5, 0.5])
    with pytest.raises(AnnotationError, match=r"no score for labels \[3\]"):
        labels_to_coco_results(5, labels, {1: 0.1, 2: 0.2})


def _valid() -> dict:
    return labels_to_coco([(1, "a.png", _blobs(n=2))])


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda c: c.pop("categories"), r"missing top-level keys \['categories'\]"),
        (lambda c: c["annotations"][1].update(image_id=99), r"\[2\].*unknown image ids \[99\]"),
        (lambda c: c["annotations"][0].update(category_id=5), r"\[1\].*category ids \[5\]"),
        (lambda c: c["annotations"][1].update(id=1), r"duplicate annotations ids \[1\]"),
        (lambda c: c["images"][0].pop("height"), r"images\[0\] lacks keys \['height'\]"),
    ],
)  # fmt: skip
def test_read_coco_validation(tmp_path, corrupt, match):
    coco = _valid()
    corrupt(coco)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match=match) as info:
        read_coco(path)
    assert "bad.json" in str(info.value)


def test_read_coco_bad_json_and_missing(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataFormatError, match=r"x\.json"):
        read_coco(tmp_path / "x.json")
    with pytest.raises(MissingFileError):
        read_coco(tmp_path / "y.json")


def test_write_coco_refuses_invalid(tmp_path):
    coco = _valid()
    coco["annotations"][0]["image_id"] = 3
    with pytest.raises(AnnotationError):
        write_coco(tmp_path / "out.json", coco)
    assert not (tmp_path / "out.json").exists()


def _with(seg=None, **image) -> dict:
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30, **image}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]] if seg is None else seg}],
        "categories": [{"id": 1, "name": "nucleus"}],
    }  # fmt: skip
    return coco


@pytest.mark.parametrize(
    ("coco", "said"),
    [
        (_with([[2, 2, float("nan"), 2, 10, 10]]), "NaN"),  # pycocotools: 22 GB or segfault
        (_with([[2, 2, 1e12, 2, 10, 10]]), "outside"),
        (_with([[2, 2, 10, 2, 10]]), "even number"),
        (_with([[2, 2, 10, 2]]), ">= 6"),
        (_with(["2,2,10,2,10,10"]), "list of numbers"),
        (_with([[2, 2, "x", 2, 10, 10]]), "list of numbers"),
        (_with({"size": [20, 30], "counts": [10, -5, 600]}), "non-negative"),
        (_with({"size": [20, 30], "counts": [10, 5]}), "sum to 15"),
        (_with({"size": [20, 31], "counts": [620]}), "differs from the image size"),
        (_with(height=-20), "height"),
        (_with(width=10**7), "width"),
        (_with(file_name="../../etc/passwd"), "leaves the dataset folder"),
        (_with(file_name="/abs/a.png"), "leaves the dataset folder"),
        (_with(7), "polygons or RLE"),
    ],
)
def test_unsafe_annotations_are_refused_before_pycocotools(coco, said) -> None:
    """Issue 18: validate_coco never looked at `segmentation`; pycocotools trusts it."""
    with pytest.raises(AnnotationError) as err:
        validate_coco(coco, "ann.json")
    assert said in str(err.value) and "ann.json" in str(err.value)


def test_a_sound_annotation_still_passes() -> None:
    validate_coco(_with(), "ann.json")
    validate_coco(_with({"size": [20, 30], "counts": [10, 5, 585]}), "ann.json")
