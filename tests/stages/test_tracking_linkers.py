"""``tracking.linker`` / ``tracking.compare_linkers`` from params: every linker links the same
masks and ``evaluate_tracking`` writes a row per segmenter x linker (``unet``,
``unet+laptrack``). Ground-truth masks (``masks: gt``) need no trained segmenter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.config import Params, load_params
from microseg.data.ingest import ingest
from microseg.data.synthesize import write_tracking
from microseg.errors import ConfigError
from microseg.stages import tracking

REPO = Path(__file__).resolve().parents[2]


def gt_params(root: Path, **overrides) -> Params:
    return load_params(
        REPO / "params.yaml",
        {
            "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "paths.prepared": str(root / "prepared"),
            "paths.metrics": str(root / "metrics"),
            "synth.tracking.n_frames": 16,
            "synth.tracking.shape": [96, 96],
            "tracking.masks": "gt",
            "tracking.segmenters": {"unet": {"family": "unet"}},
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tracking_linkers")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params = gt_params(root)
        write_tracking(params.synth.tracking, Path(params.datasets["tracking"].source))
        ingest("tracking", params.datasets["tracking"], params.paths.prepared, params.seed)
        yield root


def test_linker_laptrack_is_reachable_from_params(workdir: Path) -> None:
    params = gt_params(workdir, **{"tracking.linker": "laptrack", "tracking.compare_linkers": []})
    assert tracking.linkers(params) == ["laptrack"]
    res = workdir / "lap_only"
    summary = tracking.track(params, "unet", out_dir=res / "unet")
    assert (res / "unet" / "laptrack" / "03_RES" / "res_track.txt").is_file()
    assert not (res / "unet" / "03_RES").exists()
    assert {"n_tracks_laptrack", "link_seconds_laptrack"} <= set(summary["03"])
    out = tracking.evaluate_tracking(params, res_root=res)
    assert set(out) == {"masks", "unet+laptrack"}
    assert out["unet+laptrack"]["03"]["TRA"] >= 0.99
    assert out["unet+laptrack"]["03"]["DET"] == pytest.approx(1.0)


def test_both_linkers_give_a_row_each_beside_the_stable_name(workdir: Path) -> None:
    params = gt_params(workdir, **{"tracking.compare_linkers": ["laptrack"]})
    assert tracking.linkers(params) == ["ours", "laptrack"]
    tracking.track(params, "unet")
    out = tracking.evaluate_tracking(params)
    saved = json.loads((workdir / "metrics" / "tracking.json").read_text())
    assert set(saved) == set(out) == {"masks", "unet", "unet+laptrack"}
    for row in ("unet", "unet+laptrack"):
        scores = saved[row]["03"]
        for key in ("TRA", "DET", "SEG", "CT", "TF", "BC(0)", "HOTA", "IDF1", "MOTA"):
            assert key in scores, (row, key)
        # CCA needs a complete cell cycle in the ground truth; the count says why it is absent
        assert ("CCA" in scores) == (scores["gt_cell_cycles"] > 0)
        assert scores["TRA"] >= 0.99


def test_bad_laptrack_key_and_unknown_linker_are_config_errors(workdir: Path) -> None:
    params = gt_params(workdir, **{"tracking.laptrack": {"cutof": 3}})
    with pytest.raises(ConfigError, match=r"tracking\.laptrack"):
        tracking.track(params, "unet", out_dir=workdir / "bad")
    params = gt_params(workdir, **{"tracking.laptrack": {"merging_cutoff": 100.0}})
    with pytest.raises(ConfigError, match="merg"):
        tracking.linker_function(params, "laptrack")
    with pytest.raises(Exception, match="linker"):
        gt_params(workdir, **{"tracking.linker": "trackpy"})
