"""The Python API: ``microseg.load(...).predict(...)`` on arrays and files, by name, by a
trained file or folder and by a registry URI, cross-checked against the family's own
predictor and the registered MLflow model; ``import microseg`` stays light."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from skimage.draw import disk

import microseg
from microseg.config import load_params
from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError, DataFormatError, MicrosegError
from microseg.infer.watershed import PostprocessConfig
from microseg.io.tiff import read_stack, write_stack
from microseg.models.classical import otsu_watershed
from microseg.models.punet import ProbUNet, save_punet
from microseg.models.unet import UnetConfig, build_unet, load_unet, save_unet
from microseg.models.unet.predict import InferConfig, predict_instances
from microseg.registry.integrity import folder_digests

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def nuclei_image(shape=(48, 64)) -> np.ndarray:
    image = np.full(shape, 12, np.uint8)
    for centre in ((12, 14), (30, 40), (14, 50)):
        rr, cc = disk(centre, 6, shape=shape)
        image[rr, cc] = 210
    return image


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("api_unet")
    cfg = UnetConfig(arch="unet", features=(4, 8, 16))
    return save_unet(build_unet(cfg), root / "best.pt", cfg, PostprocessConfig(min_size=5))


def test_import_microseg_does_not_import_torch() -> None:
    code = (
        "import sys, microseg; before = 'torch' in sys.modules; microseg.load; "
        "print(before, 'torch' in sys.modules, sorted(microseg.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "False False ['Model', 'Result', 'load']"


def test_otsu_on_an_array(params, tmp_path: Path) -> None:
    model = microseg.load("otsu", params=params)
    assert (model.task, model.name, model.family) == ("nuclei", "otsu", "classical")
    image = nuclei_image()
    result = model.predict(image, voxel_size_nm=(250.0, 250.0))
    np.testing.assert_array_equal(result.labels, otsu_watershed(image))
    table = result.to_dataframe()
    assert len(table) == 3 and table["area_um2"].iloc[0] == pytest.approx(
        table["area_px"].iloc[0] * 0.0625
    )
    assert result.points is None and result.tracks is None
    files = result.save(tmp_path)
    assert {p.name for p in files} == {"image_labels.tif", "image_objects.csv"}
    np.testing.assert_array_equal(read_stack(tmp_path / "image_labels.tif"), result.labels)
    with pytest.raises(DataFormatError, match="YX"):
        model.predict(np.zeros((2, 3, 4, 5)))


def test_a_trained_file_and_its_folder(params, unet_file: Path, tmp_path: Path) -> None:
    image = nuclei_image()
    model = microseg.load(unet_file, params=params, device="cpu")
    assert (model.task, model.family) == ("nuclei", "unet")
    result = model.predict(image)
    net, _, post = load_unet(unet_file)
    cfg = InferConfig.from_mapping({"roi": 128, "overlap": 0.25, "blend": "gaussian", "post": post})
    expected, probs = predict_instances(net, image, cfg)
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_allclose(result.probability, 1.0 - probs[0], atol=1e-6)
    assert "score" in result.to_dataframe().columns
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "best.pt").write_bytes(unet_file.read_bytes())
    (folder / "train_info.json").write_text(json.dumps({"family": "unet"}))
    again = microseg.load(folder, params=params).predict(image)
    np.testing.assert_array_equal(again.labels, expected)


def test_a_file_path_is_read_and_names_the_result(params, tmp_path: Path) -> None:
    write_stack(tmp_path / "cells.tif", nuclei_image().astype(np.uint16), (1.0, 500.0, 500.0))
    result = microseg.load("otsu", params=params).predict(tmp_path / "cells.tif")
    assert result.name == "cells" and result.pixel_size_um == pytest.approx((0.5, 0.5))
    assert "y_um" in result.to_dataframe().columns


def test_tracking_gives_labels_and_tracks_with_parents(params, tmp_path: Path) -> None:
    cfg = TrackingSynthConfig(
        shape=(64, 64), n_frames=5, n_cells=(3, 3), division_probability=0.0,
        enter_probability=0.0, ensure_events=False,
    )  # fmt: skip
    seq = generate_tracking_sequence(cfg, seed=2)
    model = microseg.load("otsu", task="tracking", params=params)
    result = model.predict(seq.frames)
    assert result.labels.shape == seq.frames.shape
    tracks = result.tracks
    assert {"track_id", "t", "parent"} <= set(tracks.columns)
    assert tracks["track_id"].nunique() == len(seq.tracks)  # no division, none entering
    assert tracks.groupby("track_id")["t"].count().tolist() == [5] * len(seq.tracks)
    result.save(tmp_path)
    assert (tmp_path / "image_RES" / "res_track.txt").is_file()


def test_spines_array_gives_probability_and_uncertainty(params, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2)
    save_punet(net, tmp_path / "punet.pt")
    p = params.model_copy(deep=True)
    p.punet.predict.n_samples, p.punet.predict.batch_planes = 2, 2
    model = microseg.load("punet", params=p, weights=tmp_path / "punet.pt")
    stack = np.random.default_rng(0).normal(300, 40, (3, 32, 32)).clip(0).astype(np.uint16)
    result = model.predict(stack, voxel_size_nm=(500.0, 94.0, 94.0))
    assert model.task == "spines" and result.probability.shape == stack.shape
    assert (result.uncertainty >= 0).all() and result.uncertainty.shape == stack.shape
    result.save(tmp_path / "out")
    assert (tmp_path / "out" / "punet_prediction.json").is_file()
    with pytest.raises(ConfigError, match="z, y, x"):
        model.predict(stack, voxel_size_nm=(94.0, 94.0))


def test_a_downloaded_model_folder_is_read_without_mlflow(params, unet_file, tmp_path) -> None:
    """What the registry's download holds (MLmodel + artifacts), loaded as a path."""
    from microseg.registry.resolve import read_model_folder

    art = tmp_path / "model" / "artifacts"
    art.mkdir(parents=True)
    (art / "w.pt").write_bytes(unet_file.read_bytes())
    spec = {"family": "unet", "train": {}, "infer": {"roi": 32}, "post": {"min_size": 9}}
    (art / "nuclei_model.json").write_text(json.dumps(spec))
    (tmp_path / "model" / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n"
        "      weights: {path: artifacts/w.pt}\n      config: {path: artifacts/nuclei_model.json}\n"
        "metadata: {task: nuclei, model_family: unet}\n"
    )
    local = read_model_folder(tmp_path / "model")
    assert (local.task, local.family, local.config["post"]) == ("nuclei", "unet", {"min_size": 9})
    model = microseg.load(tmp_path / "model", params=params)
    assert model._runner.spec.post == {"min_size": 9} and model._runner.spec.infer["roi"] == 32
    net, _, _ = load_unet(unet_file)
    cfg = InferConfig.from_mapping({"roi": 32, "post": {"min_size": 9}})
    expected, _ = predict_instances(net, nuclei_image(), cfg)
    np.testing.assert_array_equal(model.predict(nuclei_image()).labels, expected)
    (tmp_path / "model" / "MLmodel").write_text("metadata: {task: cells}\n")
    with pytest.raises(DataFormatError, match="task"):
        read_model_folder(tmp_path / "model")


