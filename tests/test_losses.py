"""Adversarial losses against values worked out by hand on tiny explicit tensors."""

import math

import pytest
import torch

from ladd.losses import (
    d_loss,
    disc_metrics,
    fake_side_per_sample,
    g_loss,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
)


def sp(x: float) -> float:
    """softplus written out: log(1 + exp(x))."""
    return math.log(1 + math.exp(x))


def close(a: torch.Tensor, b: float) -> None:
    torch.testing.assert_close(a, torch.tensor(b), rtol=0, atol=1e-6)


# One head: real = [2.0, 0.5], fake = [-0.5, 1.5].
REAL1 = torch.tensor([[2.0], [0.5]])
FAKE1 = torch.tensor([[-0.5], [1.5]])

# Two heads (columns):
#   real = [[1.0, -1.0],     fake = [[0.0, -2.0],
#           [0.5,  2.0]]             [1.0,  2.0]]
REAL2 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
FAKE2 = torch.tensor([[0.0, -2.0], [1.0, 2.0]])


def test_hinge_single_head():
    # d: mean(relu(1-2), relu(1-0.5)) + mean(relu(1-0.5), relu(1+1.5)) = mean(0, .5) + mean(.5, 2.5)
    close(hinge_d_loss(REAL1, FAKE1), 0.25 + 1.5)
    close(d_loss(REAL1, FAKE1, "hinge"), 1.75)
    # g: -mean(-0.5, 1.5) = -0.5
    close(hinge_g_loss(FAKE1), -0.5)
    close(g_loss(FAKE1, "hinge"), -0.5)


def test_hinge_mean_heads():
    # head 0: real relu(0), relu(.5) -> .25 ; fake relu(1), relu(2) -> 1.5  => 1.75
    # head 1: real relu(2), relu(-1) -> 1.0 ; fake relu(-1), relu(3) -> 1.5 => 2.5
    close(d_loss(REAL2, FAKE2, "hinge", "mean_heads"), (1.75 + 2.5) / 2)
    # g: head 0 -mean(0, 1) = -0.5 ; head 1 -mean(-2, 2) = 0  => -0.25
    close(g_loss(FAKE2, "hinge", "mean_heads"), -0.25)


def test_hinge_sum_logits():
    # real_sum = [0.0, 2.5], fake_sum = [-2.0, 3.0]
    # d: mean(relu(1), relu(-1.5)) + mean(relu(-1), relu(4)) = 0.5 + 2.0
    close(d_loss(REAL2, FAKE2, "hinge", "sum_logits"), 2.5)
    # g: -mean(-2, 3) = -0.5
    close(g_loss(FAKE2, "hinge", "sum_logits"), -0.5)


def test_default_aggregate_is_mean_heads():
    close(d_loss(REAL2, FAKE2), 2.125)
    close(g_loss(FAKE2), -0.25)


def test_nonsaturating_single_head():
    real = torch.tensor([[0.0], [2.0]])
    fake = torch.tensor([[1.0], [-1.0]])
    # d: mean(log(1+e^0), log(1+e^-2)) + mean(log(1+e^1), log(1+e^-1)) ~= 0.410038 + 0.813262
    expected_d = (sp(0.0) + sp(-2.0)) / 2 + (sp(1.0) + sp(-1.0)) / 2
    assert abs(expected_d - 1.223300) < 1e-6
    close(nonsaturating_d_loss(real, fake), expected_d)
    close(d_loss(real, fake, "nonsaturating"), expected_d)
    # g: mean(log(1+e^-1), log(1+e^1)) ~= 0.813262
    close(nonsaturating_g_loss(fake), (sp(-1.0) + sp(1.0)) / 2)
    close(g_loss(fake, "nonsaturating"), 0.813262)


def test_nonsaturating_aggregates():
    # mean_heads: head 0 real [1, .5] fake [0, 1]; head 1 real [-1, 2] fake [-2, 2]
    head0 = (sp(-1.0) + sp(-0.5)) / 2 + (sp(0.0) + sp(1.0)) / 2
    head1 = (sp(1.0) + sp(-2.0)) / 2 + (sp(-2.0) + sp(2.0)) / 2
    close(d_loss(REAL2, FAKE2, "nonsaturating", "mean_heads"), (head0 + head1) / 2)
    # sum_logits: real_sum [0, 2.5], fake_sum [-2, 3]
    summed = (sp(0.0) + sp(-2.5)) / 2 + (sp(-2.0) + sp(3.0)) / 2
    close(d_loss(REAL2, FAKE2, "nonsaturating", "sum_logits"), summed)
    close(g_loss(FAKE2, "nonsaturating", "sum_logits"), (sp(2.0) + sp(-3.0)) / 2)


