"""The synthetic-data study's figure: F1@0.5 per arm with its CI, and the difference to R.

Left: per arm the mean over test images of the seed-averaged per-image F1@0.5, with the
bootstrap 95 % CI of that mean, and each seed's mean as a dot (the seed spread). Right: the
per-image difference to ``R`` (averaged over seeds) with its CI and a line at 0: a bar whose
interval excludes 0 is a claimable effect. No pyplot: a bare Figure, saved atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from microseg.report.figures import RC, save_figure


def arms_figure(
    runs: dict[str, dict[int, pd.DataFrame]], summary: dict[str, Any], out_png: Path
) -> Path:
    """``arms.png`` from the per-(arm, seed) tables and ``synth_study.summarise``'s output."""
    arms = list(summary["arms"])
    with mpl.rc_context(RC):
        fig = Figure(figsize=(max(5.0, 1.6 * len(arms) + 2), 3.2), layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[1, 1])
        for i, a in enumerate(arms):
            r = summary["arms"][a]
            mean = r["seed_averaged_mean_f1_50"]
            left.errorbar(
                i,
                mean,
                yerr=[[mean - r["ci_low"]], [r["ci_high"] - mean]],
                fmt="o",
                color="black",
                capsize=4,
            )
            per_seed = [float(df["f1_50"].mean()) for df in runs[a].values()]
            left.scatter([i + 0.12] * len(per_seed), per_seed, s=10, color="tab:blue", alpha=0.7)
        left.set_xticks(range(len(arms)), arms)
        left.set_ylabel("mean per-image F1@0.5 (test)")
        left.set_title("per arm: seed-averaged, 95% CI; dots: seeds")
        others = [a for a in arms if a in summary["vs_R"]]
        for i, a in enumerate(others):
            t = summary["vs_R"][a]
            d = t["mean_diff"]
            colour = {"helped": "tab:green", "hurt": "tab:red"}.get(t["verdict"], "grey")
            right.errorbar(
                i,
                d,
                yerr=[[d - t["ci_low"]], [t["ci_high"] - d]],
                fmt="o",
                color=colour,
                capsize=4,
            )
        right.axhline(0, color="black", lw=0.8)
        right.set_xticks(range(len(others)), others)
        right.set_xlim(-0.5, max(len(others), 1) - 0.5)
        right.set_ylabel("F1@0.5 minus R (per image)")
        right.set_title("paired difference to R, 95% CI")
        save_figure(fig, out_png)
    return out_png
