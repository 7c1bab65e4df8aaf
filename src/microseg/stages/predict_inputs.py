"""What ``microseg predict`` reads: any image a task takes, as the array its models want.

Microscope formats (OME-TIFF, CZI, ND2, LIF, OME-Zarr, PNG, plain TIFF) are read through
:func:`microseg.io.bioformats.read_image`, which picks a channel, a scene and a timepoint and
says which axes the array has. A task then keeps the axes its models take:

* nuclei: one 2D image, ``YX`` (or ``YXC`` with up to 4 colour channels): every other axis
  must have one element (a Z stack or a time-lapse names ``--timepoint``/``--task tracking``);
* tracking: a time-lapse ``TYX`` (a plain multi-page TIFF without axes metadata counts its
  pages as frames), or a Cell Tracking Challenge folder of ``t###.tif`` frames;
* spines: a ``ZYX`` TIFF stack, read plane by plane by the spine predictors themselves; a
  channel of a ``ZCYX`` OME-TIFF or a CZI/ND2/LIF/OME-Zarr stack is read through bioio and
  streamed from a scratch TIFF with its voxel size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microseg.errors import ConfigError, DataFormatError, MicrosegError, MissingFileError

#: files a folder run picks up (a ``.zarr`` folder counts as one image)
IMAGE_SUFFIXES = (
    ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".czi", ".nd2", ".lif", ".zarr",
)  # fmt: skip
STACK_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: endings that are one suffix to the user (``a.ome.tif`` has stem ``a``)
_DOUBLE = (".ome.tif", ".ome.tiff", ".ome.zarr")
_FRAME = re.compile(r"^t(\d+)\.tiff?$")
PixelSize = tuple[float, ...] | None
Voxel = tuple[float, float, float] | None


@dataclass
class Input:
    """One input of a task: ``array`` (nuclei ``YX``/``YXC``, tracking ``TYX``/``TYXC``) or,
    for spines, the stack's ``path`` (read lazily); sizes as the file or the user gave them."""

    name: str
    array: np.ndarray | None = None
    path: Path | None = None
    pixel_size_um: PixelSize = None
    voxel_size_nm: Voxel = None


@dataclass(frozen=True)
class ReadOptions:
    """``--channel``, ``--scene``, ``--timepoint`` and the sizes the files may not carry."""

    channel: int | str | None = None
    scene: int | str | None = None
    timepoint: int | None = None
    pixel_size_um: PixelSize = None
    voxel_size_nm: Voxel = None


def stem(path: Path) -> str:
    """The name outputs are called after (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for ending in _DOUBLE:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return path.stem if path.suffix else name


def is_ctc_folder(path: Path) -> bool:
    """A folder of ``t###.tif`` frames (a CTC sequence)."""
    return path.is_dir() and any(_FRAME.match(p.name) for p in path.iterdir())


def is_single(source: Path, task: str) -> bool:
    """One input (a file, a ``.zarr`` image, a CTC sequence) rather than a folder of them."""
    if not source.is_dir():
        return True
    return source.suffix.lower() == ".zarr" or (task == "tracking" and is_ctc_folder(source))


def list_inputs(source: Path, task: str) -> list[Path]:
    """The inputs of a folder, sorted (hidden files and this command's outputs skipped)."""
    if not source.exists():
        raise MissingFileError("expected an image, or a folder of images, found nothing", source)
    if is_single(source, task):
        return [source]
    suffixes = (
        tuple(s for s in IMAGE_SUFFIXES if s not in RASTER_SUFFIXES)
        if task == "spines"
        else IMAGE_SUFFIXES
    )
    found = [p for p in sorted(source.iterdir()) if _is_input(p, task, suffixes)]
    if not found:
        kinds = ", ".join(suffixes)
        raise ConfigError(f"no images ({kinds}) in {source}")
    return found


def _is_input(path: Path, task: str, suffixes: tuple[str, ...]) -> bool:
    """A folder entry the task reads: not hidden, not one of this command's outputs."""
    if path.name.startswith(".") or path.name.endswith("_RES") or _is_output(path):
        return False
    if task == "tracking" and is_ctc_folder(path):
        return True
    suffix = path.suffix.lower()
    return suffix in suffixes and (path.is_file() or suffix == ".zarr")


def _is_output(path: Path) -> bool:
    """Files this command writes (a result folder inside the input folder is not re-read)."""
    s = stem(path)
    return s.endswith(("_labels", "_probability", "_uncertainty"))


