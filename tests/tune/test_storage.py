"""Optuna storage: the table-creation race between workers starting together is retried."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from microseg.tune import storage


def _flaky(exc: Exception, fails: int):
    real = storage.optuna_storage
    calls = {"n": 0}

    def make(url=None):
        calls["n"] += 1
        if calls["n"] <= fails:
            raise exc
        return real(url)

    return make, calls


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists")),
        IntegrityError("CREATE TABLE", {}, Exception('duplicate key value "pg_type_typname"')),
    ],
    ids=["sqlite", "postgresql"],
)
def test_lost_table_race_is_retried(tmp_path, monkeypatch, exc):
    make, calls = _flaky(exc, fails=1)
    monkeypatch.setattr(storage, "optuna_storage", make)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    st = storage.study("s", f"sqlite:///{tmp_path / 'o.db'}", seed=0)
    assert st.study_name == "s" and calls["n"] == 2


def test_other_database_errors_are_not_swallowed(tmp_path, monkeypatch):
    locked = OperationalError("INSERT", {}, Exception("database is locked"))
    make, calls = _flaky(locked, fails=1)
    monkeypatch.setattr(storage, "optuna_storage", make)
    with pytest.raises(OperationalError, match="locked"):
        storage.study("s", f"sqlite:///{tmp_path / 'o.db'}", seed=0)
    assert calls["n"] == 1
