"""Optuna training studies: median pruning, seeded reproducibility, resume, shared storage,
nested params, and the real Prob-UNet (and, slow, YOLO) trainers behind the study."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from microseg.errors import ConfigError, MissingFileError
from microseg.train.hooks import HookBase
from microseg.tune.storage import study as open_study
from microseg.tune.training import (
    STUDY_CONFIGS,
    ParamSpec,
    TrainStudyConfig,
    TuningError,
    check_keys,
    default_study_config,
    family_train_fn,
    flatten,
    merge_tuned,
    nest,
    read_best_params,
    study_summary,
    tune_training,
    write_best_params,
)

E = 4  # epochs of the fake trainings


def make_cfg(tmp_path: Path, **kw) -> TrainStudyConfig:
    values = {
        "n_trials": 6,
        "epochs": E,
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "study_name": "fake",
        "metric": "score",
        "pruner": {"n_startup_trials": 2, "n_warmup_steps": 1},
        "space": {"q": {"low": 0.0, "high": 1.0}, "nested.r": {"low": 0.0, "high": 1.0}},
    }
    values.update(kw)
    return TrainStudyConfig(**values)


def curve(params: dict, epoch: int) -> float:
    """Curves that rise or fall with ``r``, so they cross: pruning is not just ranking by q."""
    return params["q"] + (params["nested"]["r"] - 0.5) * epoch / E


class FakeTrainer:
    """Reports :func:`curve` per epoch through the hooks; records what it was given."""

    def __init__(self, fail_if=None, interrupt_on_call: int | None = None) -> None:
        self.calls: list[dict] = []
        self.epochs_run: list[int] = []
        self.dirs: list[Path] = []
        self.fail_if, self.interrupt_on_call = fail_if, interrupt_on_call

    def __call__(self, params: dict, hooks: HookBase, trial_dir: Path) -> float:
        self.calls.append(params)
        self.dirs.append(trial_dir)
        if self.interrupt_on_call is not None and len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        if self.fail_if is not None and self.fail_if(params):
            raise RuntimeError("CUDA out of memory (fake)")
        self.epochs_run.append(0)
        for epoch in range(E):
            self.epochs_run[-1] += 1
            hooks.after_epoch(epoch, {"score": curve(params, epoch), "loss": 1.0})
        return max(curve(params, e) for e in range(E))


def finished(st: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in st.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def expected_states(trials, n_startup: int, warmup: int) -> list[str]:
    """The median rule replayed by hand: a trial is pruned at the first epoch >= ``warmup``
    where its best value so far is below the median of the *completed* earlier trials at
    that epoch, once at least ``n_startup`` (and one) trials have completed."""
    completed: list[list[float]] = []
    states = []
    for t in trials:
        c = [curve(nest(t.params), s) for s in range(E)]
        state = "COMPLETE"
        for s in range(E):
            ready = len(completed) >= max(1, n_startup) and s >= warmup
            if ready and max(c[: s + 1]) < float(np.median([o[s] for o in completed])):
                state = "PRUNED"
                break
        if state == "COMPLETE":
            completed.append(c)
        states.append(state)
    return states


# ---------------------------------------------------------------------------- pruning
def test_pruner_prunes_the_curves_below_the_median_hand_computed(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=5)
    pre = open_study(cfg.study_name, cfg.storage, seed=0)
    qs = [0.5, 0.9, 0.1, 0.75, 0.3]  # flat curves (r = 0.5): the value is q at every epoch
    for q in qs:
        pre.enqueue_trial({"q": q, "nested.r": 0.5})
    fake = FakeTrainer()
    seen: list[tuple[int, dict]] = []
    best, st = tune_training(
        "fake",
        fake,
        {},
        cfg,
        seed=0,
        on_trial=lambda t, m: seen.append((t.number, m)),
        work_dir=tmp_path / "work",
    )
    # trials 0, 1 start the pruner; trial 2 (0.1 < median 0.7) is pruned at the first epoch
    # after warm-up; trial 3 (0.75 > 0.7) completes; trial 4 (0.3 < median 0.75) is pruned
    assert [t.state.name for t in st.trials] == [
        "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "PRUNED"
    ]  # fmt: skip
    assert fake.epochs_run == [E, E, 2, E, 2]  # pruned after epoch 1 (0-based): training stopped
    assert sorted(st.trials[2].intermediate_values) == [0, 1]
    assert best == {"q": 0.9, "nested": {"r": 0.5}}
    assert [m["state"] for _, m in seen] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert seen[2][1]["value"] == pytest.approx(0.1) and seen[2][1]["curve"] == {0: 0.1, 1: 0.1}
    assert seen[1][1]["params"] == {"q": 0.9, "nested": {"r": 0.5}}
    assert [d.name for d in fake.dirs] == [f"trial_{i}" for i in range(5)]
    assert study_summary(st)["n_pruned"] == 2 and study_summary(st)["best_trial"] == 1


def test_pruned_count_matches_the_median_rule_replayed_on_sampled_trials(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=14, pruner={"n_startup_trials": 3, "n_warmup_steps": 1})
    fake = FakeTrainer()
    _, st = tune_training("fake", fake, {"nested": {"keep": 7}}, cfg, seed=5, work_dir=tmp_path)
    want = expected_states(st.trials, n_startup=3, warmup=1)
    assert [t.state.name for t in st.trials] == want
    n_pruned = sum(s == "PRUNED" for s in want)
    assert 0 < n_pruned < 14
    assert sum(t.state == TrialState.PRUNED for t in st.trials) == n_pruned
    # the base params reach the trainer, merged with the sampled ones
    assert all(c["nested"]["keep"] == 7 and set(c["nested"]) == {"keep", "r"} for c in fake.calls)


# ---------------------------------------------------------------------------- reproducibility
class GlobalRngVandal(FakeTrainer):
    """Training reseeds the global generators (as ``train_punet`` does) from the clock."""

    def __call__(self, params, hooks, trial_dir):
        random.seed(time.perf_counter_ns())
        np.random.seed(time.perf_counter_ns() % 2**32)
        return super().__call__(params, hooks, trial_dir)


def _run(tmp_path: Path, name: str, seed: int, trainer=None, n_trials: int = 12):
    cfg = make_cfg(tmp_path, storage=f"sqlite:///{tmp_path / (name + '.db')}", n_trials=n_trials)
    best, st = tune_training(
        "fake", trainer or GlobalRngVandal(), {}, cfg, seed=seed, work_dir=tmp_path / name
    )
    return best, st


def test_same_seed_and_fresh_storage_give_the_same_study(tmp_path):
    best_a, a = _run(tmp_path, "a", seed=11)
    best_b, b = _run(tmp_path, "b", seed=11)
    assert sum(t.state == TrialState.PRUNED for t in a.trials) > 0  # the pruner took part
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.state for t in a.trials] == [t.state for t in b.trials]
    assert a.best_trial.number == b.best_trial.number and best_a == best_b
    _, c = _run(tmp_path, "c", seed=12, n_trials=3)
    assert [t.params for t in c.trials][:3] != [t.params for t in a.trials][:3]


class Noisy(FakeTrainer):
    """Nondeterministic training: the value changes from run to run."""

    def __call__(self, params, hooks, trial_dir):
        rng = np.random.default_rng(time.perf_counter_ns())
        for epoch in range(E):
            hooks.after_epoch(epoch, {"score": float(rng.random())})
        return float(rng.random())


def test_start_up_points_do_not_depend_on_what_training_returns(tmp_path):
    # TPE draws its first 10 points at random from its own seeded generator
    _, a = _run(tmp_path, "a", seed=4, trainer=Noisy(), n_trials=6)
    _, b = _run(tmp_path, "b", seed=4, trainer=Noisy(), n_trials=6)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


# ---------------------------------------------------------------------------- resume
def test_interrupted_study_resumes_without_lost_or_duplicated_trials(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=7)
    with pytest.raises(KeyboardInterrupt):
        tune_training("fake", FakeTrainer(interrupt_on_call=4), {}, cfg, work_dir=tmp_path)
    st = open_study(cfg.study_name, cfg.storage)
    assert [t.state.name for t in st.trials][3] == "FAIL" and len(finished(st)) == 3
    lost = st.trials[3]
    assert lost.user_attrs["interrupted"] is True

    again = FakeTrainer()
    _, st = tune_training("fake", again, {}, cfg, work_dir=tmp_path)
    done = finished(st)
    assert len(done) == 7 and len(again.calls) == 4  # 7 - 3: nothing redone, nothing skipped
    retry = [t for t in done if t.user_attrs.get("retry_of") == 3]
    assert len(retry) == 1 and retry[0].params == lost.params  # the lost point is not lost
    keys = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(keys)) == 7  # no duplicates (a resumed TPE does not replay its start-up)

    third = FakeTrainer()
    best, st3 = tune_training("fake", third, {}, cfg, work_dir=tmp_path)
    assert third.calls == [] and len(st3.trials) == len(st.trials)
    assert best == nest(st.best_trial.params)
    # a larger budget continues the same study
    more = FakeTrainer()
    _, st4 = tune_training("fake", more, {}, make_cfg(tmp_path, n_trials=9), work_dir=tmp_path)
    assert len(more.calls) == 2 and len(finished(st4)) == 9


def test_a_trial_whose_process_died_is_run_again(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=3)
    st = open_study(cfg.study_name, cfg.storage)
    orphan = st.ask()
    orphan.suggest_float("q", 0.0, 1.0)
    orphan.suggest_float("nested.r", 0.0, 1.0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan.set_user_attr("owner", {"host": __import__("socket").gethostname(), "pid": dead.pid})
    fake = FakeTrainer()
    _, st = tune_training("fake", fake, {}, cfg, work_dir=tmp_path)
    assert st.trials[0].state == TrialState.FAIL
    done = finished(st)
    assert len(done) == 3 and len(fake.calls) == 3
    assert [t.params for t in done if t.user_attrs.get("retry_of") == 0] == [st.trials[0].params]


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=6, max_failed_trials=20)
    fake = FakeTrainer(fail_if=lambda p: p["q"] > 0.6)
    best, st = tune_training("fake", fake, {}, cfg, seed=2, work_dir=tmp_path)
    failed = [t for t in st.trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["q"] > 0.6 for t in failed)
    assert "out of memory" in failed[0].user_attrs["error"]
    assert len(finished(st)) == 6 and best["q"] <= 0.6


def test_a_study_whose_trials_all_fail_stops(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=5, max_failed_trials=2)
    with pytest.raises(TuningError, match=r"3 trials failed.*out of memory"):
        tune_training("fake", FakeTrainer(fail_if=lambda p: True), {}, cfg, work_dir=tmp_path)
    st = open_study(cfg.study_name, cfg.storage)
    assert [t.state.name for t in st.trials] == ["FAIL"] * 3


def test_a_study_refuses_another_metric(tmp_path):
    cfg = make_cfg(tmp_path, n_trials=1)
    tune_training("fake", FakeTrainer(), {}, cfg, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="optimises 'score'"):
        tune_training("fake", FakeTrainer(), {}, make_cfg(tmp_path, metric="loss"))


class Slow(FakeTrainer):
    def __call__(self, params, hooks, trial_dir):
        time.sleep(1.0)
        return super().__call__(params, hooks, trial_dir)


def test_timeout_starts_no_new_trial_and_on_trial_errors_stop_the_study(tmp_path):
    slow = Slow()
    _, st = tune_training("fake", slow, {}, make_cfg(tmp_path, timeout=0.5), work_dir=tmp_path)
    assert len(slow.calls) == 1 and len(st.trials) == 1  # the running trial is not cut short

    def broken_logger(trial, metrics):
        raise RuntimeError("tracking server down")

    with pytest.raises(RuntimeError, match="tracking server down"):
        tune_training("fake", FakeTrainer(), {}, make_cfg(tmp_path), on_trial=broken_logger)
    st = open_study("fake", make_cfg(tmp_path).storage)
    assert [t.state.name for t in st.trials] == ["COMPLETE", "FAIL"]


WORKER = """
import sys, time, pathlib
from microseg.tune.training import TrainStudyConfig, tune_training
url, worker, root = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
(root / f"ready_{worker}").touch()
def fn(params, hooks, trial_dir):
    t0 = time.time()  # both workers in the study before any trial ends
    while not all((root / f"ready_{w}").exists() for w in (0, 1)) and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.3)
    for e in range(3):
        hooks.after_epoch(e, {"score": params["q"] * (e + 1)})
    return params["q"] * 3
