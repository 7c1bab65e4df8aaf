"""The one ``microseg`` command: every pipeline stage is a sub-command.

``dvc.yaml``, ``MLproject`` and the workflows call these; no logic lives in YAML or shell.
A command parses its options, calls one stage function (``microseg.stages``) and prints
its result. User errors (:class:`~microseg.errors.MicrosegError`) print one clear line and
exit 2.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Annotated

import typer

from microseg.cli import data, evaluation, prediction, profiles, registry, training
from microseg.errors import MicrosegError

app = typer.Typer(
    name="microseg",
    help="Reproducible microscopy segmentation and detection (DVC + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("microseg")

#: ``microseg --help`` lists the commands in this order
COMMANDS = (
    ("synth", data.synth),
    ("ingest", data.ingest),
    ("pack-dsb", data.pack_dsb),
    ("validate", data.validate),
    ("convert", data.convert),
    ("train", training.train),
    ("prepare-targets", data.prepare_targets),
    ("report", evaluation.report),
    ("track", evaluation.track),
    ("evaluate", evaluation.evaluate),
    ("predict", prediction.predict),
    ("tune", training.tune),
    ("fuse", prediction.fuse),
    ("compare-spines", evaluation.compare_spines),
    ("uncertainty", evaluation.uncertainty),
    ("inter-rater", evaluation.inter_rater),
    ("seeds", evaluation.seeds),
    ("visualize", prediction.visualize),
    ("register", registry.register),
    ("promote", registry.promote),
    ("batch-eval", registry.batch_eval),
    ("where", registry.where),
    ("profile", profiles.profile),
)
for _name, _fn in COMMANDS:
    app.command(_name)(_fn)


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


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("MICROSEG_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except MicrosegError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


__all__ = ["app", "main", "version_line"]