@pytest.mark.slow  # logging a pyfunc model copies the package: ~10 s
def test_a_registry_uri_predicts_what_the_registered_model_predicts(
    params, unet_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microseg.registry.pyfunc import log_nuclei_model

    monkeypatch.setenv("MICROSEG_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("api", artifact_location=(tmp_path / "art").as_uri())
        infer = {"roi": 32, "overlap": 0.25, "device": "cpu"}
        with mlflow.start_run(experiment_id=exp):
            info = log_nuclei_model(
                "m", unet_file, infer, registered_model_name="nuc", post={"min_size": 7}
            )
        mlflow.MlflowClient().set_registered_model_alias(
            "nuc", "champion", info.registered_model_version
        )
        model = microseg.load("models:/nuc@champion", params=params)
        image = nuclei_image()
        write_stack(tmp_path / "img.tif", image)
        ours = model.predict(tmp_path / "img.tif")
        served = mlflow.pyfunc.load_model("models:/nuc@champion")
        out = served.predict(
            pd.DataFrame({"path": [str(tmp_path / "img.tif")]}),
            params={"out_dir": str(tmp_path / "served")},
        )
        np.testing.assert_array_equal(ours.labels, read_stack(out["labels_path"].iloc[0]))
        (cached,) = (tmp_path / "cache" / "registry").glob(f"*/nuc/{info.registered_model_version}")
        assert (cached / "MLmodel").is_file()
        # registered by MLflow, not `microseg register`: the first load recorded the digest
        mv = mlflow.MlflowClient().get_model_version("nuc", info.registered_model_version)
        assert mv.tags["artifacts_sha256"] == folder_digests(cached)[0]
        weights = next((cached / "artifacts").glob("*.pt"))
        good = weights.read_bytes()
        weights.write_bytes(good[:-4] + b"evil")  # the cache edited: downloaded again
        microseg.load("models:/nuc@champion", params=params)
        assert weights.read_bytes() == good
        # the artifact store's copy edited: refused
        (stored,) = (tmp_path / "art").rglob(f"artifacts/{weights.name}")
        stored.write_bytes(good[:-4] + b"evil")
        shutil.rmtree(cached)
        with pytest.raises(MicrosegError, match="changed since registration"):
            microseg.load("models:/nuc@champion", params=params)
    finally:
        mlflow.set_tracking_uri(before)
