"""Probabilistic U-Net: shapes, the efficient sampling path, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microseg.errors import DataFormatError, MissingFileError
from microseg.models.punet import HEADS, ProbUNet, load_punet, pad_to_multiple

TINY = {"filters": (4, 8, 16), "latent_dim_spine": 3, "latent_dim_dendrite": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread beats two on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def model() -> ProbUNet:
    torch.manual_seed(0)
    return ProbUNet(**TINY).eval()


def _masks(b: int, size: int) -> torch.Tensor:
    return (torch.rand(b, 2, size, size) > 0.8).float()


@pytest.mark.parametrize("dual", [True, False])
def test_forward_shapes_with_and_without_masks(dual: bool) -> None:
    torch.manual_seed(0)
    model = ProbUNet(**TINY, dual_decoder=dual)
    x = torch.randn(3, 1, 32, 32)
    out = model(x, _masks(3, 32))
    assert set(out.logits) == set(HEADS)
    for k in HEADS:
        assert out.logits[k].shape == (3, 1, 32, 32)
        assert out.kl[k].shape == (3,)
        assert (out.kl[k] >= 0).all()
    assert out.prior["spine"].event_shape == (3,)
    assert out.prior["dendrite"].event_shape == (2,)
    assert out.posterior is not None

    plain = model(x)
    assert plain.kl is None and plain.posterior is None
    assert plain.logits["spine"].shape == (3, 1, 32, 32)


def test_dual_decoder_gives_heads_their_own_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32)
    dual = ProbUNet(**TINY, dual_decoder=True).unet_features(x)
    shared = ProbUNet(**TINY, dual_decoder=False).unet_features(x)
    assert not torch.equal(dual["spine"], dual["dendrite"])
    assert shared["spine"] is shared["dendrite"]


def test_two_and_a_half_d_input() -> None:
    model = ProbUNet(in_channels=3, **TINY)
    out = model(torch.randn(2, 3, 32, 32), _masks(2, 32))
    assert out.logits["dendrite"].shape == (2, 1, 32, 32)


def test_prior_mean_forward_is_deterministic(model: ProbUNet) -> None:
    x = torch.randn(2, 1, 32, 32)
    a = model(x, sample=False).logits["spine"]
    b = model(x, sample=False).logits["spine"]
    assert torch.equal(a, b)


def test_efficient_sampling_equals_naive_for_same_latents(model: ProbUNet) -> None:
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.unet_features(x)
        prior = model.prior(x)
    # a wide spread of latents so that the heads really depend on them
    z = {k: 3 * torch.randn(2, 5, model.latent_dims[k]) for k in HEADS}
    fast = model.sample_heads(features, prior, n_samples=5, temperature=1.0, z=z, chunk=2)
    for k in HEADS:
        assert fast[k].shape == (2, 5, 32, 32)
    with torch.no_grad():
        for s in range(5):
            naive = model.head_logits(
                model.unet_features(x), {k: z[k][:, s] for k in HEADS}
            )  # full forward per sample
            for k in HEADS:
                torch.testing.assert_close(fast[k][:, s], naive[k][:, 0], atol=1e-5, rtol=1e-5)
    spread = (fast["spine"][:, 0] - fast["spine"][:, 1]).abs().max()
    assert spread > 1e-4, "samples with different latents should differ"


def test_sample_heads_does_not_rerun_the_unet(model: ProbUNet, monkeypatch) -> None:
    x = torch.randn(1, 1, 32, 32)
    features, prior = model.unet_features(x), model.prior(x)

    def boom(*args, **kwargs):
        raise AssertionError("U-Net ran again")

    monkeypatch.setattr(model.unet, "forward", boom)
    monkeypatch.setattr(model.prior_net, "forward", boom)
    out = model.sample_heads(features, prior, n_samples=4)
    assert out["spine"].shape == (1, 4, 32, 32)


def test_temperature_divides_logits_and_chunking_is_invisible(model: ProbUNet) -> None:
    x = torch.randn(1, 1, 32, 32)
    features, prior = model.unet_features(x), model.prior(x)
    z = {k: torch.randn(1, 6, model.latent_dims[k]) for k in HEADS}
    t1 = model.sample_heads(features, prior, temperature=1.0, z=z, chunk=6)
    t2 = model.sample_heads(features, prior, temperature=2.0, z=z, chunk=1)
    for k in HEADS:
        torch.testing.assert_close(t2[k], t1[k] / 2.0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample_heads(features, prior, temperature=0.0, z=z)


def test_random_draws_follow_the_generator(model: ProbUNet) -> None:
    x = torch.randn(1, 1, 32, 32)
    features, prior = model.unet_features(x), model.prior(x)
    a = model.sample_heads(features, prior, 3, generator=torch.Generator().manual_seed(1))
    b = model.sample_heads(features, prior, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["spine"], b["spine"])


def test_pad_to_multiple() -> None:
    x = torch.randn(1, 1, 30, 33)
    y = pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 32, 36)
    assert torch.equal(y[..., :30, :33], x)
    assert pad_to_multiple(torch.randn(1, 1, 2, 2), 8).shape == (1, 1, 8, 8)


def test_load_round_trip_and_errors(model: ProbUNet, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"model_config": model.config, "model": model.state_dict()}, path)
    loaded = load_punet(path)
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(
        loaded(x, sample=False).logits["spine"], model(x, sample=False).logits["spine"]
    )
    with pytest.raises(MissingFileError):
        load_punet(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(DataFormatError, match="model_config"):
        load_punet(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DataFormatError, match="could not load"):
        load_punet(tmp_path / "junk.pt")


def test_registered_family_builds_trains_saves_loads_predicts(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    from microseg.io.d3set import D3Set, meta_row, write_d3set
    from microseg.models import get_model
    from microseg.models.punet import PunetSegmenter

    assert get_model("punet") is PunetSegmenter
    rng = np.random.default_rng(0)
    shape = (2, 32, 32)
    for split in ("train", "val"):
        mask = rng.random(shape) > 0.9
        d3 = D3Set(
            {"x0": rng.integers(0, 500, shape).astype(np.uint16)},
            {"x0": mask},
            {"x0": mask},
            pd.DataFrame([meta_row(shape, 0.094, 0.5)]),
        )
        write_d3set(tmp_path / f"{split}.d3set", d3)
    family = PunetSegmenter.build(**TINY, head_convs=2)
    result = family.train(
        tmp_path,
        tmp_path / "run",
        epochs=1,
        steps_per_epoch=1,
        batch_size=2,
        patch_size=32,
        latent_filters=(4, 8),
        progress=False,
        num_threads=1,
    )
    assert result.epochs_completed == 1 and result.best_path is not None
    saved = family.save(tmp_path / "model.pt")
    loaded = PunetSegmenter.load(saved)
    assert loaded.network.config == family.network.config
    (out,) = loaded.predict([rng.integers(0, 500, (2, 32, 32)).astype(np.uint16)], n_samples=2)
    assert out["prob_spine"].shape == (2, 32, 32)
