"""``compare_prob_models``: the flat and the hierarchical Prob-UNet on the spine benchmark.

Both models sample the benchmark stack (every ``hpunet.compare_plane_stride``-th plane,
normalised with the whole stack's intensity range; with 2.5D models the context planes are
the strided neighbours) with the same ``punet.predict`` knobs; per model one
row of ``metrics/prob_models.json``: spine and dendrite Dice at ``prob_thr`` (small components
removed, as ``predict_punet``'s fixed-threshold masks), spine ECE/MCE/Brier
(:func:`microseg.evaluate.calibration.calibration_summary`), and the AUROC (and Spearman) of
each spine uncertainty map for the raters' disagreement within ``punet.rater_region_px`` of
any rater's mask (:func:`microseg.evaluate.inter_rater.compare_uncertainty_to_disagreement`,
what ``inter_rater`` reports for the model ``spines.prob_model`` picks).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.errors import MissingFileError
from microseg.io import tiff
from microseg.stages.common import metrics_file, samples, torch_device, write_json
from microseg.stages.punet import HEADS, HPUNET_DIR, MODEL_DIR, _source, _targets, load_prob_model

log = logging.getLogger(__name__)

#: model name -> folder holding its ``best.pt``
MODELS = {"punet": MODEL_DIR, "hpunet": HPUNET_DIR}
#: uncertainty maps scored against rater disagreement
SCORED_MAPS = ("entropy", "mutual_information", "variance")


def rater_disagreement(raters_dir: Path, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The spine raters' disagreement map and the near-foreground region it is scored in."""
    from microseg.evaluate.inter_rater import disagreement_map, near_foreground

    paths = sorted(Path(raters_dir).glob("rater*_spines.tif"))
    if len(paths) < 3:
        raise MissingFileError(f"need >= 3 raters' spine masks, found {len(paths)}", raters_dir)
    masks = [tiff.read_stack(p) > 0 for p in paths]
    return disagreement_map(masks), near_foreground(masks, radius=radius)


def sample_planes(model: Any, image: np.ndarray, params: Params) -> dict[str, Any]:
    """``model`` (a family façade) over ``image`` with the ``punet.predict`` knobs."""
    from microseg.data.patches import DEFAULT_PERCENTILES
    from microseg.data.transforms import intensity_range

    p, stride = params.punet.predict, params.hpunet.compare_plane_stride
    return model.predict_stack(
        image[::stride],
        n_samples=p.n_samples,
        temperature=p.temperature,
        tile=p.tile,
        batch_planes=p.batch_planes,
        intensity=intensity_range(image, DEFAULT_PERCENTILES, max_planes=16),
        seed=params.seed,
        device=torch_device(p.device),
        progress=False,
    )


def score_model(
    result: dict[str, Any],
    targets: dict[str, np.ndarray],
    disagreement: np.ndarray,
    region: np.ndarray,
    params: Params,
) -> dict[str, float]:
    """One row: Dice per head, spine calibration, AUROC/Spearman of the spine maps."""
    from microseg.evaluate.calibration import calibration_summary
    from microseg.evaluate.inter_rater import compare_uncertainty_to_disagreement
    from microseg.evaluate.segmentation import dice
    from microseg.models.punet.predict import remove_small
    from microseg.stages.uncertainty_maps import maps_from_sums

    p = params.punet.predict
    row: dict[str, float] = {}
    for head in HEADS:
        prob = np.asarray(result[f"prob_{head}"], np.float32)
        row[f"{head}_dice"] = dice(remove_small(prob >= p.prob_thr, p.size_thr), targets[head])
    cal = calibration_summary(np.asarray(result["prob_spine"], np.float32), targets["spine"])
    row.update({f"spine_{k}": float(v) for k, v in cal.items() if k in ("ece", "mce", "brier")})
    maps = maps_from_sums(
        result["sum_p_spine"], result["sum_p2_spine"], result["sum_entropy_spine"],
        result["n_samples"],
    )  # fmt: skip
    scored = {k: v for k, v in maps.items() if k in SCORED_MAPS}
    table = compare_uncertainty_to_disagreement(scored, disagreement, mask=region, seed=params.seed)
    for r in table.itertuples():
        row[f"{r.map}_auroc"] = float(r.auroc)
        row[f"{r.map}_spearman"] = float(r.spearman)
    return row


def compare_prob_models(
    params: Params, models: dict[str, Path] | None = None, raters_dir: Path | None = None
) -> dict[str, Any]:
    """Score each model of ``models`` (default: both families' ``best.pt``) on the benchmark
    stack -> ``metrics/prob_models.json`` (``{model: row}``)."""
    models = dict(models or MODELS)
    (bench,) = samples(params.prepared_dir("spines"), "test")
    stride = params.hpunet.compare_plane_stride
    targets = {k: v[::stride] for k, v in _targets(bench).items()}
    dis, region = rater_disagreement(
        raters_dir or _source(params) / "raters", params.punet.rater_region_px
    )
    dis, region = dis[::stride], region[::stride]
    image = tiff.read_stack(bench.image_path)
    table: dict[str, Any] = {}
    for name, folder in models.items():
        weights = Path(folder) / "best.pt"
        if not weights.is_file():
            raise MissingFileError(f"no trained {name}; run `microseg train -m {name}`", weights)
        t0 = time.perf_counter()
        result = sample_planes(load_prob_model(weights), image, params)
        seconds = time.perf_counter() - t0
        row = score_model(result, targets, dis, region, params)
        table[name] = {**row, "seconds": seconds, "planes": int(targets["spine"].shape[0])}
        log.info("%s: spine Dice %.3f, ECE %.4f", name, table[name]["spine_dice"],
                 table[name]["spine_ece"])  # fmt: skip
    write_json(metrics_file(params, "prob_models"), table)
    return table


def run_compare_prob_models(params: Params) -> Any:
    """:func:`compare_prob_models` in its MLflow run (``compare_prob_models`` stage)."""
    from microseg.stages.result import StageResult, run_stage

    path = metrics_file(params, "prob_models")

    def compare() -> StageResult:
        table = compare_prob_models(params)
        return StageResult(
            "compare_prob_models",
            table,
            metrics_file=path,
            log_metrics=table,
            artifacts=[(path, "metrics")],
        )

    return run_stage(params, compare, stage="compare_prob_models", task="spines",
                     section=params.punet.predict)  # fmt: skip
