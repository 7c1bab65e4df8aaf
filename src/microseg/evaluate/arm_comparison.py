"""Arms of a training study compared on the same test images: F1 over seeds, paired tests.

Each arm (a training recipe, e.g. real images only, or real plus synthetic ones) is trained
once per seed and scored on the same test images (per-image tables with ``image_id``, ``f1_50``
and ``tp_50``/``fp_50``/``fn_50``). Per arm: the pooled F1@0.5 (all objects of all images) and
the per-image mean, with mean and sample sd over seeds. Against the reference arm: per image
the difference averaged over seeds (images in ``image_id`` order), the bootstrap CI of its mean
(:func:`microseg.evaluate.paired.bootstrap_mean_ci`) and the Wilcoxon signed-rank p-value
(:func:`scipy.stats.wilcoxon`). The verdict follows the benchmark's rule: a difference is
claimed only when its CI excludes 0. Pure functions of tables (``synth_study`` uses them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import ConfigError, DataFormatError

#: the arm every other arm is compared with (real training images only)
REFERENCE = "R"


def _spread(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed values (rounded) with their mean, sample sd, min and max."""
    v = np.asarray(values, dtype=float)
    return {
        "per_seed": [round(float(x), 4) for x in v],
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def pooled_f1(per_image: pd.DataFrame) -> float:
    """F1@0.5 over all objects of all images (2 TP / (2 TP + FP + FN); 1 when both empty)."""
    from microseg.evaluate.rates import prf

    tp, fp, fn = (int(per_image[f"{n}_50"].sum()) for n in ("tp", "fp", "fn"))
    return float(prf(tp, fp, fn, empty=1.0).f1)


def seed_averaged(runs: dict[int, pd.DataFrame], value: str = "f1_50") -> pd.Series:
    """Per test image, ``value`` averaged over seeds (all seeds must score the same images)."""
    tables = [df.set_index("image_id")[value].rename(s) for s, df in sorted(runs.items())]
    wide = pd.concat(tables, axis=1)
    if wide.isna().any().any():
        raise DataFormatError(
            "seeds scored different test images; cannot pair them", "per_image.csv"
        )
    return wide.mean(axis=1).sort_index()


def paired_test(
    arm: pd.Series,
    ref: pd.Series,
    *,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-image differences ``arm - ref`` (same images): mean, bootstrap CI of the mean
    (:func:`microseg.evaluate.paired.bootstrap_mean_ci`), Wilcoxon signed-rank p-value
    (:func:`scipy.stats.wilcoxon`; NaN when every difference is 0) and the verdict."""
    from scipy.stats import wilcoxon

    from microseg.evaluate.paired import bootstrap_mean_ci

    if not arm.index.sort_values().equals(ref.index.sort_values()):
        raise DataFormatError("arms scored different test images; cannot pair them", "per_image")
    d = (arm - ref.reindex(arm.index)).to_numpy(float)
    low, high = bootstrap_mean_ci(
        d, n_resamples=n_resamples, confidence_level=confidence_level, seed=seed
    )
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) and d.size > 1 else math.nan
    return {
        "n_images": int(d.size),
        "mean_diff": float(d.mean()) if d.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "confidence_level": confidence_level,
        "wilcoxon_p": p,
        "verdict": verdict(low, high),
    }


def verdict(low: float, high: float) -> str:
    """The CI rule: claim a difference only when the interval excludes 0."""
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "did not help"


def sentence(paired: dict[str, dict[str, Any]]) -> str:
    """One sentence on the real + synthetic arms (S alone is reported, not judged here)."""
    added = {a: r for a, r in paired.items() if re.fullmatch(r"R\+S@[\d.]+", a)}
    if not added:
        return "no real + synthetic arm was run: nothing to decide"
    helped = [a for a, r in added.items() if r["verdict"] == "helped"]
    hurt = [a for a, r in added.items() if r["verdict"] == "hurt"]

    def cite(arms: list[str]) -> str:
        return ", ".join(
            f"{a} {added[a]['mean_diff']:+.3f} [{added[a]['ci_low']:+.3f}, "
            f"{added[a]['ci_high']:+.3f}]"
            for a in arms
        )

    if helped and not hurt:
        return f"synthetic data helped ({cite(helped)}; 95% CI of the F1@0.5 difference to R)"
    if hurt and not helped:
        return f"synthetic data hurt ({cite(hurt)}; 95% CI of the F1@0.5 difference to R)"
    if helped and hurt:
        return f"synthetic data helped in {cite(helped)} and hurt in {cite(hurt)}"
    return (
        "synthetic data did not help: no real + synthetic arm's 95% CI of the per-image "
        f"F1@0.5 difference to R excludes 0 ({cite(list(added))})"
    )


def variant_sentence(paired: dict[str, dict[str, Any]], variants: Sequence[str]) -> str:
    """One clause per variant arm (same images as its data arm, other training knobs)."""
    parts = [
        f"{a} {paired[a]['verdict']} ({paired[a]['mean_diff']:+.3f} "
        f"[{paired[a]['ci_low']:+.3f}, {paired[a]['ci_high']:+.3f}] vs R)"
        for a in variants
        if a in paired
    ]
    return "; ".join(parts)


def summarise(
    runs: dict[str, dict[int, pd.DataFrame]],
    *,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
) -> dict[str, Any]:
    """Per arm: pooled and per-image-mean F1@0.5 per seed (mean, sd over seeds), the
    seed-averaged per-image mean with its bootstrap CI; against ``R``: :func:`paired_test`."""
    from microseg.evaluate.paired import bootstrap_mean_ci

    if REFERENCE not in runs:
        raise ConfigError(f"the study has no {REFERENCE!r} arm to compare against")
    averaged = {a: seed_averaged(by_seed) for a, by_seed in runs.items()}
    arms: dict[str, Any] = {}
    for a, by_seed in runs.items():
        seeds = sorted(by_seed)
        low, high = bootstrap_mean_ci(
            averaged[a].to_numpy(float),
            n_resamples=n_resamples,
            confidence_level=confidence_level,
        )
        arms[a] = {
            "seeds": seeds,
            "pooled_f1_50": _spread([pooled_f1(by_seed[s]) for s in seeds]),
            "mean_f1_50": _spread([float(by_seed[s]["f1_50"].mean()) for s in seeds]),
            "seed_averaged_mean_f1_50": float(averaged[a].mean()),
            "ci_low": low,
            "ci_high": high,
        }
    paired = {
        a: paired_test(
            averaged[a],
            averaged[REFERENCE],
            n_resamples=n_resamples,
            confidence_level=confidence_level,
        )
        for a in runs
        if a != REFERENCE
    }
    return {"arms": arms, "vs_R": paired, "sentence": sentence(paired)}


def summary_table(summary: dict[str, Any], sizes: dict[str, dict[str, int]]) -> pd.DataFrame:
    """One row per arm: sizes, F1 means and sds over seeds, the paired test against R."""
    rows = []
    for a, r in summary["arms"].items():
        test = summary["vs_R"].get(a, {})
        rows.append(
            {
                "arm": a,
                **sizes.get(a, {}),
                "seeds": " ".join(map(str, r["seeds"])),
                "pooled_f1_50_mean": r["pooled_f1_50"]["mean"],
                "pooled_f1_50_sd": r["pooled_f1_50"]["sd"],
                "mean_f1_50_mean": r["mean_f1_50"]["mean"],
                "mean_f1_50_sd": r["mean_f1_50"]["sd"],
                "diff_to_R": test.get("mean_diff", 0.0 if a == REFERENCE else math.nan),
                "diff_ci_low": test.get("ci_low", math.nan),
                "diff_ci_high": test.get("ci_high", math.nan),
                "wilcoxon_p": test.get("wilcoxon_p", math.nan),
                "verdict": test.get("verdict", "reference"),
            }
        )
    return pd.DataFrame(rows)
