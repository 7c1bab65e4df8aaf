"""MLproject as MLflow reads it, and python_env.yaml/requirements.txt in step with uv.lock.

Commands are rendered by MLflow's own loader (``mlflow.projects._project_spec``), so quoting
and typed parameters are what ``mlflow run`` will execute. That each rendered command exists in
the CLI is checked in ``test_workflows.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY_PACKAGES = ("torch", "torchvision", "mlflow", "ultralytics", "monai", "dvc")
#: `mlflow run` runs the pipeline, so requirements.txt holds the core and the pipeline extra
PIPELINE = ("--extra", "pipeline")


@pytest.fixture(scope="module")
def project():
    from mlflow.projects._project_spec import load_project

    return load_project(str(REPO))


def _render(project, entry: str, **given) -> str:
    return project.get_entry_point(entry).compute_command(given, None)


def test_project_header(project) -> None:
    assert project.name == "microseg"
    assert project.env_type == "python_env"
    assert Path(project.env_config_path).resolve() == REPO / "python_env.yaml"
    assert {"main", "train", "tune", "evaluate", "batch_eval"} <= set(project._entry_points)


def test_parameter_types_and_defaults(project) -> None:
    def spec(entry: str) -> dict[str, tuple[str, object]]:
        ep = project.get_entry_point(entry)
        return {k: (p.type, p.default) for k, p in ep.parameters.items()}

    assert spec("train") == {"model": ("string", "yolo"), "params_file": ("path", "params.yaml")}
    assert spec("tune")["target"] == ("string", "fusion")
    assert spec("evaluate")["model"] == ("string", "yolo")
    assert spec("evaluate")["task"] == ("string", "spines")
    assert spec("batch_eval") == {
        "model_uri": ("uri", "models:/microseg-spines@champion"),
        "input": ("path", None),
        "out": ("string", "reports/batch_eval"),
        "strict": ("string", "no-strict"),
        "engine": ("string", "local"),
    }


def test_commands_render(project) -> None:
    """Hand-written expectations of what `mlflow run -P ...` executes."""
    assert _render(project, "main") == "MLFLOW_RUN_ID= dvc repro dvc.yaml"
    assert _render(project, "main", target="eval_yolo") == "MLFLOW_RUN_ID= dvc repro eval_yolo"
    assert _render(project, "train", model="unet") == (
        "microseg train --model unet --params params.yaml"
    )
    assert _render(project, "tune", target="punet") == (
        "microseg tune --target punet --params params.yaml"
    )
    assert _render(project, "evaluate", model="punet") == (
        "microseg evaluate --model punet --task spines --params params.yaml"
    )
    assert _render(project, "batch_eval", input="new data", strict="strict") == (
        "microseg batch-eval --model models:/microseg-spines@champion --input 'new data' "
        "--out reports/batch_eval --strict --engine local"
    )
    assert _render(project, "batch_eval", input="x", engine="ray").endswith("--engine ray")


def test_typed_parameters_are_enforced(project, tmp_path: Path) -> None:
    from mlflow.exceptions import ExecutionException

    with pytest.raises(ExecutionException, match="input"):
        _render(project, "batch_eval")  # required
    with pytest.raises(ExecutionException, match="Expected URI"):
        _render(project, "batch_eval", input="x", model_uri="not a uri")
    train = project.get_entry_point("train")
    with pytest.raises(ExecutionException, match="no such file"):
        train.compute_command({"params_file": str(tmp_path / "missing.yaml")}, str(tmp_path))
    (tmp_path / "p.yaml").write_text("seed: 1\n")
    cmd = train.compute_command({"params_file": str(tmp_path / "p.yaml")}, str(tmp_path))
    assert cmd.endswith(f"--params {tmp_path / 'p.yaml'}")


def _lock_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    out: dict[str, set[str]] = {}
    for pkg in lock["package"]:
        if "version" in pkg:
            out.setdefault(pkg["name"], set()).add(pkg["version"])
    return out


def _requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m[1].lower().replace("_", "-")] = m[2]
    return pins


def test_python_env_matches_lock() -> None:
    from mlflow.utils.environment import _PythonEnv
    from packaging.specifiers import SpecifierSet

    env = _PythonEnv.from_yaml(str(REPO / "python_env.yaml"))
    assert "-r requirements.txt" in env.dependencies and "-e ." in env.dependencies
    assert "pip" in env.build_dependencies
    requires = tomllib.loads((REPO / "uv.lock").read_text())["requires-python"]
    assert SpecifierSet(requires).contains(env.python), (env.python, requires)


def test_requirements_pins_equal_the_lock() -> None:
    lock, pins = _lock_versions(), _requirement_pins()
    for name in KEY_PACKAGES:
        assert pins[name] in lock[name], f"requirements.txt {name}=={pins[name]}, lock {lock[name]}"
    wrong = {n: (v, lock.get(n)) for n, v in pins.items() if v not in lock.get(n, ())}
    assert not wrong, f"requirements.txt pins not in uv.lock: {wrong}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["pipeline"]]
    direct = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in wanted}
    assert direct <= set(pins), f"direct dependencies missing: {direct - set(pins)}"
    assert "napari" not in pins  # the viewer extra stays out of `mlflow run`'s environment


def test_requirements_is_the_lock_export() -> None:
    """Byte for byte what `uv export` makes from the lock with the pipeline extra, which
    `mlflow run`'s entry points need (skipped when no uv binary)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("no uv binary on PATH to re-export requirements.txt from uv.lock")
    proc = subprocess.run(
        [uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project", *PIPELINE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert body(proc.stdout) == body((REPO / "requirements.txt").read_text())


# ------------------------------------------------------------------ mlflow run, end to end


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_mlflow_run_evaluate_after_tiny_repro(tmp_path: Path) -> None:
    """A clean copy, a tiny `dvc repro eval_yolo`, then `mlflow run . -e evaluate` logs the
    same benchmark numbers into the run that MLflow started for the entry point."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], REPO, env).stdout.split()
    repo = tmp_path / "repo"
    for f in files:
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    _run(["git", "init", "-q"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["synth"]["spines"].update(
        n_train=1, n_val=1, shape=[8, 64, 64], benchmark_shape=[8, 96, 96]
    )
    params["yolo"]["train"].update(epochs=1, imgsz=64, batch=4)
    params["yolo"]["sweep"].update(confs=[0.01, 0.1], ious=[0.5])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([str(BIN / "dvc"), "repro", "eval_yolo"], repo, env)
    (repo / "metrics" / "spines_yolo.json").unlink()

    _run([str(BIN / "mlflow"), "run", ".", "-e", "evaluate", "--env-manager", "local"], repo, env)

    metrics = json.loads((repo / "metrics" / "spines_yolo.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = [
        r
        for exp in client.search_experiments()
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("mlflow.project.entryPoint") == "evaluate"
    ]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["microseg.stage"] == "eval_yolo"  # the stage logged into that run
    assert run.data.metrics["benchmark.f1"] == pytest.approx(metrics["benchmark"]["f1"])