def test_fake_side_per_sample_by_hand():
    """The fake half of d_loss, sample by sample: FAKE2 = [[0, -2], [1, 2]], sums [-2, 3]."""
    torch.testing.assert_close(fake_side_per_sample(FAKE2, "hinge", "mean_heads"),
                               torch.tensor([(1 + 0) / 2, (2 + 3) / 2]))
    torch.testing.assert_close(fake_side_per_sample(FAKE2, "hinge", "sum_logits"), torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(fake_side_per_sample(FAKE2, "nonsaturating", "mean_heads"),
                               torch.tensor([(sp(0.0) + sp(-2.0)) / 2, (sp(1.0) + sp(2.0)) / 2]))
    torch.testing.assert_close(fake_side_per_sample(FAKE2, "nonsaturating", "sum_logits"),
                               torch.tensor([sp(-2.0), sp(3.0)]))
    # Its mean is d_loss's fake term: with reals past the margin the real term is 0 (hinge).
    for aggregate in ("mean_heads", "sum_logits"):
        close(d_loss(torch.full((2, 2), 5.0), FAKE2, "hinge", aggregate),
              fake_side_per_sample(FAKE2, "hinge", aggregate).mean().item())


def test_nonsaturating_is_stable_for_large_logits():
    # softplus must not overflow where log(1 + exp(x)) in fp32 would.
    huge = torch.tensor([[200.0], [-200.0]])
    assert torch.isfinite(d_loss(huge, -huge, "nonsaturating"))
    # One sample per term is wrong by 200 logits: softplus(200) = 200, so each mean is 100.
    close(d_loss(huge, -huge, "nonsaturating"), 200.0)


def test_unknown_kind_or_aggregate_raises():
    with pytest.raises(ValueError, match="hinge, nonsaturating"):
        d_loss(REAL2, FAKE2, kind="wasserstein")
    with pytest.raises(ValueError, match="hinge, nonsaturating"):
        g_loss(FAKE2, kind="lsgan")
    with pytest.raises(ValueError, match="mean_heads, sum_logits"):
        d_loss(REAL2, FAKE2, aggregate="max")
    with pytest.raises(ValueError, match="mean_heads, sum_logits"):
        g_loss(FAKE2, aggregate="max")


def test_shape_errors():
    with pytest.raises(ValueError, match="n_heads"):
        d_loss(REAL2[:, 0], FAKE2[:, 0])
    with pytest.raises(ValueError, match="heads"):
        d_loss(REAL2, FAKE1)


def test_r1_linear_discriminator_equals_weight_norm():
    # D(x) = w . x has grad_x D = w for every sample, so R1 = ||w||^2.
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    x = torch.randn(4, 3, requires_grad=True)
    r1 = r1_penalty(x @ w, [x])
    close(r1.detach(), 14.0)  # 1 + 4 + 9
    # create_graph=True: the penalty reaches the discriminator's weights, d||w||^2/dw = 2w.
    r1.backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())


def test_r1_sums_over_inputs_and_means_over_batch():
    # Two inputs, one of them a grid like a teacher feature: D = x1 . w1 + sum(w2 * x2).
    w1 = torch.tensor([3.0, 4.0])  # ||w1||^2 = 25
    w2 = torch.full((2, 2, 2), 0.5)  # ||w2||^2 = 8 * 0.25 = 2
    x1 = torch.randn(3, 2, requires_grad=True)
    x2 = torch.randn(3, 2, 2, 2, requires_grad=True)
    logits = torch.stack([x1 @ w1, (x2 * w2).flatten(1).sum(1)], dim=1)  # (B, 2 heads)
    close(r1_penalty(logits.sum(dim=1), [x1, x2]).detach(), 27.0)
    # Non-linear per-sample case: D(x_b) = sum(x_b^2) -> grad 2 x_b -> R1 = mean_b 4 ||x_b||^2.
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    close(r1_penalty((x**2).sum(1), [x]).detach(), (4 * 1 + 4 * 2) / 2)


def test_r1_requires_grad_inputs():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.sum(1), [x])


def test_disc_metrics_by_hand():
    real = torch.tensor([[1.0, -2.0], [0.5, 0.5]])  # sums [-1, 1]
    fake = torch.tensor([[-1.0, -1.0], [0.5, -1.0]])  # sums [-2, -0.5]
    m = disc_metrics(real, fake, layers=[5, 10])
    expected = {
        "accuracy_real": 0.5,
        "accuracy_fake": 1.0,
        "logit_gap": 0.0 - (-1.25),
        "layer_5_real": 0.75,
        "layer_10_real": -0.75,
        "layer_5_fake": -0.25,
        "layer_10_fake": -1.0,
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert isinstance(m[k], float), k
        assert m[k] == pytest.approx(v), k


def test_disc_metrics_layer_count_mismatch():
    with pytest.raises(ValueError, match="3 layers"):
        disc_metrics(REAL2, FAKE2, layers=[1, 2, 3])
