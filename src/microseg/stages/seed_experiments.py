"""Seed spread of the spine and tracking pipelines: the pipeline itself rerun per seed.

The nuclei spread (:mod:`microseg.stages.seeds`) calls the training and scoring functions
directly. The spine and tracking results come out of several stages each (YOLO and Prob-UNet
training, prediction, the fusion study, the evaluations; two segmenters, linking, CTC
scoring), so here the seed goes where a user would put it, into ``params.yaml``, and DVC runs
the pipeline: one ``dvc exp run --temp -S <key>=<seed> <targets>`` per seed, in a temporary
copy of the workspace that shares its cache. Only the stages whose parameters changed run
(the data, the baselines and the other task come from the cache), nothing in the workspace
changes, and each seed is a DVC experiment (``dvc exp show``) whose stages log to the
workspace's MLflow store.

Params ``seeds.pipelines.<task>``: ``keys`` (the training seeds set to each seed), ``seeds``
(the first value the workspace's params already give is the demo's own run and is read from
the workspace's metrics instead), ``targets`` (the stages to reproduce), ``metrics`` (the
metrics file to read), ``measures`` (``fnmatch`` patterns of its flattened keys) and optional
``baseline`` (a row whose measures the others are compared to per seed).

An experiment is named from the task, the seed and a digest of the workspace (commit and
uncommitted changes): a finished one is read again, not rerun, and a changed workspace gets
new ones. An interrupted one restarts, with DVC's run cache restoring the stages it finished.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microseg.config import Params
from microseg.errors import ConfigError, MicrosegError, MissingFileError
from microseg.stages.common import write_json
from microseg.stages.seeds import spread_stats
from microseg.train.engine import EngineConfig
from microseg.utils.convert import flatten

log = logging.getLogger(__name__)

TASKS = ("spines", "tracking")


@dataclass(frozen=True)
class PipelineSpread:
    """One task's ``seeds.pipelines`` entry."""

    task: str
    keys: tuple[str, ...]
    seeds: tuple[int, ...]
    targets: tuple[str, ...]
    metrics: Path
    measures: tuple[str, ...]
    baseline: str | None = None

    @property
    def out(self) -> Path:
        return Path("metrics") / f"seeds_{self.task}.json"


def pipeline_config(params: Params, task: str) -> PipelineSpread:
    """The validated ``seeds.pipelines.<task>`` of ``params``."""
    if task not in TASKS:
        raise ConfigError(f"unknown seed-spread pipeline {task!r}; available: {list(TASKS)}")
    cfg = dict((dict(getattr(params, "seeds", None) or {}).get("pipelines") or {}).get(task) or {})
    missing = [k for k in ("keys", "seeds", "targets", "metrics", "measures") if not cfg.get(k)]
    if missing:
        raise ConfigError(f"params seeds.pipelines.{task} lacks {missing}")
    seeds = tuple(dict.fromkeys(int(s) for s in cfg["seeds"]))
    if len(seeds) < 2:
        raise ConfigError(f"seeds.pipelines.{task}.seeds needs two different seeds; got {seeds}")
    return PipelineSpread(
        task=task,
        keys=tuple(str(k) for k in cfg["keys"]),
        seeds=seeds,
        targets=tuple(str(t) for t in cfg["targets"]),
        metrics=Path(cfg["metrics"]),
        measures=tuple(str(m) for m in cfg["measures"]),
        baseline=cfg.get("baseline"),
    )


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def demo_seed(params: Params, spread: PipelineSpread) -> int:
    """The seed the workspace's own run trained with: the value at every key (absent keys
    train with the engine's default seed); keys that disagree are refused."""
    raw = params.model_dump()
    values = {
        int(v) if (v := _lookup(raw, k)) is not None else EngineConfig.seed for k in spread.keys
    }
    if len(values) != 1:
        raise ConfigError(
            f"seeds.pipelines.{spread.task}.keys hold different seeds {sorted(values)} in "
            "params.yaml: the demo's run has no single seed"
        )
    return values.pop()


