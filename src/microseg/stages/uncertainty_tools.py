"""``microseg uncertainty STACK`` and ``microseg inter-rater --stack S --rater A --rater B``:
the seed's ``uncertainity_maps.py`` and ``inter-rater.py`` on a user's own files, and the
writers the benchmark stages (:mod:`microseg.stages.punet`) share with them.

One module for both so that a map has one name and one look wherever it is made:
``<head>_<map>.tif`` (float32, ZYX; maps as :data:`microseg.evaluate.uncertainty.MAP_NAMES`:
``mean``, ``variance``, ``entropy``, ``mutual_information`` (epistemic) and
``expected_entropy`` (aleatoric)), ``panel_<head>.png|pdf``, and for rater comparisons
``uncertainty_vs_disagreement_<head>.csv`` with ``roc_<head>.png|pdf``.

User stacks are read as ``microseg predict`` reads spine stacks (TIFF streamed, other formats
through bioio); NaN/inf voxels are refused by the check the Prob-UNet predictor runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.errors import (
    ConfigError,
    DataFormatError,
    MicrosegError,
    MissingFileError,
    ShapeMismatchError,
)
from microseg.io import tiff
from microseg.stages.common import torch_device, write_json
from microseg.stages.result import StageResult

UNC_ROOT = Path("reports/uncertainty")
RATER_ROOT = Path("reports/inter_rater")
HEADS = ("spine", "dendrite")
#: rater masks mark spines: their disagreement is scored against the spine head's maps
RATER_HEAD = "spine"
Voxel = tuple[float, float, float] | None


from microseg.stages.uncertainty_maps import (  # noqa: E402  (shared with the stages)
    maps_from_sums,
    write_disagreement_scores,
    write_uncertainty_maps,
)


# ------------------------------------------------------------------------ user inputs
@contextlib.contextmanager
def open_user_stack(path: Path, what: str = "stack") -> Iterator[tuple[tiff.TiffStack, Voxel]]:
    """A user's ZYX stack, lazily, with its voxel size (None when the file has none).

    Any file ``microseg predict`` reads for spines; errors name ``path`` (not the scratch
    TIFF a non-TIFF format is converted to).
    """
    from microseg.stages.predict_inputs import read_input

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"expected a {what} (ZYX image), found nothing", path)
    item = read_input(path, "spines")
    assert item.path is not None
    try:
        stack = tiff.open_stack(item.path, expect_ndim=3)
    except ShapeMismatchError as exc:
        raise ShapeMismatchError(f"{what}: {_reason(exc)}", path) from None
    with stack:
        voxel = item.voxel_size_nm or stack.voxel_size_nm
        yield stack, voxel


def _reason(exc: MicrosegError) -> str:
    """The message of ``exc`` without its ``path: `` prefix."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path is not None else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def check_finite(stack: tiff.TiffStack, path: Path) -> None:
    """Refuse NaN/inf voxels (:func:`microseg.data.transforms.check_stack_finite`, as
    ``predict``), naming the user's file."""
    from microseg.data.transforms import check_stack_finite

    try:
        check_stack_finite(stack)
    except DataFormatError as exc:
        raise DataFormatError(_reason(exc), path) from None


def parse_planes(text: str | None, depth: int, path: Path) -> tuple[int, int]:
    """``--planes a:b`` as Python slices it (``b`` excluded; ``a:`` and ``:b`` allowed, and
    ``a`` alone is one plane), checked against ``depth``."""
    if text is None or not text.strip():
        return 0, depth
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            stop = start + 1
        elif len(parts) == 2:
            start = int(parts[0]) if parts[0].strip() else 0
            stop = int(parts[1]) if parts[1].strip() else depth
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--planes expects a:b (plane indices), got {text!r}") from None
    if not 0 <= start < stop <= depth:
        raise ConfigError(
            f"--planes {text} is outside the stack's {depth} planes (valid: 0 <= a < b <= {depth})",
            path,
        )
    return start, stop


def load_punet_network(params: Params, model: str | None, weights: Path | None) -> Any:
    """The Prob-UNet behind ``--model`` (a name, file, folder or ``models:/`` URI; a registered
    spine pipeline gives its Prob-UNet) or ``--weights`` (default: ``best.pt`` of
    ``spines.prob_model``'s folder), loaded through the model registry: the family façade
    (flat or hierarchical, by the file's format)."""
    from microseg.stages.predict_models import FUSION_FAMILY, resolve_spec

    if model is None and weights is not None:
        spec = resolve_spec(params, str(weights), task="spines")
    else:
        spec = resolve_spec(params, model or "punet", task="spines", weights=weights)
    if spec.family == FUSION_FAMILY:
        path = spec.files.get("punet")
    elif spec.family == "punet":
        path = spec.weights
    else:
        raise ConfigError(
            f"{spec.name}: a {spec.family} model has no uncertainty maps; give a Prob-UNet "
            "(--model punet, a punet model file, or a registered spine model)"
        )
    if path is None or not Path(path).is_file():
        raise MissingFileError(
            "no Prob-UNet weights; train one (microseg train -m punet) or give --weights", path
        )
    from microseg.stages.punet import load_prob_model

    return load_prob_model(path)


