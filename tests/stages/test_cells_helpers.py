"""Small helpers of the nuclei stages."""

from __future__ import annotations

import pandas as pd

from microseg.stages.cells import stratified_head


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
