"""register/promote against a real MLflow store: SQLite always, PostgreSQL when one answers.

Versions are registered from runs that carry an ``MLmodel`` file (the runs:/ path of
``register_version``); the batch-eval tests cover registering a real pyfunc logged model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from microseg.errors import MicrosegError
from microseg.registry import promotion
from microseg.registry.promotion import CHALLENGER, CHAMPION, promote, register_version

METRIC = "benchmark.f1"


@dataclass
class Registry:
    """One registered-model name in a store, with the test's shorthand for the API."""

    client: MlflowClient
    experiment_id: str
    name: str

    def register(self, f1: float | None, *, validation: bool = True, tag_metric: bool = True):
        """A run with house tags, a logged F1 and an MLmodel file, registered as challenger."""
        run = self.client.create_run(
            self.experiment_id,
            tags={"git_commit": "abc123", "data_md5": "d41d8.dir", "params_hash": "p0"},
        )
        rid = run.info.run_id
        if f1 is not None:
            self.client.log_metric(rid, METRIC, f1)
        self.client.log_text(rid, "flavors: {}\n", "model/MLmodel")
        self.client.set_terminated(rid)
        metrics = {METRIC: f1, "benchmark.precision": 0.5} if tag_metric and f1 else {}
        mv = register_version(
            f"runs:/{rid}/model",
            self.name,
            metrics=metrics,
            tags={"trainer": "yolo"},
            validation_passed=validation,
            client=self.client,
        )
        return str(mv.version)

    def promote(self, **kw) -> promotion.PromotionDecision:
        kw.setdefault("min_delta", 0.005)
        return promote(self.name, METRIC, client=self.client, **kw)

    def champion(self) -> str:
        return str(self.client.get_model_version_by_alias(self.name, CHAMPION).version)

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.name, version).tags

    def history(self) -> list[dict]:
        return promotion.champion_history(self.name, self.client)


def _store(uri: str, tmp: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("promo", artifact_location=(tmp / "mlruns").as_uri())
    return client, exp


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str]:
    """One SQLite store per module: creating its schema costs seconds, a model name nothing."""
    tmp = tmp_path_factory.mktemp("registry")
    return _store(f"sqlite:///{tmp / 'mlflow.db'}", tmp)


@pytest.fixture()
def reg(store: tuple[MlflowClient, str], request: pytest.FixtureRequest) -> Registry:
    return Registry(*store, name=f"spines-{request.node.name}")


def _scenario(reg: Registry) -> None:
    """first -> champion; worse stays out; < min_delta stays out; +min_delta exactly gets in."""
    v1 = reg.register(0.800)
    assert reg.client.get_model_version(reg.name, v1).aliases == [CHALLENGER]
    d1 = reg.promote(actor="ci")
    assert d1.promoted and d1.version == v1 and d1.previous_champion is None
    assert reg.champion() == v1
    assert promotion.champion_uri(reg.name, reg.client) == f"models:/{reg.name}@champion"
    pinned = promotion.champion_uri(reg.name, reg.client, resolve=True)
    assert pinned == f"models:/{reg.name}/{v1}"

    v2 = reg.register(0.790)  # worse
    d2 = reg.promote()
    assert not d2.promoted and reg.champion() == v1
    assert (d2.candidate_value, d2.champion_value) == (0.79, 0.8)
    assert reg.tags(v2)["promotion_decision"].startswith("rejected")

    v3 = reg.register(0.804)  # better, but by less than min_delta
    assert not reg.promote().promoted and reg.champion() == v1

    v4 = reg.register(0.805)  # better by exactly min_delta (0.805 - 0.8 in floats)
    d4 = reg.promote(actor="ci")
    assert d4.promoted and d4.previous_champion == v1 and not d4.forced
    assert reg.champion() == v4
    new, old = reg.tags(v4), reg.tags(v1)
    assert new["previous_champion"] == v1 and new["promoted_by"] == "ci"
    assert "0.805" in new["promotion_reason"] and new["promoted_at"]
    assert old["replaced_by"] == v4 and old["demoted_at"]
    assert [(h["version"], h["previous"]) for h in reg.history()] == [(v1, None), (v4, v1)]
    assert v3 not in {h["version"] for h in reg.history()}


def test_promotion_rules_sqlite(reg: Registry) -> None:
    _scenario(reg)


