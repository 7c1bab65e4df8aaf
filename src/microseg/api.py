"""microseg from Python: load any model by name, path or registry URI and predict arrays or
files, with the same code ``microseg predict`` runs::

    import microseg

    model = microseg.load("otsu")                      # a params.yaml name (no weights needed)
    result = model.predict(image)                      # a 2D array, or a path
    result.labels, result.to_dataframe()               # instances, per-object table
    result.save("out/")                                # <name>_labels.tif, <name>_objects.csv

    microseg.load("models/cells/unet/best.pt")         # a trained file (family from the file)
    microseg.load("models:/microseg-nuclei@champion")  # the registry (downloaded once)
    microseg.load("lstmunet").predict("movie.tif")     # tracking: .labels, .tracks (parent)

A name is a ``cells.models``/``cells.baselines`` or ``tracking.segmenters`` entry of
``params.yaml``, ``yolo`` or ``punet`` (the pipeline's trained weights under ``models/``); see
:mod:`microseg.stages.predict_models` for how paths and URIs are resolved.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.stages.predict_result import Result

__all__ = ["Model", "Result", "load"]


def _params(params: Params | str | Path | None, device: str | None) -> Params:
    """``params`` as given, a params file, or the default one (``./params.yaml``, else the
    packaged copy: :func:`microseg.config.default_params_path`)."""
    from microseg.config import default_params_path, load_params

    if not isinstance(params, Params):
        params = load_params(default_params_path() if params is None else params)
    return params.with_device(device)


def load(
    model: str | Path,
    *,
    task: str | None = None,
    device: str | None = None,
    params: Params | str | Path | None = None,
    weights: str | Path | None = None,
) -> Model:
    """The model ``model`` names (a params name, a model file or folder, a ``models:/`` URI),
    ready to predict. ``task`` (nuclei, spines, tracking) defaults to the model's own (a
    nuclei model given ``task="tracking"`` segments each frame and links the tracks);
    ``device``: auto, cpu, cuda, cuda:N or mps; ``weights`` replaces a name's weights."""
    from microseg.stages.predict import load_runner

    p = _params(params, device)
    runner = load_runner(
        p, model, task=task, weights=Path(weights) if weights else None, device=device
    )
    return Model(runner)


class Model:
    """A loaded model of one task (``.task``: nuclei, spines or tracking)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    @property
    def task(self) -> str:
        return self._runner.task

    @property
    def name(self) -> str:
        return self._runner.name

    @property
    def family(self) -> str:
        return self._runner.family

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, task={self.task!r}, family={self.family!r})"

    def predict(
        self,
        image: np.ndarray | str | Path,
        *,
        voxel_size_nm: tuple[float, ...] | None = None,
        channel: int | str | None = None,
        scene: int | str | None = None,
        timepoint: int | None = None,
        name: str | None = None,
    ) -> Result:
        """Predict one input: a path (any format ``microseg predict`` reads) or an array
        (nuclei ``YX``/``YXC``, tracking ``TYX``, spines ``ZYX``). ``voxel_size_nm``: ``(y, x)``
        or ``(z, y, x)`` in nm, used where the input carries none (object sizes in µm, the
        spines' 3D de-duplication); ``name`` names the result's files (default: the file's
        stem, else ``image``)."""
        from microseg.stages.predict_inputs import ReadOptions, array_input, read_input

        pixel = _pixel_um(voxel_size_nm)
        spine_voxel = _spine_voxel(voxel_size_nm) if self.task == "spines" else None
        if isinstance(image, str | Path):
            opts = ReadOptions(channel, scene, timepoint, pixel, spine_voxel)
            item = read_input(Path(image), self.task, opts)
            if name:
                item.name = name
            return self._runner.predict(item)
        if self.task == "spines":
            return self._predict_stack(np.asarray(image), spine_voxel, name or "image")
        if not isinstance(channel, int | None):
            from microseg.errors import ConfigError

            raise ConfigError(f"an array's channel is an index, got {channel!r}")
        item = array_input(image, self.task, name or "image", pixel, channel)
        return self._runner.predict(item)

    def _predict_stack(
        self, stack: np.ndarray, voxel: tuple[float, float, float] | None, name: str
    ) -> Result:
        """The spine predictors stream planes from a TIFF: the array goes through one."""
        from microseg.io.tiff import write_stack
        from microseg.stages.predict_inputs import Input

        with tempfile.TemporaryDirectory(prefix="microseg-predict-") as tmp:
            path = write_stack(Path(tmp) / f"{name}.tif", stack, voxel)
            return self._runner.predict(Input(name, path=path, voxel_size_nm=voxel))


def _pixel_um(voxel_size_nm: tuple[float, ...] | None) -> tuple[float, float] | None:
    if voxel_size_nm is None:
        return None
    _check_sizes(voxel_size_nm)
    y, x = voxel_size_nm[-2:]
    return float(y) / 1e3, float(x) / 1e3


def _spine_voxel(voxel_size_nm: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    if voxel_size_nm is None:
        return None
    if len(voxel_size_nm) != 3:
        from microseg.errors import ConfigError

        raise ConfigError(f"spines need voxel_size_nm=(z, y, x), got {voxel_size_nm!r}")
    z, y, x = (float(v) for v in voxel_size_nm)
    return z, y, x


def _check_sizes(sizes: tuple[float, ...]) -> None:
    from microseg.errors import ConfigError

    if len(sizes) not in (2, 3) or not all(float(v) > 0 for v in sizes):
        raise ConfigError(f"voxel_size_nm expects (y, x) or (z, y, x) > 0, got {sizes!r}")
