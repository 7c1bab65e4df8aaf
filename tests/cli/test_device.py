"""``--device``: one override reaches every training and inference device the command uses;
a value torch does not know is a clear error before anything runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from microseg.cli import app
from microseg.config import check_device, load_params
from microseg.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_with_device_sets_every_training_and_inference_device() -> None:
    params = load_params(REPO_PARAMS)
    p = params.with_device("cuda:1")
    assert p.yolo.train.device == "cuda:1" and p.yolo.predict.device == "cuda:1"
    assert p.punet.train["device"] == "cuda:1" and p.punet.predict.device == "cuda:1"
    segs = p.tracking.segmenters.values()
    assert segs and all(s.train["device"] == s.infer["device"] == "cuda:1" for s in segs)
    learned = {n: mc for n, mc in p.cells.models.items() if mc.family != "classical"}
    assert learned and all(
        mc.train["device"] == mc.infer["device"] == "cuda:1" for mc in learned.values()
    )
    # classical baselines have no device; the original params are untouched
    assert all("device" not in mc.infer for mc in p.cells.baselines.values())
    assert params.yolo.train.device == "auto" and params.punet.predict.device is None
    assert params.with_device(None) is params


def test_auto_is_ultralytics_default_and_kept_out_of_hashed_params() -> None:
    p = load_params(REPO_PARAMS).with_device("auto")
    assert p.yolo.train.device == "auto" and p.yolo.predict.device is None
    assert p.engine.device == "auto"
    assert p.punet.predict.device == "auto"
    # where a model runs is not a logged param of the prediction sections (same hash as before)
    assert "device" not in p.punet.predict.model_dump()
    assert "device" not in p.yolo.predict.model_dump()


@pytest.mark.parametrize("good", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", "CUDA"])
def test_accepted_devices(good: str) -> None:
    assert check_device(good) == good.lower()


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "0", "tpu", ""])
def test_bad_device_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="--device expects auto, cpu, cuda, cuda:N or mps"):
        load_params(REPO_PARAMS).with_device(bad)


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [*args, "--params", str(REPO_PARAMS)])


def test_bad_device_on_the_command_line_fails_before_the_stage(monkeypatch) -> None:
    from microseg.stages import training

    monkeypatch.setattr(training, "run_train", lambda *a, **k: pytest.fail("stage ran"))
    res = _invoke(["train", "--model", "yolo", "--device", "gpu"])
    assert isinstance(res.exception, ConfigError) and "'gpu'" in str(res.exception)


def test_train_and_evaluate_stages_get_the_device(monkeypatch) -> None:
    from microseg.stages import evaluation, training

    seen = {}

    def fake_train(params, model):
        seen["train"] = training.trainers(params)[model].section
        return SimpleNamespace(out=Path("w.pt"))

    def fake_evaluate(params, model, task):
        seen["evaluate"] = params.cells.models[model].infer
        metrics = {"f1_50": 1.0, "segm_AP": 1.0}
        return SimpleNamespace(stage="evaluate_cells", metrics=metrics, metrics_file=None)

    monkeypatch.setattr(training, "run_train", fake_train)
    monkeypatch.setattr(evaluation, "run_evaluate", fake_evaluate)
    assert _invoke(["train", "-m", "maunet", "--device", "cuda:0"]).exit_code == 0
    assert seen["train"].train["device"] == "cuda:0"
    assert _invoke(["train", "-m", "yolo"]).exit_code == 0  # not set: params.yaml's
    assert seen["train"].device == "auto"
    assert _invoke(["evaluate", "-m", "maunet", "--device", "mps"]).exit_code == 0
    assert seen["evaluate"]["device"] == "mps"


def test_predict_fuse_and_batch_eval_get_the_device(monkeypatch, tmp_path: Path) -> None:
    import pandas as pd

    from microseg.registry import batch_eval
    from microseg.stages import predict

    seen = {}

    def fake_predict(params, *a, **k):
        seen["predict"] = (params.yolo.predict.device, params.punet.predict.device)
        return predict.PredictResult(1, ["ok"])

    def fake_fuse(params, *a, **k):
        seen["fuse"] = params.punet.predict.device
        return pd.DataFrame({"status": ["done"], "stack": ["a"], "error": [""]})

    def fake_batch_eval(*a, device=None, **k):
        seen["batch_eval"] = device
        return SimpleNamespace(bad_files={}, output_failures={}, model_name="m",
                               model_version=1, good_files=[], exit_code=0)  # fmt: skip

    monkeypatch.setattr(predict, "predict_stacks", fake_predict)
    monkeypatch.setattr(predict, "fuse_folder", fake_fuse)
    monkeypatch.setattr(batch_eval, "batch_eval", fake_batch_eval)
    out = str(tmp_path / "out")
    assert _invoke(["predict", "x.tif", "--out", out, "--device", "cuda"]).exit_code == 0
    assert seen["predict"] == ("cuda", "cuda")
    assert _invoke(["fuse", "--input", "x", "--out", out, "--device", "cpu"]).exit_code == 0
    assert seen["fuse"] == "cpu"
    args = ["batch-eval", "--model", "m", "--input", "x", "--out", out, "--device", "cuda:1"]
    assert _invoke(args).exit_code == 0
    assert seen["batch_eval"] == "cuda:1"
