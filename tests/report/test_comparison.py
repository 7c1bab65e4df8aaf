"""The report's paired comparison to the baselines, error table and model details.

Per-image tables are small fakes with known shifts, so which differences are claimed is
known in advance; the stage test builds the report from fake per_image.csv folders.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microseg.config import CellModelConfig
from microseg.data.manifest import write_manifest
from microseg.errors import MicrosegError
from microseg.evaluate.paired import paired_difference
from microseg.report.benchmark import (
    COMPARISON_COLUMNS,
    ModelResult,
    build_report,
    compare_to_baselines,
    details_from_info,
    error_counts,
)
from microseg.report.figures import difference_figure

IDS = [f"s{k:02d}" for k in range(24)]
MODALITY = ["fluorescence"] * 14 + ["tissue"] * 7 + ["brightfield"] * 3


def per_image(shift: float, merges: int, seed: int, *, suffixed: bool = False) -> pd.DataFrame:
    """Per-image F1 around a shared base, plus error counts (``merges`` per image)."""
    base = np.random.default_rng(0).uniform(0.4, 0.8, len(IDS))
    f1 = base + shift + np.random.default_rng(seed).normal(0, 0.02, len(IDS))
    n = "_y" if suffixed else ""
    return pd.DataFrame(
        {
            "image_id": IDS,
            "f1_50": f1,
            f"n_gt{n}": 20,
            f"n_pred{n}": 18,
            "misses": 2,
            "false_positives": 1,
            "merges": merges,
            "merged_gt": 2 * merges,
            "splits": 1,
            "split_pred": 2,
            "misses_in_merge": 1,
            "fp_in_split": 0,
            "modality": MODALITY,
        }
    )


@pytest.fixture
def results() -> list[ModelResult]:
    return [
        ModelResult("otsu", {"f1_50": 0.7}, per_image(0.0, 3, 1), baseline=True,
                    description="Otsu + watershed"),
        ModelResult("unet", {"f1_50": 0.8}, per_image(0.1, 2, 2), description="MONAI UNet"),
        ModelResult("maunet", {"f1_50": 0.8}, per_image(0.0, 1, 3, suffixed=True),
                    description="MAUNet", details={"encoder": "resnet34", "profile": "demo"}),
        ModelResult("sac", {"f1_50": 0.6}, per_image(-0.1, 4, 4), description="SAC"),
    ]  # fmt: skip


def test_comparison_table_claims_only_intervals_excluding_zero(results, tmp_path):
    folder = build_report(results, tmp_path / "bench", n_resamples=2000).parent
    md = (folder / "index.md").read_text()
    html = (folder / "index.html").read_text()
    assert "A difference is claimed only when its 95% bootstrap interval excludes 0" in md
    head = "| model | all images (n=24) | brightfield (n=3) | fluorescence (n=14) | tissue (n=7) |"
    assert head in md
    section = md.split("## Against the baseline")[1].split("\n## ")[0]
    rows = {r.split(" | ")[0][2:]: r for r in section.splitlines() if r.startswith("| ")}
    # unet: +0.1 everywhere; claimed overall and on fluorescence (>= 10 images) only
    unet = rows["unet"].split(" | ")
    for cell in unet[1], unet[3]:
        assert cell.startswith("**+") and cell.endswith("better**")
        assert float(cell[2:8]) == pytest.approx(0.1, abs=0.02)
    assert "(n < 10: no claim)" in unet[2] and "(n < 10: no claim)" in unet[4]
    assert not unet[2].startswith("**")
    assert rows["sac"].split(" | ")[1].endswith("worse**")
    # maunet: no shift; its row carries the training details, nothing is bold
    maunet = rows["maunet [encoder: resnet34, profile: demo]"]
    assert "**" not in maunet.split(" | ", 1)[1] and "better" not in maunet
    assert "<strong>" in html and "better</strong>" in html and "worse</strong>" in html

    table = pd.read_csv(folder / "comparison.csv")
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert len(table) == 3 * 4 and set(table["baseline"]) == {"otsu"} and table["primary"].all()
    # the numbers are those of the library on the same inputs
    ref = paired_difference(
        results[1].per_image, results[0].per_image, group_col="modality", n_resamples=2000
    )
    got = table[table["model"] == "unet"].set_index("group")
    for d in ref:
        assert got.loc[d.group, "mean_diff"] == pytest.approx(d.mean_diff, abs=1e-12)
        assert got.loc[d.group, ["low", "high"]].tolist() == pytest.approx([d.low, d.high])
        assert got.loc[d.group, "n_images"] == d.n_images
    verdicts = dict(zip(got.index, got["verdict"], strict=True))
    assert verdicts == {
        "all": "better", "brightfield": "too few images",
        "fluorescence": "better", "tissue": "too few images",
    }  # fmt: skip

    summary = json.loads((folder / "comparison.json").read_text())
    assert summary["primary_baseline"] == "otsu" and summary["metric"] == "f1_50"
    assert summary["n_resamples"] == 2000 and summary["min_claim_images"] == 10
    u = summary["models"]["unet"]["differences"]["otsu"]["all"]
    assert u["verdict"] == "better" and u["claimed"] and u["low"] > 0
    assert u["mean_diff"] == pytest.approx(got.loc["all", "mean_diff"])
    assert summary["models"]["maunet"]["details"] == {"encoder": "resnet34", "profile": "demo"}
    assert "differences" not in summary["models"]["otsu"]


def test_a_claim_the_training_seeds_do_not_back_is_seed_dependent(results, tmp_path):
    """Issue 16: an image-level "better" stands only when every seed's mean difference has
    its sign and their mean exceeds their sd; the report says which seeds disagreed."""
    seed_diffs = {
        ("unet", "otsu", "all"): [0.09, -0.002, 0.11],  # one seed ties: not backed
        ("unet", "otsu", "fluorescence"): [0.08, 0.10, 0.12],  # backed
        ("sac", "otsu", "all"): [-0.1, -0.12],  # a "worse" that the seeds back
    }
    folder = build_report(results, tmp_path / "b", n_resamples=1000, seed_diffs=seed_diffs).parent
    table = pd.read_csv(folder / "comparison.csv").set_index(["model", "group"])
    assert table.loc[("unet", "all"), "verdict"] == "seed-dependent"
    assert not table.loc[("unet", "all"), "claimed"]
    assert table.loc[("unet", "all"), "n_seeds"] == 3
    assert table.loc[("unet", "all"), "seed_min_diff"] == pytest.approx(-0.002)
    assert table.loc[("unet", "fluorescence"), "verdict"] == "better"
    assert table.loc[("sac", "all"), "verdict"] == "worse"
    assert table.loc[("maunet", "all"), "n_seeds"] == 0  # no spread: the image rule alone
    md = (folder / "index.md").read_text()
    assert "seed-dependent (seeds -0.002 to +0.110)" in md
    assert (
        "every training seed's mean difference"
        in json.loads((folder / "comparison.json").read_text())["rule"]
    )


def test_seed_verdict_rule():
    from microseg.report.benchmark import SEED_DEPENDENT, seed_verdict

    assert seed_verdict("better", 0.04, [0.04, 0.03, 0.05]) == "better"
    assert seed_verdict("better", 0.04, [0.04, -0.001, 0.05]) == SEED_DEPENDENT
    assert seed_verdict("better", 0.04, [0.01, 0.2]) == SEED_DEPENDENT  # mean < sd
    assert seed_verdict("worse", -0.05, [-0.04, -0.06]) == "worse"
    assert seed_verdict("no claim", 0.01, [0.5, 0.6]) == "no claim"  # seeds never add a claim
    assert seed_verdict("better", 0.04, [0.04]) == "better"  # one seed: no spread to hold to


def test_error_table_sums_counts_per_model(results, tmp_path):
    folder = build_report(results, tmp_path / "bench", n_resamples=200).parent
    errors = pd.read_csv(folder / "errors.csv")
    overall = errors[errors["group"] == "all"].set_index("model")
    assert overall["merges"].to_dict() == {"otsu": 72, "unet": 48, "maunet": 24, "sac": 96}
    assert overall.loc["maunet", "n_gt"] == 20 * 24  # read from the suffixed n_gt_y column
    tissue = errors[(errors["group"] == "tissue") & (errors["model"] == "unet")].iloc[0]
    assert tissue["n_images"] == 7 and tissue["merged_gt"] == 2 * 2 * 7
    md = (folder / "index.md").read_text()
    assert "| model | images | GT nuclei | predicted | misses | false positives | merges |" in md
    section = md.split("## Error types")[1].split("\n## ")[0]
    row = next(r for r in section.splitlines() if r.startswith("| maunet ["))
    assert "| **24** | **48** |" in row  # fewest merges and merged nuclei in bold
    summary = json.loads((folder / "comparison.json").read_text())
    assert summary["models"]["unet"]["errors"]["merges"] == 48


def test_descriptions_and_details_are_shown(results, tmp_path):
    md = build_report(results, tmp_path / "bench", n_resamples=200).parent / "index.md"
    text = md.read_text()
    assert "| model | description | encoder | profile |" in text
    assert "| maunet | MAUNet | resnet34 | demo |" in text
    assert "| otsu (baseline) | Otsu + watershed | — | — |" in text
    assert "encoder: resnet34, profile: demo" in text  # in the model's own section too
    models = pd.read_csv(md.parent / "models.csv")
    assert models.set_index("model").loc["maunet", "detail_encoder"] == "resnet34"


def test_every_baseline_is_compared_first_is_primary(results, tmp_path):
    second = ModelResult("otsu2", {"f1_50": 0.7}, per_image(0.05, 3, 9), baseline=True)
    folder = build_report([*results, second], tmp_path / "bench", n_resamples=200).parent
    table = pd.read_csv(folder / "comparison.csv")
    assert set(table["model"]) == {"unet", "maunet", "sac"}  # baselines are not compared
    assert table.groupby("baseline")["primary"].all().to_dict() == {"otsu": True, "otsu2": False}
    md = (folder / "index.md").read_text()
    assert "### F1@0.5: model minus otsu (primary baseline)" in md
    assert "### F1@0.5: model minus otsu2" in md
    assert (folder / "figures" / "differences_otsu2.png").is_file()
    summary = json.loads((folder / "comparison.json").read_text())
    assert list(summary["models"]["sac"]["differences"]) == ["otsu", "otsu2"]


def test_different_image_sets_are_refused(results, tmp_path):
    short = ModelResult("short", {}, per_image(0.1, 1, 5).iloc[:20])
    out = tmp_path / "bench"
    with pytest.raises(MicrosegError, match="cannot pair 'short' and 'otsu': their image sets"):
        build_report([*results, short], out, n_resamples=200)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_claim_threshold_and_modality_from_manifest(results):
    bare = [
        ModelResult(r.name, r.metrics, r.per_image.drop(columns="modality"), baseline=r.baseline)
        for r in results[:2]
    ]
    manifest = pd.DataFrame({"sample_id": IDS, "modality": MODALITY})
    table = compare_to_baselines(bare, manifest=manifest, n_resamples=500, min_claim_images=3)
    assert table["group"].tolist() == ["all", "brightfield", "fluorescence", "tissue"]
    assert table["claimed"].all() and set(table["verdict"]) == {"better"}
    none = compare_to_baselines(bare, n_resamples=500)
    assert none["group"].tolist() == ["all"]  # no modality anywhere: overall only
    lower = compare_to_baselines(results[:2], "f1_50", higher_is_better=False, n_resamples=500)
    assert lower.loc[0, "verdict"] == "worse"  # a higher error would be worse


def test_models_without_per_image_scores_are_skipped(results, tmp_path):
    bare = [ModelResult(r.name, r.metrics, baseline=r.baseline) for r in results]
    folder = build_report(bare, tmp_path / "bench").parent
    assert pd.read_csv(folder / "comparison.csv").empty
    assert "Against the baseline" not in (folder / "index.md").read_text()
    assert json.loads((folder / "comparison.json").read_text())["primary_baseline"] == "otsu"
    assert error_counts(bare).empty


def test_details_from_info_keeps_the_known_keys():
    info = {"seconds": 3.0, "encoder": "resnet34", "profile": "full", "backbone": {"depth": 18}}
    assert details_from_info(info) == {
        "encoder": "resnet34", "backbone": '{"depth": 18}', "profile": "full"
    }  # fmt: skip
    assert details_from_info({"encoder": None, "profile": ""}) == {}


def test_difference_figure(tmp_path):
    table = pd.DataFrame(
        {
            "model": ["a", "b", "a", "b"],
            "group": ["all", "all", "tissue", "tissue"],
            "n_images": [9, 9, 3, 3],
            "mean_diff": [0.1, -0.01, 0.2, np.nan],
            "low": [0.05, -0.03, np.nan, np.nan],
            "high": [0.15, 0.02, np.nan, np.nan],
            "excludes_zero": [True, False, False, False],
        }
    )
    one = difference_figure(table, tmp_path / "one.png")[0]
    two = difference_figure(table, tmp_path / "two.png")[0]
    assert one.read_bytes() == two.read_bytes()
    with Image.open(one) as im:
        assert im.size[0] > im.size[1]  # one panel per group, side by side
    with pytest.raises(MicrosegError, match="needs columns"):
        difference_figure(table.drop(columns="high"), tmp_path / "x.png")
    with pytest.raises(MicrosegError, match="empty"):
        difference_figure(table.iloc[:0], tmp_path / "x.png")


def test_build_benchmark_stage_reads_folders_and_train_info(params):
    """The report stage from fake evaluation folders: details from train_info.json."""
    from microseg.stages import cells

    params.cells.dataset = "toyds"
    params.cells.split = "test"
    params.cells.baselines = {"otsu": CellModelConfig(family="classical", description="Otsu")}
    params.cells.models = {
        "unet": CellModelConfig(family="unet", description="MONAI UNet"),
        "sac": CellModelConfig(family="sac"),
    }
    rows = [
        {"sample_id": i, "split": "test", "task": "nuclei", "label_kind": "instance",
         "modality": m}
        for i, m in zip(IDS, MODALITY, strict=True)
    ]  # fmt: skip
    write_manifest(pd.DataFrame(rows), params.paths.prepared / "toyds")
    shifts = {"otsu": 0.0, "unet": 0.1, "sac": -0.1}
    for k, (name, shift) in enumerate(shifts.items()):
        folder = cells.REPORTS_ROOT / name
        folder.mkdir(parents=True)
        per_image(shift, k, k, suffixed=True).to_csv(folder / "per_image.csv", index=False)
        (folder / "overlays.json").write_text("[]")
        metrics = params.paths.metrics / "cells" / f"{name}.json"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        counting = {"count_mae": 1.0 + k, "count_mre": 0.1 * k, "true_area_p50": 90.0}
        metrics.write_text(
            json.dumps({"f1_50": 0.5 + shift, "n_images": len(IDS), "counting": counting})
        )
    (cells.REPORTS_ROOT / "unet" / "sizes.png").write_bytes(b"\x89PNG not drawn here")
    info = cells.MODELS_ROOT / "sac" / cells.INFO_NAME
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"seconds": 60.0, "encoder": "mobilesam", "profile": "demo"}))

    index = cells.build_benchmark(params)
    md = index.with_name("index.md").read_text()
    assert "| sac | sac | mobilesam | demo |" in md  # description falls back to the family
    models = pd.read_csv(index.with_name("models.csv")).set_index("model")
    assert models.loc["sac", "count_mae"] == 3.0 and models.loc["unet", "count_mre"] == 0.1
    assert "counting" not in models and "true_area_p50" not in models  # the block, flattened
    assert (index.parent / "figures" / "unet_sizes.png").is_file()  # a model's own figure
    assert "figures/unet_sizes.png" in md and "figures/sac_sizes.png" not in md
    assert re.search(r"\| sac \[encoder: mobilesam, profile: demo\] \| \*\*-0\.\d+ \[.*worse", md)
    summary = json.loads(index.with_name("comparison.json").read_text())
    assert summary["primary_baseline"] == "otsu"
    assert summary["models"]["unet"]["differences"]["otsu"]["all"]["verdict"] == "better"
    assert summary["models"]["sac"]["details"] == {"encoder": "mobilesam", "profile": "demo"}
    # a seed spread of this dataset and split holds the claims to it; another one is not used
    spread = {
        "baseline": "otsu",
        "dataset": "other",
        "split": "test",
        "models": {
            "unet": {"seeds": [1, 2], "groups": {"all": {"diff": {"per_seed": [0.1, -0.01]}}}}
        },
    }
    seeds_json = params.paths.metrics / "seeds.json"
    seeds_json.write_text(json.dumps(spread))
    index = cells.build_benchmark(params)
    summary = json.loads(index.with_name("comparison.json").read_text())
    assert summary["models"]["unet"]["differences"]["otsu"]["all"]["verdict"] == "better"
    seeds_json.write_text(json.dumps(spread | {"dataset": "toyds"}))
    index = cells.build_benchmark(params)
    summary = json.loads(index.with_name("comparison.json").read_text())
    assert summary["models"]["unet"]["differences"]["otsu"]["all"]["verdict"] == "seed-dependent"
    assert "seeds.json, seeds 1, 2" in index.with_name("index.md").read_text()