cfg = TrainStudyConfig(
    n_trials=8, epochs=3, storage=url, study_name="shared", metric="score",
    space={"q": {"low": 0.0, "high": 1.0}}, pruner={"n_startup_trials": 3, "n_warmup_steps": 0},
)
tune_training("fake", fn, {}, cfg, seed=3, worker=worker, work_dir=root / "trials")
"""


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(w), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    st = open_study("shared", url)
    done = finished(st)
    assert len(done) == 8  # exactly the budget, none over, none short
    assert len({t.user_attrs["owner"]["pid"] for t in done}) == 2  # both workers trained
    assert len({t.params["q"] for t in done}) == 8


@pytest.mark.postgres
def test_workers_share_a_postgres_study(pg_database, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cfg = make_cfg(tmp_path, storage=pg_database, n_trials=6)

    def work(worker: int) -> None:
        tune_training("fake", Slow(), {}, cfg, seed=1, worker=worker, work_dir=tmp_path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(work, [0, 1]))
    st = open_study(cfg.study_name, pg_database)
    done = finished(st)
    assert len(done) == 6 and len({tuple(t.params.items()) for t in done}) == 6
    assert st.trials[0].params != st.trials[1].params  # the workers' samplers differ


# ---------------------------------------------------------------------------- params
def test_merge_tuned_sets_dotted_and_nested_keys_without_touching_base():
    base = {"lr0": 1e-3, "augment": {"scale": 0.1, "mosaic": 0.8}, "imgsz": 256}
    merged = merge_tuned(base, {"lr0": 5e-3, "augment.scale": 0.3, "new.deep.key": 1})
    assert merged == {
        "lr0": 5e-3,
        "augment": {"scale": 0.3, "mosaic": 0.8},
        "imgsz": 256,
        "new": {"deep": {"key": 1}},
    }
    assert base["augment"]["scale"] == 0.1  # a copy
    assert merge_tuned(base, {"augment": {"mosaic": 0.0}})["augment"] == {
        "scale": 0.1,
        "mosaic": 0.0,
    }
    assert merge_tuned({"augment": None}, {"augment.scale": 0.2}) == {"augment": {"scale": 0.2}}
    with pytest.raises(ConfigError, match="expected a mapping at 'imgsz'"):
        merge_tuned(base, {"imgsz.x": 1})
    flat = {"a.b": 1, "a.c": [1, 2], "d": "x"}
    assert flatten(nest(flat)) == flat and nest(flat) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}


def test_best_params_round_trip_and_unknown_keys_are_refused(tmp_path):
    best = {"lr0": np.float64(0.004), "augment": {"scale": 0.25}, "imgsz": np.int64(320)}
    path = write_best_params(tmp_path / "params" / "tuned_yolo.yaml", best, "yolo")
    back = read_best_params(path)
    assert back == {"lr0": 0.004, "augment": {"scale": 0.25}, "imgsz": 320}
    assert type(back["imgsz"]) is int
    assert merge_tuned({"lr0": 1e-3, "augment": {"mosaic": 0.8}}, back)["augment"] == {
        "mosaic": 0.8,
        "scale": 0.25,
    }
    with pytest.raises(ConfigError, match=r"augment\.sparkle"):
        write_best_params(tmp_path / "bad.yaml", {"augment": {"sparkle": 1.0}}, "yolo")
    with pytest.raises(ConfigError, match="project"):
        check_keys("yolo", ["project"])  # microseg sets it
    check_keys("yolo", ["box", "warmup_epochs", "arch", "augment.mixup"])  # Ultralytics args
    with pytest.raises(ConfigError, match="lrr"):
        write_best_params(tmp_path / "bad.yaml", {"lrr": 1.0}, "punet")
    assert not (tmp_path / "bad.yaml").exists()
    with pytest.raises(MissingFileError):
        read_best_params(tmp_path / "none.yaml")


def test_default_spaces_fit_their_trainers_and_specs_validate():
    for family in STUDY_CONFIGS:
        cfg = default_study_config(family)
        check_keys(family, cfg.space)
        assert cfg.direction == "maximize" and cfg.n_trials >= cfg.pruner.n_startup_trials
    assert default_study_config("yolo").metric == "val/mAP50"
    assert default_study_config("punet").metric == "val_spine_dice"
    assert default_study_config("unet").metric == "val_f1_50"
    with pytest.raises(ConfigError):
        default_study_config("nope")
    with pytest.raises(ConfigError, match="per-trial budget"):
        check_keys("punet", ["epochs"])
    assert ParamSpec(low=1, high=4).kind == "int"
    assert ParamSpec(low=0.0, high=1).kind == "float"
    assert ParamSpec(choices=[192, 256]).kind == "categorical"
    for bad in ({"low": 1.0}, {"low": 0.0, "high": 1.0, "log": True}, {"low": 2, "high": 1},
                {"choices": []}, {"choices": [1], "low": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            ParamSpec(**bad)
    with pytest.raises(ValueError, match="per-trial budget"):
        TrainStudyConfig(space={"epochs": {"low": 1, "high": 3}})


# ---------------------------------------------------------------------- family objectives
@pytest.mark.parametrize("soft", [False, True])
def test_family_objective_trains_a_registered_family_and_prunes_it_its_way(tmp_path, soft):
    """Any registered family is a study's objective; one that ``stops_on_request`` ends its loop
    on the pruning hook's ``should_stop``, any other is stopped by ``TrialPruned``."""
    from microseg.models import MODELS, register_model
    from microseg.train.hooks import should_stop

    ended: list[str] = []

    @register_model("_fake_tunable")
    class Fake:
        trainable = True
        stops_on_request = soft

        @classmethod
        def train(cls, data, out_dir, train, hooks=None, *, resume=True):
            assert data == "the-data" and resume is False and train["keep"] == 7
            try:
                for epoch in range(train["epochs"]):
                    hooks.after_epoch(epoch, {"score": train["q"]})
                    if should_stop(hooks):
                        break
            except optuna.TrialPruned:
                ended.append("raised")
                raise
            ended.append(f"stopped after {epoch}")

        @classmethod
        def check_train_keys(cls, keys):
            if set(keys) - {"q", "keep"}:
                raise ConfigError(f"unknown fake knob(s) {sorted(set(keys) - {'q', 'keep'})}")

    try:
        cfg = make_cfg(tmp_path, n_trials=2, epochs=3, space={"q": {"low": 0.0, "high": 0.5}},
                       pruner={"n_startup_trials": 1, "n_warmup_steps": 0})  # fmt: skip
        st = open_study(cfg.study_name, cfg.storage)
        st.add_trial(
            create_trial(
                params={"q": 0.4},
                distributions={"q": optuna.distributions.FloatDistribution(0.0, 0.5)},
                value=1.0,
                intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
            )
        )
        fn = family_train_fn("_fake_tunable", "the-data", cfg.epochs, metric="score")
        _, st = tune_training("_fake_tunable", fn, {"keep": 7}, cfg, work_dir=tmp_path / "w")
        trial = st.trials[1]
        assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
        assert ended == (["stopped after 0"] if soft else ["raised"])
        with pytest.raises(ConfigError, match="unknown fake knob"):
            bad = make_cfg(tmp_path, study_name="bad", space={"r": {"low": 0.0, "high": 1.0}})
            tune_training("_fake_tunable", fn, {}, bad, work_dir=tmp_path / "w")
    finally:
        MODELS.remove("_fake_tunable")


