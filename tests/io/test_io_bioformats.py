"""Reading users' formats through bioio: channel/scene/time selection, pixel sizes, bad files.

Every fixture file is written by the format's own writer (bioio's OME-TIFF and OME-Zarr
writers, Zeiss' pylibCZIrw, tifffile, Pillow) and read back through :func:`read_image`.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from microseg.errors import ConfigError, DataFormatError, MicrosegError, MissingFileError
from microseg.io.bioformats import ImageData, pixel_size_nm, read_image
from microseg.io.tiff import open_stack, write_stack

RNG = np.random.default_rng(7)
ZCYX = RNG.integers(0, 4000, (3, 2, 16, 20), dtype=np.uint16)
TZYX = RNG.integers(0, 4000, (4, 3, 8, 9), dtype=np.uint16)


@pytest.fixture(scope="module")
def ome_zcyx(tmp_path_factory):
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    path = tmp_path_factory.mktemp("ome") / "zcyx.ome.tiff"
    OmeTiffWriter.save(
        ZCYX,
        path,
        dim_order="ZCYX",
        channel_names=["DAPI", "GFP"],
        physical_pixel_sizes=PhysicalPixelSizes(Z=0.5, Y=0.1, X=0.1),
    )
    return path


def test_ome_tiff_channel_by_index_gives_that_plane_and_pixel_sizes(ome_zcyx):
    data = read_image(ome_zcyx, channel=1)
    assert isinstance(data, ImageData)
    assert data.dims == "ZYX"
    assert data.array.dtype == np.uint16
    np.testing.assert_array_equal(data.array, ZCYX[:, 1])
    np.testing.assert_allclose(data.pixel_size_um, (0.5, 0.1, 0.1))
    np.testing.assert_allclose(pixel_size_nm(data), (500.0, 100.0, 100.0))
    assert data.channel_names == ("DAPI", "GFP")
    assert data.path == ome_zcyx


@pytest.mark.parametrize("name", ["DAPI", "dapi"])
def test_ome_tiff_channel_by_name(ome_zcyx, name):
    np.testing.assert_array_equal(read_image(ome_zcyx, channel=name).array, ZCYX[:, 0])


def test_multichannel_without_channel_lists_the_channels(ome_zcyx):
    with pytest.raises(ConfigError) as err:
        read_image(ome_zcyx)
    message = str(err.value)
    assert ome_zcyx.name in message and "'DAPI'" in message and "'GFP'" in message
    assert "2 channels" in message


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"channel": 2}, "valid channels are 0..1"),
        ({"channel": "RFP"}, "no channel named 'RFP'"),
        ({"channel": 0, "scene": 1}, "valid scenes are 0..0"),
        ({"channel": 0, "timepoint": 3}, "valid timepoints are 0..0"),
    ],
)
def test_out_of_range_selection_names_the_valid_range(ome_zcyx, kwargs, expect):
    with pytest.raises(ConfigError, match=expect) as err:
        read_image(ome_zcyx, **kwargs)
    assert ome_zcyx.name in str(err.value)


@pytest.fixture(scope="module")
def ome_tzyx(tmp_path_factory):
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    path = tmp_path_factory.mktemp("ome") / "tzyx.ome.tif"
    OmeTiffWriter.save(
        TZYX, path, dim_order="TZYX", physical_pixel_sizes=PhysicalPixelSizes(2.0, 0.3, 0.3)
    )
    return path


def test_timepoint_selects_one_volume(ome_tzyx):
    data = read_image(ome_tzyx, timepoint=2)
    assert data.dims == "ZYX"
    np.testing.assert_array_equal(data.array, TZYX[2])
    np.testing.assert_allclose(data.pixel_size_um, (2.0, 0.3, 0.3))


def test_time_axis_kept_when_no_timepoint_given(ome_tzyx):
    data = read_image(ome_tzyx)
    assert data.dims == "TZYX"
    np.testing.assert_array_equal(data.array, TZYX)
    with pytest.raises(ConfigError, match="4 timepoints"):
        read_image(ome_tzyx, keep_time=False)
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        read_image(ome_tzyx, timepoint=4)


def test_scene_by_index_and_by_ome_image_name(tmp_path):
    from bioio_base.types import PhysicalPixelSizes
    from bioio_ome_tiff.writers import OmeTiffWriter

    path = tmp_path / "scenes.ome.tif"
    first, second = TZYX[0], TZYX[1, 0]
    OmeTiffWriter.save(
        [first, second],
        path,
        dim_order=["ZYX", "YX"],
        image_name=["first", "second"],
        physical_pixel_sizes=[
            PhysicalPixelSizes(2.0, 0.3, 0.3),
            PhysicalPixelSizes(None, 0.5, 0.5),
        ],
    )
    by_index = read_image(path, scene=1)
    assert by_index.dims == "YX"
    np.testing.assert_array_equal(by_index.array, second)
    np.testing.assert_allclose(by_index.pixel_size_um, (0.5, 0.5))
    np.testing.assert_array_equal(read_image(path, scene="first").array, first)
    np.testing.assert_array_equal(read_image(path, scene="Image:1").array, second)
    with pytest.raises(ConfigError, match="first"):
        read_image(path, scene="third")


def test_ome_tiff_physical_size_units_are_honoured(tmp_path):
    path = tmp_path / "nm.ome.tif"
    meta = {"axes": "ZYX", "PhysicalSizeX": 94, "PhysicalSizeXUnit": "nm"}
    meta |= {"PhysicalSizeY": 94, "PhysicalSizeYUnit": "nm"}
    meta |= {"PhysicalSizeZ": 0.5, "PhysicalSizeZUnit": "µm"}
    tifffile.imwrite(path, TZYX[0], ome=True, metadata=meta)
    np.testing.assert_allclose(read_image(path).pixel_size_um, (0.5, 0.094, 0.094))


def test_ome_zarr_from_bioio_writer(tmp_path):
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    path = tmp_path / "img.ome.zarr"
    czyx = np.moveaxis(ZCYX, 1, 0)
    writer = OMEZarrWriter(
        str(path),
        level_shapes=czyx.shape,
        dtype=czyx.dtype,
        axes_names=["c", "z", "y", "x"],
        axes_types=["channel", "space", "space", "space"],
        axes_units=[None, "micrometer", "micrometer", "micrometer"],
        physical_pixel_size=[1.0, 0.8, 0.2, 0.25],
        channels=[Channel(label="DAPI", color="0000FF"), Channel(label="GFP", color="00FF00")],
    )
    writer.write_full_volume(czyx)
    data = read_image(path, channel="GFP")
    assert data.dims == "ZYX"
    np.testing.assert_array_equal(data.array, ZCYX[:, 1])
    np.testing.assert_allclose(data.pixel_size_um, (0.8, 0.2, 0.25))
    assert data.channel_names == ("DAPI", "GFP")


def test_ome_zarr_in_nanometres_and_without_units(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    for name, units, expect in (("nm", "nanometer", (0.5, 0.1)), ("none", None, None)):
        group = zarr.open_group(str(tmp_path / f"{name}.ome.zarr"), mode="w")
        axes_units = dict.fromkeys("yx", units) if units else None
        scale = {"y": 500.0, "x": 100.0} if units else {"y": 1.0, "x": 1.0}
        write_image(
            TZYX[0, 0], group, scale_factors=[], axes="yx", scale=scale, axes_units=axes_units
        )
        data = read_image(tmp_path / f"{name}.ome.zarr")
        np.testing.assert_array_equal(data.array, TZYX[0, 0])
        if expect is None:
            assert data.pixel_size_um is None  # a scale without a unit is not physical
        else:
            np.testing.assert_allclose(data.pixel_size_um, expect)


def test_czi_written_by_pylibczirw(tmp_path):
    from pylibCZIrw import czi as pyczi

    path = tmp_path / "two.czi"
    cyx = RNG.integers(0, 60000, (2, 3, 24, 32), dtype=np.uint16)  # C, Z, Y, X
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for c in range(2):
            for z in range(3):
                czi.write(cyx[c, z][..., None], plane={"C": c, "Z": z})
        # CZI keeps scaling in metres (<Distance><Value>), whatever the docstring says
        czi.write_metadata(
            channel_names={0: "DAPI", 1: "GFP"}, scale_x=0.2e-6, scale_y=0.25e-6, scale_z=1.5e-6
        )
    data = read_image(path, channel=1)
    assert data.dims == "ZYX"
    np.testing.assert_array_equal(data.array, cyx[1])
    np.testing.assert_allclose(data.pixel_size_um, (1.5, 0.25, 0.2))
    assert data.channel_names == ("DAPI", "GFP")
    np.testing.assert_array_equal(read_image(path, channel="DAPI").array, cyx[0])


def test_random_bytes_named_tif_give_a_clear_error(tmp_path, caplog):
    path = tmp_path / "noise.tif"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with caplog.at_level(logging.WARNING), pytest.raises(DataFormatError) as err:
        read_image(path)
    message = str(err.value)
    assert str(path) in message and "not a TIFF file" in message
    assert "Traceback" not in message
    assert not [r for r in caplog.records if r.name.startswith("bioio")]  # no bioio noise
    assert not logging.getLogger("bioio.bio_image").filters  # our log filters are gone again
    assert not logging.getLogger("tifffile").filters


def test_truncated_ome_tiff_gives_a_clear_error(tmp_path, ome_zcyx):
    data = ome_zcyx.read_bytes()
    path = tmp_path / "cut.ome.tiff"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError) as err:
        read_image(path, channel=0)
    assert str(path) in str(err.value)
    assert "corrupt" in str(err.value) or "truncated" in str(err.value)


def test_unsupported_file_and_missing_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(DataFormatError, match="no installed reader"):
        read_image(text)
    with pytest.raises(MissingFileError, match="found nothing"):
        read_image(tmp_path / "absent.czi")
    with pytest.raises(MicrosegError):  # both are MicrosegError: the CLI prints them plainly
        read_image(tmp_path / "absent.czi")


def test_plain_png_grey_and_rgb(tmp_path):
    grey = RNG.integers(0, 255, (10, 12), dtype=np.uint8)
    rgb = RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    data = read_image(tmp_path / "grey.png")
    assert data.dims == "YX" and data.pixel_size_um is None
    np.testing.assert_array_equal(data.array, grey)
    with pytest.raises(ConfigError, match="'R', 1='G', 2='B'"):
        read_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", channel="G").array, rgb[..., 1])
    (tmp_path / "bad.png").write_bytes(b"not a png" * 10)
    with pytest.raises(DataFormatError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png")


def test_plain_zyx_tiff_without_metadata(tmp_path):
    path = tmp_path / "plain.tif"
    zyx = TZYX[0].copy()
    tifffile.imwrite(path, zyx, photometric="minisblack")
    data = read_image(path)
    assert data.dims == "ZYX" and data.pixel_size_um is None
    np.testing.assert_array_equal(data.array, zyx)


def test_tiff_pixel_sizes_agree_with_the_tiff_module(tmp_path):
    """ImageJ spacing/resolution read as microseg.io.tiff reads them; DPI is not optics."""
    imagej = write_stack(tmp_path / "ij.tif", TZYX[0], voxel_size_nm=(500.0, 94.0, 94.0))
    with open_stack(imagej) as stack:
        expected_nm = stack.voxel_size_nm
    np.testing.assert_allclose(pixel_size_nm(read_image(imagej)), expected_nm, rtol=1e-6)
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, TZYX[0, 0], resolution=(72, 72))  # inch: bioio alone says 352 µm
    assert read_image(dpi).pixel_size_um is None
    only_xy = write_stack(tmp_path / "xy.tif", TZYX[0], voxel_size_nm=(float("nan"), 94, 94))
    size = read_image(only_xy).pixel_size_um
    assert np.isnan(size[0]) and size[1:] == pytest.approx((0.094, 0.094))


def test_rgb_tiff_samples_count_as_channels(tmp_path):
    path = tmp_path / "rgb.tif"
    rgb = RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb)
    data = read_image(path, channel=2)
    assert data.dims == "YX" and data.channel_names == ("R", "G", "B")
    np.testing.assert_array_equal(data.array, rgb[..., 2])


def test_reads_only_what_was_asked(ome_zcyx, monkeypatch):
    """One channel goes through bioio's lazy reader with C fixed, never the whole file."""
    from bioio import BioImage

    seen = []
    original = BioImage.get_image_dask_data

    def spy(self, dimension_order_out=None, **kwargs):
        seen.append((dimension_order_out, kwargs))
        return original(self, dimension_order_out, **kwargs)

    monkeypatch.setattr(BioImage, "get_image_dask_data", spy)
    monkeypatch.setattr(BioImage, "data", property(lambda self: pytest.fail("read it all")))
    read_image(ome_zcyx, channel=1)
    assert seen == [("ZYX", {"C": 1, "T": 0})]
