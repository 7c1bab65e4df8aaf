from pathlib import Path

import pytest

from microseg.utils.atomic import atomic_path, write_text


def test_file_written_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    write_text(target, "whole")
    assert target.read_text() == "whole"


def test_folder_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        raise ValueError
    assert (target / "old.txt").exists(), "a failed rewrite must keep the previous output"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_suffix_kept_for_writers_that_dispatch_on_it(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.parquet") as tmp:
        assert tmp.suffix == ".parquet"
        tmp.write_bytes(b"x")


def test_folder_swap_leaves_old_or_new_whole_at_every_moment(tmp_path: Path, monkeypatch) -> None:
    """Issue 18: the old folder was deleted before the new one was renamed in, and a SIGKILL
    between the two left a prepared dataset half-deleted. Now the two are exchanged; where the
    system cannot exchange, the old folder is renamed aside whole first."""
    from microseg.utils import atomic

    target = tmp_path / "ds"
    target.mkdir()
    (target / "manifest.parquet").write_text("old")
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def spy(path, *a, **k):  # at the moment the old folder is deleted, the new one is in place
        seen.append((target / "manifest.parquet").read_text())
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(atomic.shutil, "rmtree", spy)
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "manifest.parquet").write_text(f"new{exchange}")
        assert (target / "manifest.parquet").read_text() == f"new{exchange}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert seen[0] == "newTrue" and "newFalse" in seen


def test_leftovers_of_a_killed_process_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".ds.{dead}.abc123.tmp"
    (stale / "images").mkdir(parents=True)
    import os

    live = tmp_path / f".ds.{os.getppid()}.def456.tmp"  # a running writer's: kept
    live.mkdir()
    write_text(tmp_path / "other.txt", "x")
    assert stale.exists()  # another path's write leaves it alone
    with atomic_path(tmp_path / "ds") as tmp:
        tmp.mkdir()
    assert not stale.exists() and live.exists()
