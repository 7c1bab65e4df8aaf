"""The cli/ package: the command surface of the single cli.py it replaced, thin modules, and
no MLflow in the commands or the stages (registry/ owns every MLflow call)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import typer

SRC = Path(__file__).resolve().parents[2] / "src" / "microseg"

#: `microseg --help` order of the single-module CLI before the split
COMMANDS_BEFORE_SPLIT = [
    "synth", "ingest", "validate", "convert", "train", "prepare-targets", "report", "track",
    "evaluate", "predict", "tune", "fuse", "compare-spines", "uncertainty", "inter-rater",
    "visualize", "register", "promote", "batch-eval", "where",
]  # fmt: skip
#: commands added after the split (issue 15: pack-dsb, profile; issue 16: seeds)
COMMANDS_ADDED = ["pack-dsb", "profile", "seeds"]


def test_help_lists_the_commands_in_the_order_they_had() -> None:
    from typer.testing import CliRunner

    from microseg.cli import app

    group = typer.main.get_command(app)
    commands = group.list_commands(None)
    # commands added since keep the old ones in their order
    assert [c for c in commands if c in COMMANDS_BEFORE_SPLIT] == COMMANDS_BEFORE_SPLIT
    assert set(commands) - set(COMMANDS_BEFORE_SPLIT) == set(COMMANDS_ADDED)
    out = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("│ ") and
              line.split()[1] in COMMANDS_BEFORE_SPLIT]  # fmt: skip
    assert listed == COMMANDS_BEFORE_SPLIT


def test_entry_point_and_imports() -> None:
    from microseg.cli import app, main

    scripts = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["microseg"] == "microseg.cli:main"
    assert callable(main) and isinstance(app, typer.Typer)


def test_version_names_the_package_python_and_torch() -> None:
    import platform
    from importlib.metadata import version

    from typer.testing import CliRunner

    from microseg.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    expected = (
        f"microseg {version('microseg')} (python {platform.python_version()}, "
        f"torch {version('torch')})"
    )
    assert res.output.strip() == expected
    assert CliRunner().invoke(app, []).exit_code in (0, 2)  # no args: help, as before


def test_no_cli_module_over_250_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (SRC / "cli").glob("*.py")}
    assert sizes and not {name: n for name, n in sizes.items() if n > 250}, sizes


def _mlflow_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        found += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "mlflow"]
    return found


def test_no_mlflow_import_in_cli_or_stages() -> None:
    files = [*(SRC / "cli").rglob("*.py"), *(SRC / "stages").rglob("*.py")]
    assert len(files) > 10
    assert [hit for f in files for hit in _mlflow_imports(f)] == []


def test_the_check_sees_an_mlflow_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import mlflow.pyfunc\n    from mlflow import log_metric\n")
    assert _mlflow_imports(bad) == ["bad.py:2", "bad.py:3"]
