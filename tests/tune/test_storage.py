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
    from microseg.errors import MicrosegError

    with pytest.raises(MicrosegError, match=r"OperationalError.*locked") as err:
        storage.study("s", f"sqlite:///{tmp_path / 'o.db'}", seed=0)
    assert isinstance(err.value.__cause__, OperationalError)  # not retried, not hidden
    assert calls["n"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nobody@127.0.0.1:1/none",  # nothing listens on port 1
        "sqlite:////proc/microseg-no-such-folder/optuna.db",  # a folder that cannot exist
    ],
    ids=["unreachable-server", "unwritable-sqlite"],
)
def test_an_unusable_storage_is_one_clear_error(url):
    from microseg.errors import MicrosegError

    with pytest.raises(MicrosegError, match="could not open the Optuna storage") as err:
        storage.study("x", url)
    assert "\n" not in str(err.value)
