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
#: commands added after the split (issue 15: pack-dsb, profile; issue 16: seeds; issue 17:
#: view, the dataset group; issue 21: synth-nuclei, synth-study)
COMMANDS_ADDED = [
    "pack-dsb", "profile", "seeds", "view", "dataset", "synth-nuclei", "synth-study",
    "compare-prob-models",
]  # fmt: skip


def test_help_lists_every_command_once_grouped_in_panels() -> None:
    """Issue 17: help groups the commands by what a user does (cli.PANELS); none is lost."""
    from typer.testing import CliRunner

    from microseg.cli import PANELS, app

    group = typer.main.get_command(app)
    commands = group.list_commands(None)
    extra = set(commands) - set(COMMANDS_BEFORE_SPLIT)
    assert extra == set(COMMANDS_ADDED)
    assert set(COMMANDS_BEFORE_SPLIT) <= set(commands)
    out = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    panels: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("╭─ "):
            title = panels.setdefault(line[3:].split(" ─")[0], [])
        elif line.startswith("│ ") and line[2] != " " and line.split()[1] in commands:
            title.append(line.split()[1])
    panels.pop("Options")
    assert list(panels) == list(PANELS)
    assert sorted(n for names in panels.values() for n in names) == sorted(commands)
    for title, names in panels.items():  # in the panel's order, whatever order COMMANDS has
        assert names == [n for n in PANELS[title] if n in names], title


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
