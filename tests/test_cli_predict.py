"""`microseg predict` and `microseg fuse --input` on folders, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from microseg.cli import app
from microseg.io.tiff import read_stack, write_stack
from microseg.models.classical import otsu_watershed
from microseg.models.punet import ProbUNet, save_punet
from microseg.models.yolo import YoloSpineDetector

REPO = Path(__file__).resolve().parents[1]


def write_noise_stack(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stack = rng.normal(300, 40, (4, 64, 64))
    stack[1, 20:26, 30:36] += 2000  # a bright blob, so the nets' outputs vary
    write_stack(path, np.clip(stack, 0, 65535).astype(np.uint16), (500.0, 94.0, 94.0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cli_predict")
    YoloSpineDetector.build("n").save(root / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        root / "punet.pt",
    )
    stacks = root / "stacks"
    write_noise_stack(stacks / "a.tif", seed=1)
    write_noise_stack(stacks / "b.tif", seed=2)
    (stacks / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["yolo"]["convert"]["channels"] = "single"
    params["yolo"]["predict"]["conf"] = 0.0
    params["punet"]["predict"].update(n_samples=2, batch_planes=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    # fusion thresholds that keep every box: the pipeline's outputs are then non-empty
    (root / "fusion.yaml").write_text("high_conf: 0.0\nlow_conf: 0.0\n")
    return root


def test_predict_folder_reports_the_bad_stack_and_predicts_the_rest(setup: Path) -> None:
    out = setup / "pred"
    res = CliRunner().invoke(
        app,
        ["predict", str(setup / "stacks"), "--out", str(out), "--weights", str(setup / "yolo.pt"),
         "--params", str(setup / "params.yaml")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "2 of 3 stacks predicted" in res.output and "broken.tif" in res.output
    for stem in ("a", "b"):
        boxes = pd.read_csv(out / stem / "detections.csv")
        assert {"z", "x1", "y1", "x2", "y2", "score"} <= set(boxes.columns) and len(boxes) > 0
        assert (out / stem / "spines.csv").exists()
    assert not (out / "broken").exists()


def test_fuse_folder_writes_one_result_per_stack_and_resumes(setup: Path) -> None:
    out = setup / "fused"
    args = [
        "fuse", "--input", str(setup / "stacks"), "--out", str(out),
        "--yolo-weights", str(setup / "yolo.pt"), "--punet-weights", str(setup / "punet.pt"),
        "--fusion-params", str(setup / "fusion.yaml"), "--params", str(setup / "params.yaml"),
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 done, 0 skipped, 1 failed" in res.output and "broken.tif" in res.output
    for stem in ("a", "b"):
        dedup = pd.read_csv(out / stem / "predictions_dedup.csv")
        assert list(dedup.columns) == ["z", "x1", "y1", "x2", "y2", "score", "status"]
        assert len(dedup) > 0 and set(dedup["status"]) <= {"high", "validated"}
    again = CliRunner().invoke(app, args)
    assert "0 done, 2 skipped, 1 failed" in again.output
    # issue 18: other fusion params are another result, not a "skipped" old one
    (setup / "fusion_strict.yaml").write_text("high_conf: 0.9\nlow_conf: 0.5\n")
    strict = [a if a != str(setup / "fusion.yaml") else str(setup / "fusion_strict.yaml")
              for a in args]  # fmt: skip
    assert "2 done, 0 skipped" in CliRunner().invoke(app, strict).output
    assert "0 done, 2 skipped" in CliRunner().invoke(app, strict).output
    # an interrupted --overwrite (new results.json, no run.json yet) is redone, not trusted
    (out / "a" / "run.json").unlink()
    assert "1 done, 1 skipped" in CliRunner().invoke(app, strict).output


def test_spine_folder_resumes_and_keeps_a_summary(setup: Path) -> None:
    out = setup / "pred_resume"
    args = ["predict", str(setup / "stacks"), "--out", str(out), "--weights",
            str(setup / "yolo.pt"), "--params", str(setup / "params.yaml")]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "(0 now, 2 earlier), 1 failed" in again.output
    summary = pd.read_csv(out / "summary.csv")
    assert summary.set_index("input")["status"].to_dict() == {
        "a.tif": "skipped", "b.tif": "skipped", "broken.tif": "failed",
    }  # fmt: skip


def test_a_registered_spine_pipeline_folder_predicts_like_the_pipeline(setup: Path) -> None:
    """An MLflow spine model folder (as the registry downloads it) given as --model."""
    import json

    from microseg.infer.fusion import DEDUP_COLS
    from microseg.infer.spine_pipeline import (
        SpinePipelineConfig,
        predict_spines,
        read_fusion_params,
    )
    from microseg.models.punet import PunetSegmenter, load_punet

    folder = setup / "registered"
    (folder / "artifacts").mkdir(parents=True)
    cfg = SpinePipelineConfig(conf=0.0, iou=1.0, batch_planes=2, n_samples=2, device="cpu")
    (folder / "artifacts" / "config.json").write_text(json.dumps(cfg.to_dict()))
    files = {"yolo": "yolo.pt", "punet": "punet.pt", "fusion": "fusion.yaml"}
    for name in files.values():
        (folder / "artifacts" / name).write_bytes((setup / name).read_bytes())
    entries = {**files, "config": "config.json"}
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        + "".join(f"      {k}: {{path: artifacts/{n}}}\n" for k, n in entries.items())
        + "metadata: {task: spines, model_family: yolo+punet-fusion}\n"
    )
    out = setup / "registered_out"
    args = ["predict", str(setup / "stacks" / "a.tif"), "--out", str(out), "--model",
            str(folder), "--params", str(setup / "params.yaml")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out / "predictions_dedup.csv")
    yolo = YoloSpineDetector.load(setup / "yolo.pt")
    punet = PunetSegmenter(load_punet(setup / "punet.pt"))
    fp = read_fusion_params(setup / "fusion.yaml")
    expected = predict_spines(setup / "stacks" / "a.tif", yolo, punet, fp, cfg).dedup
    assert len(got) == len(expected) > 0
    np.testing.assert_allclose(
        got[["z", "x1", "y1", "x2", "y2"]], expected[["z", "x1", "y1", "x2", "y2"]]
    )
    assert list(got.columns) == list(DEDUP_COLS)


# ------------------------------------------------------------------------------- nuclei
def nuclei_image(seed: int) -> np.ndarray:
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    image = rng.normal(15, 2, (48, 64))
    for centre in ((12, 14), (30, 40), (14, 50)):
        rr, cc = disk(centre, 6, shape=image.shape)
        image[rr, cc] = 180
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(nuclei_image(1)).save(folder / "one.png")
    write_stack(folder / "two.tif", nuclei_image(2), (1.0, 400.0, 400.0))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def test_nuclei_folder_names_the_corrupt_image_and_resumes(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["predict", str(images), "--out", str(out), "--model", "otsu", "--rois", "--geojson",
            "--params", str(REPO / "params.yaml")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "skipped corrupt.png" in res.stderr
    assert "2 of 3 images predicted (2 now, 0 earlier), 1 failed" in res.stdout
    for stem in ("one", "two"):
        for suffix in ("_labels.tif", "_objects.csv", "_rois.zip", ".geojson"):
            assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"
    objects = pd.read_csv(out / "two_objects.csv")
    assert len(objects) == 3 and objects["area_um2"].iloc[0] == pytest.approx(
        objects["area_px"].iloc[0] * 0.16
    )  # the TIFF's 400 nm pixels
    again = CliRunner().invoke(app, args)
    assert "(0 now, 2 earlier), 1 failed" in again.stdout


def test_all_failing_exits_1_and_ome_zarr_is_written(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tif").write_bytes(b"nothing")
    p = ["--params", str(REPO / "params.yaml")]
    res = CliRunner().invoke(
        app, ["predict", str(bad), "--out", str(tmp_path / "o"), "-m", "otsu", *p]
    )
    assert res.exit_code == 1 and "x.tif" in res.stderr
    write_stack(tmp_path / "img.tif", nuclei_image(3))
    args = ["predict", str(tmp_path / "img.tif"), "--out", str(tmp_path / "z"), "-m", "otsu",
            "--format", "ome-zarr", *p]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "z" / "img_labels.ome.zarr").is_dir()
    bad_format = CliRunner().invoke(app, [*args[:-3], "--format", "png", *p])
    assert bad_format.exit_code != 0


def test_tracking_from_a_ctc_folder(tmp_path: Path) -> None:
    from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
    from microseg.evaluate.tracking import validate_ctc
    from microseg.io import ctc

    cfg = TrackingSynthConfig(
        shape=(48, 48), n_frames=4, n_cells=(2, 3), division_probability=0.0,
        enter_probability=0.0, ensure_events=False,
    )  # fmt: skip
    seq = generate_tracking_sequence(cfg, seed=3)
    ctc.write_ctc_gt(tmp_path, "01", seq.frames, seq.labels, seq.tracks)
    args = ["predict", str(tmp_path / "01"), "--out", str(tmp_path / "res"), "-m", "otsu",
            "--task", "tracking", "--params", str(REPO / "params.yaml")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"01: {len(seq.tracks)} tracks (0 with a parent)" in res.stdout
    assert validate_ctc(tmp_path / "res", "01")
    tracks = pd.read_csv(tmp_path / "res" / "01_tracks.csv")
    assert (tracks["parent"] == 0).all()


def test_predict_in_process_in_a_folder_without_params_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path / "cells.tif", nuclei_image(4))
    res = CliRunner().invoke(app, ["predict", "cells.tif", "--out", "out", "--model", "otsu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "cells_objects.csv").is_file()


@pytest.mark.slow  # a fresh interpreter imports torch, typer and bioio: 10-20 s here
def test_predict_runs_in_a_folder_without_params_yaml(tmp_path: Path) -> None:
    """A user's folder: no params.yaml, no pipeline data; the packaged defaults are used."""
    import subprocess
    import sys

    write_stack(tmp_path / "cells.tif", nuclei_image(4))
    cmd = [sys.executable, "-m", "microseg.cli", "predict", "cells.tif", "--out", "out",
           "--model", "otsu"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "cells: 3 objects" in run.stdout
    assert not (tmp_path / "params.yaml").exists()
    np.testing.assert_array_equal(
        read_stack(tmp_path / "out" / "cells_labels.tif"),
        otsu_watershed(nuclei_image(4)),
    )


@pytest.mark.slow  # the first bioio read imports every reader plugin: 10-20 s
def test_a_multichannel_file_needs_channel(tmp_path: Path) -> None:
    import tifffile

    nuclei = nuclei_image(5)
    two = np.stack([np.full_like(nuclei, 9), nuclei])  # CYX, nuclei in channel 1
    tifffile.imwrite(tmp_path / "two.ome.tif", two, ome=True, metadata={"axes": "CYX"})
    args = ["predict", str(tmp_path / "two.ome.tif"), "--out", str(tmp_path / "out"), "-m",
            "otsu", "--params", str(REPO / "params.yaml")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "channel" in str(res.exception)
    res = CliRunner().invoke(app, [*args, "--channel", "1"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(
        read_stack(tmp_path / "out" / "two_labels.tif"), otsu_watershed(nuclei)
    )


@pytest.mark.slow  # bioio's first read imports its reader plugins: 10-20 s
def test_nuclei_from_a_czi_file_with_its_pixel_size(tmp_path: Path) -> None:
    """A Zeiss CZI (written by pylibCZIrw, the library bioio-czi reads with): channel by name,
    object areas in µm from the file's scaling."""
    from pylibCZIrw import czi as pyczi

    nuclei = nuclei_image(6)
    with pyczi.create_czi(str(tmp_path / "cells.czi"), exist_ok=True) as czi:
        czi.write(np.full_like(nuclei, 7)[..., None], plane={"C": 0})
        czi.write(nuclei[..., None], plane={"C": 1})
        czi.write_metadata(channel_names={0: "BF", 1: "DAPI"}, scale_x=0.5e-6, scale_y=0.5e-6)
    args = ["predict", str(tmp_path / "cells.czi"), "--out", str(tmp_path / "out"), "-m", "otsu",
            "--channel", "DAPI", "--params", str(REPO / "params.yaml")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    expected = otsu_watershed(nuclei)
    np.testing.assert_array_equal(read_stack(tmp_path / "out" / "cells_labels.tif"), expected)
    objects = pd.read_csv(tmp_path / "out" / "cells_objects.csv")
    areas = np.bincount(expected.ravel())[1:]
    np.testing.assert_allclose(sorted(objects["area_um2"]), sorted(areas[areas > 0] * 0.25))


@pytest.mark.slow  # bioio's first read imports its reader plugins: 10-20 s
def test_spines_from_a_zcyx_ome_tiff_with_channel_1(setup: Path, tmp_path: Path) -> None:
    """A two-photon ZCYX OME-TIFF (dendrite channel 1): the same detections as the plain ZYX
    stack of that channel, with the voxel size of the OME metadata."""
    from bioio.writers import OmeTiffWriter
    from bioio_base.types import PhysicalPixelSizes

    zyx = read_stack(setup / "stacks" / "a.tif")
    zcyx = np.stack([np.zeros_like(zyx), zyx], axis=1)
    OmeTiffWriter.save(zcyx, tmp_path / "two.ome.tif", dim_order="ZCYX",
                       physical_pixel_sizes=PhysicalPixelSizes(0.5, 0.094, 0.094))  # fmt: skip
    common = ["--weights", str(setup / "yolo.pt"), "--params", str(setup / "params.yaml")]
    res = CliRunner().invoke(
        app, ["predict", str(tmp_path / "two.ome.tif"), "--out", str(tmp_path / "ome"),
              "--channel", "1", *common],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ref = CliRunner().invoke(
        app, ["predict", str(setup / "stacks" / "a.tif"), "--out", str(tmp_path / "ref"), *common]
    )
    assert ref.exit_code == 0, ref.output
    got = pd.read_csv(tmp_path / "ome" / "detections.csv")
    want = pd.read_csv(tmp_path / "ref" / "detections.csv")
    assert len(got) > 0
    pd.testing.assert_frame_equal(got, want)


def test_one_nan_voxel_is_an_error_not_nan_predictions(setup: Path, tmp_path: Path) -> None:
    """Issue 18: a NaN voxel made `predict`/`fuse --input` report 0 spines and `-m punet` write
    NaN maps, exit 0. Now the stack is named with the plane, and nothing is written for it."""
    stack = read_stack(setup / "stacks" / "a.tif").astype(np.float32)
    stack[2, 10, 10] = np.nan
    write_stack(tmp_path / "nan.tif", stack, (500.0, 94.0, 94.0))
    p = ["--params", str(setup / "params.yaml")]
    for model, weights in (("yolo", "yolo.pt"), ("punet", "punet.pt")):
        out = tmp_path / model
        args = ["predict", str(tmp_path / "nan.tif"), "--out", str(out), "-m", model,
                "--weights", str(setup / weights), *p]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code != 0, res.output
        assert "plane 2" in str(res.exception) and "nan.tif" in str(res.exception)
        assert not out.exists() or not any(out.rglob("*.csv"))
    args = ["fuse", "--input", str(tmp_path / "nan.tif"), "--out", str(tmp_path / "f"),
            "--yolo-weights", str(setup / "yolo.pt"), "--punet-weights", str(setup / "punet.pt"),
            "--fusion-params", str(setup / "fusion.yaml"), *p]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert "0 done" in res.output and "failed nan.tif" in res.output and "plane 2" in res.output
