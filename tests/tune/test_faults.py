"""An Optuna study on PostgreSQL whose worker is killed mid-trial (SIGTERM, then its restart
SIGKILLed), finished by two worker processes at once: the study ends with exactly its budget
of finished trials, every killed trial failed and ran again with its own parameters, and no
point was trained twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from microseg.tune.storage import study as open_study

N_TRIALS = 6

WORKER = textwrap.dedent(
    """
    import os, sys, time, pathlib
    from microseg.tune.training import TrainStudyConfig, tune_training

    url, worker, root = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])

    def fn(params, hooks, trial_dir):
        (root / "started").mkdir(exist_ok=True)
        (root / "started" / f"{trial_dir.name}.{os.getpid()}").touch()
        for e in range(3):
            time.sleep(0.7)
            hooks.after_epoch(e, {"score": params["q"] * (e + 1)})
        return params["q"] * 3

    cfg = TrainStudyConfig(
        n_trials=int(sys.argv[4]), epochs=3, storage=url, study_name="faults", metric="score",
        space={"q": {"low": 0.0, "high": 1.0}},
        pruner={"n_startup_trials": 100, "n_warmup_steps": 0},
    )
    tune_training("fake", fn, {}, cfg, seed=3, worker=worker, work_dir=root / "trials")
    """
)


def _worker(url: str, worker: int, root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(worker), str(root), str(N_TRIALS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_in_a_trial(proc: subprocess.Popen, root: Path, sig: int) -> None:
    """Wait until ``proc`` is inside a trial, then send ``sig``."""
    mine = f".{proc.pid}"
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(mine) for p in (root / "started").glob("*")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the worker never started a trial"
        time.sleep(0.05)
    time.sleep(0.5)  # inside its first epoch
    proc.send_signal(sig)
    proc.wait(timeout=30)


@pytest.mark.heavy
@pytest.mark.postgres
def test_killed_worker_loses_and_duplicates_no_trial(pg_database: str, tmp_path: Path) -> None:
    (tmp_path / "started").mkdir()
    _kill_in_a_trial(_worker(pg_database, 0, tmp_path), tmp_path, signal.SIGTERM)
    _kill_in_a_trial(_worker(pg_database, 0, tmp_path), tmp_path, signal.SIGKILL)
    other, last = _worker(pg_database, 1, tmp_path), _worker(pg_database, 0, tmp_path)
    outs = [p.communicate(timeout=300)[0] for p in (other, last)]
    assert [other.returncode, last.returncode] == [0, 0], outs

    st = open_study("faults", pg_database)
    states = [t.state for t in st.trials]
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    assert len(done) == N_TRIALS, states  # exactly the budget
    assert TrialState.RUNNING not in states
    killed = [t for t in st.trials if t.state == TrialState.FAIL]
    assert len(killed) == 2, states  # one per kill
    done_points = [t.params["q"] for t in done]
    for lost in killed:  # run again once, with its own parameters (a retry may be killed too)
        retry = [t for t in st.trials if t.user_attrs.get("retry_of") == lost.number]
        assert len(retry) == 1 and retry[0].params == lost.params, [
            (t.number, t.state.name, t.user_attrs.get("retry_of")) for t in st.trials
        ]
        assert done_points.count(lost.params["q"]) == 1  # and finished once
    assert len({t.params["q"] for t in done}) == N_TRIALS  # nothing trained twice
