"""Seed spread: the summary's numbers by hand, the params copy, the config checks."""

from __future__ import annotations

import pandas as pd
import pytest

from microseg.errors import ConfigError
from microseg.report.seed_spread import seed_differences
from microseg.stages import seeds


def _per_image(values: list[float], modalities: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": [f"i{k}" for k in range(len(values))], "f1_50": values, "modality": modalities}
    )


def test_summary_means_sd_and_paired_differences_by_hand():
    mods = ["fluorescence", "fluorescence", "tissue"]
    runs = {
        "m": {
            1: _per_image([0.8, 0.6, 0.4], mods),  # all 0.6, tissue 0.4
            2: _per_image([0.9, 0.7, 0.5], mods),  # all 0.7, tissue 0.5
            3: _per_image([1.0, 0.8, 0.6], mods),  # all 0.8, tissue 0.6
        }
    }
    base = _per_image([0.5, 0.5, 0.5], mods)
    out = seeds.summarise(runs, base)["m"]
    assert out["seeds"] == [1, 2, 3]
    assert out["groups"]["all"]["per_seed"] == [0.6, 0.7, 0.8]
    assert out["groups"]["all"]["mean"] == pytest.approx(0.7)
    assert out["groups"]["all"]["sd"] == pytest.approx(0.1)  # sample sd (ddof 1)
    assert out["groups"]["tissue"]["mean"] == pytest.approx(0.5)
    assert out["diff_to_baseline"]["per_seed"] == [0.1, 0.2, 0.3]
    assert out["diff_to_baseline"]["min"] == pytest.approx(0.1)
    # per group: tissue 0.4 / 0.5 / 0.6 against the baseline's 0.5
    assert out["groups"]["tissue"]["diff"]["per_seed"] == [-0.1, 0.0, 0.1]
    assert out["groups"]["fluorescence"]["diff"]["mean"] == pytest.approx(0.3)
    spread = {"baseline": "b", "models": {"m": out}}
    assert seed_differences(spread)[("m", "b", "tissue")] == [-0.1, 0.0, 0.1]


def test_with_seed_changes_one_model_only(params_unet):
    params = params_unet
    seeded = seeds.with_seed(params, "maunet", 7)
    assert seeded.cells.models["maunet"].train["seed"] == 7
    assert "seed" not in params.cells.models["maunet"].train  # the original is untouched
    assert seeded.cells.models["unet"] == params.cells.models["unet"]
    assert seeds.demo_seed(params, "maunet") == 42


def test_config_is_checked(params):
    models, chosen, baseline = seeds.spread_config(params)
    assert set(models) == {"maunet"} and chosen[0] == 42 and baseline == "otsu"
    params.seeds = {"models": ["nope"], "seeds": [1, 2]}
    with pytest.raises(ConfigError, match="nope"):
        seeds.spread_config(params)
    params.seeds = {"models": ["maunet"], "seeds": [3, 3]}
    with pytest.raises(ConfigError, match="two different seeds"):
        seeds.spread_config(params)