def predict_maps(
    params: Params,
    network: Any,
    stack: tiff.TiffStack,
    planes: tuple[int, int],
    n_samples: int,
    temperature: float,
) -> dict[str, dict[str, np.ndarray]]:
    """``{head: maps}`` of planes ``[a, b)``: the Prob-UNet sampled ``n_samples`` times at
    ``temperature``. The planes are read with the model's context planes around them and
    normalised with the whole stack's intensity range, as a whole-stack run would.
    ``network``: a family façade (:func:`load_punet_network`) or a flat ``ProbUNet``."""
    from microseg.data.patches import DEFAULT_PERCENTILES
    from microseg.data.transforms import intensity_range
    from microseg.models.punet import PunetSegmenter

    segmenter = network if hasattr(network, "predict_stack") else PunetSegmenter(network)
    a, b = planes
    depth = int(stack.shape[0])
    context = (int(segmenter.network.in_channels) - 1) // 2
    lo_z, hi_z = max(0, a - context), min(depth, b + context)
    intensity = intensity_range(stack, DEFAULT_PERCENTILES, max_planes=16)
    p = params.punet.predict
    result = segmenter.predict_stack(
        stack[lo_z:hi_z],
        n_samples=int(n_samples),
        temperature=float(temperature),
        tile=p.tile,
        batch_planes=p.batch_planes,
        intensity=intensity,
        seed=params.seed,
        device=torch_device(p.device),
    )
    keep = slice(a - lo_z, b - lo_z)
    return {
        h: maps_from_sums(
            result[f"sum_p_{h}"][keep],
            result[f"sum_p2_{h}"][keep],
            result[f"sum_entropy_{h}"][keep],
            result["n_samples"],
        )
        for h in HEADS
    }


def _settings(params: Params, samples: int | None, temperature: float | None) -> tuple[int, float]:
    p = params.punet.predict
    n = p.n_samples if samples is None else int(samples)
    t = p.temperature if temperature is None else float(temperature)
    if n < 1:
        raise ConfigError(f"--samples must be >= 1, got {n}")
    if not t > 0:
        raise ConfigError(f"--temperature must be > 0, got {t}")
    return n, t


# ------------------------------------------------------------------------ uncertainty
def uncertainty_on_stack(
    params: Params,
    stack_path: Path,
    *,
    samples: int | None = None,
    temperature: float | None = None,
    planes: str | None = None,
    model: str | None = None,
    weights: Path | None = None,
    out: Path | None = None,
) -> StageResult:
    """Maps of both heads for planes ``planes`` of a user's stack, their panels and
    ``uncertainty.json`` (settings and each map's mean) in ``out`` (default:
    ``reports/uncertainty/<stack name>``)."""
    from microseg.stages.predict_inputs import stem

    stack_path = Path(stack_path)
    n, t = _settings(params, samples, temperature)
    out_dir = Path(out) if out is not None else UNC_ROOT / stem(stack_path)
    with open_user_stack(stack_path) as (stack, voxel):
        check_finite(stack, stack_path)
        a, b = parse_planes(planes, int(stack.shape[0]), stack_path)
        network = load_punet_network(params, model, weights)
        maps = predict_maps(params, network, stack, (a, b), n, t)
        image = np.asarray(stack[a:b])
    summary: dict[str, Any] = {}
    for head in HEADS:
        summary[head] = write_uncertainty_maps(
            out_dir,
            head,
            image,
            maps[head],
            voxel,
            planes=[(b - a) // 2],
            title=f"Prob-UNet {head} uncertainty ({stack_path.name}, plane {a + (b - a) // 2})",
        )
    write_json(
        out_dir / "uncertainty.json",
        {
            "stack": str(stack_path),
            "planes": [a, b],
            "n_samples": n,
            "temperature": t,
            "seed": params.seed,
            "entropy_unit": "nats",
            "maps": {h: sorted(f"{h}_{k}.tif" for k in maps[h]) for h in HEADS},
            "summary": summary,
        },
    )
    return StageResult("uncertainty", summary, out=out_dir)


# ------------------------------------------------------------------------ inter-rater
def read_rater_masks(paths: Sequence[Path], shape: tuple[int, ...]) -> list[np.ndarray]:
    """Binary rater masks (0 and one other value, e.g. 0/1 or 0/255) of ``shape``, as bool."""
    if len(paths) < 2:
        named = f" (got only {paths[0]})" if paths else ""
        raise ConfigError(f"inter-rater needs at least 2 --rater masks{named}")
    masks = []
    for path in map(Path, paths):
        with open_user_stack(path, what="rater mask") as (stack, _):
            arr = np.asarray(stack[:])
        if arr.shape != tuple(shape):
            raise ShapeMismatchError(
                f"rater mask has shape {arr.shape}; the stack has {tuple(shape)}", path
            )
        values = np.unique(arr)
        if values.size > 2 or (values.size == 2 and values[0] != 0) or np.isnan(values).any():
            shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if values.size > 5 else "")
            raise DataFormatError(
                f"rater mask must be binary (0 and one other value); found {values.size} "
                f"distinct values: {shown}",
                path,
            )
        masks.append(arr != 0)
    return masks


