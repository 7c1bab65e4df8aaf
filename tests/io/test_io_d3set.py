"""DeepD3 .d3set files: round trip, DeepD3's own reading pattern, validation."""

from __future__ import annotations

import flammkuchen as fl
import numpy as np
import pandas as pd
import pytest

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.d3set import D3Set, _numpy2_aliases, meta_row, read_d3set, write_d3set

SHAPES = [(5, 48, 64), (7, 40, 56), (4, 32, 32)]


def _d3set() -> D3Set:
    rng = np.random.default_rng(1)
    stacks, dendrites, spines, rows = {}, {}, {}, []
    for i, shape in enumerate(SHAPES):
        key = f"x{i}"
        stacks[key] = rng.integers(0, 4096, shape).astype(np.uint16)
        dendrites[key] = rng.random(shape) > 0.7
        spines[key] = rng.random(shape) > 0.95
        rows.append(meta_row(shape, 0.094, 0.5, f"stack_{i}.tif", timestamp="20240101_120000"))
    return D3Set(stacks, dendrites, spines, pd.DataFrame(rows))


def test_round_trip(tmp_path):
    original = _d3set()
    path = write_d3set(tmp_path / "train.d3set", original)
    loaded = read_d3set(path)
    assert len(loaded) == 3 and loaded.stack_keys() == ["x0", "x1", "x2"]
    for group in ("stacks", "dendrites", "spines"):
        for key in original.stack_keys():
            got, want = getattr(loaded, group)[key], getattr(original, group)[key]
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    pd.testing.assert_frame_equal(loaded.meta, original.meta)
    stack, dendrite, spines = loaded.sample(1)
    assert stack.shape == dendrite.shape == spines.shape == SHAPES[1]


def test_meta_row_matches_deepd3_generator():
    row = meta_row((7, 40, 56), 0.094, 0.5, "a.tif", z_begin=3)
    assert list(row) == [
        "crop", "X", "Y", "Width", "Height", "Depth", "Z_begin", "Z_end",
        "Resolution_XY", "Resolution_Z", "Timestamp", "Generated_from",
    ]  # fmt: skip
    assert (row["Width"], row["Height"], row["Depth"]) == (56, 40, 7)
    assert (row["Z_begin"], row["Z_end"]) == (3, 9)  # inclusive, as DeepD3 writes it


def test_deepd3_datageneratorstream_can_read_it(tmp_path):
    """Access the file exactly as deepd3/training/stream.py does, with plain flammkuchen."""
    path = write_d3set(tmp_path / "train.d3set", _d3set())
    d = fl.load(str(path))  # DataGeneratorStream.__init__: self.d = fl.load(self.fn)
    data, meta = d["data"], d["meta"]
    assert isinstance(meta, pd.DataFrame)
    assert len(meta) == len(data["stacks"]) == 3
    np.random.seed(42)
    size, target_resolution = (1, 16, 16), 0.094
    for _ in range(20):  # _getSample
        r_stack = np.random.choice(len(meta))
        scaling = target_resolution / meta.iloc[r_stack].Resolution_XY
        h, w = round(scaling * size[1]), round(scaling * size[2])
        x = np.random.choice(meta.iloc[r_stack].Width - w)
        y = np.random.choice(meta.iloc[r_stack].Height - h)
        r_plane = np.random.choice(meta.iloc[r_stack].Depth - size[0] + 1)
        z_begin, z_end = r_plane, r_plane + size[0]
        tmp_stack = data["stacks"][f"x{r_stack}"][z_begin:z_end, y : y + h, x : x + w]
        tmp_dendrites = data["dendrites"][f"x{r_stack}"][z_begin:z_end, y : y + h, x : x + w]
        tmp_spines = data["spines"][f"x{r_stack}"][z_begin:z_end, y : y + h, x : x + w]
        assert tmp_stack.shape == tmp_dendrites.shape == tmp_spines.shape == size
        assert tmp_dendrites.dtype == bool and tmp_spines.dtype == bool
    # convert_d3set_to_yolo.py (DeepD3_V2) iterates range(len(meta)) with x{idx}
    for idx in range(len(meta)):
        assert data["stacks"][f"x{idx}"].shape[0] == meta.iloc[idx].Depth
        assert hasattr(meta.iloc[idx], "Resolution_XY")


def test_numpy_aliases_do_not_leak(tmp_path):
    write_d3set(tmp_path / "a.d3set", _d3set())
    read_d3set(tmp_path / "a.d3set")
    assert "unicode_" not in vars(np) and "string_" not in vars(np)


def _raw_save(path, payload):
    with _numpy2_aliases():
        fl.save(str(path), payload, compression="blosc")


