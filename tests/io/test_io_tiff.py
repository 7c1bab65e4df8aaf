"""TIFF stacks: lazy reads, ImageJ/OME voxel sizes, corrupt input, atomic writes."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from microseg.errors import DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io import tiff as tiff_io
from microseg.io.tiff import TiffStack, check_finite, open_stack, read_stack, write_stack

VOXEL = (500.0, 94.0, 94.0)


def _stack(dtype: str = "uint16", shape: tuple[int, ...] = (6, 40, 52)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "float32":
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
def test_round_trip_keeps_data_and_voxel_size(tmp_path, dtype, compression):
    data = _stack(dtype)
    path = write_stack(tmp_path / "s.tif", data, voxel_size_nm=VOXEL, compression=compression)
    with open_stack(path) as stack:
        assert stack.shape == data.shape
        assert stack.dtype == data.dtype
        assert stack.ndim == 3 and len(stack) == 6
        assert stack.is_memmap == (compression is None)
        np.testing.assert_allclose(stack.voxel_size_nm, VOXEL, rtol=1e-6)
        np.testing.assert_array_equal(stack[2], data[2])
        np.testing.assert_array_equal(stack.plane(-1), data[-1])
        np.testing.assert_array_equal(stack[1:5:2, 3:17, ::4], data[1:5:2, 3:17, ::4])
        np.testing.assert_array_equal(stack[:, 7], data[:, 7])
        assert stack[3, 4, 5] == data[3, 4, 5]
        np.testing.assert_array_equal(np.stack(list(stack.iter_planes())), data)
        np.testing.assert_array_equal(stack.asarray(), data)
    np.testing.assert_array_equal(read_stack(path), data)


def test_imagej_metadata_is_what_fiji_reads(tmp_path):
    path = write_stack(tmp_path / "s.tif", _stack(), voxel_size_nm=VOXEL)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        meta = tif.imagej_metadata
        assert meta["unit"] == "um"
        assert meta["spacing"] == pytest.approx(0.5)
        assert meta["slices"] == 6 and meta["hyperstack"]
        num, den = tif.pages.first.tags["XResolution"].value
        assert num / den == pytest.approx(1 / 0.094)  # pixels per micrometre


def test_uint32_labels_go_to_ome_with_physical_size(tmp_path):
    path = write_stack(tmp_path / "l.tif", _stack("uint32"), voxel_size_nm=VOXEL)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.is_imagej
        assert 'PhysicalSizeZ="0.5"' in tif.ome_metadata


def test_2d_image_and_missing_metadata(tmp_path):
    image = _stack(shape=(30, 20))
    write_stack(tmp_path / "a.tif", image, voxel_size_nm=VOXEL, compression="zlib")
    with open_stack(tmp_path / "a.tif", expect_ndim=2) as stack:
        assert stack.shape == (30, 20)
        z, y, x = stack.voxel_size_nm
        assert math.isnan(z) and (y, x) == pytest.approx((94.0, 94.0))
        np.testing.assert_array_equal(stack[5:9, 2], image[5:9, 2])
    tifffile.imwrite(tmp_path / "plain.tif", _stack())
    with open_stack(tmp_path / "plain.tif") as stack:
        assert stack.voxel_size_nm is None


def test_dpi_resolution_is_not_taken_as_voxel_size(tmp_path):
    tifffile.imwrite(tmp_path / "dpi.tif", _stack(), resolution=(72, 72), resolutionunit="INCH")
    with open_stack(tmp_path / "dpi.tif") as stack:
        assert stack.voxel_size_nm is None
    tifffile.imwrite(
        tmp_path / "cm.tif", _stack(), resolution=(1e5, 1e5), resolutionunit="CENTIMETER"
    )
    with open_stack(tmp_path / "cm.tif") as stack:
        assert stack.voxel_size_nm[1:] == pytest.approx((100.0, 100.0))


def test_plane_read_is_lazy_on_a_100mb_stack(tmp_path):
    shape = (50, 1024, 1024)  # 100 MiB of uint16
    path = tmp_path / "big.tif"
    big = tifffile.memmap(path, shape=shape, dtype=np.uint16, imagej=True)
    big[17] = 7
    big.flush()
    del big
    with open_stack(path) as stack:
        assert stack.is_memmap
        assert isinstance(stack._memmap, np.memmap)
        tracemalloc.start()
        try:
            plane = stack[17]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert plane.shape == shape[1:] and (plane == 7).all()
    assert peak < 3 * plane.nbytes, f"one plane allocated {peak} bytes"


def test_compressed_plane_read_decodes_one_page(tmp_path):
    data = _stack(shape=(40, 256, 256))
    write_stack(tmp_path / "z.tif", data, compression="zlib")
    with open_stack(tmp_path / "z.tif") as stack:
        assert not stack.is_memmap
        tracemalloc.start()
        try:
            plane = stack[20]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(plane, data[20])
    assert peak < 4 * plane.nbytes  # the whole stack would be 40 planes


def test_plane_stays_valid_after_close(tmp_path):
    data = _stack()
    write_stack(tmp_path / "s.tif", data)
    stack = TiffStack(tmp_path / "s.tif")
    plane = stack[1]
    stack.close()
    np.testing.assert_array_equal(plane, data[1])
    with pytest.raises(ValueError, match="closed"):
        stack[0]


def _read_everything(path: Path) -> None:
    with open_stack(path) as stack:
        for z in range(len(stack)):
            stack.plane(z)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff_raises_data_format_error(tmp_path, compression):
    path = write_stack(tmp_path / "cut.tif", _stack(shape=(8, 64, 80)), compression=compression)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.tif"):
        _read_everything(path)


def test_last_page_truncated_is_caught_on_read(tmp_path):
    # a non-ImageJ compressed file: the IFD chain survives, only the last page's data is cut
    path = tmp_path / "tail.tif"
    tifffile.imwrite(path, _stack(shape=(4, 64, 80)), compression="zlib", metadata=None)
    payload = path.read_bytes()
    path.write_bytes(payload[:-100])
    with pytest.raises(DataFormatError, match=r"tail\.tif"):
        _read_everything(path)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(DataFormatError, match=r"junk\.tif"):
        open_stack(tmp_path / "junk.tif")
    with pytest.raises(MissingFileError, match=r"nothing\.tif"):
        open_stack(tmp_path / "nothing.tif")


def test_unsupported_dtype_and_ndim(tmp_path):
    with pytest.raises(DataFormatError, match="int16"):
        write_stack(tmp_path / "a.tif", np.zeros((2, 4, 4), np.int16))
    tifffile.imwrite(tmp_path / "f64.tif", np.zeros((2, 4, 4), np.float64))
    with pytest.raises(DataFormatError, match="float64"):
        read_stack(tmp_path / "f64.tif")
    with pytest.raises(ShapeMismatchError, match="expected a 2D image"):
        read_stack(write_stack(tmp_path / "b.tif", _stack()), expect_ndim=2)
    with pytest.raises(ShapeMismatchError):
        write_stack(tmp_path / "c.tif", np.zeros((2, 2, 4, 4), np.uint8))


def test_check_finite_counts_bad_values():
    array = np.ones((3, 4), np.float32)
    check_finite(array, "ok.tif")
    check_finite(np.zeros(3, np.uint8))
    array[0, 0], array[1, 1], array[2, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(DataFormatError, match=r"prob\.tif.*3 non-finite \(1 NaN, 2 inf\)"):
        check_finite(array, "prob.tif")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = write_stack(tmp_path / "s.tif", _stack())
    before = path.read_bytes()

    def broken(file, *args, **kwargs):
        Path(file).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tiff_io.tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_stack(path, _stack("uint8"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.tif"]


def test_a_header_declaring_gigabytes_in_a_tiny_file_is_refused(tmp_path, monkeypatch):
    """Issue 18: a TIFF declaring 60000x60000 in a few hundred bytes allocated 3.6 GB."""
    import struct

    import tifffile

    from microseg.errors import DataFormatError
    from microseg.io.tiff import open_stack

    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as tif:  # then the header is made to declare 60000 x 60000
        tags = tif.pages[0].tags
        names = ("ImageWidth", "ImageLength", "RowsPerStrip")
        spots = [(tags[n].valueoffset, tags[n].dtype) for n in names]
    data = bytearray(path.read_bytes())
    for offset, dtype in spots:
        fmt = "<H" if int(dtype) == 3 else "<I"
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, 60000)
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 10_000
    with pytest.raises(DataFormatError, match=r"declares 3\.4 GiB.*bomb"):
        open_stack(path)
    monkeypatch.setenv("MICROSEG_ALLOW_LARGE", "1")
    open_stack(path).close()  # opening is lazy: nothing allocated until a plane is read


def test_a_png_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    from PIL import Image

    from microseg.errors import DataFormatError
    from microseg.io.png import read_png

    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 90 000 px is then > 2x the limit
    with pytest.raises(DataFormatError, match="decompression bomb"):
        read_png(tmp_path / "big.png")