def _rater_names(paths: Sequence[Path]) -> list[str]:
    from microseg.stages.predict_inputs import stem

    names = [stem(Path(p)) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def inter_rater_on_stack(
    params: Params,
    stack_path: Path,
    rater_paths: Sequence[Path],
    *,
    model: str | None = None,
    weights: Path | None = None,
    samples: int | None = None,
    temperature: float | None = None,
    out: Path | None = None,
) -> StageResult:
    """Rater agreement on a user's stack, and with a model how well its uncertainty finds
    where raters disagree.

    Writes ``disagreement.tif`` (float32: fraction of raters against the per-voxel majority;
    0 where unanimous, 0.5 at most), ``consensus.tif`` (uint8 majority vote; a tie of an
    even number of raters is background) and ``inter_rater.json`` (Fleiss' kappa over all
    voxels and near the raters' masks, pairwise Dice); with ``model``/``weights`` also the
    spine maps, the AUROC/Spearman table and ROC figure, and a panel. AUROC and Spearman are
    computed within ``punet.rater_region_px`` pixels of any rater's mask, as the stage does.
    """
    from microseg.evaluate.inter_rater import (
        agreement_fraction,
        fleiss_kappa,
        majority_vote,
        near_foreground,
        pairwise_dice,
    )
    from microseg.report.figures import uncertainty_panel
    from microseg.stages.predict_inputs import stem

    stack_path = Path(stack_path)
    rater_paths = [Path(p) for p in rater_paths]
    use_model = model is not None or weights is not None
    n, t = _settings(params, samples, temperature)
    out_dir = Path(out) if out is not None else RATER_ROOT / stem(stack_path)
    with open_user_stack(stack_path) as (stack, voxel):
        check_finite(stack, stack_path)
        shape = tuple(int(s) for s in stack.shape)
        masks = read_rater_masks(rater_paths, shape)
        maps = None
        if use_model:
            network = load_punet_network(params, model, weights)
            maps = predict_maps(params, network, stack, (0, shape[0]), n, t)[RATER_HEAD]
        image = np.asarray(stack[:])
    names = _rater_names(rater_paths)
    disagreement = (1.0 - agreement_fraction(masks, "majority", min_raters=2)).astype(np.float32)
    tiff.write_stack(out_dir / "disagreement.tif", disagreement, voxel)
    consensus = majority_vote(masks, min_raters=2).astype(np.uint8)
    tiff.write_stack(out_dir / "consensus.tif", consensus, voxel)
    radius = params.punet.rater_region_px
    region = near_foreground(masks, radius=radius)
    dice = pairwise_dice(masks, names, min_raters=2)
    result: dict[str, Any] = {
        "stack": str(stack_path),
        "raters": {name: str(p) for name, p in zip(names, rater_paths, strict=True)},
        "n_raters": len(masks),
        "fleiss_kappa": fleiss_kappa(masks, min_raters=2),
        "fleiss_kappa_near_raters": fleiss_kappa(masks, mask=region, min_raters=2),
        "region_px": radius,
        "pairwise_dice": dice.to_dict(orient="records"),
        "mean_pairwise_dice": float(dice["dice"].mean()),
        "disagreement_fraction": float((disagreement > 0).mean()),
    }
    if maps is not None:
        for name, arr in maps.items():
            tiff.write_stack(out_dir / f"{RATER_HEAD}_{name}.tif", arr, voxel)
        table = write_disagreement_scores(
            out_dir, RATER_HEAD, maps, disagreement, region, params.seed
        )
        z = int(np.argmax(disagreement.sum(axis=(1, 2))))
        uncertainty_panel(
            image,
            maps,
            out_dir / f"panel_{RATER_HEAD}.png",
            raters=masks,
            disagreement=disagreement,
            planes=[z],
            title=f"{stack_path.name}: model uncertainty vs rater disagreement (plane {z})",
        )
        result.update(
            n_samples=n,
            temperature=t,
            n_pixels_scored=int(table["n_pixels"].iloc[0]),
            n_disagree=int(table["n_disagree"].iloc[0]),
            auroc={r.map: float(r.auroc) for r in table.itertuples()},
            spearman={r.map: float(r.spearman) for r in table.itertuples()},
        )
    write_json(out_dir / "inter_rater.json", result)
    return StageResult("inter_rater", result, out=out_dir)