# ---------------------------------------------------------------------------- real trainers
def toy_d3set(n: int = 2, shape=(3, 32, 32), seed: int = 0):
    """Noisy background, a bright dendrite band, brighter 3x3 spines beside it."""
    from microseg.io.d3set import D3Set, meta_row

    rng = np.random.default_rng(seed)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i in range(n):
        img = rng.normal(100, 5, shape).clip(0, None)
        den = np.zeros(shape, bool)
        den[:, 12:17, :] = True
        sp = np.zeros(shape, bool)
        for x in range(4, 28, 6):
            sp[:, 18:21, x : x + 3] = True
        img[den] += 300
        img[sp] += 600
        stacks[f"x{i}"], dendrites[f"x{i}"], spines[f"x{i}"] = img.astype(np.uint16), den, sp
        rows.append(meta_row(shape, 0.094, 0.5, timestamp="20260101_000000"))
    return D3Set(stacks, dendrites, spines, pd.DataFrame(rows))


PUNET_TINY = {
    "filters": [4, 8],
    "latent_filters": [4, 8],
    "latent_dim_spine": 2,
    "latent_dim_dendrite": 2,
    "head_convs": 2,
    "patch_size": 32,
    "batch_size": 2,
    "steps_per_epoch": 2,
    "lr_warmup_steps": 0,
    "seed": 0,
    "device": "cpu",
    "progress": False,
    "num_threads": 1,
}


