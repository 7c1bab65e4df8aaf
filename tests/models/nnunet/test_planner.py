"""The planner's decisions on synthetic fingerprints, its memory model and plans.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from microseg.errors import ConfigError, DataFormatError
from microseg.models.nnunet.fingerprint import Fingerprint, ImageRecord
from microseg.models.nnunet.planner import (
    GIB,
    Plan,
    PlannerConfig,
    count_parameters,
    memory_per_sample,
    plan_experiment,
    read_plans,
    topology,
    widths,
    write_plans,
)
from microseg.models.unet.network import build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fingerprint(n: int, shape: tuple[int, int], channels: int, modality: str, spacing=None):
    images = tuple(
        ImageRecord(f"s{i}", "train", modality, shape, channels, spacing or (None, None))
        for i in range(n)
    )
    return Fingerprint("prepared", "raw", ("train",), images, cache_percentiles=(1.0, 99.0))


ISO = (None, None)


def test_small_fluorescence_plan():
    """1000 greyscale 256x256 images, nnU-Net's 2D defaults (8 GiB)."""
    plan = plan_experiment(fingerprint(1000, (256, 256), 1, "fluorescence"))
    assert plan.patch_size == 256  # the median image, already a multiple of 2 ** 6
    assert plan.features == (32, 64, 128, 256, 512, 512, 512)  # doubling, capped at 512
    assert plan.strides == ((1, 1),) + ((2, 2),) * 6  # 256 / 2**6 = 4 px bottleneck
    assert plan.kernel_size == ((3, 3),) * 7 and plan.bottleneck == (4, 4)
    # memory: 0.336 GiB per patch + 16 bytes per weight (33.5 M weights) -> 22 fit 8 GiB
    assert (plan.batch_size, plan.batch_rule) == (22, "memory")
    assert plan.in_channels == 1
    norm = plan.normalisation
    assert (norm["scheme"], norm["input"], norm["percentiles"]) == ("percentile", "grey", [1, 99])
    assert norm["schemes"] == {"fluorescence": ["percentile"]}
    assert plan.memory_gb <= 8 and plan.notes == ()


def test_large_colour_tissue_plan():
    """20 colour 1000x1300 images: the patch shrinks to fit two samples, depth is capped."""
    plan = plan_experiment(fingerprint(20, (1000, 1300), 3, "tissue"))
    # 1000 -> 896 (a multiple of 2**7, 7 poolings is the cap); 896 needs 2 x 4.1 GiB, too
    # much with the weights; the next side a 7-pool net takes is 768 (2 x 3.0 GiB + 0.7 GiB)
    assert plan.patch_size == 768
    assert plan.strides == ((1, 1),) + ((2, 2),) * 7  # capped at max_pools = 7
    assert plan.bottleneck == (6, 6)
    assert plan.features == (32, 64, 128, 256, 512, 512, 512, 512)
    assert (plan.batch_size, plan.batch_rule) == (2, "memory")
    assert plan.in_channels == 3
    norm = plan.normalisation
    assert (norm["input"], norm["grey_images"]) == ("colour", "repeated to R=G=B")
    assert norm["schemes"] == {"tissue": ["percentile"] * 3}
    assert "shrunk to 768" in plan.notes[0]


def test_batch_is_capped_by_the_dataset_and_the_minimum():
    small = plan_experiment(fingerprint(60, (256, 256), 1, "fluorescence"))
    assert (small.batch_size, small.batch_rule) == (3, "dataset fraction")  # 5% of 60 images
    tiny = plan_experiment(fingerprint(10, (256, 256), 1, "fluorescence"))
    assert (tiny.batch_size, tiny.batch_rule) == (2, "minimum")
    free = plan_experiment(
        fingerprint(10, (256, 256), 1, "fluorescence"), PlannerConfig(max_dataset_fraction=0)
    )
    assert free.batch_size == 22


def test_cpu_knobs_make_a_small_network():
    cfg = PlannerConfig(base_features=16, max_features=256, max_patch=128, memory_gb=0.5)
    plan = plan_experiment(fingerprint(500, (256, 320), 1, "fluorescence"), cfg)
    assert plan.patch_size == 128 and plan.features == (16, 32, 64, 128, 256, 256)
    assert plan.batch_size >= 2 and plan.memory_gb <= 0.5
    with pytest.raises(ConfigError, match="fits"):
        plan_experiment(fingerprint(5, (256, 256), 1, "x"), PlannerConfig(memory_gb=0.001))


def test_anisotropic_spacing_pools_the_fine_axis_first():
    cfg = PlannerConfig(max_pools=7)
    topo = topology(64, (2.0, 1.0), cfg)  # y pixels twice as large as x
    assert topo.kernel_size[0] == (1, 3)  # no 3-wide kernel along the coarse axis yet
    assert topo.strides == ((1, 1), (1, 2), (2, 2), (2, 2), (2, 2), (2, 1))
    assert topo.pools == (4, 4) and topo.bottleneck(64) == (4, 4)
    assert topo.multiple == 32  # the unet family's DynUNet rule (product of largest strides)
    iso = topology(64, (500.0, 500.0), cfg)
    assert iso.strides == ((1, 1),) + ((2, 2),) * 4 and iso.multiple == 16


def test_memory_and_weights_models():
    cfg = PlannerConfig(base_features=8, max_features=32)
    for spacing in (ISO, (2.0, 1.0)):
        topo = topology(64, spacing, cfg)
        feats = widths(len(topo.strides), cfg)
        for channels in (1, 3):
            plan = Plan(64, 2, feats, topo.kernel_size, topo.strides, channels, {})
            net = build_unet(plan.unet_config())
            assert count_parameters(feats, topo, channels) == sum(
                p.numel() for p in net.parameters()
            )
            assert net(torch.zeros(1, channels, 64, 64)).shape == (1, 3, 64, 64)
    topo = topology(256, ISO, PlannerConfig())
    feats = widths(7, PlannerConfig())
    levels = [32 * 256**2, 64 * 128**2, 128 * 64**2, 256 * 32**2, 512 * 16**2, 512 * 8**2]
    hand = 8 * (11 * sum(levels) + 4 * 512 * 4**2)  # fp32 values and their gradients
    assert memory_per_sample(256, feats, topo) == hand
    assert hand / GIB == pytest.approx(0.336, abs=1e-3)


def test_plans_json_round_trip(tmp_path: Path):
    cfg = PlannerConfig(base_features=16)
    plan = plan_experiment(fingerprint(30, (1000, 1300), 3, "tissue"), cfg)
    path = write_plans(tmp_path / "plans.json", plan, cfg)
    doc = json.loads(path.read_text())
    assert doc["plan"]["spacing"] == [None, None] and doc["planner"]["base_features"] == 16
    assert doc["plan"]["strides"][1] == [2, 2]
    assert read_plans(path) == (plan, cfg)
    assert read_plans(path)[0].unet_config() == plan.unet_config()
    doc["format"] = "nope"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="plans"):
        read_plans(path)


def test_planner_config_is_checked():
    with pytest.raises(ConfigError, match="memory_gb"):
        PlannerConfig(memory_gb=0)
    with pytest.raises(ConfigError, match="unknown nnunet planner keys"):
        PlannerConfig.from_mapping({"base_feature": 8})
    with pytest.raises(ConfigError, match="too small for a 3-level network"):
        plan_experiment(fingerprint(3, (12, 40), 1, "fluorescence"))
