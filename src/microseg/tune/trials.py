"""One trial of a training study: what it reports to Optuna, and what happens when it is lost.

:class:`OptunaPruningHook` reports the validation metric after every epoch and prunes a trial
whose curve falls below the median of the completed ones; :class:`CurveRecorder` keeps the
curve whose best epoch is the trial's value.

Lost trials are run again with the same params, once each (:func:`requeue_lost`):

* ``KeyboardInterrupt`` inside a trial: Optuna records it FAIL; the study marks it
  ``interrupted``;
* a process killed outright leaves its trial RUNNING: a RUNNING trial whose process (host +
  pid recorded on the trial, :func:`owner`) no longer exists on this host is marked FAIL by
  the next call, on any storage; a trial of a process on another host is caught by Optuna's
  heartbeat (server storages) after its grace period.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from microseg.errors import MicrosegError
from microseg.train.hooks import HookBase, Hooks
from microseg.tune.spaces import Direction

log = logging.getLogger(__name__)


class TuningError(MicrosegError):
    """The study cannot go on (every trial fails, the metric is never reported ...)."""


class OptunaPruningHook(HookBase):
    """Reports ``metric`` after every epoch (``trial.report(value, epoch)``) and prunes.

    When the pruner says so, it raises :class:`optuna.TrialPruned` (``raise_on_prune``), or
    instead sets ``should_stop`` so that a loop that honours it (ours, Ultralytics' through
    ``models.yolo.callbacks``) ends the run normally; ``pruned`` tells afterwards.
    Epochs without the metric (e.g. no validation that epoch) are not reported.
    """

    def __init__(self, trial: optuna.Trial, metric: str, *, raise_on_prune: bool = True) -> None:
        self.trial, self.metric, self.raise_on_prune = trial, metric, raise_on_prune
        self.curve: dict[int, float] = {}
        self.pruned_at: int | None = None
        self.should_stop = False

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.pruned or self.metric not in metrics:
            return
        value = float(metrics[self.metric])
        self.trial.report(value, epoch)
        self.curve[int(epoch)] = value
        if self.trial.should_prune():
            self.pruned_at = int(epoch)
            self.should_stop = True
            if self.raise_on_prune:
                raise optuna.TrialPruned(self.message())

    def message(self) -> str:
        return (
            f"trial {self.trial.number} pruned after epoch {self.pruned_at}: {self.metric} "
            f"{self.curve.get(self.pruned_at or 0, math.nan):.4g} is worse than the median of "
            "the completed trials"
        )


class CurveRecorder(HookBase):
    """Keeps ``metric`` per epoch; :meth:`best` is a trial's final value."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.curve: dict[int, float] = {}
        self.seen: set[str] = set()

    def after_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.seen.update(metrics)
        if self.metric in metrics:
            self.curve[int(epoch)] = float(metrics[self.metric])

    def best(self, direction: Direction = "maximize") -> float:
        values = [v for v in self.curve.values() if math.isfinite(v)]
        if not values:
            raise TuningError(
                f"the training loop never reported a finite {self.metric!r}; its epoch "
                f"metrics were {sorted(self.seen)}"
            )
        return max(values) if direction == "maximize" else min(values)


def pruning_hooks(hook: HookBase) -> list[OptunaPruningHook]:
    """The :class:`OptunaPruningHook` s in ``hook`` (itself, or inside nested ``Hooks``)."""
    if isinstance(hook, OptunaPruningHook):
        return [hook]
    if isinstance(hook, Hooks):
        return [p for h in hook.hooks for p in pruning_hooks(h)]
    return []


# -- lost trials ----------------------------------------------------------------------------
def owner() -> dict[str, Any]:
    """This process, as recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def requeue_lost(st: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
    """Run again, once each, the trials an interruption or a dead process took away.

    Returns whether anything changed (then ``trials`` is out of date).
    """
    storage = st._storage  # Optuna exposes no public accessor
    changed = False
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried |= {t.system_attrs.get("failed_trial") for t in trials}  # heartbeat retries
    host = socket.gethostname()
    for t in trials:
        # a trial failed for a dead process is queued by the worker that marked it (below),
        # never from another worker's later snapshot (that would queue it twice)
        lost = (
            t.state == TrialState.FAIL
            and t.user_attrs.get("interrupted", False)
            and not t.user_attrs.get("process_lost", False)
        )
        who = t.user_attrs.get("owner") or {}
        # a dead process on this host is certain now; heartbeats (server storages) catch the
        # other hosts' after their grace period
        if (
            t.state == TrialState.RUNNING
            and who.get("host") == host
            and not _pid_alive(int(who["pid"]))
        ):
            # the FAIL transition is the claim: the storage refuses it (row-locked) to a
            # second worker that saw the same RUNNING trial, which must not queue it again
            try:
                storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                storage.set_trial_user_attr(t._trial_id, "process_lost", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                changed = True  # another worker marked it: our snapshot is out of date
                continue
            log.warning("trial %d: its process %s is gone; marked FAIL", t.number, who["pid"])
            lost = changed = True
        if lost and t.number not in retried and t.params:
            keep = {"baseline": True} if t.user_attrs.get("baseline") else {}
            st.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number, **keep})
            retried.add(t.number)
            changed = True
            log.info("trial %d was interrupted: queued again with params %s", t.number, t.params)
    return changed
