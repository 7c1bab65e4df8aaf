"""batch-eval on a real local Ray cluster of two worker processes (no network).

Six small spine stacks (as in test_batch_eval.py: a few bright voxels each, points beside
them). The same model run with ``engine="local"`` and ``engine="ray"`` must write the same
bytes; a worker killed (SIGKILL, from the test) while it predicts ``s3`` must have that input
retried on a restarted worker, and the outputs must still be complete and the same; a rerun
into the same folder predicts nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
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

pytestmark = pytest.mark.slow  # a Ray cluster starts in about 20 s on 2 cores

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
SPINE_OUT = ["path", "z", "y", "x", "x1", "y1", "x2", "y2", "score", "status"]
KILLED = "s3"

# the models are logged from this module: Ray's worker processes cannot import it, so its
# classes travel by value inside the logged model
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SpineModel(mlflow.pyfunc.PythonModel):
    """Every voxel above 1000 is a spine. Each call leaves ``calls/<stem>.<pid>``; while the
    ``armed`` file exists, a call on ``s3`` writes its pid to ``victim`` and waits to be
    killed (the test's hook: nothing else reads these files)."""

    def __init__(self, hook_dir: str) -> None:
        self.hook_dir = hook_dir

    def predict(self, context, model_input, params=None):
        hook = Path(self.hook_dir)
        rows = []
        for path in model_input["path"]:
            stem = Path(path).stem
            (hook / "calls" / f"{stem}.{os.getpid()}").touch()
            if stem == KILLED and (hook / "armed").exists():
                (hook / "victim").write_text(str(os.getpid()))
                time.sleep(120)  # killed long before
            stack = tifffile.imread(path)
            _, h, w = stack.shape
            for z, y, x in np.argwhere(stack > 1000):
                rows.append(
                    {"path": path, "z": z, "y": y, "x": x, "status": "kept"}
                    | {"x1": max(x - 2, 0), "y1": max(y - 2, 0)}
                    | {"x2": min(x + 3, w), "y2": min(y + 3, h)}
                    | {"score": float(stack[z, y, x]) / 65535}
                )
        return pd.DataFrame(rows, columns=SPINE_OUT)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes' worth of CPUs, no dashboard, no usage reporting."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, spine_stacks):
    tmp = tmp_path_factory.mktemp("batch_eval_ray")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    params = load_params(
        REPO / "params.yaml",
        {"mlflow.tracking_uri": uri, "mlflow.artifact_root": str(tmp / "mlruns")},
    )
    hook = tmp / "hook"
    (hook / "calls").mkdir(parents=True)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("models", artifact_location=(tmp / "models").as_uri())
        mp.setenv("MLFLOW_EXPERIMENT_ID", exp)
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(
                name="spines",
                python_model=SpineModel(str(hook)),
                metadata={"task": "spines"},
                pip_requirements=[],
            )
        inputs = spine_stacks(tmp / "in", 6)
        yield {"tmp": tmp, "params": params, "model": info.model_uri, "hook": hook, "in": inputs}
    mlflow.set_tracking_uri(previous)


def _calls(hook: Path) -> list[str]:
    return sorted(p.name for p in (hook / "calls").iterdir())


def _kill_when_waiting(hook: Path, killed: list[int]) -> threading.Thread:
    """SIGKILL the worker process that announces itself in ``victim``, once."""

    def run() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            victim = hook / "victim"
            if victim.exists() and victim.read_text():
                pid = int(victim.read_text())
                (hook / "armed").unlink()  # the retry must not wait again
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ray_writes_what_local_writes_and_survives_a_killed_worker(
    cluster, env, folder_digest
) -> None:
    tmp, hook, params = env["tmp"], env["hook"], env["params"]
    local = batch_eval(env["model"], env["in"], tmp / "local", progress=False, params=params)
    assert local.summary["n_evaluated"] == 6 and local.summary["n_scored"] == 6
    assert not local.output_failures
    assert len(_calls(hook)) == 6 and {c.split(".")[1] for c in _calls(hook)} == {str(os.getpid())}
    for p in (hook / "calls").iterdir():
        p.unlink()

    (hook / "armed").touch()
    killed: list[int] = []
    thread = _kill_when_waiting(hook, killed)
    res = batch_eval(
        env["model"], env["in"], tmp / "ray", progress=False, params=params, engine="ray"
    )
    thread.join(timeout=5)
    assert len(killed) == 1 and killed[0] != os.getpid()

    # s3 was given to a worker that died and then to a live one; everything ran off this process
    s3 = [c for c in _calls(hook) if c.startswith(f"{KILLED}.")]
    assert len(s3) == 2 and f"{KILLED}.{killed[0]}" in s3
    pids = {c.split(".")[1] for c in _calls(hook)}
    assert str(os.getpid()) not in pids and len(pids) >= 2
    assert sorted({c.split(".")[0] for c in _calls(hook)}) == [f"s{i}" for i in range(6)]

    assert res.summary == {**local.summary, "seconds": res.summary["seconds"]}
    assert not res.output_failures
    assert folder_digest(tmp / "ray") == folder_digest(tmp / "local")
    assert sorted(p.name for p in (tmp / "ray").iterdir() if p.is_dir()) == [
        f"s{i}" for i in range(6)
    ]

    # a rerun predicts nothing: every input is answered on disk by the same model
    for p in (hook / "calls").iterdir():
        p.unlink()
    again = batch_eval(
        env["model"], env["in"], tmp / "ray", progress=False, params=params, engine="ray"
    )
    assert _calls(hook) == []
    assert again.summary["f1"] == local.summary["f1"]
    assert folder_digest(tmp / "ray") == folder_digest(tmp / "local")


def test_a_worker_that_cannot_load_is_a_clear_error(cluster, env) -> None:
    """The model is loaded in the workers: what goes wrong there reaches the caller as the
    same MicrosegError a local run raises, not a Ray traceback."""
    from microseg.config import ScaleConfig
    from microseg.errors import MicrosegError

    one = env["params"].model_copy(update={"scale": ScaleConfig(num_workers=1)})
    with pytest.raises(MicrosegError, match="cannot be moved to 'cpu'") as info:
        batch_eval(
            env["model"], env["in"], env["tmp"] / "dev", progress=False, params=one,
            engine="ray", device="cpu",
        )  # fmt: skip
    assert "Traceback" not in str(info.value)
