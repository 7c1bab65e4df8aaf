"""Model registry: register a new version as ``challenger``, promote it to ``champion`` on merit.

The aliases are the truth. ``champion`` is read from the registry every time (never cached,
never inferred from tags), so a person who moves the alias in the MLflow UI has decided, and
every later ``promote`` and ``batch-eval`` compares against and loads that version.

A version carries what it was judged on as version tags: ``metric.<name>`` (evaluation
metrics), ``dataset_md5``, ``git_commit``, ``params_hash``, ``validation`` (``passed`` or
``failed``) and ``source_run_id``. ``promote`` reads the candidate's and the champion's value
of the configured metric from those tags (falling back to the source run's logged metric, so
a version registered by hand can still be judged) and moves ``champion`` only when

* the candidate's validation passed, and
* there is no champion yet, or the candidate beats it by at least ``min_delta``;

``force=True`` overrides both (a person's decision, recorded as such). One promotion of a
model runs at a time (:mod:`microseg.registry.locks`), so concurrent ones form a chain.
Every promotion leaves a trail: tags on the new champion (``promoted_by``, ``promoted_at``,
``promotion_reason``, ``previous_champion``), on the old one (``demoted_at``,
``replaced_by``), and one ``champion_history.<NNNN>`` tag per event on the registered model
(one tag per event because a single growing tag would hit the store's 5000-character value
limit).

Everything goes through one :class:`~mlflow.MlflowClient`, so the same code runs against the
embedded SQLite store and a team's PostgreSQL-backed store.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from microseg.errors import MicrosegError
from microseg.registry import integrity, runs
from microseg.registry.locks import promotion_lock

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_PREFIX = "metric."
HISTORY_PREFIX = "champion_history."
#: floating-point slack on ``min_delta``: 0.805 - 0.800 must count as an improvement of 0.005
_EPS = 1e-12
_MODEL_ID_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")
_RUNS_URI = re.compile(r"^runs:/([^/]+)/(.+)$")


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided and why; ``asdict`` of it is what the CLI prints."""

    name: str
    promoted: bool
    version: str
    previous_champion: str | None
    metric: str
    candidate_value: float | None
    champion_value: float | None
    min_delta: float
    higher_is_better: bool
    validation_passed: bool
    forced: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- helpers


def _client(client: MlflowClient | None) -> MlflowClient:
    return client if client is not None else MlflowClient()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER", "unknown")


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise MicrosegError(
                f"expected a registered model named {name!r} in the registry at "
                f"{client.tracking_uri}, found none (run `microseg register` first)"
            ) from exc
        raise


