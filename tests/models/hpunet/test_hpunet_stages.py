"""``spines.prob_model`` routes the stages to the hierarchical Prob-UNet, and
``compare_prob_models`` writes one row per model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from microseg.config import Params
from microseg.io.tiff import write_stack
from microseg.models.hpunet import HierarchicalProbUNet, HpunetSegmenter, save_hpunet
from microseg.models.punet import ProbUNet, PunetSegmenter, save_punet
from microseg.stages import prob_models
from microseg.stages import punet as punet_stage
from microseg.stages.common import Sample

ROOT = Path(__file__).resolve().parents[3]
SHAPE = (3, 32, 32)


def params_with(**spines) -> Params:
    params = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    return params.model_copy(update={"spines": params.spines.model_copy(update=spines)})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prob_models")
    torch.manual_seed(0)
    flat = ProbUNet(
        filters=(4, 8), latent_filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2
    )
    hier = HierarchicalProbUNet(filters=(4, 8, 16), latent_levels=2, latent_dim=2, head_convs=2)
    return {
        "punet": save_punet(flat, root / "punet" / "best.pt"),
        "hpunet": save_hpunet(hier, root / "hpunet" / "best.pt"),
    }


def test_default_is_the_flat_prob_unet_and_the_switch_routes_to_hpunet() -> None:
    from microseg.stages.predict_models import resolve_spec

    assert Params().spines.prob_model == "punet"
    assert params_with().spines.prob_model == "punet"  # the demo's params keep the flat model
    assert punet_stage.prob_model_dir(params_with()) == Path("models/punet")
    hp = params_with(prob_model="hpunet")
    assert punet_stage.prob_model_dir(hp) == Path("models/hpunet")
    # `microseg predict -m punet` / `microseg uncertainty`: the switched model's weights
    spec = resolve_spec(hp, "punet", task="spines")
    assert spec.weights == Path("models/hpunet/best.pt") and spec.family == "punet"
    assert resolve_spec(params_with(), "hpunet", task="spines").weights.parent.name == "hpunet"
    with pytest.raises(ValueError, match="prob_model"):
        params_with().spines.model_validate({"prob_model": "hierarchical"})


def test_a_file_loads_as_its_own_family(weights) -> None:
    assert isinstance(punet_stage.load_prob_model(weights["hpunet"]), HpunetSegmenter)
    flat = punet_stage.load_prob_model(weights["punet"])
    assert isinstance(flat, PunetSegmenter) and not isinstance(flat, HpunetSegmenter)


def test_predict_punet_stage_samples_the_switched_model(weights, tmp_path, monkeypatch) -> None:
    """``predict_stack`` (what ``predict_punet`` and ``microseg predict`` run) calls the
    hierarchical predictor for an hpunet file, the flat one for a network."""
    stack = np.random.default_rng(1).integers(0, 500, SHAPE).astype(np.uint16)
    write_stack(tmp_path / "s.tif", stack)
    params = params_with(prob_model="hpunet")
    params = params.model_copy(update={"punet": params.punet.model_copy(update={
        "predict": params.punet.predict.model_copy(update={"n_samples": 2})})})  # fmt: skip
    calls = []
    import microseg.models.hpunet as hp

    real = hp.predict_stack_hpunet
    monkeypatch.setattr(
        hp, "predict_stack_hpunet", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    res = punet_stage.predict_stack(
        punet_stage.load_prob_model(weights["hpunet"]), tmp_path / "s.tif", params
    )
    assert calls and res["prob_spine"].shape == SHAPE and res["n_samples"] == 2
    flat = punet_stage.load_prob_model(weights["punet"]).network
    assert punet_stage.predict_stack(flat, tmp_path / "s.tif", params)["prob_spine"].shape == SHAPE


def test_compare_stage_writes_one_row_per_model(weights, tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 14:18, :] = 1  # dendrite
    labels[:, 10:13, 6:9] = 2  # a spine
    image = (rng.normal(100, 5, SHAPE) + 300 * (labels > 0)).astype(np.uint16)
    write_stack(tmp_path / "img.tif", image)
    write_stack(tmp_path / "lab.tif", labels)
    raters = tmp_path / "raters"
    for i in range(3):  # three raters who disagree about the spine's extent
        write_stack(
            raters / f"rater{i + 1}_spines.tif",
            np.roll(labels == 2, i - 1, axis=2).astype(np.uint8),
        )
    bench = Sample(
        "bench", "test", tmp_path / "img.tif", tmp_path / "lab.tif", None, (500.0, 94.0, 94.0)
    )
    monkeypatch.setattr(prob_models, "samples", lambda *a, **k: [bench])
    params = params_with()
    params = params.model_copy(update={
        "paths": params.paths.model_copy(update={"metrics": tmp_path / "metrics"}),
        "punet": params.punet.model_copy(update={
            "predict": params.punet.predict.model_copy(update={"n_samples": 3, "size_thr": 1})}),
        "hpunet": params.hpunet.model_copy(update={"compare_plane_stride": 2}),
    })  # fmt: skip
    models = {k: v.parent for k, v in weights.items()}
    table = prob_models.compare_prob_models(params, models, raters_dir=raters)
    written = json.loads((tmp_path / "metrics" / "prob_models.json").read_text())
    assert set(written) == {"punet", "hpunet"} == set(table)
    for row in written.values():
        for key in ("spine_dice", "dendrite_dice", "spine_ece", "entropy_auroc",
                    "mutual_information_auroc", "variance_auroc"):  # fmt: skip
            assert key in row, key
        assert 0.0 <= row["spine_ece"] <= 1.0 and 0.0 <= row["entropy_auroc"] <= 1.0
        assert row["planes"] == 2  # planes 0 and 2 of 3
    with pytest.raises(Exception, match="no trained hpunet"):
        prob_models.compare_prob_models(params, {"hpunet": tmp_path / "none"}, raters_dir=raters)
