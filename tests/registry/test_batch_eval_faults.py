"""batch-eval killed for real (SIGTERM, then SIGKILL) in the middle and run again: every input
answered once it finished, none half-written, and the outputs equal an uninterrupted run's.

The model is a stub logged to a SQLite store (as in test_batch_eval_ray.py): bright voxels are
spines; each call leaves ``calls/<stem>.<n>``, and while ``slow`` exists each stack takes a
second, so the test can kill the run between answers. The killed runs are separate processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile

from microseg.config import load_params
from microseg.registry.batch_eval import batch_eval

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["path", "z", "y", "x", "x1", "y1", "x2", "y2", "score", "status"]
N = 6

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the run's process loads it

SCRIPT = textwrap.dedent(
    """
    import sys
    from microseg.config import load_params
    from microseg.registry.batch_eval import batch_eval

    params_file, uri, root, model, inputs, out = sys.argv[1:7]
    params = load_params(params_file, {"mlflow.tracking_uri": uri,
                                       "mlflow.artifact_root": root + "/mlruns"})
    batch_eval(model, inputs, out, progress=False, params=params)
    """
)


class SlowSpines(mlflow.pyfunc.PythonModel):
    def __init__(self, hook_dir: str) -> None:
        self.hook_dir = hook_dir

    def predict(self, context, model_input, params=None):
        hook = Path(self.hook_dir)
        rows = []
        for path in model_input["path"]:
            stem = Path(path).stem
            n = len(list((hook / "calls").glob(f"{stem}.*")))
            (hook / "calls" / f"{stem}.{n}").touch()
            if (hook / "slow").exists():
                time.sleep(1.0)
            stack = tifffile.imread(path)
            _, h, w = stack.shape
            for z, y, x in np.argwhere(stack > 1000):
                rows.append(
                    {"path": path, "z": z, "y": y, "x": x, "status": "kept"}
                    | {"x1": max(x - 2, 0), "y1": max(y - 2, 0)}
                    | {"x2": min(x + 3, w), "y2": min(y + 3, h)}
                    | {"score": float(stack[z, y, x]) / 65535}
                )
        return pd.DataFrame(rows, columns=COLUMNS)


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spine_stacks):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {"mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp_path / "mlruns")}
    params = load_params(REPO / "params.yaml", overrides)
    hook = tmp_path / "hook"
    (hook / "calls").mkdir(parents=True)
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("models", artifact_location=(tmp_path / "models").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="spines",
            python_model=SlowSpines(str(hook)),
            metadata={"task": "spines"},
            pip_requirements=[],
        )
    spine_stacks(tmp_path / "in", N)
    yield {"tmp": tmp_path, "uri": uri, "params": params, "model": info.model_uri, "hook": hook}
    mlflow.set_tracking_uri(previous)


def _answered(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("*/done.json")}


def _run_and_kill(env: dict, out: Path, answered: int, sig: int) -> None:
    tmp = env["tmp"]
    argv = [str(REPO / "params.yaml"), env["uri"], str(tmp), env["model"], str(tmp / "in")]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": env["uri"]},
    )
    deadline = time.monotonic() + 180
    while len(_answered(out)) < answered:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "batch-eval never got that far"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    # what is there is whole: an answered input has its predictions, nothing half-written
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for stem in _answered(out):
        assert (out / stem / "predictions.csv").is_file()


@pytest.mark.heavy
def test_killed_batch_eval_resumes_to_the_uninterrupted_result(env: dict, folder_digest) -> None:
    tmp, hook, params = env["tmp"], env["hook"], env["params"]
    full = batch_eval(env["model"], tmp / "in", tmp / "full", progress=False, params=params)
    assert full.summary["n_evaluated"] == N
    for p in (hook / "calls").iterdir():
        p.unlink()

    (hook / "slow").touch()
    cut = tmp / "cut"

    def calls() -> set[str]:
        return {p.name for p in (hook / "calls").iterdir()}

    def stems(names: set[str]) -> set[str]:
        return {n.split(".")[0] for n in names}

    _run_and_kill(env, cut, 2, signal.SIGTERM)
    first, calls1 = _answered(cut), calls()
    _run_and_kill(env, cut, len(first) + 2, signal.SIGKILL)
    second, calls2 = _answered(cut), calls()
    assert first < second < {f"s{i}" for i in range(N)}
    (hook / "slow").unlink()
    resumed = batch_eval(env["model"], tmp / "in", cut, progress=False, params=params)
    # an answered input is never predicted again (an input in flight at a kill may be)
    assert not stems(calls2 - calls1) & first
    assert not stems(calls() - calls2) & second
    assert resumed.summary == {**full.summary, "seconds": resumed.summary["seconds"]}
    assert folder_digest(cut) == folder_digest(tmp / "full")
