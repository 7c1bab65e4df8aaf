"""Prediction commands: ``predict``, ``fuse`` and ``visualize``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from microseg.cli._options import (
    DeviceOpt,
    ParamsOpt,
    SetOpt,
    load,
    parse_pixel,
    parse_voxel,
)
from microseg.errors import ConfigError

if TYPE_CHECKING:
    from microseg.config import Params
    from microseg.utils.engine import EngineOptions

EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="a folder's inputs: local (this process) or ray (Ray workers, the models loaded "
        "once in each; default: params scale.engine)",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="with --engine ray: the cluster to join (auto, host:port; default: params "
        "scale.address, else a local cluster)",
    ),
]


def _engine(params: Params, engine: str | None, address: str | None) -> EngineOptions:
    from microseg.utils.engine import EngineOptions

    return EngineOptions.from_mapping(params.scale.model_dump(), engine=engine, address=address)


def predict(
    source: Annotated[
        Path,
        typer.Argument(help="an image, ZYX stack or time-lapse (TYX, CTC folder), or a folder"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="result folder")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="a cells.models or tracking.segmenters name, yolo, punet, a model file or "
            "folder, or a models:/ URI (default: yolo; with --task, that task's model)",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="nuclei, spines or tracking (default: the model's)"),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="model file or folder (default: the pipeline's models/)")
    ] = None,
    channel: Annotated[str | None, typer.Option(help="channel index or name")] = None,
    scene: Annotated[str | None, typer.Option(help="scene index or name")] = None,
    timepoint: Annotated[int | None, typer.Option(help="timepoint of a time-lapse")] = None,
    pixel_size: Annotated[
        str | None, typer.Option(help="y,x (or one value) in µm when the file does not carry it")
    ] = None,
    voxel_size: Annotated[
        str | None, typer.Option(help="spines: z,y,x in nm when the TIFF does not carry it")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="nuclei label images: tif (OME-TIFF) or ome-zarr")
    ] = "tif",
    rois: Annotated[bool, typer.Option("--rois/--no-rois", help="nuclei: ImageJ ROI zip")] = False,
    geojson: Annotated[
        bool, typer.Option("--geojson/--no-geojson", help="nuclei: QuPath GeoJSON")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="redo inputs that already have results")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """Any model on any input of its task: nuclei label images + object tables, tracking CTC
    results + track tables, spine points or maps. A folder is resumable (done inputs are
    skipped, <out>/summary.csv lists each), and an input that cannot be read is named and
    skipped."""
    from microseg.stages.predict import PredictOptions, predict_stacks
    from microseg.stages.predict_inputs import ReadOptions
    from microseg.stages.predict_result import SaveOptions

    params = load(params_path, set_, device)
    options = PredictOptions(
        read=ReadOptions(
            channel=_index_or_name(channel),
            scene=_index_or_name(scene),
            timepoint=timepoint,
            pixel_size_um=parse_pixel(pixel_size),
            voxel_size_nm=parse_voxel(voxel_size),
        ),
        save=SaveOptions(fmt=fmt, rois=rois, geojson=geojson),
        overwrite=overwrite,
    )
    result = predict_stacks(
        params, source, out, model, weights, task=task, options=options, device=device,
        engine=_engine(params, engine, address),
    )  # fmt: skip
    if not result.folder:
        typer.echo(result.messages[0])
        return
    for name, error in result.failed:
        typer.secho(f"skipped {name}: {error}", fg=typer.colors.YELLOW, err=True)
    n, failed, skipped = result.n_stacks, len(result.failed), len(result.skipped)
    typer.echo(
        f"{n - failed} of {n} {result.noun}s predicted ({n - failed - skipped} now, {skipped} "
        f"earlier), {failed} failed -> {out}"
    )
    if failed == n:
        raise typer.Exit(1)


def _index_or_name(text: str | None) -> int | str | None:
    """``--channel 1`` is an index, ``--channel DAPI`` a name."""
    if text is None:
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else text


SAVE_VIS_HELP = (
    "with --input: PNGs in <stem>/vis/ as DeepD3.V2's --save_vis (YOLO boxes green, Prob-UNet-"
    "validated orange, fused spines magenta circles; every n-th plane + max projection)"
)


def fuse(
    input_: Annotated[
        Path | None,
        typer.Option("--input", help="a stack or a folder of stacks (default: the benchmark)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="result folder (with --input)")] = None,
    yolo_weights: Annotated[Path, typer.Option(help="YOLO weights")] = Path("models/yolo/best.pt"),
    punet_weights: Annotated[Path, typer.Option(help="Prob-UNet weights")] = Path(
        "models/punet/best.pt"
    ),
    fusion_params: Annotated[Path, typer.Option(help="tuned fusion params")] = Path(
        "params/tuned_fusion.yaml"
    ),
    voxel_size: Annotated[
        str | None, typer.Option(help="z,y,x in nm when the TIFFs do not carry it")
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="folder of <stem>.csv spine points to score against")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="redo stacks that already have results")] = False,
    save_vis: Annotated[bool, typer.Option("--save-vis", help=SAVE_VIS_HELP)] = False,
    vis_interval: Annotated[int, typer.Option(min=1, help="--save-vis: planes 0, n, 2n...")] = 10,
    params_path: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    address: AddressOpt = None,
) -> None:
    """YOLO boxes validated by Prob-UNet probability, de-duplicated in 3D.

    Without --input: the pipeline's benchmark stage (from the evaluation's saved outputs).
    With --input: stacks are predicted end to end, one result folder each, resumable.
    """
    params = load(params_path, set_, device)
    if input_ is None:
        if save_vis:
            raise ConfigError("--save-vis draws the stacks of --input; give --input and --out")
        from microseg.stages import evaluation

        result = evaluation.run_fuse(params)
        b = result.metrics["benchmark"]
        typer.echo(f"fusion: benchmark F1 {b['f1']:.3f} -> {result.metrics_file}")
        return
    if out is None:
        raise ConfigError("--input needs --out (the folder for the results)")
    from microseg.stages.predict import fuse_folder

    summary = fuse_folder(
        params, input_, out, yolo_weights=yolo_weights, punet_weights=punet_weights,
        fusion_params=fusion_params, voxel_size=parse_voxel(voxel_size),
        annotations=annotations, overwrite=overwrite, engine=_engine(params, engine, address),
        save_vis=save_vis, vis_interval=vis_interval,
    )  # fmt: skip
    counts = summary["status"].value_counts().to_dict()
    for row in summary[summary["status"] == "failed"].itertuples():
        typer.secho(f"failed {row.stack}: {row.error}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"{counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, "
        f"{counts.get('failed', 0)} failed -> {out}"
    )
    if save_vis:
        typer.echo(f"visualisations: {summary.attrs.get('vis', 0)} drawn -> {out}/<stack>/vis/")
    if counts.get("failed", 0) and not counts.get("done", 0) and not counts.get("skipped"):
        raise typer.Exit(1)


def visualize(
    stack: Annotated[Path, typer.Argument(help="3D TIFF stack (ZYX)")],
    predictions: Annotated[Path, typer.Argument(help="CSV of boxes (z,x1,y1,x2,y2) or points")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNGs + overlay.tif")],
    mode: Annotated[str | None, typer.Option(help="dots, boxes or both")] = None,
    dot_radius: Annotated[int | None, typer.Option(help="dot radius in output pixels")] = None,
    color: Annotated[str | None, typer.Option(help="dot colour: name, #rrggbb or r,g,b")] = None,
    box_color: Annotated[str | None, typer.Option(help="box colour")] = None,
    line_width: Annotated[int | None, typer.Option(help="box line width")] = None,
    clahe: Annotated[bool, typer.Option("--clahe/--no-clahe", help="CLAHE contrast")] = False,
    scores: Annotated[bool, typer.Option("--scores", help="write each score")] = False,
    show_rejected: Annotated[bool, typer.Option(help="draw rejected detections")] = False,
    z_start: Annotated[int | None, typer.Option(help="first plane")] = None,
    z_stop: Annotated[int | None, typer.Option(help="stop before this plane")] = None,
    z_step: Annotated[int | None, typer.Option(help="every n-th plane")] = None,
    spread: Annotated[int | None, typer.Option(help="show marks faintly on z±n")] = None,
    scale: Annotated[int | None, typer.Option(help="upscale factor")] = None,
) -> None:
    """Per-plane PNG overlays and a stacked RGB TIFF of detections on a stack."""
    from microseg.report.overlays import OverlayConfig, render_overlays

    cfg = OverlayConfig.from_mapping(
        {
            "mode": mode,
            "dot_radius": dot_radius,
            "color": color,
            "box_color": box_color,
            "line_width": line_width,
            "clahe": clahe,
            "show_scores": scores,
            "show_rejected": show_rejected,
            "z_start": z_start,
            "z_stop": z_stop,
            "z_step": z_step,
            "spread": spread,
            "scale": scale,
        }
    )
    result = render_overlays(stack, predictions, out, cfg)
    typer.echo(f"{result.n_marks} marks on {result.n_planes} planes -> {result.out_dir}")
