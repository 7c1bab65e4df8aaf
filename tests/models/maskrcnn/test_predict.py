"""Mask R-CNN prediction: post-processing, mask pasting, tiling, the predictor's type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.models.maskrcnn import (
    Detections,
    MaskRCNNPostConfig,
    MaskRCNNSegmenter,
    detect_tiled,
    paste_mask,
    resolve_instances,
    tile_windows,
)

#: resnet18-FPN with few proposals/detections: a CPU forward pass of a 64 px image in ~1 s
TINY = {
    "engine": "torchvision",
    "backbone": "resnet18",
    "box_batch_size_per_image": 16,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_detections_per_img": 10,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def disk_mask(shape, centre, radius) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[disk(centre, radius, shape=shape)] = True
    return m


# -- post-processing (pure) -------------------------------------------------------------------
def test_resolve_instances_orders_ids_by_score_and_gives_overlaps_to_the_higher_score():
    shape = (40, 40)
    a = disk_mask(shape, (15, 15), 8)  # overlaps b
    b = disk_mask(shape, (15, 24), 8)
    c = disk_mask(shape, (32, 32), 5)
    masks = np.stack([a, b, c]).astype(np.float32) * 0.9  # probabilities above 0.5
    labels, scores = resolve_instances(
        Detections.from_masks(masks, [0.6, 0.9, 0.7]), shape, MaskRCNNPostConfig(min_size=0)
    )
    assert labels.dtype == np.uint16
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6])  # id k has scores[k - 1]
    # b (0.9) is id 1 and keeps every pixel of its own; a (0.6) only what b left over
    assert np.array_equal(labels == 1, b)
    assert np.array_equal(labels == 2, c)
    assert np.array_equal(labels == 3, a & ~b)
    # hand count: the overlap a & b belongs to b
    assert np.count_nonzero(labels == 3) == a.sum() - (a & b).sum()


def test_resolve_instances_thresholds_scores_masks_and_small_objects():
    shape = (30, 30)
    big = disk_mask(shape, (10, 10), 6).astype(np.float32)
    faint = np.where(disk_mask(shape, (22, 22), 6), 0.4, 0.0)  # mask prob below 0.5
    weak = disk_mask(shape, (22, 8), 5).astype(np.float32)  # score below 0.5
    tiny = disk_mask(shape, (5, 25), 1).astype(np.float32)  # 5 px < min_size
    dets = Detections.from_masks(
        np.stack([big, np.asarray(faint, np.float32), weak, tiny]), [0.8, 0.95, 0.3, 0.99]
    )
    labels, scores = resolve_instances(dets, shape, MaskRCNNPostConfig(min_size=10))
    assert labels.max() == 1 and np.array_equal(labels == 1, big > 0)
    np.testing.assert_allclose(scores, [0.8])
    # with the score floor lowered and min_size 0, the weak and tiny ones come back in order
    labels, scores = resolve_instances(
        dets, shape, MaskRCNNPostConfig(score_thresh=0.2, min_size=0)
    )
    np.testing.assert_allclose(scores, [0.99, 0.8, 0.3])
    assert np.count_nonzero(labels == 1) == tiny.sum()


def test_resolve_instances_drops_a_detection_fully_covered_by_a_better_one():
    shape = (20, 20)
    outer = disk_mask(shape, (10, 10), 7)
    inner = disk_mask(shape, (10, 10), 3)
    labels, scores = resolve_instances(
        Detections.from_masks(np.stack([inner, outer]), [0.6, 0.9]),
        shape,
        MaskRCNNPostConfig(min_size=0),
    )
    assert labels.max() == 1 and scores.tolist() == pytest.approx([0.9])


def test_resolve_instances_uses_crop_offsets_and_clips_at_the_border():
    crop = np.ones((4, 6), bool)
    dets = Detections([0.9], [[17, 8, 23, 12]], [crop], [[8, 17]])  # runs past x = 20
    labels, scores = resolve_instances(dets, (16, 20), MaskRCNNPostConfig(min_size=0))
    expect = np.zeros((16, 20), np.uint16)
    expect[8:12, 17:20] = 1
    assert np.array_equal(labels, expect) and scores.size == 1


def test_paste_mask_matches_torchvision_paste():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(0)
    probs = rng.random((3, 28, 28)).astype(np.float32)
    boxes = np.float32([[3.2, 4.7, 20.1, 15.9], [30, 2, 47.5, 30], [-3, 25, 9, 44]])
    shape = (40, 45)
    ref = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), shape)
    for i in range(3):
        crop, (y, x) = paste_mask(probs[i], boxes[i], shape)
        full = np.zeros(shape, np.float32)
        full[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        np.testing.assert_allclose(full, ref[i, 0].numpy(), atol=1e-6)


# -- tiling ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "tile", "overlap"), [(100, 40, 10), (64, 64, 8), (257, 64, 16)])
def test_tile_cores_partition_the_axis(size, tile, overlap):
    wins = tile_windows(size, tile, overlap)
    assert wins[0][1] == 0 and wins[-1][2] == size
    for (s, c0, c1), (s2, c2, _) in zip(wins, [*wins[1:], (size, size, size)], strict=True):
        assert c1 == c2 and s <= c0 < c1 <= s + tile  # contiguous cores inside their tile
        assert s + tile <= size
        if s2 < size:
            assert s2 - s <= tile - overlap and c1 - s2 >= overlap // 2  # margin to the cut


def _blob_detector(image: torch.Tensor) -> Detections:
    """A stand-in network: every connected bright blob (cut or not) is one detection."""
    from scipy import ndimage

    lab, _ = ndimage.label(image[0].numpy() > 0.5)
    masks, boxes, offsets, scores = [], [], [], []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        masks.append(lab[sl] == i)
        boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        offsets.append([sl[0].start, sl[1].start])
        scores.append(1.0 - 0.001 * i)
    return Detections(scores, np.reshape(boxes, (-1, 4)), masks, np.reshape(offsets, (-1, 2)))


def test_tiled_detection_equals_whole_image_detection():
    rng = np.random.default_rng(3)
    shape = (150, 170)
    truth = np.zeros(shape, np.uint16)
    for i in range(1, 40):
        truth[disk(rng.uniform(5, 145, 2) * [1, 170 / 150], rng.uniform(3, 7), shape=shape)] = i
    image = torch.from_numpy(np.repeat((truth > 0)[None].astype(np.float32), 3, axis=0))
    post = MaskRCNNPostConfig(min_size=0, max_size=48, tile_overlap=20)
    whole, _ = resolve_instances(_blob_detector(image), shape, post)
    tiled_dets = detect_tiled(_blob_detector, image, post.max_size, post.tile_overlap)
    tiled, _ = resolve_instances(tiled_dets, shape, post)
    assert len(tiled_dets) == whole.max()  # no object twice, none lost
    # same objects (ids may differ): a one-to-one map between the two label images
    pairs = {(a, b) for a, b in zip(whole.ravel(), tiled.ravel(), strict=True)}
    assert len(pairs) == whole.max() + 1 and len({a for a, _ in pairs}) == len(pairs)
    assert np.array_equal(whole > 0, tiled > 0)


# -- the network behind the family's prediction types ------------------------------------------
def test_build_and_predict_return_the_family_prediction_type():
    seg = MaskRCNNSegmenter.build(**TINY, post={"score_thresh": 0.0, "min_size": 0})
    assert seg.engine == "torchvision"
    rng = np.random.default_rng(0)
    grey = (rng.random((64, 72)) * 255).astype(np.uint8)
    colour = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    out = seg.predict([grey, colour], device="auto")
    assert len(out) == 2
    for (labels, scores), image in zip(out, (grey, colour), strict=True):
        assert labels.dtype == np.uint16 and labels.shape == image.shape[:2]
        assert scores.dtype == np.float32 and scores.shape == (labels.max(),)
        assert np.all(np.diff(scores) <= 0)  # ids in decreasing score order
        assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))
    assert out[0][0].max() > 0  # untrained, but with no floor some boxes come through
    # predict's per-call override of the score floor
    labels, scores = seg.predict([grey], score_thresh=1.0)[0]
    assert labels.max() == 0 and scores.size == 0
    # the stages' predictor: the same labels, no probability map, a score per id
    labels2, prob, by_id = seg.as_predictor()(grey)
    assert np.array_equal(labels2, out[0][0]) and prob is None
    assert by_id == {i + 1: pytest.approx(float(s)) for i, s in enumerate(out[0][1])}
    assert np.array_equal(seg(grey), labels2)
