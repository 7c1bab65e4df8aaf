"""Ultralytics callbacks -> our hooks, and no stray MLflow runs from Ultralytics' integration."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from PIL import Image

from microseg.models.yolo.callbacks import (
    UltralyticsHookBridge,
    attach_hooks,
    disable_ultralytics_mlflow,
    strip_foreign_callbacks,
)
from microseg.train.hooks import EarlyStopping, HookBase, Hooks


class Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self, config):
        self.events.append(("before_train", dict(config)))

    def after_epoch(self, epoch, metrics):
        self.events.append(("after_epoch", epoch, dict(metrics)))

    def after_checkpoint(self, path, is_best):
        self.events.append(("after_checkpoint", Path(path).name, is_best))

    def after_train(self, best, best_path):
        self.events.append(("after_train", dict(best), best_path))


class FakeTrainer(SimpleNamespace):
    def label_loss_items(self, loss_items=None, prefix="train"):
        return {f"{prefix}/{k}": round(float(v), 5) for k, v in loss_items.items()}


def _trainer(tmp_path: Path) -> FakeTrainer:
    weights = tmp_path / "weights"
    weights.mkdir()
    return FakeTrainer(
        args=SimpleNamespace(model="yolov8n-p2.yaml", data=tmp_path / "d.yaml", epochs=3, lr0=0.01),
        start_epoch=0,
        epoch=0,
        tloss={"box_loss": 1.5, "cls_loss": 2.0},
        loss_names=("box_loss", "cls_loss"),
        metrics={
            "metrics/precision(B)": 0.5,
            "metrics/recall(B)": 0.25,
            "metrics/mAP50(B)": 0.4,
            "metrics/mAP50-95(B)": 0.2,
            "val/box_loss": 1.0,
        },
        fitness=0.22,
        best_fitness=0.22,
        lr={"lr/pg0": 0.001},
        last=weights / "last.pt",
        best=weights / "best.pt",
        stopper=SimpleNamespace(best_epoch=1),
        stop=False,
    )


def test_bridge_translates_trainer_events(tmp_path):
    rec = Recorder()
    bridge = UltralyticsHookBridge(rec)
    tr = _trainer(tmp_path)
    bridge.on_train_start(tr)
    bridge.on_train_epoch_end(tr)
    tr.last.write_bytes(b"x")
    tr.best.write_bytes(b"x")
    bridge.on_model_save(tr)
    bridge.on_fit_epoch_end(tr)
    tr.epoch, tr.fitness = 1, 0.1  # worse than best: only last.pt is announced
    bridge.on_train_epoch_end(tr)
    bridge.on_model_save(tr)
    bridge.on_fit_epoch_end(tr)
    tr.metrics = {"metrics/mAP50(B)": 0.9}  # Ultralytics' final validation of best.pt
    bridge.on_fit_epoch_end(tr)
    bridge.on_train_end(tr)

    names = [e[0] for e in rec.events]
    assert names == [
        "before_train",
        "after_checkpoint",
        "after_checkpoint",
        "after_epoch",
        "after_checkpoint",
        "after_epoch",
        "after_train",
    ]
    config = rec.events[0][1]
    assert config == {
        "model": "yolov8n-p2.yaml",
        "data": str(tmp_path / "d.yaml"),
        "epochs": 3,
        "lr0": 0.01,
        "start_epoch": 0,
    }
    assert rec.events[1][1:] == ("last.pt", False) and rec.events[2][1:] == ("best.pt", True)
    assert rec.events[4][1:] == ("last.pt", False)
    epoch, metrics = rec.events[3][1:]
    assert epoch == 0
    assert metrics == {
        "train/box_loss": 1.5,
        "train/cls_loss": 2.0,
        "val/precision": 0.5,
        "val/recall": 0.25,
        "val/mAP50": 0.4,
        "val/mAP50-95": 0.2,
        "val/box_loss": 1.0,
        "fitness": 0.22,
        "lr/pg0": 0.001,
    }
    assert rec.events[5][1] == 1
    best, best_path = rec.events[6][1:]
    assert best == {"val/mAP50": 0.9, "fitness": 0.22, "best_epoch": 0.0}
    assert best_path == tr.best


def test_bridge_stops_the_trainer_when_a_hook_asks(tmp_path):
    stopper = EarlyStopping("val/mAP50", patience=1)
    bridge = UltralyticsHookBridge(Hooks([stopper]))
    tr = _trainer(tmp_path)
    for epoch in range(2):
        tr.epoch = epoch
        bridge.on_train_epoch_end(tr)
        bridge.on_fit_epoch_end(tr)
    assert tr.stop is True  # mAP50 did not improve in epoch 1


def test_attach_hooks_registers_model_callbacks():
    class FakeModel:
        def __init__(self):
            self.callbacks: dict[str, list] = {}

        def add_callback(self, event, fn):
            self.callbacks.setdefault(event, []).append(fn)

    model = FakeModel()
    bridge = attach_hooks(model, Recorder())
    assert set(model.callbacks) == {
        "on_train_start",
        "on_train_epoch_end",
        "on_model_save",
        "on_fit_epoch_end",
        "on_train_end",
    }
    assert model.callbacks["on_fit_epoch_end"][0].__self__ is bridge


def test_strip_foreign_callbacks_removes_only_ultralytics_mlflow_and_raytune():
    from ultralytics.utils.callbacks import mlflow as ul_mlflow
    from ultralytics.utils.callbacks import raytune as ul_raytune

    def ours(trainer):
        return None

    tr = SimpleNamespace(
        callbacks={
            "on_fit_epoch_end": [ours, ul_mlflow.on_fit_epoch_end, ul_raytune.on_fit_epoch_end],
            "on_pretrain_routine_end": [ul_mlflow.on_pretrain_routine_end],
        }
    )
    strip_foreign_callbacks(tr)
    assert tr.callbacks == {"on_fit_epoch_end": [ours], "on_pretrain_routine_end": []}


def _blob_dataset(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 30, (64, 64)).astype(np.uint8)
            x, y = (int(v) for v in rng.integers(4, 48, 2))
            img[y : y + 10, x : x + 10] = 230
            Image.fromarray(img).save(root / "images" / split / f"im{i}.png")
            (root / "labels" / split / f"im{i}.txt").write_text(
                f"0 {(x + 5) / 64} {(y + 5) / 64} {10 / 64} {10 / 64}\n"
            )
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: spine\n")
    return data


def test_mlflow_training_logs_into_the_one_active_run(tmp_path, monkeypatch):
    """Named test_mlflow*: Ultralytics' MLflow callback only runs under pytest for such names."""
    from ultralytics.utils import SETTINGS

    from microseg.models.yolo import YoloSpineDetector
    from microseg.registry.mlflow_hooks import MlflowHook

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    data = _blob_dataset(tmp_path / "data")
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dict.__setitem__(SETTINGS, "mlflow", True)  # as a user may have it; in memory only
    try:
        exp = mlflow.create_experiment("microseg-spines")
        with mlflow.start_run(experiment_id=exp) as run:
            hook = MlflowHook()
            det = YoloSpineDetector.build("n")
            det.fit(data, tmp_path / "runs", epochs=2, imgsz=64, batch=4, device="cpu", hooks=hook)
            assert mlflow.active_run() is not None  # nobody ended our run
            assert mlflow.active_run().info.run_id == run.info.run_id
        client = mlflow.MlflowClient()
        experiments = client.search_experiments()
        runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
        assert len(runs) == 1 and runs[0].info.run_id == run.info.run_id
        assert {e.name for e in experiments} <= {"Default", "microseg-spines"}
        got = runs[0].data
        assert got.params["epochs"] == "2" and "warmup_bias_lr" not in got.params
        history = client.get_metric_history(run.info.run_id, "val/mAP50")
        assert sorted(m.step for m in history) == [0, 1]
        assert "best_fitness" in got.metrics
        assert SETTINGS["mlflow"] is False
    finally:
        dict.__setitem__(SETTINGS, "mlflow", False)
        mlflow.set_tracking_uri(previous_uri)


def test_disable_ultralytics_mlflow_is_idempotent():
    class FakeModel:
        def __init__(self) -> None:
            self.callbacks: dict[str, list] = {}

    model = FakeModel()
    disable_ultralytics_mlflow(model)
    disable_ultralytics_mlflow(model)
    assert model.callbacks["on_pretrain_routine_start"] == [strip_foreign_callbacks]


@pytest.mark.parametrize("value", [float("nan"), "abc", None])
def test_non_numeric_metrics_are_dropped(value):
    from microseg.models.yolo.callbacks import val_metrics

    assert val_metrics({"metrics/mAP50(B)": value, "x": 1}) == {"x": 1.0}
