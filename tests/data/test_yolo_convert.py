"""d3set -> Ultralytics dataset: boxes from spine masks, 2.5D channels, stats, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from microseg.data.yolo_convert import (
    DATA_YAML,
    SUMMARY_JSON,
    SplitStats,
    convert_d3set_to_yolo,
    mask_boxes,
    plane_image,
    stack_boxes,
)
from microseg.errors import ConfigError, MissingFileError
from microseg.io.d3set import D3Set, meta_row, write_d3set
from microseg.io.yolo import read_yolo_labels


def _disk(mask: np.ndarray, cy: int, cx: int, r: float) -> None:
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = True


def _spine_plane() -> np.ndarray:
    """A head of radius 4 at (20, 30) on a 1-pixel neck running 10 px to the right."""
    m = np.zeros((48, 64), bool)
    _disk(m, 20, 30, 4)
    m[20, 34:45] = True
    return m


def test_component_box_spans_head_and_neck():
    boxes, areas = mask_boxes(_spine_plane(), box="component", min_box_px=1)
    assert boxes.tolist() == [[26.0, 16.0, 45.0, 25.0]]  # pixel edges: x2 = last column + 1
    assert areas[0] == _spine_plane().sum()


def test_head_box_drops_the_neck():
    boxes, _ = mask_boxes(_spine_plane(), box="head", min_box_px=1)
    x1, y1, x2, y2 = boxes[0]
    assert (y1, y2) == (16.0, 25.0)
    assert 26 <= x1 <= 27 and 34 <= x2 <= 36  # the disk, not the neck reaching to 45
    centre_x = (x1 + x2) / 2 - 0.5
    assert abs(centre_x - 30) <= 1


def test_thin_component_head_is_the_whole_component():
    m = np.zeros((16, 16), bool)
    m[5, 2:14] = True  # a 1-px line has no thick part: keep it whole
    assert mask_boxes(m, box="head", min_box_px=1)[0].tolist() == [[2.0, 5.0, 14.0, 6.0]]


def test_eight_connectivity_and_size_filter():
    m = np.zeros((32, 32), bool)
    m[2:4, 2:4] = True
    m[4:6, 4:6] = True  # touches the first block only diagonally: one component of 8 px
    m[20:23, 20:22] = True  # 6 px
    m[10:30, 10:12] = False
    stats = SplitStats()
    boxes, areas = mask_boxes(m, min_box_px=7, max_box_px=100, stats=stats)
    assert boxes.tolist() == [[2.0, 2.0, 6.0, 6.0]] and areas.tolist() == [8]
    assert (stats.components, stats.dropped_small, stats.dropped_large) == (2, 1, 0)
    stats = SplitStats()
    boxes, _ = mask_boxes(m, min_box_px=1, max_box_px=7, stats=stats)
    assert len(boxes) == 1 and stats.dropped_large == 1


def test_pad_grows_and_clips():
    m = np.zeros((20, 20), bool)
    m[0:4, 10:14] = True
    boxes, _ = mask_boxes(m, min_box_px=1, pad_px=2)
    assert boxes.tolist() == [[8.0, 0.0, 16.0, 6.0]]


def test_stack_boxes_centres_use_voxel_centres():
    mask = np.zeros((3, 32, 32), bool)
    mask[1, 10:13, 20:23] = True  # voxels 10..12 / 20..22: centre (11, 21)
    df = stack_boxes(mask, min_box_px=1)
    assert df[["z", "x", "y", "area"]].values.tolist() == [[1, 21.0, 11.0, 9]]


def test_25d_channels_are_neighbour_planes_with_edges_repeated():
    stack = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 100, 200)])
    first = plane_image(stack, 0, 0.0, 200.0, "25d")
    assert first.shape == (4, 4, 3)
    assert first[0, 0].tolist() == [0, 0, 128]  # z-1 repeats z=0
    assert plane_image(stack, 2, 0.0, 200.0, "25d")[0, 0].tolist() == [128, 255, 255]
    assert plane_image(stack, 1, 0.0, 200.0, "single").shape == (4, 4)
    with pytest.raises(ConfigError):
        plane_image(stack, 1, 0.0, 200.0, "rgb")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ whole conversion
def _d3(tmp_path, name: str, n_stacks: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i in range(n_stacks):
        shape = (4, 48, 64)
        img = rng.normal(200, 10, shape)
        spine = np.zeros(shape, bool)
        for z in (1, 2):  # planes 0 and 3 stay empty
            _disk(spine[z], 12 + 10 * i, 20, 3)
            _disk(spine[z], 30, 45, 2.5)
        img[spine] += 800
        key = f"x{i}"
        stacks[key] = img.astype(np.uint16)
        spines[key] = spine
        dendrites[key] = np.zeros(shape, bool)
        rows.append(meta_row(shape, 0.094, 0.5, f"s{i}", timestamp="20260101_000000"))
    path = tmp_path / name
    write_d3set(path, D3Set(stacks, dendrites, spines, pd.DataFrame(rows)))
    return str(path)


@pytest.fixture()
def d3_pair(tmp_path):
    return _d3(tmp_path, "train.d3set", 2, 0), _d3(tmp_path, "val.d3set", 1, 1)


def test_convert_writes_an_ultralytics_dataset(d3_pair, tmp_path):
    out = tmp_path / "yolo"
    data_yaml = convert_d3set_to_yolo(*d3_pair, out, min_box_px=5, box="component")
    assert data_yaml == out / DATA_YAML
    spec = yaml.safe_load(data_yaml.read_text())
    assert "path" not in spec  # the same bytes wherever the folder is
    from ultralytics.data.utils import check_det_dataset

    resolved = check_det_dataset(str(data_yaml.resolve()), autodownload=False)
    assert Path(resolved["path"]) == out.resolve()  # Ultralytics roots it at the yaml's folder
    assert Path(resolved["train"]) == out.resolve() / "images" / "train"
    assert (spec["train"], spec["val"], spec["names"]) == (
        "images/train",
        "images/val",
        {0: "spine"},
    )
    train = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert train[:5] == ["x0_z000.png", "x0_z001.png", "x0_z002.png", "x0_z003.png", "x1_z000.png"]
    assert len(train) == 8 and len(list((out / "labels" / "val").iterdir())) == 4
    img = Image.open(out / "images" / "train" / "x0_z001.png")
    assert img.mode == "L" and img.size == (64, 48)
    arr = np.asarray(img)
    assert arr.max() == 255 and arr.min() == 0  # per-stack percentile scaling
    boxes, cls = read_yolo_labels(out / "labels" / "train" / "x0_z001.txt", (48, 64))
    assert cls.tolist() == [0, 0]
    assert sorted(np.round(boxes).tolist()) == [[17, 9, 24, 16], [43, 28, 48, 33]]
    assert (out / "labels" / "train" / "x0_z000.txt").read_text() == ""
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["splits"]["train"]["boxes"] == 8 and summary["splits"]["val"]["boxes"] == 4
    assert summary["splits"]["train"]["empty_images"] == 4
    assert summary["options"]["box"] == "component"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".yolo")]  # no temp left


def test_convert_25d_and_empty_plane_policy(d3_pair, tmp_path):
    out = tmp_path / "yolo25"
    convert_d3set_to_yolo(*d3_pair, out, min_box_px=5, channels="25d", include_empty=False)
    train = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert train == ["x0_z001.png", "x0_z002.png", "x1_z001.png", "x1_z002.png"]
    assert len(list((out / "images" / "val").iterdir())) == 4  # validation keeps every plane
    rgb = np.asarray(Image.open(out / "images" / "train" / "x0_z001.png"))
    assert rgb.shape == (48, 64, 3)
    # channel 0 is plane 0 (no spines), channel 1 plane 1 (spine at row 12, col 20)
    assert rgb[12, 20, 1] > 200 and rgb[12, 20, 0] < 100
    summary = json.loads((out / SUMMARY_JSON).read_text())
    assert summary["splits"]["train"]["empty_planes_skipped"] == 4


def test_convert_failure_leaves_previous_output(d3_pair, tmp_path):
    out = tmp_path / "yolo"
    convert_d3set_to_yolo(*d3_pair, out, min_box_px=5)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(MissingFileError):
        convert_d3set_to_yolo(d3_pair[0], tmp_path / "missing.d3set", out)
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": "rgb"},
        {"box": "mask"},
        {"min_box_px": 10, "max_box_px": 5},
        {"include_empty": 1.5},
        {"norm_percentiles": (99, 1)},
    ],
)
def test_convert_rejects_bad_options(d3_pair, tmp_path, kwargs):
    with pytest.raises(ConfigError):
        convert_d3set_to_yolo(*d3_pair, tmp_path / "y", **kwargs)


def test_head_boxes_localise_synthetic_spines_better(tiny_spines):
    """Oracle: ground-truth boxes -> 3D dedup -> points; head centres sit nearer the truth."""
    from microseg.evaluate.points import match_points
    from microseg.infer.dedup import dedup_3d
    from microseg.io.d3set import read_d3set
    from microseg.io.points import read_points

    d3 = read_d3set(tiny_spines / "val.d3set")
    gt = read_points(tiny_spines / "points" / "val_x0.csv")
    vs = (500.0, 94.0, 94.0)
    dist = {}
    for box in ("component", "head"):
        df = stack_boxes(d3.spines["x0"], box=box, min_box_px=10)
        pts = dedup_3d(df, vs, 1500.0, score_col="area")
        m = match_points(pts[["z", "y", "x"]].to_numpy(), gt[["z", "y", "x"]].to_numpy(), vs)
        dist[box] = m.mean_distance_nm
    assert dist["head"] < dist["component"]


def test_the_same_bytes_in_another_clone(tmp_path, monkeypatch):
    """The summary named the d3sets by absolute path: a clone elsewhere (or a teammate's) had a
    different data/yolo/spines hash, and DVC retrained YOLO for nothing."""
    import hashlib

    def tree(root):
        return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip

    outs = []
    for clone in ("a", "bb"):
        root = tmp_path / clone
        root.mkdir()
        monkeypatch.chdir(root)
        _d3(root, "train.d3set", 1, 0), _d3(root, "val.d3set", 1, 1)
        convert_d3set_to_yolo("train.d3set", "val.d3set", "yolo", min_box_px=5)
        outs.append(tree(root / "yolo"))
    assert outs[0] == outs[1] and outs[0]
