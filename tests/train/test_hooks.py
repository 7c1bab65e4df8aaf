from pathlib import Path

import mlflow

from microseg.registry.mlflow_hooks import MlflowHook
from microseg.registry.runs import stage_run
from microseg.train.hooks import EarlyStopping, HookBase, Hooks


class Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def after_epoch(self, epoch, metrics):
        self.events.append(("epoch", epoch, dict(metrics)))


def test_hooks_fan_out_in_order() -> None:
    a, b = Recorder(), Recorder()
    Hooks([a, b]).after_epoch(3, {"loss": 1.0})
    assert a.events == b.events == [("epoch", 3, {"loss": 1.0})]


def test_early_stopping_counts_bad_epochs() -> None:
    es = EarlyStopping("dice", patience=2)
    for epoch, value in enumerate([0.1, 0.3, 0.29, 0.3, 0.2]):
        es.after_epoch(epoch, {"dice": value})
    assert es.best == 0.3 and es.should_stop
    es_min = EarlyStopping("loss", patience=2, mode="min")
    for epoch, value in enumerate([1.0, 0.5, 0.4]):
        es_min.after_epoch(epoch, {"loss": value})
    assert not es_min.should_stop and es_min.best == 0.4


def test_mlflow_hook_logs_into_the_stage_run(params, tmp_path: Path) -> None:
    with stage_run(params, stage="train", task="spines", dataset="d") as run:
        hook = MlflowHook()
        hook.before_train({"opt": {"lr": 0.1}, "epochs": 2})
        hook.after_epoch(0, {"train/loss": 1.5, "val/dice": 0.2, "bad": float("nan"), "s": "x"})
        hook.after_epoch(1, {"train/loss": 1.0, "val/dice": 0.4})
        hook.after_train({"val/dice": 0.4}, None)
    client = mlflow.MlflowClient()
    got = client.get_run(run.info.run_id).data
    assert got.params["opt.lr"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.0)]
    assert "bad" not in got.metrics and got.metrics["best_val/dice"] == 0.4
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1
