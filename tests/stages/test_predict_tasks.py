"""``stages.predict`` on every task: nuclei folders (resumable, a corrupt file named and
skipped, no half result after an interruption), time-lapses into CTC results that the official
checker (py-ctcmetrics) accepts, and how names, files and checkpoints become models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from skimage.draw import disk

from microseg.config import load_params
from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.evaluate.tracking import evaluate_ctc, validate_ctc
from microseg.infer.watershed import PostprocessConfig
from microseg.io import ctc
from microseg.io.tiff import read_stack, write_stack
from microseg.models.classical import otsu_watershed
from microseg.models.lstmunet import LstmUnetConfig, save_lstmunet
from microseg.models.lstmunet.network import LstmUnet
from microseg.models.unet import UnetConfig, build_unet, save_unet
from microseg.stages.predict import SUMMARY_NAME, PredictOptions, predict_stacks
from microseg.stages.predict_models import checkpoint_family, resolve_spec
from microseg.stages.predict_result import NucleiResult

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def nuclei_image(seed: int, shape=(64, 80)) -> np.ndarray:
    """Bright round nuclei on a noisy dark background (Otsu finds them)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(20, 3, shape)
    for _ in range(4):
        rr, cc = disk(tuple(rng.integers(12, np.array(shape) - 12)), 6, shape=shape)
        image[rr, cc] = 200
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    write_stack(folder / "a.tif", nuclei_image(1).astype(np.uint16))
    Image.fromarray(nuclei_image(2)).save(folder / "b.png")
    (folder / "broken.tif").write_bytes(b"II*\x00 not a TIFF at all")
    return folder


def test_nuclei_folder_skips_the_corrupt_file_and_resumes(params, image_folder, tmp_path):
    out = tmp_path / "out"
    first = predict_stacks(params, image_folder, out, "otsu")
    assert first.task == "nuclei" and first.folder and first.n_stacks == 3
    assert [name for name, _ in first.failed] == ["broken.tif"]
    summary = pd.read_csv(out / SUMMARY_NAME)
    assert dict(zip(summary["input"], summary["status"], strict=True)) == {
        "a.tif": "done",
        "b.png": "done",
        "broken.tif": "failed",
    }
    assert "broken.tif" in summary.loc[summary["status"] == "failed", "error"].iloc[0]
    for stem, seed in (("a", 1), ("b", 2)):
        labels = read_stack(out / f"{stem}_labels.tif")
        # the classical family's own function on the same image is the reference
        np.testing.assert_array_equal(labels, otsu_watershed(nuclei_image(seed)))
        objects = pd.read_csv(out / f"{stem}_objects.csv")
        assert sorted(objects["id"]) == sorted(np.unique(labels[labels > 0]).tolist())
        assert objects["area_px"].sum() == np.count_nonzero(labels)
    assert not (out / "broken_labels.tif").exists()

    again = predict_stacks(params, image_folder, out, "otsu")
    assert again.skipped == ["a.tif", "b.png"] and len(again.failed) == 1
    redo = predict_stacks(params, image_folder, out, "otsu", options=PredictOptions(overwrite=True))
    assert redo.skipped == [] and len(redo.messages) == 2


