"""The baseline trial of a training study: trial 0 trains the training section's own values of
the searched knobs, so the study's best is compared with the default on the same budget."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from microseg.train.hooks import HookBase
from microseg.tune.spaces import baseline_values
from microseg.tune.storage import study as open_study
from microseg.tune.training import TrainStudyConfig, study_summary, tune_training

E = 3


def make_cfg(tmp_path: Path, **kw) -> TrainStudyConfig:
    values = {
        "n_trials": 4,
        "epochs": E,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "study_name": "fake",
        "metric": "score",
        "pruner": {"n_startup_trials": 10, "n_warmup_steps": 0},
        "space": {"q": {"low": 0.0, "high": 1.0}, "nested.r": {"low": 0.0, "high": 1.0}},
    }
    values.update(kw)
    return TrainStudyConfig(**values)


class Trainer:
    """Scores ``q - r`` every epoch; records the params of each call."""

    def __init__(self, interrupt_on_call: int | None = None) -> None:
        self.calls: list[dict] = []
        self.interrupt_on_call = interrupt_on_call

    def __call__(self, params: dict, hooks: HookBase, trial_dir: Path) -> float:
        self.calls.append(params)
        if len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        value = params["q"] - params["nested"]["r"]
        for epoch in range(E):
            hooks.after_epoch(epoch, {"score": value})
        return value


BASE = {"q": 0.25, "nested": {"r": 0.5, "other": 7}, "epochs": 99}


def test_trial_0_trains_the_sections_values_and_the_summary_holds_both(tmp_path):
    fake = Trainer()
    _, st = tune_training("fake", fake, BASE, make_cfg(tmp_path), seed=3, work_dir=tmp_path)
    assert fake.calls[0] == BASE  # the default, untouched
    assert st.trials[0].user_attrs["baseline"] is True
    assert not any(t.user_attrs.get("baseline") for t in st.trials[1:])
    assert len({(c["q"], c["nested"]["r"]) for c in fake.calls}) == 4  # the others are sampled
    out = study_summary(st)
    assert (out["default_trial"], out["default_value"]) == (0, -0.25)
    assert out["direction"] == "maximize"
    assert out["best_value"] == max(t.value for t in st.trials) >= out["default_value"]


def test_a_resumed_study_queues_no_second_baseline(tmp_path):
    tune_training("fake", Trainer(), BASE, make_cfg(tmp_path, n_trials=2), work_dir=tmp_path)
    more = Trainer()
    _, st = tune_training("fake", more, BASE, make_cfg(tmp_path, n_trials=4), work_dir=tmp_path)
    assert len(more.calls) == 2 and BASE not in more.calls
    assert [t.number for t in st.trials if t.user_attrs.get("baseline")] == [0]


def test_an_interrupted_baseline_is_rerun_as_the_baseline(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=2)
    with pytest.raises(KeyboardInterrupt):
        tune_training("fake", Trainer(interrupt_on_call=1), BASE, cfg, work_dir=tmp_path)
    again = Trainer()
    _, st = tune_training("fake", again, BASE, cfg, work_dir=tmp_path)
    assert again.calls[0] == BASE
    out = study_summary(st)
    retry = next(t for t in st.trials if t.user_attrs.get("retry_of") == 0)
    assert (out["default_trial"], out["default_value"]) == (retry.number, -0.25)


def test_no_baseline_when_the_section_lacks_a_knob_or_it_is_switched_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    fake = Trainer()
    cfg = make_cfg(tmp_path, study_name="a")
    _, st = tune_training("fake", fake, {"q": 0.25}, cfg, work_dir=tmp_path / "a")
    assert "no baseline trial" in caplog.text and "default_value" not in study_summary(st)
    cfg = make_cfg(tmp_path, study_name="b", baseline=False)
    _, st = tune_training("fake", Trainer(), BASE, cfg, work_dir=tmp_path / "b")
    assert not any(t.user_attrs.get("baseline") for t in st.trials)
    assert open_study("b", cfg.storage).trials[0].params != {"q": 0.25, "nested.r": 0.5}


def test_yolo_baseline_fills_what_the_section_leaves_to_the_detector():
    from microseg.models.yolo import DEFAULT_AUGMENT, YoloSpineDetector

    section = {"lr0": 0.004, "augment": {"degrees": 3.0}, "epochs": 8}
    keys = ["lr0", "augment.degrees", "augment.scale", "augment.mixup", "lrf"]
    assert baseline_values("yolo", section, keys) == {
        "lr0": 0.004,
        "augment.degrees": 3.0,
        "augment.scale": DEFAULT_AUGMENT["scale"],
        "augment.mixup": DEFAULT_AUGMENT["mixup"],
        "lrf": 0.01,  # YoloSpineDetector.fit's default
    }
    assert baseline_values("yolo", section, ["augment.sparkle"]) is None
    assert YoloSpineDetector.train_defaults(["augment.copy_paste"]) == {"augment.copy_paste": 0.0}


def test_enqueued_points_follow_the_baseline_in_a_fresh_study_only(tmp_path):
    point = {"q": 0.9, "nested.r": 0.1}
    cfg = make_cfg(tmp_path, n_trials=3, enqueue=[point])
    fake = Trainer()
    _, st = tune_training("fake", fake, BASE, cfg, seed=3, work_dir=tmp_path)
    assert fake.calls[0] == BASE
    assert (fake.calls[1]["q"], fake.calls[1]["nested"]["r"]) == (0.9, 0.1)
    assert st.trials[1].user_attrs["enqueued"] is True
    more = Trainer()
    tune_training("fake", more, BASE, make_cfg(tmp_path, n_trials=4, enqueue=[point]), seed=3,
                  work_dir=tmp_path)  # fmt: skip
    assert len(more.calls) == 1 and (more.calls[0]["q"], more.calls[0]["nested"]["r"]) != (0.9, 0.1)
    with pytest.raises(ValueError, match="not knobs"):
        make_cfg(tmp_path, enqueue=[{"lr": 1.0}])
