"""batch-eval with tiny pyfunc models logged here, on folders with good and bad files.

Spine stacks hold a few bright voxels; the model reports every voxel above its threshold as
a spine. Expected scores are counted by hand from the planted voxels and annotated points
(voxel size 500 x 100 x 100 nm, match distance 1000 nm):

    a.tif  bright (1,10,10)=5000 (2,20,20)=3000   annotated (1,10,11) (3,5,5)
    b.tif  bright (0,5,5)=5000   (2,28,28)=3000   annotated (0,5,6)

threshold 1000 (all four): a tp1 fp1 fn1, b tp1 fp1 fn0 -> P 2/4, R 2/3, F1 4/7
threshold 4000 (the 5000s):  a tp1 fp0 fn1, b tp1 fp0 fn0 -> P 1,   R 2/3, F1 4/5
threshold 10000 (nothing):   tp0 fp0 fn3                  -> P 0,   R 0,   F1 0
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from mlflow import MlflowClient
from PIL import Image

from microseg.config import load_params
from microseg.errors import ConfigError, MicrosegError
from microseg.io.tiff import write_stack
from microseg.registry.batch_eval import batch_eval
from microseg.registry.promotion import promote, register_version

REPO = Path(__file__).resolve().parents[2]
VOXEL = (500.0, 100.0, 100.0)
SHAPE = (4, 32, 32)
SPINE_OUT = ["path", "z", "y", "x", "x1", "y1", "x2", "y2", "score", "status"]


class SpineModel(mlflow.pyfunc.PythonModel):
    """Every voxel above ``threshold`` is a spine with a 5 x 5 box; optionally a bad box."""

    def __init__(self, threshold: float, overshoot_stem: str | None = None) -> None:
        self.threshold = threshold
        self.overshoot_stem = overshoot_stem

    def predict(self, context, model_input, params=None):
        rows = []
        for path in model_input["path"]:
            stack = tifffile.imread(path)
            _, h, w = stack.shape
            for z, y, x in np.argwhere(stack > self.threshold):
                rows.append(
                    {
                        "path": path,
                        **{"z": z, "y": y, "x": x, "status": "kept"},
                        **{"x1": max(x - 2, 0), "y1": max(y - 2, 0)},
                        **{"x2": min(x + 3, w), "y2": min(y + 3, h)},
                        "score": float(stack[z, y, x]) / 65535,
                    }
                )
            if Path(path).stem == self.overshoot_stem:
                rows[-1]["x2"] = w + 5  # a box that leaves the image
        return pd.DataFrame(rows, columns=SPINE_OUT)


class NucleiModel(mlflow.pyfunc.PythonModel):
    """int32 connected components above 100; ``*crop*`` images get a label image too small."""

    def predict(self, context, model_input, params=None):
        from skimage.measure import label

        out_dir = Path(params["out_dir"])
        rows = []
        for path in model_input["path"]:
            image = np.asarray(Image.open(path))
            labels = label(image > 100).astype(np.int32)  # as skimage gives, not uint16
            if "crop" in Path(path).stem:
                labels = labels[:-4]
            dst = out_dir / f"{Path(path).stem}_labels.tif"
            tifffile.imwrite(dst, labels)
            h, w = image.shape
            rows.append(
                {"path": path, "labels_path": str(dst), "n_objects": int(labels.max())}
                | {"height": h, "width": w}
            )
        return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """One MLflow store with the models logged once; params pointing at it."""
    tmp = tmp_path_factory.mktemp("batch_eval")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    params = load_params(
        REPO / "params.yaml",
        {"mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp / "mlruns")},
    )
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("models", artifact_location=(tmp / "models").as_uri())
        mp.setenv("MLFLOW_EXPERIMENT_ID", exp)  # runs started without params go here
        models: dict[str, str] = {}
        with mlflow.start_run(experiment_id=exp):
            for key, model, meta, sig in (
                ("good", SpineModel(1000), "spines", None),
                ("worse", SpineModel(10000), "spines", None),
                ("better", SpineModel(4000), "spines", None),
                ("overshoot", SpineModel(1000, overshoot_stem="a"), "spines", None),
                ("nuclei", NucleiModel(), "nuclei", _nuclei_signature()),
            ):
                info = mlflow.pyfunc.log_model(
                    name=key,
                    python_model=model,
                    metadata={"task": meta},
                    signature=sig,
                    pip_requirements=[],
                )
                models[key] = info.model_uri
        yield {"tmp": tmp, "uri": uri, "params": params, "models": models, "exp": exp}
    mlflow.set_tracking_uri(previous)


def _nuclei_signature():
    from mlflow.models import infer_signature

    out = pd.DataFrame({"path": ["a"], "labels_path": ["b"], "n_objects": [1]})
    out = out.assign(height=[1], width=[1])
    return infer_signature(pd.DataFrame({"path": ["a"]}), out, params={"out_dir": ""})


def _stack(path: Path, bright: dict[tuple[int, int, int], int]) -> None:
    stack = np.full(SHAPE, 100, np.uint16)
    for zyx, value in bright.items():
        stack[zyx] = value
    write_stack(path, stack, voxel_size_nm=VOXEL)


def _points(path: Path, zyx: list[tuple[int, int, int]]) -> None:
    pd.DataFrame(zyx, columns=["z", "y", "x"])[["x", "y", "z"]].to_csv(path, index=False)


@pytest.fixture()
def spine_dir(tmp_path: Path) -> Path:
    """a, b: good stacks with annotations beside them; c: truncated; d: float32 with NaN."""
    d = tmp_path / "in"
    d.mkdir()
    _stack(d / "a.tif", {(1, 10, 10): 5000, (2, 20, 20): 3000})
    _stack(d / "b.tif", {(0, 5, 5): 5000, (2, 28, 28): 3000})
    _points(d / "a.csv", [(1, 10, 11), (3, 5, 5)])
    _points(d / "b.csv", [(0, 5, 6)])
    _stack(d / "c.tif", {(1, 1, 1): 5000})
    data = (d / "c.tif").read_bytes()
    (d / "c.tif").write_bytes(data[: len(data) // 2])
    nan = np.ones(SHAPE, np.float32)
    nan[2, 3, 4] = np.nan
    write_stack(d / "d.tif", nan, voxel_size_nm=VOXEL)
    return d


def test_bad_files_are_named_and_skipped_good_ones_scored(env, spine_dir, tmp_path) -> None:
    out = tmp_path / "out"
    res = batch_eval(env["models"]["good"], spine_dir, out, progress=False, params=env["params"])
    assert set(res.bad_files) == {"c.tif", "d.tif"}
    c, d = "\n".join(res.bad_files["c.tif"]), "\n".join(res.bad_files["d.tif"])
    assert "expect_column_values_to_be_in_set(readable" in c and "truncated" in c
    assert "n_nonfinite" in d and "observed n_nonfinite=1" in d
    assert [p.name for p in res.good_files] == ["a.tif", "b.tif"]
    assert res.output_failures == {} and res.exit_code == 0
    assert dataclasses.replace(res, strict=True).exit_code == 1

    per = res.per_file.set_index("file")
    assert per.loc["a.tif", ["tp", "fp", "fn"]].tolist() == [1, 1, 1]
    assert per.loc["b.tif", ["tp", "fp", "fn"]].tolist() == [1, 1, 0]
    s = res.summary
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(4 / 7) and s["n_bad_inputs"] == 2

    # outputs only for the files the model saw; reports are on disk and name the bad files
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b"]
    assert len(pd.read_csv(out / "a" / "predictions.csv")) == 2
    report = json.loads((out / "batch_eval.json").read_text())
    assert set(report["bad_files"]) == {"c.tif", "d.tif"} and report["exit_code"] == 0
    assert json.loads((out / "metrics.json").read_text())["f1"] == pytest.approx(4 / 7)
    inputs = json.loads((out / "input_validation.json").read_text())
    assert not inputs["success"] and any("c.tif" in f["message"] for f in inputs["failures"])

    run = MlflowClient(env["uri"]).get_run(res.run_id)
    assert run.data.tags["model_uri"] == env["models"]["good"]
    assert run.data.tags["microseg.stage"] == "batch_eval"
    assert run.data.metrics["batch_eval.f1"] == pytest.approx(4 / 7)
    assert run.data.metrics["batch_eval.n_bad_inputs"] == 2
    names = {a.path for a in MlflowClient(env["uri"]).list_artifacts(res.run_id, "batch_eval")}
    assert names == {"batch_eval/batch_eval.json", "batch_eval/input_validation.json"}


def test_strict_run_exits_non_zero_and_stale_outputs_go(env, spine_dir, tmp_path) -> None:
    for bad in ("c.tif", "d.tif"):
        (spine_dir / bad).unlink()
    out = tmp_path / "out"
    clean = batch_eval(env["models"]["good"], spine_dir, out, strict=True, progress=False)
    assert clean.bad_files == {} and clean.exit_code == 0
    assert (out / "b" / "predictions.csv").is_file()
    data = (spine_dir / "b.tif").read_bytes()
    (spine_dir / "b.tif").write_bytes(data[: len(data) // 3])
    res = batch_eval(env["models"]["good"], spine_dir, out, strict=True, progress=False)
    assert list(res.bad_files) == ["b.tif"] and res.exit_code == 1
    assert not (out / "b").exists() and (out / "a" / "predictions.csv").is_file()


def test_the_same_run_writes_the_same_bytes(env, spine_dir, tmp_path) -> None:
    """The report folder is a DVC output: a second run of the same model on the same files,
    a second later, writes the same bytes (no seconds, GE's ids and times made stable)."""
    import hashlib
    import time

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    first = batch_eval(env["models"]["good"], spine_dir, tmp_path / "a", progress=False)
    time.sleep(1.1)
    batch_eval(env["models"]["good"], spine_dir, tmp_path / "b", progress=False)
    assert "seconds" in first.summary  # measured, and logged to MLflow
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert '"seconds"' not in (tmp_path / "a" / "batch_eval.json").read_text()


def test_output_check_catches_a_box_outside_the_image(env, spine_dir, tmp_path) -> None:
    res = batch_eval(
        env["models"]["overshoot"], spine_dir, tmp_path / "out", progress=False, strict=True
    )
    assert list(res.output_failures) == ["a.tif"]
    (reason,) = res.output_failures["a.tif"]
    assert "expect_column_pair_values_a_to_be_greater_than_b(width, x2" in reason
    assert "x2=37" in reason and "width=32" in reason
    per = res.per_file.set_index("file")
    assert per.loc["a.tif", "status"] == "output_rejected" and not per.loc["a.tif", "scored"]
    assert per.loc["b.tif", "scored"] and res.summary["n_scored"] == 1
    assert (res.summary["tp"], res.summary["fp"], res.summary["fn"]) == (1, 1, 0)
    assert res.exit_code == 1


def test_champion_moves_only_for_a_better_model(env, spine_dir, tmp_path) -> None:
    """The demo: batch-eval, register, promote; a worse model does not move champion."""
    client = MlflowClient(env["uri"])
    name = "microseg-spines-demo"

    def round_trip(key: str):
        res = batch_eval(
            env["models"][key], spine_dir, tmp_path / key, progress=False, params=env["params"]
        )
        register_version(
            env["models"][key],
            name,
            {"batch.f1": res.summary["f1"]},
            {},
            validation_passed=not res.output_failures,
            client=client,
        )
        return res, promote(name, "batch.f1", 0.005, client=client, actor="test")

    good, d_good = round_trip("good")
    worse, d_worse = round_trip("worse")
    assert good.summary["f1"] == pytest.approx(4 / 7) and worse.summary["f1"] == 0.0
    assert d_good.promoted and not d_worse.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == d_good.version

    champ = batch_eval(f"models:/{name}@champion", spine_dir, tmp_path / "champ", progress=False)
    assert (champ.model_name, champ.model_version) == (name, d_good.version)
    assert champ.resolved_uri == f"models:/{name}/{d_good.version}"
    assert champ.summary["f1"] == pytest.approx(4 / 7)
    tags = client.get_run(champ.run_id).data.tags
    assert tags["registered_model_version"] == d_good.version
    assert tags["model_uri"] == f"models:/{name}@champion"

    better, d_better = round_trip("better")
    assert better.summary["f1"] == pytest.approx(4 / 5) and better.summary["precision"] == 1.0
    assert d_better.promoted and d_better.previous_champion == d_good.version
    version = client.get_model_version_by_alias(name, "champion").version
    assert str(version) == d_better.version

    with pytest.raises(MicrosegError, match="alias 'nope'"):
        batch_eval(f"models:/{name}@nope", spine_dir, tmp_path / "x", progress=False)


def test_nuclei_labels_checked_and_scored_in_the_active_run(env, tmp_path) -> None:
    d = tmp_path / "nuclei"
    d.mkdir()
    image = np.zeros((32, 32), np.uint8)
    image[2:8, 2:8] = image[20:28, 20:28] = 200
    Image.fromarray(image).save(d / "img.png")
    Image.fromarray(image).save(d / "img_crop.png")
    gt = np.zeros((32, 32), np.uint16)
    gt[2:8, 2:8], gt[20:28, 20:28], gt[10:14, 25:30] = 1, 2, 3  # one nucleus the model misses
    tifffile.imwrite(d / "img_labels.tif", gt)  # ground truth beside the image: not an input
    with mlflow.start_run(experiment_id=env["exp"]) as run:
        res = batch_eval(env["models"]["nuclei"], d, tmp_path / "out", progress=False)
    assert res.run_id == run.info.run_id
    assert [p.name for p in res.good_files] == ["img.png", "img_crop.png"]
    assert list(res.output_failures) == ["img_crop.png"]
    assert "labels_shape, input_shape" in res.output_failures["img_crop.png"][0]
    assert "28,32" in res.output_failures["img_crop.png"][0]
    # tp 2, fp 0, fn 1 at IoU 0.5 -> F1 = 2*2 / (2*2 + 0 + 1)
    assert res.summary["f1_50"] == pytest.approx(0.8) and res.summary["n_scored"] == 1
    labels = tifffile.imread(tmp_path / "out" / "img" / "img_labels.tif")
    assert labels.shape == (32, 32) and labels.max() == 2
    saved = pd.read_csv(tmp_path / "out" / "img" / "predictions.csv")
    assert Path(saved["labels_path"][0]) == tmp_path / "out" / "img" / "img_labels.tif"
    assert MlflowClient(env["uri"]).get_run(run.info.run_id).data.metrics[
        "batch_eval.f1_50"
    ] == pytest.approx(0.8)


def test_bad_device_is_named_and_an_older_model_cannot_move(env, tmp_path) -> None:
    d = tmp_path / "nuclei"
    d.mkdir()
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(d / "img.png")
    model = env["models"]["nuclei"]
    with pytest.raises(ConfigError, match="--device expects"):
        batch_eval(model, d, tmp_path / "a", progress=False, device="gpu")
    # the test model has no use_device, as a version logged before --device
    with pytest.raises(MicrosegError, match="cannot be moved to 'cpu'"):
        batch_eval(model, d, tmp_path / "b", progress=False, device="cpu")
