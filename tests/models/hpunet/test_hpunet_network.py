"""The hierarchical Prob-UNet network: shapes, KL per scale, reproducible samples, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microseg.errors import DataFormatError
from microseg.models.hpunet import (
    HierarchicalProbUNet,
    HpunetSegmenter,
    is_hpunet_file,
    load_hpunet,
    save_hpunet,
)
from microseg.models.punet import HEADS, ProbUNet, save_punet


def tiny(**kw) -> HierarchicalProbUNet:
    torch.manual_seed(0)
    base = {"filters": (4, 8, 16), "latent_levels": 2, "latent_dim": 2, "head_convs": 2}
    return HierarchicalProbUNet(**{**base, **kw})


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("levels", [1, 2])
def test_forward_gives_logits_per_head_and_kl_per_scale(dual: bool, levels: int) -> None:
    net = tiny(dual_decoder=dual, latent_levels=levels)
    x = torch.randn(3, 1, 32, 32)
    masks = (torch.rand(3, 2, 32, 32) > 0.5).float()
    out = net(x, masks)
    assert set(out.logits) == set(HEADS)
    assert all(v.shape == (3, 1, 32, 32) for v in out.logits.values())
    assert out.kl is not None and len(out.kl) == levels
    assert all(k.shape == (3,) and torch.isfinite(k).all() and (k >= -1e-6).all() for k in out.kl)
    # latents are spatial maps at the coarsest decoder scales, coarsest first
    assert [tuple(d.mean.shape[1:]) for d in out.prior] == net.latent_shapes(32, 32)
    assert net.latent_shapes(32, 32)[0] == (2, 8, 8)
    prior_only = net(x)
    assert prior_only.kl is None and prior_only.posterior is None


def test_samples_are_reproducible_chunk_free_and_differ() -> None:
    net = tiny().eval()
    x = torch.randn(2, 1, 32, 32)

    def draw(chunk: int) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        parts = net.iter_sample_logits(x, 5, 1.4, generator=gens, chunk=chunk)
        return torch.cat([p["spine"] for p in parts], dim=1)

    a, b = draw(2), draw(5)
    assert a.shape == (2, 5, 32, 32)
    torch.testing.assert_close(a, b)
    assert a.std(dim=1).mean() > 0  # the latents reach the logits: samples differ


def test_temperature_divides_logits() -> None:
    net = tiny().eval()
    x = torch.randn(1, 1, 16, 16)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one = next(net.iter_sample_logits(x, 2, 1.0, generator=gen()))["dendrite"]
    two = next(net.iter_sample_logits(x, 2, 2.0, generator=gen()))["dendrite"]
    torch.testing.assert_close(one / 2, two)
    with pytest.raises(ValueError, match="temperature"):
        next(net.iter_sample_logits(x, 2, 0.0))


def test_bad_hierarchy_is_refused() -> None:
    with pytest.raises(ValueError, match="latent_levels"):
        tiny(latent_levels=3)  # 3 levels of filters leave 2 decoder scales


def test_save_load_round_trip_and_format(tmp_path: Path) -> None:
    net = tiny()
    path = save_hpunet(net, tmp_path / "m.pt", {"epoch": 3})
    back = load_hpunet(path)
    assert back.config == net.config and not back.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert is_hpunet_file(path) and HpunetSegmenter.owns(path)
    flat = save_punet(ProbUNet(filters=(4, 8), latent_filters=(4, 8)), tmp_path / "flat.pt")
    assert not is_hpunet_file(flat) and not is_hpunet_file(tmp_path / "missing.pt")
    with pytest.raises(DataFormatError, match="hpunet"):
        load_hpunet(flat)
