"""napari for a result folder: a headless ``ViewerModel``, a window, or a PNG of the canvas.

napari is the optional ``viewer`` extra and its window needs a Qt binding, which microseg
does not install; both are imported here, only when called, so the rest of microseg (and
the layer tuples of :mod:`microseg.report.napari_layers`) works without them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microseg.errors import MicrosegError
from microseg.report.napari_layers import LayerData, result_layers
from microseg.utils.atomic import atomic_path

if TYPE_CHECKING:
    from napari.components import ViewerModel

#: the one-line fix: napari from the extra, a Qt binding beside it (napari 0.9 deprecates PyQt5)
INSTALL = (
    '`uv sync --extra viewer` and `uv pip install pyqt6` (or `pip install "microseg[viewer]" '
    "pyqt6`)"
)
NO_DISPLAY = (
    "no display for napari to draw on (DISPLAY is unset, and Qt's offscreen platform has no OpenGL)"
)


def _require_napari() -> None:
    try:
        import napari  # noqa: F401
    except ImportError as exc:
        raise MicrosegError(f"napari is not installed ({exc}); install it: {INSTALL}") from exc


def _require_qt() -> None:
    """napari draws through Qt (qtpy picks PyQt5/6 or PySide2/6): fail with the fix, not with
    napari's page-long import error."""
    _require_napari()
    try:
        import qtpy  # noqa: F401
    except ImportError as exc:
        raise MicrosegError(
            f"napari has no Qt binding to draw with ({exc}); install: {INSTALL}"
        ) from exc


def _has_display() -> bool:
    if sys.platform != "linux" or os.environ.get("QT_QPA_PLATFORM"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def add_layers(viewer: Any, layers: list[LayerData]) -> None:
    """``viewer.add_<type>(data, **kwargs)`` per tuple, then the middle plane/frame shown."""
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    dims = viewer.dims
    if dims.ndim > dims.ndisplay:
        steps = list(dims.current_step)
        for axis in dims.not_displayed:
            steps[axis] = dims.nsteps[axis] // 2
        dims.current_step = tuple(steps)
    viewer.reset_view()


def build_viewer_model(result_dir: str | Path, image: str | Path | None = None) -> ViewerModel:
    """A headless ``napari.components.ViewerModel`` holding the folder's layers (no Qt)."""
    _require_napari()
    from napari.components import ViewerModel

    model = ViewerModel(title=f"microseg: {Path(result_dir).name}")
    add_layers(model, result_layers(result_dir, image))
    return model


def _viewer(result_dir: str | Path, show: bool) -> Any:
    import napari

    try:
        return napari.Viewer(title=f"microseg: {Path(result_dir).name}", show=show)
    except ImportError as exc:  # napari.window's own Qt import, when qtpy was fine
        raise MicrosegError(
            f"napari could not load its Qt window ({exc}); install: {INSTALL}"
        ) from exc


def open_viewer(
    result_dir: str | Path,
    image: str | Path | None = None,
    layers: list[LayerData] | None = None,
) -> None:
    """A napari window on the folder's layers (``layers``: already read ones); returns when
    the window is closed."""
    _require_qt()
    if not _has_display():
        raise MicrosegError(f"{NO_DISPLAY}: run it in a desktop session, or use --screenshot")
    import napari

    layers = result_layers(result_dir, image) if layers is None else layers
    viewer = _viewer(result_dir, show=True)
    add_layers(viewer, layers)
    napari.run()


def save_screenshot(
    result_dir: str | Path, png: str | Path, image: str | Path | None = None
) -> Path:
    """The canvas as napari draws the folder's layers (middle plane), written atomically to
    ``png``. napari draws only a shown window, so one opens for a moment: headless machines
    need a virtual display (``xvfb-run -a microseg view ... --screenshot out.png``)."""
    _require_qt()
    if not _has_display():
        raise MicrosegError(f"{NO_DISPLAY}: run under a virtual one, e.g. `xvfb-run -a ...`")
    from PIL import Image

    layers = result_layers(result_dir, image)
    viewer = _viewer(result_dir, show=True)
    try:
        add_layers(viewer, layers)
        pixels = viewer.screenshot(canvas_only=True, flash=False)
    except MicrosegError:
        raise
    except Exception as exc:  # a GUI toolkit's failure (no OpenGL context, ...): one line
        raise MicrosegError(f"napari could not draw ({type(exc).__name__}: {exc})") from exc
    finally:
        with contextlib.suppress(Exception):  # after a failed draw, close() can fail too
            viewer.close()
    png = Path(png)
    with atomic_path(png) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return png