def test_prob_unet_study_trains_reports_and_prunes_for_real(tmp_path):
    import torch

    from microseg.io.d3set import write_d3set

    torch.set_num_threads(1)
    train = write_d3set(tmp_path / "train.d3set", toy_d3set(seed=0))
    val = write_d3set(tmp_path / "val.d3set", toy_d3set(seed=1))
    space = {
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "tversky_alpha": {"low": 0.2, "high": 0.5},
    }
    cfg = TrainStudyConfig(
        n_trials=1, epochs=1, storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="punet",
        metric="val_spine_dice", space=space, pruner={"n_startup_trials": 1, "n_warmup_steps": 0},
    )  # fmt: skip
    fn = family_train_fn("punet", (train, val), cfg.epochs, metric=cfg.metric)
    best, st = tune_training("punet", fn, PUNET_TINY, cfg, work_dir=tmp_path / "work")
    t0 = st.trials[0]
    state = json.loads((tmp_path / "work" / "trial_0" / "train_state.json").read_text())
    assert state["epochs_completed"] == 1
    # the trial's lr reached the trainer: the cosine schedule ends at 5% of it
    assert state["history"][0]["lr"] == pytest.approx(0.05 * t0.params["lr"])
    saved = torch.load(tmp_path / "work" / "trial_0" / "best.pt", weights_only=True)
    assert saved["train_format"] == "microseg.punet.train/2"
    dice = state["history"][0]["val_spine_dice"]
    assert t0.value == pytest.approx(dice) and t0.intermediate_values == {0: pytest.approx(dice)}
    assert best == {k: pytest.approx(v) for k, v in t0.params.items()}

    # a perfect trial in the study: the next one falls below the median at epoch 0 and stops
    st.add_trial(
        create_trial(
            params={"lr": 2e-3, "tversky_alpha": 0.3},
            distributions=t0.distributions,
            value=1.0,
            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
        )
    )
    cfg3 = cfg.model_copy(update={"n_trials": 3, "epochs": 3})
    fn3 = family_train_fn("punet", (train, val), cfg3.epochs, metric=cfg3.metric)
    _, st = tune_training("punet", fn3, PUNET_TINY, cfg3, work_dir=tmp_path / "work")
    pruned = st.trials[2]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    state = json.loads((tmp_path / "work" / "trial_2" / "train_state.json").read_text())
    assert state["epochs_completed"] == 1  # one of three epochs trained


