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
