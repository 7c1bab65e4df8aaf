"""Small helpers of the nuclei stages."""

from __future__ import annotations

import pandas as pd
import pytest

from microseg.errors import ConfigError
from microseg.stages.cells import post_grid_for, stratified_head


def test_stratified_head_keeps_every_modality_and_its_share():
    rows = pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(100)],
            "modality": ["f"] * 80 + ["t"] * 18 + ["b"] * 2,
        }
    )
    out = stratified_head(rows, 20)
    counts = out["modality"].value_counts().to_dict()
    assert counts == {"f": 16, "t": 4, "b": 1}
    assert list(out.index) == sorted(out.index)  # manifest order kept
    assert stratified_head(rows, 200) is rows


def test_a_family_grid_replaces_the_shared_one_and_typos_are_refused():
    from microseg.config import load_params

    params = load_params("params.yaml")
    assert post_grid_for(params, "unet") == params.cells.post_grid
    assert post_grid_for(params, "maunet") == params.cells.post_grids["maunet"]
    assert "peak_h" in post_grid_for(params, "maunet")
    bad = params.model_copy(deep=True)
    bad.cells.post_grids["manuet"] = {"t_seed": [0.5]}
    with pytest.raises(ConfigError, match="manuet"):
        post_grid_for(bad, "unet")
