"""Issue 18: `tune --target fusion --worker N` reached no sampler: every worker of a shared
study drew the same trials."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from microseg.config import load_params
from microseg.stages import fusion

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_index_reaches_the_fusion_study(tmp_path: Path, monkeypatch) -> None:
    import microseg.tune.fusion as tf

    seen = {}

    def fake(items, **kw):
        seen.update(kw)
        return {"high_conf": 0.5}, SimpleNamespace(best_value=0.7, trials=[1, 2])

    monkeypatch.setattr(tf, "tune_fusion", fake)
    monkeypatch.setattr(tf, "write_best_params", lambda out, best: None)
    monkeypatch.setattr(fusion, "samples", lambda *a, **k: [])
    params = load_params(ROOT / "params.yaml")
    fusion.tune_fusion_stage(params, out=tmp_path / "t.yaml", worker=3)
    assert seen["worker"] == 3
    fusion.tune_fusion_stage(params, out=tmp_path / "t.yaml")
    assert seen["worker"] == 0