def read_input(path: Path, task: str, options: ReadOptions | None = None) -> Input:
    """``path`` as the task's :class:`Input`; a file that cannot be read raises a
    :class:`~microseg.errors.MicrosegError` naming it."""
    options = options or ReadOptions()
    name = stem(path)
    if task == "spines":
        if _plain_stack(path, options):
            return Input(name, path=path, voxel_size_nm=options.voxel_size_nm)
        return _spine_stack(path, name, options)
    if task == "tracking" and is_ctc_folder(path):
        return Input(name, read_ctc_frames(path), path=path, pixel_size_um=options.pixel_size_um)
    plain = _read_plain(path, task, options)
    if plain is not None:
        return plain
    from microseg.io.bioformats import read_image

    try:
        data = read_image(
            path,
            channel=options.channel,
            scene=options.scene,
            timepoint=options.timepoint,
            keep_time=task == "tracking",
        )
    except ConfigError:
        colour = _colour_image(path) if task == "nuclei" and options.channel is None else None
        if colour is None:
            raise
        return Input(name, colour, path=path, pixel_size_um=_yx(options.pixel_size_um))
    except MicrosegError:
        raise
    except Exception as exc:  # a reader library's own error on a corrupt file
        raise DataFormatError(f"cannot read ({type(exc).__name__}: {exc})", path) from exc
    array = to_task_axes(np.asarray(data.array), str(data.dims), task, path)
    pixel = options.pixel_size_um or data.pixel_size_um
    return Input(name, array, path=path, pixel_size_um=_yx(pixel))


def _plain_stack(path: Path, options: ReadOptions) -> bool:
    """A ZYX TIFF the spine predictors stream plane by plane (no channel to pick)."""
    if options.channel is not None or options.scene is not None or options.timepoint is not None:
        return False
    if path.suffix.lower() not in STACK_SUFFIXES:
        return False
    return "C" not in _tiff_axes(path).replace("S", "C")


def _spine_stack(path: Path, name: str, options: ReadOptions) -> Input:
    """A stack that needs bioio (a channel of a ZCYX OME-TIFF, a CZI/ND2/LIF/OME-Zarr
    stack): read once, its ZYX channel written to a scratch TIFF with the voxel size from the
    metadata, which the spine predictors then stream as any stack. The scratch folder goes
    when the process ends."""
    from microseg.io import tiff
    from microseg.io.bioformats import read_image

    data = read_image(
        path, channel=options.channel, scene=options.scene, timepoint=options.timepoint,
        keep_time=False,
    )  # fmt: skip
    if str(data.dims) != "ZYX":
        raise DataFormatError(f"spines need a ZYX stack, this selection has axes {data.dims}", path)
    voxel = options.voxel_size_nm
    if voxel is None and data.pixel_size_um is not None and len(data.pixel_size_um) == 3:
        found = tuple(float(v) * 1e3 for v in data.pixel_size_um)
        voxel = found if all(np.isfinite(found)) else None  # type: ignore[assignment]
    scratch = _scratch_dir() / f"{name}.tif"
    tiff.write_stack(scratch, np.asarray(data.array), voxel)
    return Input(name, path=scratch, voxel_size_nm=voxel)


def _scratch_dir() -> Path:
    import atexit
    import shutil
    import tempfile

    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="microseg-stacks-"))
        atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
    return _SCRATCH


_SCRATCH: Path | None = None


def _read_plain(path: Path, task: str, options: ReadOptions) -> Input | None:
    """PNG/JPEG and plain (ImageJ) TIFF through Pillow and tifffile, when nothing asks for a
    channel, scene or timepoint: importing bioio and finding its plugin costs seconds per
    run, more than a small image takes to segment. None when the file needs bioio (OME,
    microscope formats, a choice of channel)."""
    if options.channel is not None or options.scene is not None or options.timepoint is not None:
        return None
    suffix = path.suffix.lower()
    pixel = options.pixel_size_um
    if suffix in RASTER_SUFFIXES and task == "nuclei":
        from microseg.io.png import read_image

        return Input(stem(path), read_image(path), path=path, pixel_size_um=_yx(pixel))
    if suffix not in STACK_SUFFIXES or path.name.lower().endswith(_DOUBLE):
        return None
    from microseg.io import tiff

    axes = _tiff_axes(path).replace("S", "C")
    with tiff.open_stack(path) as stack:  # corrupt or truncated files fail here, named
        array = stack.asarray()
        found = stack.voxel_size_nm
    if len(axes) != array.ndim or ("C" in axes and not axes.endswith("YXC")):
        return None  # channels of a microscope file: bioio names them
    if task == "nuclei" and array.ndim > 2 and "C" not in axes:
        return None  # a stack or a time-lapse: bioio's error says which axis to pick
    if pixel is None and found is not None:
        pixel = tuple(v / 1e3 for v in found[-2:])
    array = to_task_axes(array, axes, task, path)
    return Input(stem(path), array, path=path, pixel_size_um=_yx(pixel))


