"""Losses against hand-computed values and MONAI; KL against the Gaussian formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal
from torch.distributions import kl_divergence as torch_kl

from microseg.train.losses import (
    DiceLoss,
    FocalLoss,
    Geco,
    TverskyLoss,
    free_bits,
    kl_divergence,
    linear_warmup,
)


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-0.2, 1.5], [0.0, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    return logits, target


def test_tversky_matches_hand_computation_batch_pooled() -> None:
    logits, target = _toy()
    p = torch.sigmoid(logits)
    tp, fp, fn = (p * target).sum(), (p * (1 - target)).sum(), ((1 - p) * target).sum()
    alpha, beta = 0.3, 0.7
    expected = 1 - (tp + 1e-5) / (tp + alpha * fp + beta * fn + 1e-5)
    got = TverskyLoss(alpha, beta)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    focal = TverskyLoss(alpha, beta, gamma=1.5)(logits, target)
    assert focal.item() == pytest.approx(expected.item() ** 1.5, rel=1e-6)


def test_tversky_weights_false_negatives_by_beta() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    miss = torch.full((1, 1, 4, 4), -20.0)  # predicts nothing: all false negatives
    recall_heavy = TverskyLoss(alpha=0.1, beta=0.9)(miss, target)
    precision_heavy = TverskyLoss(alpha=0.9, beta=0.1)(miss, target)
    assert recall_heavy > precision_heavy
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert TverskyLoss()(perfect, target).item() < 1e-6


def test_tversky_half_half_is_monai_dice() -> None:
    logits, target = _toy()
    assert TverskyLoss(0.5, 0.5)(logits, target).item() == pytest.approx(
        DiceLoss()(logits, target).item(), rel=1e-5
    )


def test_per_sample_tversky_differs_from_pooled() -> None:
    logits, target = _toy()
    target = target.clone()
    target[1] = 0  # the second sample has no foreground
    pooled = TverskyLoss(batch=True)(logits, target)
    per_sample = TverskyLoss(batch=False)(logits, target)
    assert per_sample > pooled


def test_tversky_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        TverskyLoss(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError):
        TverskyLoss(gamma=0.0)


def test_focal_matches_formula() -> None:
    logits, target = _toy()
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    gamma, alpha = 2.0, 0.25
    a_t = torch.where(target > 0, alpha, 1 - alpha)
    expected = (-a_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    got = FocalLoss(gamma=gamma, alpha=alpha)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()
    assert FocalLoss(gamma=gamma)(logits, target).item() == pytest.approx(plain.item(), rel=1e-5)


def _gauss(mu, sigma) -> Independent:
    return Independent(Normal(torch.as_tensor(mu), torch.as_tensor(sigma)), 1)


def test_kl_is_zero_for_equal_gaussians() -> None:
    d = _gauss([[0.3, -1.0, 2.0]], [[0.5, 1.0, 2.0]])
    same = _gauss([[0.3, -1.0, 2.0]], [[0.5, 1.0, 2.0]])
    kl = kl_divergence(d, same)
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)


def test_kl_matches_closed_form_and_torch() -> None:
    q = _gauss([[1.0, 0.0]], [[0.5, 2.0]])
    p = _gauss([[0.0, 0.0]], [[1.0, 1.0]])
    # sum over dims of log(sp/sq) + (sq^2 + (mq-mp)^2) / (2 sp^2) - 1/2
    expected = (math.log(1 / 0.5) + (0.25 + 1.0) / 2 - 0.5) + (math.log(1 / 2) + 4 / 2 - 0.5)
    assert kl_divergence(q, p).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    q = _gauss(torch.randn(4, 6), torch.rand(4, 6) + 0.1)
    p = _gauss(torch.randn(4, 6), torch.rand(4, 6) + 0.1)
    torch.testing.assert_close(kl_divergence(q, p), torch_kl(q, p))
    assert (kl_divergence(q, p) > 0).all()


def test_kl_has_gradients_and_plain_normal_works() -> None:
    mu = torch.zeros(3, requires_grad=True)
    kl = kl_divergence(Normal(mu + 1.0, torch.ones(3)), Normal(torch.zeros(3), torch.ones(3)))
    assert kl.shape == (3,)
    kl.sum().backward()
    assert mu.grad is not None and torch.all(mu.grad > 0)


def test_free_bits_and_warmup() -> None:
    kl = torch.tensor([0.2, 1.0, 3.0])
    assert free_bits(kl, 0.5).item() == pytest.approx((0.0 + 0.5 + 2.5) / 3)
    assert free_bits(kl, 0.0).item() == pytest.approx(kl.mean().item())
    assert linear_warmup(0, 10, 2.0) == 0.0
    assert linear_warmup(5, 10, 2.0) == pytest.approx(1.0)
    assert linear_warmup(50, 10, 2.0) == 2.0
    assert linear_warmup(0, 0, 2.0) == 2.0


def test_geco_multiplier_tracks_the_constraint() -> None:
    geco = Geco(goal=0.5, step_size=0.5, alpha=0.0)
    kl = torch.tensor(1.0)
    for _ in range(5):
        geco.loss(torch.tensor(0.9), kl)  # reconstruction worse than the goal
    high = geco.lam
    assert high > 1.0
    for _ in range(10):
        geco.loss(torch.tensor(0.1), kl)  # better than the goal: KL weighs more
    assert geco.lam < high
    state = geco.state_dict()
    other = Geco(goal=0.5)
    other.load_state_dict(state)
    assert other.lam == geco.lam and other.constraint_ma == geco.constraint_ma
    loss = geco.loss(torch.tensor(0.7, requires_grad=True), kl)
    assert loss.requires_grad
    assert geco.beta == pytest.approx(1 / geco.lam)