def _blob_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: int = 64) -> Path:
    """Tiny Ultralytics dataset: dark images with bright square blobs, boxed exactly."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 30, (size, size)).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w = int(rng.integers(6, 12))
                x, y = (int(v) for v in rng.integers(2, size - w - 2, 2))
                img[y : y + w, x : x + w] = 230
                lines.append(f"0 {(x + w / 2) / size} {(y + w / 2) / size} {w / size} {w / size}")
            Image.fromarray(img).save(root / "images" / split / f"im{i}.png")
            (root / "labels" / split / f"im{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: spine\n")
    return data


class Ended(HookBase):
    def __init__(self) -> None:
        self.ended = 0

    def after_train(self, best, best_path) -> None:
        self.ended += 1


@pytest.mark.slow
def test_yolo_study_prunes_through_ultralytics(tmp_path):
    import torch

    from microseg.models.yolo import run_state

    torch.set_num_threads(1)
    data = _blob_dataset(tmp_path / "data")
    base = {"arch": "n", "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "seed": 0,
            "patience": 50, "augment": {"mosaic": 0.0}}  # fmt: skip
    cfg = TrainStudyConfig(
        n_trials=2, epochs=3, storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="yolo",
        metric="val/mAP50", space={"lr0": {"low": 1e-3, "high": 1e-2, "log": True},
                                   "augment.scale": {"low": 0.0, "high": 0.3}},
        pruner={"n_startup_trials": 1, "n_warmup_steps": 0},
    )  # fmt: skip
    pre = open_study("yolo", cfg.storage)
    dists = {
        "lr0": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
        "augment.scale": optuna.distributions.FloatDistribution(0.0, 0.3),
    }
    pre.add_trial(
        create_trial(
            params={"lr0": 2e-3, "augment.scale": 0.1},
            distributions=dists,
            value=1.0,
            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
        )
    )
    ended = Ended()
    fn = family_train_fn("yolo", data, cfg.epochs, metric=cfg.metric, extra_hooks=[ended])
    _, st = tune_training("yolo", fn, base, cfg, work_dir=tmp_path / "work")
    trial = st.trials[1]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    run = tmp_path / "work" / "trial_1" / "train"
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 1  # header + the one epoch trained
    header = rows[0].split(",")
    map50 = float(rows[1].split(",")[header.index("metrics/mAP50(B)")])
    assert trial.intermediate_values[0] == pytest.approx(map50, abs=1e-5)
    # stopped through trainer.stop: the run ended normally (hooks told, checkpoint finalised)
    assert ended.ended == 1 and run_state(run / "weights" / "last.pt") == "finished"


def test_budget_knobs_are_not_searched():
    """A value tuned at the study's per-trial budget must carry over to the training stage's:
    image and patch size (compute per epoch) are refused, and the default spaces hold none."""
    for knob in ("imgsz", "patch_size"):
        with pytest.raises(ValueError, match="training budget"):
            TrainStudyConfig(space={knob: {"choices": [96, 128]}})
    for family in STUDY_CONFIGS:
        assert not {"epochs", "imgsz", "patch_size"} & set(default_study_config(family).space)
