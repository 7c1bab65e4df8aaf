"""Training studies outside the demo (``studies/dvc.yaml``): a study run with ``out_dir`` leaves
its own files, ``params/tuned_<target>.yaml`` changes only when adopted, and a ``cells.models``
U-Net is a study target as ``cells:<model>``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from microseg.errors import ConfigError, MissingFileError
from microseg.stages import tuned, tuning


def _fake_family_train_fn(family, data, epochs, *, metric, direction="maximize"):
    """A trainer whose metric peaks at lr = 3e-3: the study must find the best trial."""
    import math

    def run(section, hooks, trial_dir):
        for epoch in range(epochs):
            value = 1.0 / (1.0 + abs(math.log10(section["lr"] / 3e-3))) * (epoch + 1) / epochs
            hooks.after_epoch(epoch, {metric: value})
        return value

    return run


@pytest.fixture()
def unet_study(params_unet, monkeypatch, tmp_path):
    import microseg.tune.training as training

    monkeypatch.setattr(training, "family_train_fn", _fake_family_train_fn)
    params_unet.tune = {
        "unet": {
            "n_trials": 4,
            "epochs": 2,
            "storage": f"sqlite:///{tmp_path / 'studies' / 'unet' / 'optuna.db'}",
            "baseline": False,  # the default lr is the fake's peak (see the baseline test)
        }
    }
    return params_unet


def test_cells_prefix_names_the_cells_model_and_its_family_study(params_unet):
    assert tuned.resolve_target(params_unet, "cells:unet") == "unet"
    assert tuned.resolve_target(params_unet, "yolo") == "yolo"
    cfg = tuning.study_config(params_unet, "unet", "unet")
    assert (cfg.study_name, cfg.metric) == ("unet-train", "val_f1_50")
    assert set(cfg.space) == {"lr", "weight_decay", "fg_fraction", "elastic_prob"}
    with pytest.raises(ConfigError, match="unknown cells model 'nope'"):
        tuned.resolve_target(params_unet, "cells:nope")


def test_a_study_with_out_dir_leaves_params_alone_until_adopted(unet_study, caplog):
    params = unet_study
    out_dir = Path("studies/unet")
    out = tuning.tune_training_stage(params, "cells:unet", out_dir=out_dir)
    best = yaml.safe_load((out_dir / "best.yaml").read_text())
    assert best == out["best"] and set(best) == {
        "lr",
        "weight_decay",
        "fg_fraction",
        "elastic_prob",
    }
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["target"] == "unet" and summary["n_complete"] + summary["n_pruned"] == 4
    rows = list(csv.DictReader((out_dir / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert float(summary["best_value"]) == max(float(r["value"]) for r in complete)
    # the study wrote nothing the root pipeline reads
    assert not tuned.tuned_path("unet").exists()
    assert not tuning.metrics_path(params, "unet").exists()

    tuned.tuned_path("unet").parent.mkdir(parents=True, exist_ok=True)
    tuned.tuned_path("unet").write_text("{}\n")
    old, new, dst = tuning.adopt(params, "cells:unet")
    assert (old, new, dst) == ({}, best, tuned.tuned_path("unet"))
    assert yaml.safe_load(dst.read_text()) == best
    merged = tuned.tuned_train_config(params, "unet", {"lr": 1.0, "epochs": 7})
    assert merged == {**best, "epochs": 7}


def test_adopt_refuses_a_missing_or_bad_study_and_keeps_the_params(params):
    dst = tuned.tuned_path("yolo")
    dst.parent.mkdir(parents=True)
    dst.write_text("lr0: 0.002\n")
    with pytest.raises(MissingFileError, match=r"best\.yaml"):
        tuning.adopt(params, "yolo")
    src = Path("studies/yolo/best.yaml")
    src.parent.mkdir(parents=True)
    for bad, said in (
        ("augment: {sparkle: 1.0}\n", "sparkle"),
        ("{}\n", "empty"),
        ("- 1\n", "mapping"),
    ):
        src.write_text(bad)
        with pytest.raises(Exception, match=said):
            tuning.adopt(params, "yolo")
        assert dst.read_text() == "lr0: 0.002\n"
    with pytest.raises(ConfigError, match="cannot adopt"):
        tuning.adopt(params, "fusion")


def test_tune_adopt_command_prints_old_and_new(params, monkeypatch, capsys):
    import sys

    import microseg.cli as cli
    from microseg.cli import main

    Path("params.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "params.yaml").read_text()
    )
    src = Path("studies/punet/best.yaml")
    src.parent.mkdir(parents=True)
    src.write_text("lr: 0.004\nkl_beta: 0.5\n")
    tuned.tuned_path("punet").parent.mkdir(parents=True)
    tuned.tuned_path("punet").write_text("lr: 0.001\n")
    monkeypatch.setattr(cli, "_log_files", False)
    monkeypatch.setattr(sys, "argv", ["microseg", "tune", "--adopt", "punet"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert int(exit_.value.code or 0) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001 -> 0.004" in out and "kl_beta: - -> 0.5" in out
    assert yaml.safe_load(tuned.tuned_path("punet").read_text()) == {"lr": 0.004, "kl_beta": 0.5}


def test_the_studies_pipeline_is_outside_the_root_one():
    """``dvc repro`` (the demo) must not run a study: no root stage reads studies/, and the
    study stages write only there (never the params/tuned_*.yaml the root stages read)."""
    root = Path(__file__).resolve().parents[2]
    root_stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert "studies" not in json.dumps(root_stages)
    studies = yaml.safe_load((root / "studies" / "dvc.yaml").read_text())["stages"]
    assert set(studies) == {"tune_yolo", "tune_punet"}
    for name, stage in studies.items():
        target = name.removeprefix("tune_")
        assert f"--target {target} --out-dir studies/{target}" in stage["cmd"]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        outs += [next(iter(m)) for m in stage["metrics"]]
        assert all(o.startswith(f"studies/{target}/") for o in outs), outs
        assert not any("tuned_" in str(d) for d in stage["deps"])


@pytest.mark.parametrize(
    ("values", "adopted"),
    [([0.0], False), ([0.0, 0.0, 0.0], False), ([0.31, 0.41], True), ([0.2, 0.2, 0.3], True)],
)
def test_a_study_without_signal_is_not_adopted(params, values, adopted):
    """One complete trial, or all tied (YOLO at 4 epochs from scratch: mAP50 0.0 throughout),
    says nothing about the knobs: adopting it would retrain the demo with arbitrary values."""
    src = Path("studies/yolo/best.yaml")
    src.parent.mkdir(parents=True)
    src.write_text("lr0: 0.004\n")
    rows = ["number,state,value", "9,PRUNED,0.9"]
    rows += [f"{i},COMPLETE,{v}" for i, v in enumerate(values)]
    (src.parent / "trials.csv").write_text("\n".join(rows) + "\n")
    if adopted:
        assert tuning.adopt(params, "yolo")[1] == {"lr0": 0.004}
        return
    with pytest.raises(ConfigError, match="no trial of the study beat another") as err:
        tuning.adopt(params, "yolo")
    assert "trials.csv" in str(err.value)
    assert not tuned.tuned_path("yolo").exists()


def test_a_study_scores_the_default_on_the_sections_own_budget(unet_study, monkeypatch):
    """``epochs: null`` trains every trial for the training section's epochs, and trial 0 is
    the section's own values: summary.json holds both the default's value and the best."""
    params = unet_study
    params.tune["unet"].update(epochs=None, n_trials=3, baseline=True)
    seen = []

    def fake(family, data, epochs, *, metric, direction="maximize"):
        run = _fake_family_train_fn(family, data, epochs, metric=metric, direction=direction)
        seen.append(epochs)
        return run

    import microseg.tune.training as training

    monkeypatch.setattr(training, "family_train_fn", fake)
    out_dir = Path("studies/unet")
    out = tuning.tune_training_stage(params, "unet", out_dir=out_dir)
    from microseg.stages.training import tunable

    section = tunable(params)["unet"].section()
    assert seen == [section["epochs"]] and out["epochs"] == section["epochs"]
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = list(csv.DictReader((out_dir / "trials.csv").open()))
    assert [r["baseline"] for r in rows] == ["True", "False", "False"]
    from microseg.models import get_model

    default_lr = section.get("lr", get_model("unet").train_defaults(["lr"]).get("lr"))
    assert default_lr is not None and float(rows[0]["params_lr"]) == default_lr
    assert summary["default_trial"] == 0
    assert summary["default_value"] == pytest.approx(float(rows[0]["value"]))
    assert summary["best_value"] >= summary["default_value"]


@pytest.mark.parametrize(
    ("default", "best", "direction", "adopted"),
    [
        (0.45, 0.52, "maximize", True),
        (0.52, 0.52, "maximize", False),  # the best trial is the default itself
        (0.30, 0.20, "minimize", True),
        (0.20, 0.30, "minimize", False),
    ],
)
def test_adopt_refuses_a_study_whose_best_does_not_beat_the_default(
    params, default, best, direction, adopted
):
    src = Path("studies/yolo/best.yaml")
    src.parent.mkdir(parents=True)
    src.write_text("lr0: 0.004\n")
    rows = ["number,state,value", f"0,COMPLETE,{default}", f"1,COMPLETE,{best}", "2,COMPLETE,0.1"]
    (src.parent / "trials.csv").write_text("\n".join(rows) + "\n")
    summary = {"metric": "m", "best_value": best, "default_value": default, "default_trial": 0}
    (src.parent / "summary.json").write_text(json.dumps({**summary, "direction": direction}))
    if adopted:
        assert tuning.adopt(params, "yolo")[1] == {"lr0": 0.004}
        return
    with pytest.raises(ConfigError, match="does not beat the default"):
        tuning.adopt(params, "yolo")
    assert not tuned.tuned_path("yolo").exists()