def alias_version(name: str, alias: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The version that carries ``alias`` now, or None (no such alias, or no such model)."""
    client = _client(client)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # sqlalchemy store: INVALID_PARAMETER_VALUE for a missing alias,
        # RESOURCE_DOES_NOT_EXIST for a missing model; REST servers map both to 404
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def champion_version(name: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The current champion, read from the alias (so a hand-set alias in the UI counts)."""
    return alias_version(name, CHAMPION, client)


def champion_uri(name: str, client: MlflowClient | None = None, *, resolve: bool = False) -> str:
    """``models:/<name>@champion`` after checking a champion exists.

    ``resolve=True`` gives the pinned ``models:/<name>/<version>`` instead, for callers that
    must not see the alias move between loading and logging.
    """
    mv = champion_version(name, client)
    if mv is None:
        raise MicrosegError(
            f"expected model {name!r} to have a version with alias {CHAMPION!r}, found none "
            "(register a version and run `microseg promote`, or set the alias in the MLflow UI)"
        )
    return f"models:/{name}/{mv.version}" if resolve else f"models:/{name}@{CHAMPION}"


def _metric_value(client: MlflowClient, mv: ModelVersion, metric: str) -> float | None:
    """The version's ``metric.<metric>`` tag, else the source run's logged metric; NaN -> None."""
    raw = (mv.tags or {}).get(METRIC_PREFIX + metric)
    value: float | None = None
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            logger.warning(
                "model %s v%s: tag %s%s=%r is not a number",
                mv.name,
                mv.version,
                METRIC_PREFIX,
                metric,
                raw,
            )
    elif mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except MlflowException:
            value = None
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _source(client: MlflowClient, model_uri: str) -> tuple[str, str | None, str | None]:
    """``(source, run_id, model_id)`` for a model URI, resolved through ``client``.

    Handles what our loggers hand back: ``models:/m-<id>`` (an MLflow 3 logged model),
    ``runs:/<run>/<name>`` (a logged model of that run, or MLflow 2 run artifacts), and any
    other URI as an opaque source. Same rules as ``mlflow.register_model``, but through the
    given client instead of the process-global tracking URI.
    """
    if m := _MODEL_ID_URI.match(model_uri):
        lm = client.get_logged_model(m.group(1))
        return model_uri, lm.source_run_id, lm.model_id
    if m := _RUNS_URI.match(model_uri):
        run_id, path = m.group(1), m.group(2).strip("/")
        run = client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs is not None else []
        logged = [client.get_logged_model(o.model_id) for o in outputs]
        named = [lm for lm in logged if lm.name == path]
        if named:
            step = {o.model_id: o.step for o in outputs}
            lm = max(named, key=lambda x: step.get(x.model_id, 0))
            return f"models:/{lm.model_id}", run_id, lm.model_id
        if any(a.path.endswith("MLmodel") for a in client.list_artifacts(run_id, path)):
            return f"{run.info.artifact_uri.rstrip('/')}/{path}", run_id, None
        raise MicrosegError(
            f"expected a model logged as {path!r} in run {run_id}, found neither a logged "
            "model of that name nor an MLmodel file there",
            model_uri,
        )
    return model_uri, None, None


def _link_logged_model(client: MlflowClient, model_id: str, mv: ModelVersion) -> None:
    """Record the version on the logged model, as ``mlflow.register_model`` does (UI link)."""
    key = "mlflow.modelVersions"
    try:
        existing = client.get_logged_model(model_id).tags.get(key)
        value = [
            *(json.loads(existing) if existing else []),
            {"name": mv.name, "version": mv.version},
        ]
        client.set_logged_model_tags(model_id, {key: json.dumps(value)})
    except (MlflowException, ValueError) as exc:
        logger.warning(
            "could not link logged model %s to %s v%s: %s", model_id, mv.name, mv.version, exc
        )


# ---------------------------------------------------------------------------- register


def register_version(
    model_uri: str,
    name: str,
    metrics: dict[str, float],
    tags: dict[str, Any],
    validation_passed: bool,
    alias: str = CHALLENGER,
    client: MlflowClient | None = None,
) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it.

    Version tags: ``metric.<k>`` for each metric, ``dataset_md5``, ``git_commit`` and
    ``params_hash`` (explicit ``tags`` first, else the source run's house tags, else the
    working tree's), ``validation``, ``source_run_id``, any other entry of ``tags``, and the
    sha256 of the model's files (:mod:`microseg.registry.integrity`; checked at every load).
    """
    client = _client(client)
    source, run_id, model_id = _source(client, model_uri)
    try:
        digests = integrity.source_tags(source, client.tracking_uri)
    except Exception as exc:  # the store's download errors have several types
        raise MicrosegError(
            f"could not read the model's files to record their sha256 ({type(exc).__name__}: "
            f"{exc})",
            model_uri,
        ) from exc
    run_tags: dict[str, str] = {}
    if run_id:
        try:
            run_tags = client.get_run(run_id).data.tags
        except MlflowException:
            logger.warning(
                "source run %s of %s not found; tags from the working tree", run_id, model_uri
            )
    extra = {str(k): str(v) for k, v in tags.items()}
    version_tags = {
        "git_commit": run_tags.get("git_commit") or runs.git_commit(),
        "dataset_md5": run_tags.get("data_md5") or runs.data_md5(),
        "params_hash": run_tags.get("params_hash", "unknown"),
        **extra,
        **{f"{METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()},
        "validation": "passed" if validation_passed else "failed",
        "source_run_id": run_id or "",
        "model_uri": model_uri,
        "registered_at": _now(),
        **digests,
    }
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(
        name=name, source=source, run_id=run_id, tags=version_tags, model_id=model_id
    )
    if model_id:
        _link_logged_model(client, model_id, mv)
    client.set_registered_model_alias(name, alias, mv.version)
    logger.info(
        "registered %s v%s (%s) as %r; validation %s; %s",
        name,
        mv.version,
        model_uri,
        alias,
        version_tags["validation"],
        metrics,
    )
    return client.get_model_version(name, mv.version)


# ---------------------------------------------------------------------------- promote


def _decide(
    candidate: float | None,
    champion: float | None,
    min_delta: float,
    higher_is_better: bool,
    metric: str,
) -> tuple[bool, str]:
    """The merit rule alone (validation and force are handled by the caller)."""
    if candidate is None:
        return False, f"candidate has no value for {metric!r}; cannot compare"
    if champion is None:
        return False, f"champion has no value for {metric!r}; cannot compare (use force)"
    gain = candidate - champion if higher_is_better else champion - candidate
    better = "higher" if higher_is_better else "lower"
    text = (
        f"{metric} {candidate:.6g} vs champion {champion:.6g}: improvement {gain:+.6g} "
        f"({better} is better), min_delta {min_delta:g}"
    )
    return gain >= min_delta - _EPS, text


def promote(
    name: str,
    metric: str,
    min_delta: float,
    higher_is_better: bool = True,
    force: bool = False,
    reason: str | None = None,
    actor: str | None = None,
    version: str | int | None = None,
    client: MlflowClient | None = None,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` (default: the ``challenger``) if it earned it.

    Raises :class:`MicrosegError` when the model or the candidate does not exist. A rejected
    candidate is tagged ``promotion_decision`` with the reason, so the UI shows why.
    """
    client = _client(client)
    _registered_model(client, name)
    with promotion_lock(client, name):
        return _promote_locked(
            client, name, metric, min_delta, higher_is_better, force, reason, actor, version
        )


def _promote_locked(
    client: MlflowClient,
    name: str,
    metric: str,
    min_delta: float,
    higher_is_better: bool,
    force: bool,
    reason: str | None,
    actor: str | None,
    version: str | int | None,
) -> PromotionDecision:
    """:func:`promote` with the model's promotion lock held."""
    if version is None:
        cand = alias_version(name, CHALLENGER, client)
        if cand is None:
            raise MicrosegError(
                f"expected model {name!r} to have a version with alias {CHALLENGER!r}, found "
                "none (run `microseg register` first, or pass a version)"
            )
    else:
        try:
            cand = client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise MicrosegError(
                f"expected version {version} of model {name!r}, found none"
            ) from exc
    champ = champion_version(name, client)
    prev = str(champ.version) if champ is not None else None
    validation = (cand.tags or {}).get("validation", "missing")
    cand_value = _metric_value(client, cand, metric)
    champ_value = _metric_value(client, champ, metric) if champ is not None else None

    if prev == str(cand.version):
        earned, why = False, f"version {cand.version} is already the champion"
    elif champ is None:
        earned, why = True, f"no champion yet; {metric} = {cand_value}"
    else:
        earned, why = _decide(cand_value, champ_value, min_delta, higher_is_better, metric)
    if validation != "passed":
        earned, why = False, f"validation {validation}; {why}"
    forced = force and not earned and prev != str(cand.version)
    if forced:
        why = f"forced by {_actor(actor)}: {reason or 'no reason given'} (merit check: {why})"
    elif reason:
        why = f"{why}; note: {reason}"
    result = PromotionDecision(
        name=name,
        promoted=earned or forced,
        version=str(cand.version),
        previous_champion=prev,
        metric=metric,
        candidate_value=cand_value,
        champion_value=champ_value,
        min_delta=float(min_delta),
        higher_is_better=higher_is_better,
        validation_passed=validation == "passed",
        forced=forced,
        reason=why,
    )
    if not result.promoted:
        if prev == str(cand.version):
            return result
        client.set_model_version_tag(name, cand.version, "promotion_decision", f"rejected: {why}")
        client.set_model_version_tag(name, cand.version, "promotion_checked_at", _now())
        logger.info("%s v%s not promoted: %s", name, cand.version, why)
        return result
    now = champion_version(name, client)
    if (str(now.version) if now is not None else None) != prev:
        # only possible without a lock (an MLflow server store): someone promoted meanwhile
        raise MicrosegError(
            f"the champion of {name!r} moved from v{prev} to v{now.version if now else None} "
            "while this promote was deciding; run it again to judge against the new champion"
        )
    _record_promotion(client, result, _actor(actor))
    logger.info("%s v%s promoted to %s (was %s): %s", name, cand.version, CHAMPION, prev, why)
    return result


def _record_promotion(client: MlflowClient, d: PromotionDecision, actor: str) -> None:
    """Move the alias, then leave the trail on both versions and on the registered model."""
    at = _now()
    client.set_registered_model_alias(d.name, CHAMPION, d.version)
    for key, value in {
        "promoted_by": actor,
        "promoted_at": at,
        "promotion_reason": d.reason[:4900],
        "previous_champion": d.previous_champion or "none",
        "promotion_forced": str(d.forced).lower(),
        "promotion_decision": "promoted",
    }.items():
        client.set_model_version_tag(d.name, d.version, key, value)
    if d.previous_champion is not None:
        client.set_model_version_tag(d.name, d.previous_champion, "demoted_at", at)
        client.set_model_version_tag(d.name, d.previous_champion, "replaced_by", d.version)
    tags = _registered_model(client, d.name).tags or {}
    seq = 1 + max(
        (
            int(k[len(HISTORY_PREFIX) :])
            for k in tags
            if k.startswith(HISTORY_PREFIX) and k[len(HISTORY_PREFIX) :].isdigit()
        ),
        default=0,
    )
    event = {
        "version": d.version,
        "previous": d.previous_champion,
        "by": actor,
        "at": at,
        "forced": d.forced,
        "metric": d.metric,
        "value": d.candidate_value,
        "previous_value": d.champion_value,
        "reason": d.reason[:3000],
    }
    client.set_registered_model_tag(d.name, f"{HISTORY_PREFIX}{seq:04d}", json.dumps(event))


def champion_history(name: str, client: MlflowClient | None = None) -> list[dict[str, Any]]:
    """Every promotion recorded on the registered model, oldest first."""
    tags = _registered_model(_client(client), name).tags or {}
    keys = sorted(k for k in tags if k.startswith(HISTORY_PREFIX))
    return [json.loads(tags[k]) for k in keys]
