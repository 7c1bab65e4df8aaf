"""Probabilistic U-Net: shapes, the efficient sampling path, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from microseg.errors import DataFormatError, MissingFileError
from microseg.models.punet import HEADS, ProbUNet, load_punet, pad_to_multiple, save_punet

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


def test_saved_model_is_plain_data_and_loads_with_weights_only(
    model: ProbUNet, tmp_path: Path
) -> None:
    path = save_punet(model, tmp_path / "best.pt", {"metrics": {"val_spine_dice": 0.5}})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "microseg.punet.model/1"
    assert payload["metrics"] == {"val_spine_dice": 0.5}
    assert load_punet(path).config == model.config
    # the old loop's best.pt (NumPy RNG state inside) still loads; pickled classes do not
    import numpy as np

    payload["rng"] = {"numpy": np.random.get_state()}
    torch.save(payload, tmp_path / "old.pt")
    assert load_punet(tmp_path / "old.pt").config == model.config
    payload["rng"] = Unsafe()
    torch.save(payload, tmp_path / "code.pt")
    with pytest.raises(DataFormatError, match="weights_only"):
        load_punet(tmp_path / "code.pt")


@dataclass
class Unsafe:
    """A class of this module: ``weights_only`` loading must refuse to build it."""

    x: int = 1


def test_registered_family_saves_loads_predicts(tmp_path: Path) -> None:
    import numpy as np

    from microseg.models import ModelFamily, get_model
    from microseg.models.punet import PunetSegmenter

    assert get_model("punet") is PunetSegmenter
    family = PunetSegmenter.build(**TINY, head_convs=2)
    assert isinstance(family, ModelFamily) and family.trainable
    saved = family.save(tmp_path / "model.pt")
    loaded = PunetSegmenter.load(saved, predict={"n_samples": 2})
    assert loaded.network.config == family.network.config
    rng = np.random.default_rng(0)
    (out,) = loaded.predict([rng.integers(0, 500, (2, 32, 32)).astype(np.uint16)], n_samples=2)
    assert out["prob_spine"].shape == (2, 32, 32)