def _payload(d3: D3Set) -> dict:
    return {
        "data": {"stacks": d3.stacks, "dendrites": d3.dendrites, "spines": d3.spines},
        "meta": d3.meta,
    }


def test_meta_loaded_as_dict_is_rebuilt(tmp_path):
    d3 = _d3set()
    payload = _payload(d3)
    payload["meta"] = {c: d3.meta[c].to_numpy() for c in d3.meta.columns}  # pandas-3 style
    _raw_save(tmp_path / "m.d3set", payload)
    loaded = read_d3set(tmp_path / "m.d3set")
    assert isinstance(loaded.meta, pd.DataFrame) and len(loaded.meta) == 3
    assert loaded.meta["Width"].tolist() == [64, 56, 32]


def test_missing_group_is_named(tmp_path):
    payload = _payload(_d3set())
    del payload["data"]["spines"]
    _raw_save(tmp_path / "bad.d3set", payload)
    with pytest.raises(DataFormatError, match=r"bad\.d3set.*'data/spines'"):
        read_d3set(tmp_path / "bad.d3set")
    _raw_save(tmp_path / "nometa.d3set", {"data": payload["data"]})
    with pytest.raises(DataFormatError, match="'meta'"):
        read_d3set(tmp_path / "nometa.d3set")


def test_mask_shape_mismatch(tmp_path):
    payload = _payload(_d3set())
    payload["data"]["spines"]["x1"] = payload["data"]["spines"]["x1"][:, :-1]
    _raw_save(tmp_path / "shape.d3set", payload)
    with pytest.raises(ShapeMismatchError, match=r"data/spines/x1 has shape \(7, 39, 56\)"):
        read_d3set(tmp_path / "shape.d3set")


def test_keys_must_agree_and_be_consecutive(tmp_path):
    d3 = _d3set()
    d3.dendrites["x3"] = d3.dendrites.pop("x2")
    with pytest.raises(DataFormatError, match="data/dendrites keys"):
        write_d3set(tmp_path / "k.d3set", d3)
    assert not (tmp_path / "k.d3set").exists()
    assert list(tmp_path.iterdir()) == []


def test_meta_rows_and_columns(tmp_path):
    d3 = _d3set()
    d3.meta = d3.meta.iloc[:2]
    with pytest.raises(DataFormatError, match=r"one meta row per stack \(3\), found 2"):
        write_d3set(tmp_path / "a.d3set", d3)
    d3 = _d3set()
    d3.meta = d3.meta.drop(columns=["Resolution_XY"])
    with pytest.raises(DataFormatError, match="Resolution_XY"):
        write_d3set(tmp_path / "b.d3set", d3)
    d3 = _d3set()
    d3.meta.loc[0, "Width"] = 65  # wider than the stack: DeepD3 would crop outside it
    with pytest.raises(ShapeMismatchError, match="Width=65"):
        write_d3set(tmp_path / "c.d3set", d3)


def test_non_binary_mask_rejected(tmp_path):
    d3 = _d3set()
    d3.spines["x0"] = d3.spines["x0"].astype(np.uint8) * 3
    with pytest.raises(DataFormatError, match="binary mask"):
        write_d3set(tmp_path / "a.d3set", d3)


def test_non_binary_mask_in_a_file_is_refused_when_read(tmp_path):
    """Issue 18: read_d3set skipped the binary check write_d3set applies, so a -1 "ignore"
    patch passed ingest and validate as spine."""
    payload = _payload(_d3set())
    spines = payload["data"]["spines"]["x1"].astype(np.int8)
    spines[0, :3, :3] = -1
    payload["data"]["spines"]["x1"] = spines
    _raw_save(tmp_path / "ignore.d3set", payload)
    with pytest.raises(DataFormatError, match=r"ignore\.d3set.*data/spines/x1.*binary.*-1"):
        read_d3set(tmp_path / "ignore.d3set")
    payload = _payload(_d3set())
    payload["data"]["dendrites"]["x0"] = payload["data"]["dendrites"]["x0"].astype(np.uint8) * 255
    _raw_save(tmp_path / "u8.d3set", payload)
    with pytest.raises(DataFormatError, match="data/dendrites/x0"):
        read_d3set(tmp_path / "u8.d3set")
    ok = payload["data"]["dendrites"]["x0"] // 255  # 0/1 integers are a binary mask
    payload["data"]["dendrites"]["x0"] = ok
    _raw_save(tmp_path / "01.d3set", payload)
    assert read_d3set(tmp_path / "01.d3set").dendrites["x0"].dtype == bool


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.d3set").write_bytes(b"not hdf5" * 100)
    with pytest.raises(DataFormatError, match=r"junk\.d3set"):
        read_d3set(tmp_path / "junk.d3set")
    with pytest.raises(MissingFileError):
        read_d3set(tmp_path / "absent.d3set")
