"""Map a per-input function over many inputs, in this process or across a Ray cluster.

``batch-eval``, ``predict`` and ``fuse --input`` share one shape of work: a model loaded once,
then one input after another, each input's outputs written atomically by the function that
makes them. :func:`run_inputs` runs that shape with

* ``engine="local"``: one worker in this process, inputs in order (what the commands always
  did);
* ``engine="ray"``: ``num_workers`` Ray actors, each of which builds its worker (loads the
  model) once and takes inputs as they come; a local cluster is started when no ``address``
  is given, ``address="auto"`` (or ``ray://...``, ``host:port``) joins a running one.

A Ray actor whose process dies (killed, out of memory, a lost node) is restarted by Ray (which
loads the model again) and its input retried, up to ``max_retries`` times; past that the input
goes to a fresh actor, and only an input that kills ``max_retries + 1`` workers ends the run,
named. An exception raised by the function is not retried: it is the function's answer
(callers catch what one input may cost and return it), and anything else ends the run as it
would locally.

``done(input)`` is asked before an input is given out: a rerun after a crash skips what is
finished, since outputs are written atomically and a result exists only whole. Ray is imported
here only, and only for ``engine="ray"`` (the ``scale`` extra).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

from microseg.errors import ConfigError, MicrosegError
from microseg.utils.progress import bar_disabled

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    """Where inputs run (params.yaml ``scale:``; the CLI's ``--engine``/``--address``)."""

    #: local: this process; ray: Ray actors
    engine: str = "local"
    #: Ray cluster to join (``auto``, ``host:port``, ``ray://host:10001``); None starts one here
    address: str | None = None
    #: Ray actors, each with its own copy of the model
    num_workers: int = 2
    #: GPUs reserved per actor (fractions share a GPU: 0.5 puts two actors on one)
    num_gpus_per_worker: float = 0.0
    #: restarts of a dead actor, and retries of the input it held
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine expects one of {list(ENGINES)}, found {self.engine!r}")
        if self.num_workers < 1 or self.num_gpus_per_worker < 0 or self.max_retries < 0:
            raise ConfigError(
                "scale: expected num_workers >= 1, num_gpus_per_worker >= 0 and "
                f"max_retries >= 0, found {self.num_workers}, {self.num_gpus_per_worker} and "
                f"{self.max_retries}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> EngineOptions:
        """From params' ``scale`` section; ``overrides`` that are None keep the section's value."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in names}
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**given)


@dataclass
class Outcome(Generic[R]):
    """One input's result: ``value`` is what the function returned; None when ``skipped``."""

    index: int
    skipped: bool = False
    value: R | None = None


def run_inputs(
    inputs: Sequence[T],
    make_worker: Callable[[], Callable[[T], R]],
    options: EngineOptions | None = None,
    *,
    done: Callable[[T], bool] | None = None,
    name: Callable[[T], str] = str,
    desc: str = "inputs",
    progress: bool = True,
    on_result: Callable[[T, Outcome[R]], None] | None = None,
) -> list[Outcome[R]]:
    """``make_worker()`` (once per worker) applied to every input not ``done``; one
    :class:`Outcome` per input, in input order.

    For Ray, ``make_worker`` and the inputs are sent to other processes, so they must pickle
    (a module-level function or class, or a :func:`functools.partial` of one) and the values
    the worker returns must too. ``on_result`` runs here, in input order for ``local`` and
    in finishing order for ``ray`` (a summary written after each input stays current).
    """
    options = options or EngineOptions()
    outcomes: list[Outcome[R] | None] = [None] * len(inputs)
    todo: list[int] = []
    for i, item in enumerate(inputs):
        if done is not None and done(item):
            log.info("%s: finished earlier; skipped", name(item))
            outcomes[i] = Outcome(i, skipped=True)
            if on_result is not None:
                on_result(item, outcomes[i])
        else:
            todo.append(i)
    bar = tqdm(total=len(todo), desc=desc, disable=bar_disabled(progress) or not todo)

    def finish(i: int, value: R) -> None:
        outcomes[i] = Outcome(i, value=value)
        if on_result is not None:
            on_result(inputs[i], outcomes[i])
        bar.set_postfix_str(name(inputs[i]))
        bar.update()

    try:
        if not todo:
            pass
        elif options.engine == "local":
            worker = make_worker()
            for i in todo:
                finish(i, worker(inputs[i]))
        else:
            _run_ray(inputs, todo, make_worker, options, name, finish)
    finally:
        bar.close()
    return [o for o in outcomes if o is not None]


class _Actor:
    """A Ray actor around one worker: built once (the model loaded once per process)."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], cwd: str) -> None:
        if os.path.isdir(cwd):  # relative paths mean what they mean to the driver
            os.chdir(cwd)
        self.error: BaseException | None = None
        try:
            self.worker: Callable[[Any], Any] | None = make_worker()
        except Exception as exc:  # raised on the first call, where the driver sees it
            self.worker, self.error = None, exc

    def pid(self) -> int:
        return os.getpid()

    def run(self, item: Any) -> Any:
        if self.worker is None:
            raise self.error or MicrosegError("the worker could not be built")
        return self.worker(item)


def _ray() -> Any:
    from microseg.utils.extras import require

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time
    return require("scale", "ray")


def _init(ray: Any, options: EngineOptions) -> bool:
    """Join ``options.address`` or start a local cluster; True when this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if options.address is None:  # enough CPU slots for the workers asked for
        kwargs["num_cpus"] = max(options.num_workers, os.cpu_count() or 1)
    try:
        ray.init(address=options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local cluster"
        raise ConfigError(f"could not start or join Ray at {where}: {exc}") from exc
    return True


def _n_actors(ray: Any, options: EngineOptions, n_inputs: int) -> int:
    """As many actors as asked for, inputs there are and the cluster can hold at once (an
    actor that cannot be placed would hold its input forever)."""
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 1))
    if options.num_gpus_per_worker > 0:
        gpus = float(total.get("GPU", 0))
        if gpus < options.num_gpus_per_worker:
            raise ConfigError(
                f"scale.num_gpus_per_worker is {options.num_gpus_per_worker}, but the Ray "
                f"cluster has {gpus:g} GPU(s); set it to 0 for CPU workers"
            )
        fits = min(fits, int(gpus / options.num_gpus_per_worker + 1e-9))
    return max(1, min(options.num_workers, n_inputs, fits))


def _run_ray(
    inputs: Sequence[Any],
    todo: list[int],
    make_worker: Callable[[], Callable[[Any], Any]],
    options: EngineOptions,
    name: Callable[[Any], str],
    finish: Callable[[int, Any], None],
) -> None:
    ray = _ray()
    from ray.exceptions import RayActorError, RayTaskError

    started = _init(ray, options)
    actor_cls = ray.remote(_Actor).options(
        num_cpus=1,
        num_gpus=options.num_gpus_per_worker,
        max_restarts=options.max_retries,
        max_task_retries=options.max_retries,
    )
    cwd = os.getcwd()
    actors: list[Any] = []

    def new_actor() -> Any:
        actor = actor_cls.remote(make_worker, cwd)
        actors.append(actor)
        return actor

    try:
        n = _n_actors(ray, options, len(todo))
        log.info("ray: %d input(s) on %d worker(s)", len(todo), n)
        idle = [new_actor() for _ in range(n)]
        queue = deque(todo)
        lost = dict.fromkeys(todo, 0)  # workers each input has outlived
        pending: dict[Any, tuple[Any, int]] = {}
        while queue or pending:
            while queue and idle:
                actor, i = idle.pop(), queue.popleft()
                pending[actor.run.remote(inputs[i])] = (actor, i)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                actor, i = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except RayTaskError as exc:  # the function raised: as it would have here
                    cause = exc.cause
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise exc.as_instanceof_cause() from None
                except RayActorError as exc:  # restarts used up: a fresh worker tries again
                    lost[i] += 1
                    if lost[i] > options.max_retries:
                        raise MicrosegError(
                            f"{lost[i]} Ray workers died on this input; giving up: {exc}",
                            name(inputs[i]),
                        ) from exc
                    log.warning("%s: its worker died; retrying on a new one", name(inputs[i]))
                    ray.kill(actor)
                    queue.appendleft(i)
                    idle.append(new_actor())
                    continue
                idle.append(actor)
                finish(i, value)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


__all__ = ["ENGINES", "EngineOptions", "Outcome", "run_inputs"]