def _tiff_axes(path: Path) -> str:
    """tifffile's axes of the first series (``Q``/``I`` for pages of unknown meaning)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return str(tif.series[0].axes) if tif.series else ""
    except Exception:  # unreadable: io.tiff names the problem
        return ""


def _colour_image(path: Path) -> np.ndarray | None:
    """An RGB(A) PNG/JPEG/TIFF as ``YXC`` (alpha dropped), the way the nuclei models were
    trained on colour (H&E) images; None for anything else (a multichannel microscope file
    needs ``--channel``)."""
    from microseg.io.png import read_png, to_image

    suffix = path.suffix.lower()
    if suffix in STACK_SUFFIXES:
        from microseg.io.tiff import read_stack

        image = read_stack(path)
    elif suffix in RASTER_SUFFIXES:
        image = read_png(path)
    else:
        return None
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        return None
    return to_image(image)


def _yx(pixel: PixelSize) -> PixelSize:
    """The in-plane ``(y, x)`` of a pixel size (a Z spacing is no business of 2D models);
    None unless both are known."""
    if not pixel:
        return None
    yx = tuple(float(v) for v in pixel[-2:])
    return yx if all(np.isfinite(yx)) and all(v > 0 for v in yx) else None


def array_input(
    array: np.ndarray,
    task: str,
    name: str = "image",
    pixel_size_um: PixelSize = None,
    channel: int | None = None,
) -> Input:
    """An in-memory array as an :class:`Input`: nuclei ``YX``/``YXC`` (or ``CYX`` with
    ``channel``), tracking ``TYX``; spines arrays are written to a TIFF by the caller."""
    array = np.asarray(array)
    if channel is not None:
        if array.ndim < 3:
            raise ConfigError(f"channel={channel}: the array has no channel axis ({array.shape})")
        axis = array.ndim - 1 if array.shape[-1] <= 4 else array.ndim - 3
        array = np.take(array, channel, axis=axis)
    want = {"nuclei": (2, 3), "tracking": (3, 4)}[task]
    if array.ndim not in want:
        shape = "YX or YXC" if task == "nuclei" else "TYX"
        raise DataFormatError(f"expected a {shape} array for {task}, found shape {array.shape}")
    return Input(name, array, pixel_size_um=_yx(pixel_size_um))


def to_task_axes(array: np.ndarray, dims: str, task: str, path: Path | None = None) -> np.ndarray:
    """The axes a task takes (see the module docstring), from ``array`` with axes ``dims``."""
    dims = dims.upper().replace("S", "C")  # bioio calls RGB samples S
    if len(dims) != array.ndim:
        raise DataFormatError(f"axes {dims!r} do not match the array's shape {array.shape}", path)
    keep = {"Y", "X", "C"} | ({"T"} if task == "tracking" else set())
    if task == "tracking" and "T" not in dims:
        spare = [d for d, n in zip(dims, array.shape, strict=True) if d not in "YXC" and n > 1]
        if len(spare) == 1:  # a plain multi-page TIFF: its pages are the frames
            dims = dims.replace(spare[0], "T")
    for axis in reversed(range(len(dims))):
        if dims[axis] not in keep and array.shape[axis] == 1:
            array = np.take(array, 0, axis=axis)
            dims = dims[:axis] + dims[axis + 1 :]
    extra = [f"{d}={n}" for d, n in zip(dims, array.shape, strict=True) if d not in keep]
    if extra:
        hint = (
            "a time-lapse: pick a frame with --timepoint, or track it with --task tracking"
            if "T" in dims
            else "a Z stack: nuclei and tracking models take 2D frames"
        )
        raise DataFormatError(f"{hint} (axes {dims}, extra {', '.join(extra)})", path)
    if task == "tracking" and "T" not in dims:
        raise DataFormatError(
            f"expected a time-lapse (T axis, or frames as pages), found axes {dims}", path
        )
    if "C" in dims:
        c = dims.index("C")
        if array.shape[c] == 1:
            array, dims = np.take(array, 0, axis=c), dims.replace("C", "")
        elif array.shape[c] > 4:
            raise DataFormatError(
                f"{array.shape[c]} channels: pick one with --channel (axes {dims})", path
            )
    order = [dims.index(d) for d in "TYXC" if d in dims]
    return np.transpose(array, order)


def read_ctc_frames(folder: Path) -> np.ndarray:
    """The ``t###.tif`` frames of a CTC sequence folder as ``TYX``, in number order."""
    from microseg.io.tiff import read_stack

    frames = {int(m.group(1)): p for p in folder.iterdir() if (m := _FRAME.match(p.name))}
    order = sorted(frames)
    if order != list(range(len(order))):
        gaps = sorted(set(range(order[-1] + 1)) - set(order))
        raise DataFormatError(f"frames t###.tif must be numbered 0..n, missing {gaps[:10]}", folder)
    planes = [read_stack(frames[t], expect_ndim=2) for t in order]
    if len({p.shape for p in planes}) != 1:
        raise DataFormatError(
            f"frames differ in shape: {sorted({p.shape for p in planes})}", folder
        )
    return np.stack(planes)


__all__ = [
    "IMAGE_SUFFIXES",
    "Input",
    "ReadOptions",
    "array_input",
    "is_ctc_folder",
    "is_single",
    "list_inputs",
    "read_ctc_frames",
    "read_input",
    "stem",
    "to_task_axes",
]
