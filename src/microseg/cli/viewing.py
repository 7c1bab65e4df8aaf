"""Viewing command: ``view`` (a result folder in napari, the optional ``viewer`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def view(
    result_dir: Annotated[
        Path,
        typer.Argument(
            help="a result folder: microseg predict/fuse --input output, reports/spines/*, "
            "nuclei labels, or a CTC tracking result (mask###.tif + res_track.txt)"
        ),
    ],
    image: Annotated[
        Path | None,
        typer.Option(help="the image under the results: a TIFF, or a folder of t###.tif frames"),
    ] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option(help="write a PNG of the canvas (middle plane) instead of staying open"),
    ] = None,
) -> None:
    """Open results in napari: image, labels, spine points (score, uncertainty as features),
    tracks with divisions and uncertainty maps, scaled in nm when the voxel size is known."""
    from microseg.report.napari_layers import result_layers
    from microseg.report.napari_viewer import open_viewer, save_screenshot

    if screenshot is not None:
        typer.echo(f"screenshot -> {save_screenshot(result_dir, screenshot, image)}")
        return
    layers = result_layers(result_dir, image)
    typer.echo("napari: " + ", ".join(f"{kw['name']} ({kind})" for _, kw, kind in layers))
    open_viewer(result_dir, image, layers)
