"""`microseg view` as a user calls it: the layers it found, the window or the screenshot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from microseg.cli.viewing import view
from microseg.errors import MicrosegError
from microseg.io.tiff import write_stack

app = typer.Typer()
app.command()(view)


@app.callback()
def _root() -> None:
    """Keeps `view` a named sub-command, as in the microseg app."""


def _result(tmp_path: Path) -> tuple[Path, Path]:
    stack = write_stack(tmp_path / "stack.tif", np.zeros((4, 16, 16), np.uint16), (500, 94, 94))
    folder = tmp_path / "pred"
    folder.mkdir()
    pd.DataFrame({"x": [3.0], "y": [4.0], "z": [1.0], "score": [0.8]}).to_csv(
        folder / "spines.csv", index=False
    )
    return folder, stack


def test_view_lists_the_layers_and_opens_them(tmp_path: Path, monkeypatch) -> None:
    from microseg.report import napari_viewer

    opened = []
    monkeypatch.setattr(napari_viewer, "open_viewer", lambda *args: opened.append(args))
    folder, stack = _result(tmp_path)
    res = CliRunner().invoke(app, ["view", str(folder), "--image", str(stack)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "napari: stack (image), spines (points)"
    ((result_dir, image, layers),) = opened
    assert (result_dir, image) == (folder, stack)
    assert [kw["name"] for _, kw, _ in layers] == ["stack", "spines"]


def test_view_screenshot_path_reaches_the_renderer(tmp_path: Path, monkeypatch) -> None:
    from microseg.report import napari_viewer

    calls = []
    monkeypatch.setattr(
        napari_viewer, "save_screenshot", lambda *args: calls.append(args) or args[1]
    )
    folder, stack = _result(tmp_path)
    png = tmp_path / "shot.png"
    args = ["view", str(folder), "--screenshot", str(png), "--image", str(stack)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"screenshot -> {png}"
    assert calls == [(folder, png, stack)]


def test_view_of_a_folder_without_results_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["view", str(tmp_path)])
    assert isinstance(res.exception, MicrosegError)
    assert "found no results to show" in str(res.exception)


def test_view_screenshot_without_qt_names_the_fix(tmp_path: Path) -> None:
    pytest.importorskip("napari", reason="napari is the optional 'viewer' extra")
    try:
        import qtpy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("a Qt binding is installed here: nothing is missing")
    folder, _ = _result(tmp_path)
    res = CliRunner().invoke(app, ["view", str(folder), "--screenshot", str(tmp_path / "s.png")])
    assert isinstance(res.exception, MicrosegError)
    assert "uv sync --extra viewer" in str(res.exception)
    assert "\n" not in str(res.exception)
