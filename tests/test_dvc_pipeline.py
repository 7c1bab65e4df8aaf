"""The DVC graph itself: orderings that `dvc repro` must respect whatever order it picks."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    with Repo(str(ROOT)) as repo:
        g = repo.index.graph  # edges point from a stage to the stages it depends on
        return nx.relabel_nodes(g, {s: s.addressing for s in g.nodes})


@pytest.mark.parametrize(
    ("register", "dataset"), [("register_spines", "spines"), ("register_nuclei", "dsb2018")]
)
def test_promotion_runs_after_its_data_checks(graph: nx.DiGraph, register: str, dataset: str):
    """Promotion reads reports/validation/<dataset>/result.json: without the edge a fresh
    `dvc repro batch_eval` registered a model before validating its data, and refused it."""
    assert nx.has_path(graph, register, f"validate@{dataset}")


def test_batch_eval_runs_the_promoted_model(graph: nx.DiGraph):
    assert nx.has_path(graph, "batch_eval", "register_spines")


def test_tracking_scores_every_segmenter_on_its_own_masks(graph: nx.DiGraph):
    """One train_tracking_seg@/track@ pair per segmenter of params.yaml, all scored by the one
    evaluate_tracking; a segmenter's tracks come from its own masks only."""
    import yaml

    names = list(yaml.safe_load((ROOT / "params.yaml").read_text())["tracking"]["segmenters"])
    assert {"unet", "lstmunet"} <= set(names)
    for name in names:
        assert graph.has_edge("evaluate_tracking", f"track@{name}")
        assert graph.has_edge(f"track@{name}", f"train_tracking_seg@{name}")
        for other in set(names) - {name}:
            assert not nx.has_path(graph, f"track@{name}", f"train_tracking_seg@{other}")
    assert "train_tracking_seg" not in graph and "track" not in graph
