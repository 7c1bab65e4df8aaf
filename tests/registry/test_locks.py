"""Concurrent ``promote``: two processes at once leave one consistent champion chain.

Each worker process waits for the other at a file barrier, then promotes with the decision
slowed by a second, so without the lock both would read the same champion, both record it as
``previous_champion`` and both write the same ``champion_history`` key (one event lost).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from microseg.registry import locks, promotion
from microseg.registry.promotion import CHAMPION, register_version

METRIC = "benchmark.f1"

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlflow import MlflowClient
    from microseg.registry import promotion

    uri, name, version, barrier = sys.argv[1:5]
    decide = promotion._decide

    def slow(*args, **kwargs):
        time.sleep(1.0)  # widen the read-decide-write window
        return decide(*args, **kwargs)

    promotion._decide = slow
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.get_registered_model(name)  # connected and schema read before the barrier
    Path(barrier, f"ready-{version}").touch()
    while len(list(Path(barrier).glob("ready-*"))) < 2:
        time.sleep(0.01)
    d = promotion.promote(name, "benchmark.f1", 0.005, version=version, client=client)
    print(d.promoted, d.previous_champion)
    """
)


def _register(client: MlflowClient, exp: str, name: str, f1: float) -> str:
    run = client.create_run(exp, tags={"git_commit": "abc", "data_md5": "d", "params_hash": "p"})
    client.log_metric(run.info.run_id, METRIC, f1)
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    mv = register_version(
        f"runs:/{run.info.run_id}/model", name, {METRIC: f1}, {}, True, client=client
    )
    return str(mv.version)


def _race(uri: str, tmp: Path) -> None:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("race", artifact_location=(tmp / "mlruns").as_uri())
    name = "spines-race"
    v1 = _register(client, exp, name, 0.80)
    assert promotion.promote(name, METRIC, 0.005, client=client).promoted
    v2, v3 = _register(client, exp, name, 0.85), _register(client, exp, name, 0.90)
    barrier = tmp / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, name, v, str(barrier)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in (v2, v3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    history = promotion.champion_history(name, client)
    chain = [(h["version"], h["previous"]) for h in history]
    # v3 always ends champion: first (v2 then loses to it) or second (after v2 beat v1)
    assert chain in ([(v1, None), (v2, v1), (v3, v2)], [(v1, None), (v3, v1)]), chain
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v3
    tags = client.get_model_version(name, v3).tags
    assert tags["previous_champion"] == chain[-1][1]


def test_concurrent_promote_sqlite(tmp_path: Path) -> None:
    _race(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    assert (tmp_path / ".microseg-locks" / "promote-spines-race.lock").exists()


@pytest.mark.postgres
def test_concurrent_promote_postgres(pg_database: str, tmp_path: Path) -> None:
    _race(pg_database.replace("postgresql://", "postgresql+psycopg2://"), tmp_path)


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("sqlite:///mlflow.db", "file"),
        ("/data/mlruns", "file"),
        ("file:///data/mlruns", "file"),
        ("postgresql+psycopg2://u@h/db", "postgresql"),
        ("postgresql://h/db", "postgresql"),
        ("http://mlflow:5000", "none"),
        ("databricks", "none"),
    ],
)
def test_lock_kind(uri: str, kind: str) -> None:
    assert locks.lock_kind(uri) == kind


def test_advisory_key_is_stable_and_signed_64_bit() -> None:
    key = locks.advisory_key("microseg-spines")
    assert key == locks.advisory_key("microseg-spines") != locks.advisory_key("microseg-nuclei")
    assert -(2**63) <= key < 2**63
