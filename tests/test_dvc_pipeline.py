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
