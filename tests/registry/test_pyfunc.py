"""MLflow pyfunc models: logged, loaded back (in process and in a fresh interpreter), compared
with the in-process pipeline; the input contract is enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from microseg.errors import AnnotationError, ConfigError, DataFormatError, MissingFileError
from microseg.infer.fusion import FusionParams
from microseg.infer.spine_pipeline import SpinePipelineConfig, predict_spines
from microseg.infer.watershed import PostprocessConfig
from microseg.io.tiff import read_stack, write_stack
from microseg.models.punet import ProbUNet, PunetSegmenter, load_punet, save_punet
from microseg.models.unet import UnetConfig, build_unet, load_unet, save_unet
from microseg.models.unet.predict import InferConfig, predict_instances
from microseg.models.yolo import YoloSpineDetector
from microseg.registry.pyfunc import (
    NUCLEI_OUTPUT_COLS,
    SPINE_OUTPUT_COLS,
    NucleiModel,
    SpineModel,
    log_nuclei_model,
    log_spine_model,
    pinned_requirements,
)

SRC = Path(__file__).resolve().parents[2] / "src"
VOXEL = (500.0, 94.0, 94.0)
CFG = SpinePipelineConfig(
    conf=0.0, iou=1.0, batch_planes=2, n_samples=4, punet_batch_planes=2, seed=5, device="cpu"
)
#: thresholds inside an untrained YOLO's score range (about 1e-6 .. 1e-4): some boxes pass
FUSION = FusionParams(
    high_conf=3e-6, low_conf=1e-6, punet_thr=0.5, w_yolo=0.5, w_punet=0.5, dedup_radius_nm=800.0
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A private sqlite MLflow store with local artifacts; the global URI is restored after."""
    root = tmp_path_factory.mktemp("mlflow")
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("pyfunc-test", artifact_location=(root / "art").as_uri())
    yield SimpleNamespace(uri=uri, experiment_id=exp, root=root)
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def spine_files(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("spine_files")
    YoloSpineDetector.build("n").save(root / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        root / "punet.pt",
    )
    (root / "tuned_fusion.yaml").write_text(yaml.safe_dump(FUSION.to_dict()))
    rng = np.random.default_rng(0)
    stack = rng.normal(300, 40, (3, 64, 64))
    stack[1, 20:26, 30:36] += 1500
    write_stack(root / "s.tif", np.clip(stack, 0, None).astype(np.uint16), VOXEL)
    return root


@pytest.fixture(scope="module")
def spine_logged(store, spine_files):
    with mlflow.start_run(experiment_id=store.experiment_id):
        info = log_spine_model(
            "spine_model",
            spine_files / "yolo.pt",
            spine_files / "punet.pt",
            spine_files / "tuned_fusion.yaml",
            CFG,
            input_example_path=spine_files / "s.tif",
        )
    return info


def reference(spine_files, voxel=None) -> pd.DataFrame:
    """``predict_spines`` in this process on the same files, in the contract's columns."""
    yolo = YoloSpineDetector.load(spine_files / "yolo.pt")
    punet = PunetSegmenter(load_punet(spine_files / "punet.pt"))
    res = predict_spines(spine_files / "s.tif", yolo, punet, FUSION, CFG, voxel)
    return res.dedup.assign(path=str(spine_files / "s.tif"))[SPINE_OUTPUT_COLS]


def test_spine_model_round_trip_in_process(spine_logged, spine_files):
    info = spine_logged
    assert info.metadata["task"] == "spines"
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    pinned = (local / "requirements.txt").read_text().split()
    assert (local / "code" / "microseg" / "infer" / "spine_pipeline.py").is_file()
    assert set(pinned_requirements(["torch", "ultralytics", "monai", "mlflow"])) <= set(pinned)
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.metadata.metadata["task"] == "spines"
    out = model.predict(pd.DataFrame({"path": [str(spine_files / "s.tif")]}))
    ref = reference(spine_files)
    assert list(out.columns) == SPINE_OUTPUT_COLS
    assert len(ref) > 0 and set(ref["status"]) <= {"high", "validated"}
    pd.testing.assert_frame_equal(out, ref, check_dtype=False)
    # per-row voxel size reaches the de-duplication (coarser pixels: fewer merges)
    coarse = (500.0, 400.0, 400.0)
    frame = pd.DataFrame(
        {
            "path": [str(spine_files / "s.tif")],
            "voxel_size_z_nm": [coarse[0]],
            "voxel_size_y_nm": [coarse[1]],
            "voxel_size_x_nm": [coarse[2]],
        }
    )
    out_coarse = model.predict(frame)
    pd.testing.assert_frame_equal(out_coarse, reference(spine_files, coarse), check_dtype=False)
    assert len(out_coarse) > len(out)
    # two stacks in one frame: rows of both, each tagged with its path
    both = model.predict(pd.DataFrame({"path": [str(spine_files / "s.tif")] * 2}))
    assert len(both) == 2 * len(out)


def test_spine_signature_rejects_a_frame_without_path(spine_logged, spine_files):
    model = mlflow.pyfunc.load_model(spine_logged.model_uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="path"):
        model.predict(pd.DataFrame({"stack": [str(spine_files / "s.tif")]}))
    schema = model.metadata.get_input_schema()
    assert [c.name for c in schema.inputs if c.required] == ["path"]
    # the wrapper itself, called directly, says what is wrong in our own error family
    with pytest.raises(AnnotationError, match="column 'path'"):
        SpineModel().predict(None, pd.DataFrame({"stack": ["x.tif"]}))
    with pytest.raises(MissingFileError, match="nothing"):
        SpineModel().predict(None, pd.DataFrame({"path": [str(spine_files / "none.tif")]}))


@pytest.mark.slow
def test_spine_model_predicts_in_a_fresh_interpreter_from_its_own_code(
    spine_logged, spine_files, store
):
    """No repo on sys.path: the model's own copy of microseg must be what runs."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "src = Path(sys.argv[1]).resolve()\n"
        "sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != src]\n"
        "import mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "out = model.predict(pd.DataFrame({'path': [sys.argv[3]]}))\n"
        "import microseg\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('microseg.'))\n"
        "print(json.dumps({'file': microseg.__file__, 'modules': loaded,\n"
        "                  'out': out.to_dict('list')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=store.uri, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(SRC),
            spine_logged.model_uri,
            str(spine_files / "s.tif"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=store.root,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not Path(got["file"]).resolve().is_relative_to(SRC), got["file"]
    assert "/code/microseg/" in got["file"].replace(os.sep, "/")
    training = [m for m in got["modules"] if m.startswith(("microseg.tune", "microseg.stages"))]
    fits = (".train.punet", ".train.unet", ".punet.train")
    training += [m for m in got["modules"] if m.endswith(fits)]
    assert training == [] and "microseg.config" not in got["modules"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(got["out"])[SPINE_OUTPUT_COLS], reference(spine_files), check_dtype=False
    )


# ------------------------------------------------------------------------------ nuclei
@pytest.fixture(scope="module")
def nuclei_files(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("nuclei_files")
    cfg = UnetConfig(arch="unet", features=(4, 8, 16))
    save_unet(build_unet(cfg), root / "unet.pt", cfg, PostprocessConfig(min_size=5))
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60, (40, 56)).astype(np.uint8)
    image[10:22, 12:26] = 220
    Image.fromarray(image).save(root / "img.png")
    write_stack(root / "img_tif.tif", image)
    write_stack(root / "stack.tif", np.stack([image, image]))
    return root, image


INFER = {"roi": 32, "overlap": 0.25, "sw_batch_size": 2, "device": "cpu"}


def test_nuclei_model_round_trip(store, nuclei_files, tmp_path):
    root, image = nuclei_files
    with mlflow.start_run(experiment_id=store.experiment_id):
        info = log_nuclei_model("nuclei_model", root / "unet.pt", INFER, root / "img.png")
    assert info.metadata == {**info.metadata, "task": "nuclei", "model_family": "unet"}
    model = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"path": [str(root / "img.png"), str(root / "img_tif.tif")]})
    out = model.predict(frame, params={"out_dir": str(tmp_path / "labels")})
    assert list(out.columns) == NUCLEI_OUTPUT_COLS
    net, _, post = load_unet(root / "unet.pt")
    expected, _ = predict_instances(net, image, InferConfig.from_mapping({**INFER, "post": post}))
    for row in out.itertuples():
        labels = read_stack(row.labels_path)
        assert Path(row.labels_path).name == f"{Path(row.path).stem}_labels.tif"
        assert labels.dtype == np.uint16 and labels.shape == image.shape
        assert (row.height, row.width) == image.shape
        np.testing.assert_array_equal(labels, expected)
        assert row.n_objects == len(np.unique(expected)) - 1
    with pytest.raises(mlflow.exceptions.MlflowException, match="path"):
        model.predict(pd.DataFrame({"image": ["x.png"]}), params={"out_dir": str(tmp_path)})


def test_nuclei_config_reaches_post_processing_and_bad_input_is_named(nuclei_files, tmp_path):
    root, _ = nuclei_files

    def loaded(post: dict) -> NucleiModel:
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({**INFER, "post": post}))
        m = NucleiModel()
        m.load_context(SimpleNamespace(artifacts={"unet": str(root / "unet.pt"), "config": cfg}))
        return m

    frame = pd.DataFrame({"path": [str(root / "img.png")]})
    kept = loaded({"t_mask": 0.0, "min_size": 1}).predict(None, frame, {"out_dir": tmp_path / "a"})
    none = loaded({"t_mask": 1.0, "t_seed": 1.0}).predict(None, frame, {"out_dir": tmp_path / "b"})
    assert kept["n_objects"].item() >= 1 and none["n_objects"].item() == 0
    assert not read_stack(none["labels_path"].item()).any()
    m = loaded({})
    m.use_device("cpu")  # batch-eval --device
    assert m.device == next(m.model.network.parameters()).device.type == "cpu"
    with pytest.raises(ConfigError, match="out_dir"):
        m.predict(None, frame)
    with pytest.raises(MissingFileError):
        m.predict(None, pd.DataFrame({"path": [str(root / "none.png")]}), {"out_dir": tmp_path})
    with pytest.raises(DataFormatError, match="2D image"):
        m.predict(None, pd.DataFrame({"path": [str(root / "stack.tif")]}), {"out_dir": tmp_path})


def test_any_family_is_logged_with_its_validation_post_processing(store, nuclei_files, tmp_path):
    """A MAUNet (distance-seeded watershed) round-trips with the post-processing chosen on
    validation, not the one saved with its weights: the served model predicts what
    evaluate_cells scored."""
    from microseg.models import get_model
    from microseg.models.maunet.network import MaunetConfig, build_maunet, save_maunet

    root, image = nuclei_files
    torch.manual_seed(2)
    cfg = MaunetConfig(features=(4, 8, 8, 16), decoder_channels=(8, 8, 4, 4, 4))
    weights = save_maunet(build_maunet(cfg), tmp_path / "maunet.pt", cfg)
    post = {"seeds": "distance", "elevation": "predicted_distance", "t_seed": 0.0, "t_mask": 0.0,
            "min_size": 1}  # fmt: skip
    with mlflow.start_run(experiment_id=store.experiment_id):
        info = log_nuclei_model("m", weights, INFER, family="maunet", post=post)
    assert info.metadata["model_family"] == "maunet"
    model = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"path": [str(root / "img.png")]})
    out = model.predict(frame, params={"out_dir": str(tmp_path / "labels")})
    family = get_model("maunet").load(weights, infer=INFER, post=post)
    expected, _, _ = family.as_predictor()(image)
    np.testing.assert_array_equal(read_stack(out["labels_path"].item()), expected)
    assert family.infer.post.t_mask == 0.0 and expected.any()
    # knobs of the image's own kind (chosen on that kind's validation images) travel with it
    from microseg.infer.modality import image_modality

    kind = image_modality(image)
    by_kind = {**post, "by_modality": {kind: {"t_mask": 1.0, "t_seed": 1.0}}}
    with mlflow.start_run(experiment_id=store.experiment_id):
        info = log_nuclei_model("m2", weights, INFER, family="maunet", post=by_kind)
    out = mlflow.pyfunc.load_model(info.model_uri).predict(
        frame, params={"out_dir": str(tmp_path / "by_kind")}
    )
    assert out["n_objects"].item() == 0 and not read_stack(out["labels_path"].item()).any()
    with (
        mlflow.start_run(experiment_id=store.experiment_id),
        pytest.raises(MissingFileError, match="maunet"),
    ):
        log_nuclei_model("m", tmp_path / "none.pt", INFER, family="maunet")


def test_log_needs_an_active_run_and_existing_files(store, spine_files):
    with pytest.raises(ConfigError, match="active MLflow run"):
        log_spine_model("m", "a.pt", "b.pt", "c.yaml", CFG)
    yolo, punet, fusion = (spine_files / n for n in ("none.pt", "punet.pt", "tuned_fusion.yaml"))
    with (
        mlflow.start_run(experiment_id=store.experiment_id),
        pytest.raises(MissingFileError, match="yolo"),
    ):
        log_spine_model("m", yolo, punet, fusion, CFG)


def test_requirements_are_pinned_to_this_environment():
    import importlib.metadata

    reqs = pinned_requirements(["torch", "numpy", "no-such-dist-xyz"])
    assert reqs == [
        f"torch=={importlib.metadata.version('torch')}",
        f"numpy=={importlib.metadata.version('numpy')}",
    ]


def test_a_hierarchical_prob_unet_is_packaged_and_loaded_as_such(store, spine_files, tmp_path):
    """spines.prob_model: hpunet registers the hierarchical model's file; the pyfunc loads it
    with its own family (the format tag), not as a flat Prob-UNet."""
    from microseg.models.hpunet import HierarchicalProbUNet, HpunetSegmenter, save_hpunet

    torch.manual_seed(0)
    net = HierarchicalProbUNet(filters=(4, 8, 16), latent_levels=2, latent_dim=2, head_convs=2)
    save_hpunet(net, tmp_path / "hpunet.pt")
    with mlflow.start_run(experiment_id=store.experiment_id):
        info = log_spine_model(
            "spine_model_h",
            spine_files / "yolo.pt",
            tmp_path / "hpunet.pt",
            spine_files / "tuned_fusion.yaml",
            CFG,
        )
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert isinstance(model.unwrap_python_model().punet, HpunetSegmenter)
    out = model.predict(pd.DataFrame({"path": [str(spine_files / "s.tif")]}))
    assert list(out.columns) == SPINE_OUTPUT_COLS
