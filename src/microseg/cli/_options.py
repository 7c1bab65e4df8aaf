"""What every command shares: the option types and how params and option values are read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from microseg.config import Params
from microseg.errors import ConfigError

ParamsOpt = Annotated[
    Path,
    typer.Option(
        "--params",
        "-p",
        help="params.yaml to read (default: ./params.yaml, else the packaged one).",
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a param: key.sub=value")
]
TaskOpt = Annotated[str, typer.Option("--task", help="spines or nuclei")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps for every model this command trains or runs "
        "(default: the devices in params.yaml)",
    ),
]


def params_path(path: Path | None) -> Path:
    """``--params`` as given; its default (``params.yaml``, or None) falls back to the
    packaged defaults when the working directory has none (:func:`default_params_path`)."""
    from microseg.config import DEFAULT_PARAMS, default_params_path

    if path is None or (path == DEFAULT_PARAMS and not path.exists()):
        return default_params_path()
    return path


def load(path: Path | None, overrides: list[str] | None, device: str | None = None) -> Params:
    """params.yaml with ``--set key=value`` overrides (values parsed as YAML) and ``--device``."""
    import yaml

    from microseg.config import load_params

    path = params_path(path)
    pairs = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key] = yaml.safe_load(value)
    return load_params(path, pairs).with_device(device)


def parse_voxel(text: str | None) -> tuple[float, float, float] | None:
    """``--voxel-size z,y,x`` in nm (None when not given)."""
    if not text:
        return None
    try:
        z, y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--voxel-size expects z,y,x in nm, got {text!r}") from None
    return z, y, x


def parse_pixel(text: str | None) -> tuple[float, float] | None:
    """``--pixel-size y,x`` (or one value for square pixels) in µm (None when not given)."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(v > 0 for v in values):
        raise ConfigError(f"--pixel-size expects y,x (or one value) in µm > 0, got {text!r}")
    return values[0], values[1]
