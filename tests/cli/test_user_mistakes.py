"""Issue 18: user mistakes end in one `error:` line naming the file or key, exit 2, no
traceback (MICROSEG_DEBUG=1 shows it), and nothing half-written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    import microseg.cli as cli
    from microseg.cli import main

    monkeypatch.setattr(cli, "_log_files", False)  # main sets it; undone afterwards
    monkeypatch.setattr(sys, "argv", ["microseg", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MICROSEG_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("MICROSEG_DEBUG", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["track", "--model", "unet", "-S", "seed.x=1"], "seed is a value"),
        (["track", "--model", "unet", "-S", "tracking.link.foo=1"], "unknown key(s) ['foo']"),
        (["track", "--model", "unet", "-S", "yollo.epochs=1"], "yollo"),
        (["evaluate", "--model", "otsu", "-S", "spines.match_dist_nm=-5"], "match_dist_nm"),
        (["where"], "spines.mlflow.json: not readable JSON"),
    ],
)
def test_one_line_and_exit_2(workdir: Path, monkeypatch, capsys, argv, said) -> None:
    registry = workdir / "reports" / "registry"
    registry.mkdir(parents=True)
    (registry / "spines.mlflow.json").write_text("{broken")
    code, err = run_main(argv, monkeypatch, capsys)
    assert code == 2, err
    assert said in err and err.strip().splitlines()[-1].startswith("error:"), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MICROSEG_DEBUG", "1")
    code, err = run_main(["track", "--model", "unet", "-S", "seed.x=1"], monkeypatch, capsys)
    assert code == 2 and "Traceback" in err and "error: --set seed.x" in err


def test_ctrl_c_says_how_to_resume(workdir: Path, monkeypatch, capsys) -> None:
    import microseg.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    code, err = run_main(["where"], monkeypatch, capsys)
    assert code == 130 and "again to resume" in err and "Traceback" not in err


def test_sigterm_exits_143_never_0(workdir: Path, monkeypatch, capsys) -> None:
    """Lightning turns SIGTERM into SystemExit(0); the engine raises Terminated instead, and a
    0 here would let DVC record a half-trained model as the stage's output."""
    import microseg.cli as cli
    from microseg.errors import Terminated

    def terminated(*a, **k):
        raise Terminated("SIGTERM after 1 of 4 epochs in models/x")

    monkeypatch.setattr(cli, "app", terminated)
    code, err = run_main(["where"], monkeypatch, capsys)
    assert code == 143 and "by SIGTERM" in err and "again to resume" in err
