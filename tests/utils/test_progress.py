"""Progress bars only where someone watches: the rule, and tqdm, Lightning and Ultralytics
following it (tqdm's own reading of ``TQDM_DISABLE`` is the reference)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microseg.errors import ConfigError
from microseg.utils import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv(progress.TQDM_ENV, raising=False)
    return monkeypatch


def test_terminal_decides_when_nothing_is_set(clean_env: pytest.MonkeyPatch) -> None:
    assert progress.progress_enabled(_Tty()) is True
    assert progress.progress_enabled(io.StringIO()) is False  # a pipe, a file, DVC's log
    clean_env.setattr(sys, "stderr", io.StringIO())
    assert progress.progress_enabled() is False and progress.bar_disabled() is True
    clean_env.setattr(sys, "stderr", _Tty())
    assert progress.bar_disabled() is False
    assert progress.bar_disabled(progress=False) is True  # a caller's "no" stays no


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("true", True), ("0", False), ("OFF", False)]
)
def test_microseg_progress_overrides_terminal_and_tqdm(
    clean_env: pytest.MonkeyPatch, value: str, on: bool
) -> None:
    clean_env.setenv(progress.ENV, value)
    clean_env.setenv(progress.TQDM_ENV, "1")
    assert progress.progress_enabled(_Tty()) is on
    assert progress.progress_enabled(io.StringIO()) is on


def test_tqdm_disable_is_read_as_tqdm_reads_it(clean_env: pytest.MonkeyPatch) -> None:
    for value in ("1", "0", "yes"):  # tqdm: any non-empty value disables, "0" too
        clean_env.setenv(progress.TQDM_ENV, value)
        assert progress.progress_enabled(_Tty()) is False
    clean_env.setenv(progress.TQDM_ENV, "")
    assert progress.progress_enabled(_Tty()) is True


def test_bad_value_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(progress.ENV, "sometimes")
    with pytest.raises(ConfigError, match="MICROSEG_PROGRESS must be 0 or 1"):
        progress.progress_enabled()


_BAR = """
from microseg.utils.progress import export_to_tqdm
export_to_tqdm()
from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm
bars = [tqdm(range(3), desc="plain"), auto_tqdm(range(3), desc="auto")]
print([b.disable for b in bars])
for b in bars:
    list(b)
"""


def _bars(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in (progress.ENV, progress.TQDM_ENV)}
    return subprocess.run(
        [sys.executable, "-c", _BAR], env={**base, **env}, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip


def test_export_to_tqdm_turns_bars_off_on_a_pipe_and_on_when_asked() -> None:
    """stderr is a pipe here, as under DVC or CI: tqdm itself must draw nothing."""
    quiet = _bars({})
    assert quiet.stdout.strip() == "[True, True]" and "it/s" not in quiet.stderr
    forced = _bars({progress.ENV: "1"})
    assert forced.stdout.strip() == "[False, False]"
    assert forced.stderr.count("it/s") >= 2  # both bars drew
    user = _bars({progress.TQDM_ENV: "1", progress.ENV: ""})
    assert user.stdout.strip() == "[True, True]"


def test_export_sets_and_clears_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(sys, "stderr", io.StringIO())
    progress.export_to_tqdm()
    assert os.environ[progress.TQDM_ENV] == "1"
    clean_env.setenv(progress.ENV, "1")
    progress.export_to_tqdm()
    assert progress.TQDM_ENV not in os.environ


def test_lightning_bar_follows_the_rule(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from microseg.train.engine import EngineConfig, StderrProgressBar, build_trainer

    def bar(cfg: EngineConfig) -> object:
        return build_trainer(cfg, tmp_path, monitor="m", mode="max").progress_bar_callback

    clean_env.setattr(sys, "stderr", io.StringIO())
    assert bar(EngineConfig(device="cpu")) is None  # asked for, nobody watches
    clean_env.setenv(progress.ENV, "1")
    assert isinstance(bar(EngineConfig(device="cpu")), StderrProgressBar)
    assert bar(EngineConfig(device="cpu", progress=False)) is None  # params say no


def test_ultralytics_bars_off_inside_quiet_bars_only() -> None:
    from ultralytics.utils.tqdm import TQDM

    from microseg.models.yolo.runs import quiet_bars

    out = io.StringIO()
    with quiet_bars(True):
        bar = TQDM(range(3), file=out, disable=False)
        list(bar)
    assert bar.disable and out.getvalue() == ""
    with quiet_bars(False):
        assert not TQDM(range(3), file=io.StringIO(), disable=False).disable
    after = TQDM(range(3), file=out, disable=False)  # the class is restored
    list(after)
    assert not after.disable and "3/3" in out.getvalue()
