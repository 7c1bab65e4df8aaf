"""The one ``microseg`` command: every pipeline stage is a sub-command.

``dvc.yaml``, ``MLproject`` and the workflows call these; no logic lives in YAML or shell.
A command parses its options, calls one stage function (``microseg.stages``) and prints
its result. User errors (:class:`~microseg.errors.MicrosegError`), and a package of an extra
that a core install lacks (:mod:`microseg.utils.extras`), print one clear line and exit 2.
``--help`` groups the commands in panels (:data:`PANELS`); each command also logs to its own
file, ``logs/<command>[-<key>].log`` (:mod:`microseg.utils.logfile`), and draws progress bars
only on a terminal (:mod:`microseg.utils.progress`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import platform
import shlex
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from microseg.cli import (
    data,
    datasets,
    evaluation,
    prediction,
    profiles,
    registry,
    training,
    uncertainty,
    viewing,
)
from microseg.errors import MicrosegError, Terminated
from microseg.utils import logfile, progress
from microseg.utils.extras import missing_extra

app = typer.Typer(
    name="microseg",
    help="Reproducible microscopy segmentation and detection (DVC + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("microseg")

#: the panels of ``microseg --help`` and their commands, in the order help lists them
#: (``view`` and the ``dataset`` group land in theirs once in :data:`COMMANDS`)
PANELS: dict[str, tuple[str, ...]] = {
    "Use a model": ("predict", "fuse", "visualize", "view"),
    "Train and evaluate": (
        "train", "evaluate", "tune", "report", "seeds", "synth-study", "compare-spines",
        "uncertainty", "inter-rater", "compare-prob-models", "track",
    ),
    "Pipeline stages and data": (
        "synth", "ingest", "pack-dsb", "synth-nuclei", "validate", "convert", "prepare-targets",
        "dataset",
    ),
    "Registry": ("register", "promote", "batch-eval", "where"),
    "Setup": ("profile",),
}  # fmt: skip
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}

#: every command (a function, or a typer sub-app for a group of commands); help shows them
#: in the order of :data:`PANELS`
COMMANDS: tuple[tuple[str, Callable[..., Any] | typer.Typer], ...] = (
    ("predict", prediction.predict),
    ("fuse", prediction.fuse),
    ("visualize", prediction.visualize),
    ("view", viewing.view),
    ("train", training.train),
    ("evaluate", evaluation.evaluate),
    ("tune", training.tune),
    ("report", evaluation.report),
    ("seeds", evaluation.seeds),
    ("synth-study", evaluation.synth_study),
    ("compare-spines", evaluation.compare_spines),
    ("uncertainty", uncertainty.uncertainty),
    ("inter-rater", uncertainty.inter_rater),
    ("compare-prob-models", uncertainty.compare_prob_models),
    ("track", evaluation.track),
    ("synth", data.synth),
    ("ingest", data.ingest),
    ("pack-dsb", data.pack_dsb),
    ("synth-nuclei", data.synth_nuclei),
    ("validate", data.validate),
    ("convert", data.convert),
    ("prepare-targets", data.prepare_targets),
    ("register", registry.register),
    ("promote", registry.promote),
    ("batch-eval", registry.batch_eval),
    ("where", registry.where),
    ("profile", profiles.profile),
    ("dataset", datasets.app),
)
#: the parameters that say what a command works on: given on the command line, their values
#: and the command's name name its log file (``microseg train --model unet`` ->
#: ``logs/train-unet.log``; ``microseg synth`` -> ``logs/synth.log``)
LOG_KEYS = ("target", "dataset", "task", "model", "worker")
#: set by :func:`main`: only the real command writes log files (not ``CliRunner`` in tests)
_log_files = False


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _with_log_file(names: tuple[str, ...], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a command that logs to its own file (see :mod:`microseg.utils.logfile`)
    while it runs; typer hands it the context, which says what was given."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def run(*args: Any, ctx: typer.Context, **kwargs: Any) -> Any:
        if not _log_files:
            return fn(*args, **kwargs)
        keys = [str(v) for k, v in kwargs.items() if k in LOG_KEYS and _given(ctx, k)]
        path = logfile.log_path([*names, *keys])
        with contextlib.ExitStack() as stack:
            try:
                header = f"# {version_line()}: microseg {shlex.join(sys.argv[1:])}"
                stack.enter_context(logfile.attached(path, header=header))
            except OSError as exc:  # a read-only folder: the command still runs
                log.warning("no log file %s: %s", path, exc)
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                logfile.record_error(exc)
                raise

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), ctx_param])
    run.__annotations__ = {**fn.__annotations__, "ctx": typer.Context}
    return run


_ORDER = {name: i for i, name in enumerate(PANEL_OF)}
for _name, _cmd in sorted(COMMANDS, key=lambda c: _ORDER.get(c[0], len(_ORDER))):
    if isinstance(_cmd, typer.Typer):  # a group: each of its commands logs to its own file
        for _info in _cmd.registered_commands:
            if _info.callback is not None:
                _sub = _info.name or _info.callback.__name__.replace("_", "-")
                _info.callback = _with_log_file((_name, _sub), _info.callback)
        app.add_typer(_cmd, name=_name, rich_help_panel=PANEL_OF.get(_name))
    else:
        app.command(_name, rich_help_panel=PANEL_OF.get(_name))(_with_log_file((_name,), _cmd))


def version_line() -> str:
    """``microseg X (python Y, torch Z)``: what a bug report needs, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"microseg {of('microseg')} (python {platform.python_version()}, torch {of('torch')})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Reproducible microscopy segmentation and detection (DVC + MLflow)."""


def _configure_logging() -> None:
    """stderr at ``MICROSEG_LOG`` (default INFO); the command's log file gets INFO and above
    whatever stderr shows."""
    stderr = logging.StreamHandler()
    stderr.setLevel(os.environ.get("MICROSEG_LOG", "INFO").upper())
    logging.basicConfig(
        level=min(stderr.level, logging.INFO), format=logfile.FORMAT, handlers=[stderr]
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    """The ``microseg`` entry point: logging, progress bars (off unless stderr is a
    terminal), a log file per command, and user errors as one line with exit status 2."""
    global _log_files
    try:
        _configure_logging()
        progress.export_to_tqdm()  # before anything imports tqdm
        _log_files = True
        app()
    except MicrosegError as exc:
        if os.environ.get("MICROSEG_DEBUG", "") not in ("", "0"):
            import traceback

            traceback.print_exc()  # MICROSEG_DEBUG=1: the traceback of a user error too
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ValidationError as exc:  # a config model checked outside Params (a safety net)
        from microseg.config import describe_errors

        typer.secho(
            f"error: invalid {exc.title}: {describe_errors(exc)}", fg=typer.colors.RED, err=True
        )
        sys.exit(2)
    except KeyboardInterrupt as exc:
        typer.secho(
            f"interrupted{' by SIGTERM' if isinstance(exc, Terminated) else ''}: outputs are "
            "written atomically, so nothing half-written was kept; run the same command (or "
            "dvc repro) again to resume where it stopped",
            fg=typer.colors.YELLOW,
            err=True,
        )
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except ModuleNotFoundError as exc:  # a core install running a pipeline command
        if (missing := missing_extra(exc)) is None:
            raise
        typer.secho(f"error: {missing}", fg=typer.colors.RED, err=True)
        sys.exit(2)


__all__ = ["app", "main", "version_line"]
