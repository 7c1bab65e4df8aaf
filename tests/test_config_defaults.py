"""Where params come from when ``--params`` is not given: ./params.yaml, else the copy the
wheel carries, else (a source checkout) the repository's."""

from __future__ import annotations

from pathlib import Path

import pytest

from microseg import config
from microseg.cli._options import load, params_path
from microseg.errors import MissingFileError

REPO = Path(__file__).resolve().parents[1]


def test_the_working_directory_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 7\n")
    assert config.default_params_path() == Path("params.yaml")
    assert load(Path("params.yaml"), None).seed == 7


def test_elsewhere_the_packaged_then_the_source_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # this checkout is a source install: the repository's params.yaml beside src/
    assert config.packaged_params_path() is None
    assert config.default_params_path() == REPO / "params.yaml"
    assert params_path(Path("params.yaml")) == REPO / "params.yaml"
    assert load(None, ["seed=3"]).seed == 3
    packaged = tmp_path / "site" / "params.yaml"
    packaged.parent.mkdir()
    packaged.write_text("seed: 11\n")
    monkeypatch.setattr(config, "packaged_params_path", lambda: packaged)
    assert load(Path("params.yaml"), None).seed == 11
    monkeypatch.setattr(config, "packaged_params_path", lambda: None)
    monkeypatch.setattr(config, "source_params_path", lambda: None)
    with pytest.raises(MissingFileError, match="no default params"):
        config.default_params_path()


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"other\.yaml"):
        load(tmp_path / "other.yaml", None)