def test_an_interrupted_run_leaves_no_half_result(params, image_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real = NucleiResult._objects  # the object table: computed once per image, written last

    def interrupt_on_the_second(self):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(NucleiResult, "_objects", interrupt_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        predict_stacks(params, image_folder, out, "otsu")
    assert (out / "a_objects.csv").is_file() and not (out / "b_objects.csv").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files
    assert pd.read_csv(out / SUMMARY_NAME)["input"].tolist() == ["a.tif"]
    monkeypatch.setattr(NucleiResult, "_objects", real)
    resumed = predict_stacks(params, image_folder, out, "otsu")
    assert resumed.skipped == ["a.tif"] and (out / "b_objects.csv").is_file()


def test_every_input_failing_is_reported(params, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"not a png")
    result = predict_stacks(params, folder, tmp_path / "out", "otsu")
    assert len(result.failed) == result.n_stacks == 1 and "x.png" in result.failed[0][0]


# ------------------------------------------------------------------------------- tracking
@pytest.fixture(scope="module")
def movie():
    cfg = TrackingSynthConfig(
        shape=(64, 64), n_frames=6, n_cells=(3, 4), division_probability=0.0,
        enter_probability=0.0, ensure_events=False,
    )  # fmt: skip
    seq = generate_tracking_sequence(cfg, seed=1)
    assert (seq.tracks["P"] == 0).all()  # division-free
    return seq


def test_time_lapse_tiff_gives_a_valid_ctc_result(params, movie, tmp_path):
    write_stack(tmp_path / "movie.tif", movie.frames, axes="TYX")
    result = predict_stacks(
        params, tmp_path / "movie.tif", tmp_path / "out", "otsu", task="tracking"
    )
    assert result.task == "tracking" and not result.folder
    assert validate_ctc(tmp_path / "out", "movie")  # the official checker
    res = ctc.read_ctc_result(tmp_path / "out", "movie")  # and ours (check_tracks)
    assert len(res.masks) == len(movie.frames) and (res.tracks["P"] == 0).all()
    tracks = pd.read_csv(tmp_path / "out" / "movie_tracks.csv")
    assert {"track_id", "t", "y_px", "x_px", "area_px", "parent"} <= set(tracks.columns)
    assert len(tracks) == sum(len(np.unique(m[m > 0])) for m in res.masks)
    # scored against the generator's ground truth by py-ctcmetrics: easy cells, near perfect
    ctc.write_ctc_gt(tmp_path / "gt", "movie", movie.frames, movie.labels, movie.tracks)
    scores = evaluate_ctc(tmp_path / "gt", "movie", tmp_path / "out", metrics=["DET", "TRA"])
    assert scores["TRA"] > 0.9 and scores["DET"] > 0.9


def test_ctc_frame_folder_is_one_sequence_and_resumes(params, movie, tmp_path):
    seqs = tmp_path / "seqs"
    ctc.write_ctc_gt(seqs, "01", movie.frames, movie.labels, movie.tracks)  # 01/t###.tif
    write_stack(seqs / "02.tif", movie.frames, axes="TYX")
    out = tmp_path / "out"
    single = predict_stacks(params, seqs / "01", out, "otsu", task="tracking")
    assert not single.folder and validate_ctc(out, "01")
    folder = predict_stacks(params, seqs, tmp_path / "all", "otsu", task="tracking")
    assert folder.folder and folder.n_stacks == 2 and not folder.failed
    a = ctc.read_ctc_result(tmp_path / "all", "01")
    b = ctc.read_ctc_result(tmp_path / "all", "02")
    np.testing.assert_array_equal(a.masks, b.masks)  # the same frames, read two ways
    again = predict_stacks(params, seqs, tmp_path / "all", "otsu", task="tracking")
    assert sorted(again.skipped) == ["01", "02.tif"]


def test_sequence_family_sees_the_whole_time_lapse(params, movie, tmp_path):
    torch.manual_seed(0)
    net = LstmUnet(LstmUnetConfig(features=(4, 8), norm="instance"))
    save_lstmunet(net, tmp_path / "lstm.pt", PostprocessConfig(min_size=5))
    spec = resolve_spec(params, tmp_path / "lstm.pt")
    assert (spec.family, spec.task) == ("lstmunet", "tracking")
    write_stack(tmp_path / "movie.tif", movie.frames[:, :32, :32].copy(), axes="TYX")
    result = predict_stacks(params, tmp_path / "movie.tif", tmp_path / "out", tmp_path / "lstm.pt")
    assert (
        result.task == "tracking" and (tmp_path / "out" / "movie_RES" / "res_track.txt").is_file()
    )


# ------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def unet_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("unet")
    cfg = UnetConfig(arch="unet", features=(4, 8, 16))
    return save_unet(build_unet(cfg), root / "best.pt", cfg, PostprocessConfig(min_size=5))


def test_family_is_read_from_the_file_without_unpickling(unet_file, tmp_path):
    assert checkpoint_family(unet_file) == "unet"
    torch.save({"format": "microseg.maunet/1", "model": {}}, tmp_path / "m.pt")
    assert checkpoint_family(tmp_path / "m.pt") == "maunet"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(DataFormatError, match="microseg model file"):
        checkpoint_family(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataFormatError, match=r"junk\.pt"):
        checkpoint_family(tmp_path / "junk.pt")


def test_names_paths_and_folders_resolve(params_unet, unet_file, tmp_path):
    params = params_unet
    otsu = resolve_spec(params, "otsu")
    assert (otsu.task, otsu.family, otsu.weights) == ("nuclei", "classical", None)
    unet = resolve_spec(params, "unet")  # cells.models.unet before tracking.segmenters.unet
    assert unet.task == "nuclei" and unet.weights == Path("models/cells/unet/best.pt")
    seg = resolve_spec(params, "unet", task="tracking")
    assert seg.weights == Path("models/tracking_seg/unet/best.pt")
    assert resolve_spec(params, "lstmunet").task == "tracking"
    assert resolve_spec(params, "yolo").task == "spines"
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "best.pt").write_bytes(unet_file.read_bytes())
    (folder / "train_info.json").write_text('{"family": "unet"}')
    (folder / "postprocess.json").write_text('{"min_size": 9}')
    spec = resolve_spec(params, folder, device="cpu")
    assert spec.family == "unet" and spec.weights == folder / "best.pt"
    # the folder is named like cells.models.unet: its params sections come along
    assert spec.train == params.cells.models["unet"].train and spec.post == {"min_size": 9}
    assert spec.infer["device"] == "cpu"
    seg_folder = tmp_path / "tracking_seg" / "unet"  # the pipeline's segmenter of that name
    seg_folder.mkdir(parents=True)
    (seg_folder / "best.pt").write_bytes(unet_file.read_bytes())
    seg = resolve_spec(params, seg_folder / "best.pt")
    assert seg.train == params.tracking.segmenters["unet"].train and seg.post is None


def test_bad_model_names_say_what_exists(params, tmp_path):
    with pytest.raises(ConfigError, match="otsu") as err:
        resolve_spec(params, "no-such-model")
    assert "lstmunet" in str(err.value)
    with pytest.raises(MissingFileError):
        resolve_spec(params, "models/none/best.pt")
    with pytest.raises(ConfigError, match="spines"):
        resolve_spec(params, "otsu", task="spines")
    with pytest.raises(ConfigError, match="unknown task"):
        resolve_spec(params, "otsu", task="cells")
    with pytest.raises(MissingFileError, match="train"):
        predict_stacks(params, tmp_path, tmp_path / "out", "unet", task="nuclei")


def test_params_entry_with_custom_infer_reaches_the_family(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["cells"]["baselines"]["big"] = {"family": "classical", "infer": {"min_size": 400}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    write_stack(tmp_path / "in" / "a.tif", nuclei_image(1))
    predict_stacks(params, tmp_path / "in" / "a.tif", tmp_path / "out", "big")
    assert read_stack(tmp_path / "out" / "a_labels.tif").max() == 0  # every nucleus < 400 px


def test_a_folder_in_the_cwd_does_not_shadow_a_model_name(params, tmp_path, monkeypatch):
    from microseg.stages.predict_models import resolve_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "otsu").mkdir()  # e.g. an earlier `microseg predict ... -o otsu`
    assert resolve_spec(params, "otsu").family == "classical"
    with pytest.raises(MissingFileError):  # ./otsu is the folder, and it holds no model
        resolve_spec(params, "./otsu")
