"""Seed spread of the spine and tracking pipelines: DVC experiments per seed, read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microseg.config import load_params
from microseg.errors import ConfigError
from microseg.stages import seed_experiments as se

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"


def test_select_takes_ctc_names_literally():
    flat = se.flatten_numbers(
        {"unet": {"03": {"BC(0)": 0.5, "BC(1)": 0.7, "SEG": 0.8, "ok": True}}, "masks": "model"}
    )
    assert flat == {"unet.03.BC(0)": 0.5, "unet.03.BC(1)": 0.7, "unet.03.SEG": 0.8}
    assert se.select(flat, ["*.BC(0)", "*.SEG"]) == {"unet.03.BC(0)": 0.5, "unet.03.SEG": 0.8}
    assert se.select(flat, ["*.BC[0]"]) == {}  # brackets are not a character class


def test_summarise_pairs_each_seed_with_its_own_baseline():
    runs = {
        0: {"fusion.f1": 0.80, "log_baseline.f1": 0.60, "fusion.recall": 0.7},
        1: {"fusion.f1": 0.70, "log_baseline.f1": 0.65, "fusion.recall": 0.6},
        2: {"fusion.f1": 0.75, "log_baseline.f1": 0.60},  # a measure one seed lacks is dropped
    }
    out = se.summarise(runs, "log_baseline")
    assert set(out["measures"]) == {"fusion.f1", "log_baseline.f1"}
    f1 = out["measures"]["fusion.f1"]
    assert f1["per_seed"] == [0.8, 0.7, 0.75]
    assert f1["mean"] == pytest.approx(0.75) and f1["sd"] == pytest.approx(0.05)
    d = out["diff_to_baseline"]
    assert list(d) == ["fusion.f1"]
    assert d["fusion.f1"]["per_seed"] == [0.2, 0.05, 0.15]


def _params(**pipeline):
    params = load_params(REPO / "params.yaml")
    seeds = dict(params.seeds)
    seeds["pipelines"] = {"spines": pipeline}
    return params.model_copy(update={"seeds": seeds})


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="lacks"):
        se.pipeline_config(_params(keys=["a"]), "spines")
    with pytest.raises(ConfigError, match="unknown seed-spread pipeline"):
        se.pipeline_config(_params(), "nuclei")
    bad = _params(
        keys=["yolo.train.seed", "seed"], seeds=[0, 1], targets=["t"], metrics="m", measures=["*"]
    )
    params = bad.model_copy(update={"seed": 5})
    with pytest.raises(ConfigError, match="different seeds"):
        se.demo_seed(params, se.pipeline_config(params, "spines"))


def test_the_committed_pipelines_read_their_own_seeds():
    params = load_params(REPO / "params.yaml")
    spines = se.pipeline_config(params, "spines")
    tracking = se.pipeline_config(params, "tracking")
    assert se.demo_seed(params, spines) == spines.seeds[0] == params.yolo.train.seed
    assert se.demo_seed(params, tracking) == tracking.seeds[0]  # the engine's default


STAGE = """stages:
  evaluate:
    cmd: python make_metrics.py
    deps: [make_metrics.py]
    params: [toy]
    metrics:
      - metrics/spines.json:
          cache: false
"""
SCRIPT = """import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
seed = p["toy"].get("seed", 42)
os.makedirs("metrics", exist_ok=True)
json.dump({"fusion": {"f1": seed / 100}, "log_baseline": {"f1": 0.1}, "note": "x"},
          open("metrics/spines.json", "w"))
"""


@pytest.mark.skipif(not DVC.exists() or shutil.which("git") is None, reason="needs dvc, git")
def test_experiments_run_per_seed_and_are_read_back(tmp_path: Path, monkeypatch):
    root = tmp_path / "ws"
    root.mkdir()

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)

    (root / "params.yaml").write_text("toy:\n  lr: 1\n")
    (root / "dvc.yaml").write_text(STAGE)
    (root / "make_metrics.py").write_text(SCRIPT)
    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.org")
    sh("git", "config", "user.name", "t")
    sh(str(DVC), "init", "-q")
    sh(str(DVC), "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "ws")
    monkeypatch.setenv("PATH", f"{DVC.parent}:{__import__('os').environ['PATH']}")
    params = _params(
        keys=["toy.seed"],
        seeds=[42, 3],
        targets=["evaluate"],
        metrics="metrics/spines.json",
        measures=["*.f1"],
        baseline="log_baseline",
    )
    out = se.run_pipeline_seeds(params, "spines", root)
    assert out["seeds"] == [3, 42] and out["demo_seed"] == 42
    assert out["measures"]["fusion.f1"]["per_seed"] == [0.03, 0.42]
    assert out["diff_to_baseline"]["fusion.f1"]["per_seed"] == [-0.07, 0.32]
    assert json.loads((root / "metrics" / "seeds_spines.json").read_text()) == json.loads(
        json.dumps(out)
    )
    # the workspace is untouched: params, metrics and git status as before
    assert (root / "params.yaml").read_text() == "toy:\n  lr: 1\n"
    assert json.loads((root / "metrics" / "spines.json").read_text())["fusion"]["f1"] == 0.42
    # a second call reads the finished experiment instead of running it again
    calls = []
    real = se.subprocess.run

    def spy(cmd, *a, **k):
        calls.append(cmd)
        return real(cmd, *a, **k)

    monkeypatch.setattr(se.subprocess, "run", spy)
    se.run_pipeline_seeds(params, "spines", root)
    assert not [c for c in calls if c[:3] == ["dvc", "exp", "run"]]
