"""Where Optuna studies live, so that several workers can share one.

``sqlite:///optuna.db`` (the default) suits one machine: processes on it share the file, with a
long busy timeout so that concurrent writers wait instead of failing. For several machines,
point every worker at one database server with any SQLAlchemy URL, e.g.
``postgresql://user@host:5432/optuna``: workers then draw trials from, and report them to, the
same study. On a server, trials report a heartbeat; a trial whose worker died (no heartbeat for
``grace_period`` seconds) is marked failed by the next worker and re-queued once with the same
parameters, so a crashed machine loses no part of the search.

Seeding: :func:`study` seeds TPE from ``(seed, worker, trials already in the study)``, so a run
is reproducible, two workers started with the same seed do not propose the same points, and a
resumed study does not replay the random start-up points of its first run.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from typing import Any, Literal

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.engine import make_url

from microseg.errors import ConfigError, MicrosegError

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_INTERVAL_S = 60
GRACE_PERIOD_S = 180


def optuna_storage(url: str | None = None) -> RDBStorage:
    """An Optuna RDB storage for ``url`` (default :data:`DEFAULT_STORAGE`)."""
    url = url or DEFAULT_STORAGE
    if "://" not in url:
        raise ConfigError(
            f"Optuna storage must be an SQLAlchemy URL such as {DEFAULT_STORAGE!r} or "
            f"'postgresql://user@host:5432/db'; found {url!r}"
        )
    if url.startswith("sqlite"):
        # Processes on one machine share the file; wait on its lock rather than fail.
        storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # later connections get the pragmas
        return storage
    engine_kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # survive a server restart or an idle connection cut by a proxy
        "pool_recycle": 1800,
        "pool_size": 2,
        "max_overflow": 4,
    }
    with warnings.catch_warnings():  # heartbeats are marked experimental; chosen on purpose
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            _with_driver(url),
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL journal: readers do not block the writer, and a commit needs no fsync of its own
    (``synchronous=NORMAL``), which makes a trial's dozen small commits cheap. A crash can lose
    the last commits but never corrupts the file. WAL needs a local disk (not NFS); SQLite is
    the one-machine option anyway."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _with_driver(url: str) -> str:
    """A bare ``postgresql://`` URL with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; this project ships psycopg2,
    so without this such a URL fails with "No module named 'psycopg'".
    """
    u = make_url(url)
    if u.drivername != "postgresql" or importlib.util.find_spec("psycopg") is not None:
        return url
    if importlib.util.find_spec("psycopg2") is None:
        raise ConfigError(
            f"Optuna storage {_redacted(url)}: no PostgreSQL driver (psycopg or psycopg2) is "
            "installed"
        )
    return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _redacted(url: str) -> str:
    """The URL with any password hidden, for logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say nothing about it
        return "<storage url>"


def _existing_trials(storage: RDBStorage, name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def _lost_table_race(exc: BaseException) -> bool:
    """Workers starting together on an empty database race to create Optuna's tables; the
    loser sees a unique violation in pg_type (PostgreSQL) or "table ... already exists"
    (SQLite, an OperationalError) and, on retry, finds the tables made."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, OperationalError) and "already exists" in str(exc)


def study(
    name: str,
    storage_url: str | None = None,
    seed: int = 0,
    direction: Literal["maximize", "minimize"] = "maximize",
    *,
    worker: int = 0,
) -> optuna.Study:
    """Create the study ``name`` in ``storage_url``, or load it if it exists, with seeded TPE.

    ``worker`` tells apart processes that run the same study at the same time (see module
    notes on seeding).
    """
    for attempt in range(3):
        try:
            storage = optuna_storage(storage_url)
            n_before = _existing_trials(storage, name)
            break
        except ConfigError:
            raise
        except Exception as exc:
            if attempt == 2 or not _lost_table_race(exc):
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MicrosegError(
                    f"could not open the Optuna storage {_redacted(storage_url or DEFAULT_STORAGE)}"
                    f" ({type(exc).__name__}: {reason[:300]}); check the URL, that the server "
                    "answers and that the database (or the SQLite file's folder) is writable"
                ) from exc
            log.info("another worker is creating the Optuna tables; retrying")
            time.sleep(1.0 + attempt)
    sampler_seed = int(np.random.SeedSequence([seed, worker, n_before]).generate_state(1)[0])
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    st = optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=name,
        direction=direction,
        load_if_exists=True,
    )
    log.info(
        "optuna study %r (%s): %d trial(s) so far; TPE seed %d",
        name,
        _redacted(storage_url or DEFAULT_STORAGE),
        n_before,
        sampler_seed,
    )
    return st