def flatten_numbers(tree: Mapping[str, Any]) -> dict[str, float]:
    """``a.b.c -> number`` for every numeric leaf (booleans excluded)."""
    return {
        k: float(v)
        for k, v in flatten(tree).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def select(flat: Mapping[str, float], patterns: Sequence[str]) -> dict[str, float]:
    """The entries of ``flat`` whose key matches one of ``patterns`` (``fnmatch``, ``[`` is
    literal so CTC names such as ``BC(0)`` need no escaping)."""
    keep = {}
    for k, v in flat.items():
        if any(fnmatch.fnmatchcase(k, p.replace("[", "[[]")) for p in patterns):
            keep[k] = v
    return keep


def summarise(
    runs: Mapping[int, Mapping[str, float]], baseline: str | None = None
) -> dict[str, Any]:
    """Per measure (flattened key) the per-seed values with mean and sample sd; with a
    ``baseline`` row, per other row's measure the per-seed difference to the baseline's."""
    seeds = sorted(runs)
    keys = sorted(set.intersection(*(set(runs[s]) for s in seeds)))
    out: dict[str, Any] = {"measures": {k: spread_stats([runs[s][k] for s in seeds]) for k in keys}}
    if baseline:
        diffs = {}
        for k in keys:
            row, _, measure = k.partition(".")
            ref = f"{baseline}.{measure}"
            if row != baseline and ref in keys:
                diffs[k] = spread_stats([runs[s][k] - runs[s][ref] for s in seeds])
        out["diff_to_baseline"] = diffs
    return out


def _git(*args: str, cwd: Path) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise MicrosegError(f"git {' '.join(args)} failed in {cwd}: {res.stderr.strip()}")
    return res.stdout


def workspace_digest(root: Path) -> str:
    """The commit plus the uncommitted changes of tracked files (code, params, dvc.lock)."""
    h = hashlib.sha1(_git("rev-parse", "HEAD", cwd=root).encode())
    h.update(_git("diff", "HEAD", "--binary", cwd=root).encode())
    return h.hexdigest()[:8]


def experiment_name(task: str, seed: int, digest: str) -> str:
    return f"seed-{task}-{seed}-{digest}"


def _experiment_rev(root: Path, name: str) -> str | None:
    refs = _git("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", cwd=root)
    for line in refs.splitlines():
        ref, _, rev = line.partition(" ")
        if ref.endswith(f"/{name}"):
            return rev
    return None


def _tracking_env(params: Params, root: Path) -> dict[str, str]:
    """The environment of the experiment: MLflow runs go to the workspace's store (a
    relative SQLite path would otherwise land in the temporary copy and vanish)."""
    env = dict(os.environ)
    uri = env.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def run_experiment(params: Params, spread: PipelineSpread, seed: int, root: Path) -> str:
    """The experiment of ``seed`` (run unless a finished one exists); its git revision."""
    name = experiment_name(spread.task, seed, workspace_digest(root))
    rev = _experiment_rev(root, name)
    if rev is not None:
        log.info("seed spread: %s exists; reading it", name)
        return rev
    sets, raw = [], params.model_dump()
    for key in spread.keys:
        # `+key` adds a key params.yaml does not have yet (Hydra's syntax, which DVC uses)
        sets += ["-S", f"{'' if _lookup(raw, key) is not None else '+'}{key}={seed}"]
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *sets, *spread.targets]
    log.info("seed spread: %s", " ".join(cmd))
    res = subprocess.run(cmd, cwd=root, env=_tracking_env(params, root), check=False)
    if res.returncode != 0:
        raise MicrosegError(f"the experiment {name} failed (exit {res.returncode}): {cmd}")
    rev = _experiment_rev(root, name)
    if rev is None:
        raise MicrosegError(f"dvc exp run finished but no experiment {name} was recorded")
    return rev


def read_metrics_at(root: Path, rev: str, path: Path) -> dict[str, Any]:
    """A git-tracked metrics file as the experiment ``rev`` left it."""
    return json.loads(_git("show", f"{rev}:{path.as_posix()}", cwd=root))


def run_pipeline_seeds(params: Params, task: str, root: Path | str = ".") -> dict[str, Any]:
    """Every seed of ``seeds.pipelines.<task>``; writes ``metrics/seeds_<task>.json``."""
    root = Path(root)
    spread = pipeline_config(params, task)
    own = demo_seed(params, spread)
    runs: dict[int, dict[str, float]] = {}
    sources: dict[str, str] = {}
    for seed in spread.seeds:
        if seed == own:
            path = root / spread.metrics
            if not path.is_file():
                raise MissingFileError(f"run the pipeline first (dvc repro {task})", path)
            tree = json.loads(path.read_text())
            sources[str(seed)] = "workspace"
        else:
            rev = run_experiment(params, spread, seed, root)
            tree = read_metrics_at(root, rev, spread.metrics)
            sources[str(seed)] = f"dvc experiment seed-{task}-{seed}-<workspace digest>"
        runs[seed] = select(flatten_numbers(tree), spread.measures)
        if not runs[seed]:
            raise ConfigError(
                f"no measure of {spread.metrics} matches seeds.pipelines.{task}.measures "
                f"{list(spread.measures)}"
            )
    summary = {
        "task": task,
        "what": "per training seed, each measure of "
        f"{spread.metrics.as_posix()}; mean and sample sd over seeds",
        "keys": list(spread.keys),
        "seeds": sorted(runs),
        "demo_seed": own,
        "sources": sources,
        "baseline": spread.baseline,
        "profile": params.profile,
        **summarise(runs, spread.baseline),
    }
    write_json(root / spread.out, summary)
    return summary