def test_register_sets_version_tags_and_challenger(reg: Registry) -> None:
    v = reg.register(0.7, validation=False)
    tags = reg.tags(v)
    assert tags[f"metric.{METRIC}"] == "0.7" and tags["metric.benchmark.precision"] == "0.5"
    assert tags["git_commit"] == "abc123" and tags["dataset_md5"] == "d41d8.dir"
    assert tags["params_hash"] == "p0" and tags["validation"] == "failed"
    assert tags["trainer"] == "yolo" and tags["source_run_id"]
    mv = reg.client.get_model_version(reg.name, v)
    assert tags["source_run_id"] == mv.run_id
    assert str(reg.client.get_model_version_by_alias(reg.name, CHALLENGER).version) == v
    # explicit tags win over the run's
    run = reg.client.create_run(reg.experiment_id)
    reg.client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    explicit = {"git_commit": "feed", "dataset_md5": "m", "params_hash": "h"}
    mv2 = register_version(
        f"runs:/{run.info.run_id}/model", reg.name, {}, explicit, True, client=reg.client
    )
    assert {k: mv2.tags[k] for k in explicit} == explicit
    assert str(reg.client.get_model_version_by_alias(reg.name, CHALLENGER).version) == str(
        mv2.version
    )


def test_validation_failure_blocks_unless_forced(reg: Registry) -> None:
    reg.register(0.5)
    assert reg.promote().promoted
    bad = reg.register(0.99, validation=False)
    d = reg.promote()
    assert not d.promoted and not d.validation_passed and "validation failed" in d.reason
    assert reg.champion() != bad

    forced = reg.promote(force=True, reason="reviewed the failures by hand", actor="ana")
    assert forced.promoted and forced.forced and reg.champion() == bad
    tags = reg.tags(bad)
    assert tags["promoted_by"] == "ana" and tags["promotion_forced"] == "true"
    assert "reviewed the failures by hand" in tags["promotion_reason"]
    last = reg.history()[-1]
    assert last["by"] == "ana" and last["forced"] is True and last["version"] == bad


def test_first_version_without_validation_is_not_champion(reg: Registry) -> None:
    reg.register(0.9, validation=False)
    assert not reg.promote().promoted
    assert promotion.champion_version(reg.name, reg.client) is None
    with pytest.raises(MicrosegError, match="alias 'champion'"):
        promotion.champion_uri(reg.name, reg.client)


def test_hand_set_alias_is_what_counts(reg: Registry) -> None:
    """A person moves champion back to v1 in the UI: champion_uri and promote follow it."""
    v1 = reg.register(0.60)
    reg.promote()
    v2 = reg.register(0.80)
    assert reg.promote().promoted and reg.champion() == v2
    reg.client.set_registered_model_alias(reg.name, CHAMPION, v1)  # what the UI does
    pinned = promotion.champion_uri(reg.name, reg.client, resolve=True)
    assert pinned == f"models:/{reg.name}/{v1}"
    v3 = reg.register(0.70)  # worse than v2, better than the hand-picked v1
    d = reg.promote()
    assert d.promoted and d.previous_champion == v1 and d.champion_value == 0.6
    assert reg.champion() == v3


def test_lower_is_better_and_metric_from_run(reg: Registry) -> None:
    """A loss-like metric; versions without metric tags are judged on the run's metric."""
    reg.register(0.30, tag_metric=False)
    assert reg.promote(higher_is_better=False).promoted
    reg.register(0.32, tag_metric=False)  # higher loss: worse
    d = reg.promote(higher_is_better=False)
    assert not d.promoted and (d.candidate_value, d.champion_value) == (0.32, 0.30)
    v = reg.register(0.29, tag_metric=False)
    assert reg.promote(higher_is_better=False).promoted and reg.champion() == v


def test_promoting_the_champion_again_is_a_no_op(reg: Registry) -> None:
    v = reg.register(0.5)
    assert reg.promote().promoted
    again = reg.promote(force=True)
    assert not again.promoted and "already the champion" in again.reason
    assert len(reg.history()) == 1 and reg.champion() == v


def test_missing_model_or_challenger_is_a_clear_error(reg: Registry) -> None:
    with pytest.raises(MicrosegError, match=f"registered model named '{reg.name}'"):
        reg.promote()
    reg.client.create_registered_model(reg.name)
    with pytest.raises(MicrosegError, match="alias 'challenger'"):
        reg.promote()
    assert promotion.champion_version(reg.name, reg.client) is None


def test_history_tag_values_are_json(reg: Registry) -> None:
    reg.register(0.5)
    reg.promote(reason="first demo")
    tags = reg.client.get_registered_model(reg.name).tags
    keys = [k for k in tags if k.startswith("champion_history.")]
    assert keys == ["champion_history.0001"]
    assert json.loads(tags[keys[0]])["reason"].endswith("note: first demo")


@pytest.mark.postgres
def test_promotion_rules_postgres(
    pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The team setup: the same rules against a PostgreSQL backend store."""
    monkeypatch.chdir(tmp_path)
    uri = pg_database.replace("postgresql://", "postgresql+psycopg2://")
    _scenario(Registry(*_store(uri, tmp_path), name="microseg-spines"))
    assert mlflow.get_tracking_uri() != uri  # the client was used, not the process-global store
