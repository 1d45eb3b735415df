"""Adversarial losses for LADD: hinge, non-saturating, R1, and discriminator metrics.

Pure tensor functions, no modules, no state. Logits come from `Discriminator.forward` with shape
(B, n_heads), one column per teacher layer. Two ways to combine the heads:

    "mean_heads" (LADD paper): loss_j on each head column j, then mean over heads
    "sum_logits" (the blog's variant): s = sum_j logits[:, j], then the loss on s

Losses (D minimises d_loss on real/fake, the student minimises g_loss on fake):

    hinge:          L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]      L_G = -E[D(fake)]
    nonsaturating:  L_D = E[softplus(-D(real))] + E[softplus(D(fake))]    L_G = E[softplus(-D(fake))]

(softplus(x) = log(1 + exp(x)), so the non-saturating loss is the logistic GAN loss.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("hinge", "nonsaturating")
AGGREGATES = ("mean_heads", "sum_logits")


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D = mean(relu(1 - real)) + mean(relu(1 + fake))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """L_G = -mean(fake)."""
    return -fake_logits.mean()


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D = mean(softplus(-real)) + mean(softplus(fake)) = -E[log sigmoid(real)] - E[log(1 - sigmoid(fake))]."""
    # softplus rather than log(1 + exp(x)): the latter overflows to inf for logits above ~88 in fp32.
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """L_G = mean(softplus(-fake)) = -E[log sigmoid(fake)]."""
    return F.softplus(-fake_logits).mean()


_D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "nonsaturating": nonsaturating_d_loss,
}
_G_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "hinge": hinge_g_loss,
    "nonsaturating": nonsaturating_g_loss,
}


def d_loss(
    real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge", aggregate: str = "mean_heads"
) -> Tensor:
    """Discriminator loss on (B, n_heads) logits.

    mean_heads: (1/H) sum_j L_D(real[:, j], fake[:, j])
    sum_logits: L_D(sum_j real[:, j], sum_j fake[:, j])
    """
    _check_kind(kind, aggregate)
    _check_logits(real_logits, "real_logits")
    _check_logits(fake_logits, "fake_logits")
    if real_logits.shape[1] != fake_logits.shape[1]:
        raise ValueError(
            f"real and fake logits have {real_logits.shape[1]} and {fake_logits.shape[1]} heads"
        )
    loss = _D_LOSSES[kind]
    if aggregate == "sum_logits":
        return loss(real_logits.sum(dim=1), fake_logits.sum(dim=1))
    # Per column, not on the flattened logits: identical for these batch-mean losses today, but it
    # keeps "one loss per head" true if a head ever gets its own weight or a non-mean reduction.
    heads = [loss(real_logits[:, j], fake_logits[:, j]) for j in range(real_logits.shape[1])]
    return torch.stack(heads).mean()


def g_loss(fake_logits: Tensor, kind: str = "hinge", aggregate: str = "mean_heads") -> Tensor:
    """Generator (student) loss on (B, n_heads) fake logits.

    mean_heads: (1/H) sum_j L_G(fake[:, j]);  sum_logits: L_G(sum_j fake[:, j])
    """
    _check_kind(kind, aggregate)
    _check_logits(fake_logits, "fake_logits")
    loss = _G_LOSSES[kind]
    if aggregate == "sum_logits":
        return loss(fake_logits.sum(dim=1))
    return torch.stack([loss(fake_logits[:, j]) for j in range(fake_logits.shape[1])]).mean()


def fake_side_per_sample(fake_logits: Tensor, kind: str = "hinge", aggregate: str = "mean_heads") -> Tensor:
    """(B,) the fake half of d_loss for each sample: relu(1 + D) (hinge) or softplus(D) (non-saturating),
    averaged over heads (mean_heads) or of the summed logit (sum_logits). d_loss's fake term is its mean."""
    _check_kind(kind, aggregate)
    _check_logits(fake_logits, "fake_logits")

    def side(x: Tensor) -> Tensor:
        return F.relu(1 + x) if kind == "hinge" else F.softplus(x)

    return side(fake_logits.sum(dim=1)) if aggregate == "sum_logits" else side(fake_logits).mean(dim=1)


def r1_penalty(real_logits_sum: Tensor, inputs: list[Tensor]) -> Tensor:
    """R1 gradient penalty on real samples: R1 = E_x[ ||grad_x D(x)||^2 ].

    D(x) is the sum of the real logits over heads; x is every input the heads see (the re-noised
    real teacher features, which the caller has set to require grad). The squared norm is summed
    over all inputs per sample, then averaged over the batch. The weight gamma/2 is the caller's.

    The gradient is taken with create_graph=True so the penalty itself back-propagates into the
    discriminator's parameters.
    """
    if not inputs:
        raise ValueError("r1_penalty needs at least one input tensor")
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise ValueError(f"r1_penalty: inputs[{i}] does not require grad; call requires_grad_() first")
    # Samples are independent, so d(sum over batch of D)/dx_b = dD(x_b)/dx_b: one backward pass
    # gives every per-sample gradient.
    grads = torch.autograd.grad(real_logits_sum.sum(), inputs, create_graph=True)
    sq_norm = sum(g.pow(2).flatten(1).sum(dim=1) for g in grads)  # (B,)
    return sq_norm.mean()


def disc_metrics(real_logits: Tensor, fake_logits: Tensor, layers: Sequence[int]) -> dict[str, float]:
    """Logging metrics on (B, n_heads) logits, as python floats.

    accuracy_real = mean(real_sum > 0), accuracy_fake = mean(fake_sum < 0),
    logit_gap = mean(real_sum) - mean(fake_sum), with *_sum = sum over heads;
    layer_{k}_real / layer_{k}_fake = mean of head k's column.
    """
    _check_logits(real_logits, "real_logits")
    _check_logits(fake_logits, "fake_logits")
    if not real_logits.shape[1] == fake_logits.shape[1] == len(layers):
        raise ValueError(
            f"disc_metrics: {len(layers)} layers but logits have {real_logits.shape[1]} (real) "
            f"and {fake_logits.shape[1]} (fake) columns"
        )
    # Metrics are for logging only: no graph, and fp32 so bf16 logits do not round the means.
    real, fake = real_logits.detach().float(), fake_logits.detach().float()
    real_sum, fake_sum = real.sum(dim=1), fake.sum(dim=1)
    out = {
        "accuracy_real": (real_sum > 0).float().mean().item(),
        "accuracy_fake": (fake_sum < 0).float().mean().item(),
        "logit_gap": (real_sum.mean() - fake_sum.mean()).item(),
    }
    for j, k in enumerate(layers):
        out[f"layer_{k}_real"] = real[:, j].mean().item()
        out[f"layer_{k}_fake"] = fake[:, j].mean().item()
    return out


def _check_kind(kind: str, aggregate: str) -> None:
    # Names come from the config; a typo must fail loudly, not fall back to a default loss.
    if kind not in KINDS:
        raise ValueError(f"unknown adversarial loss kind {kind!r}; valid: {', '.join(KINDS)}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown head aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}")


def _check_logits(logits: Tensor, name: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (B, n_heads), got {tuple(logits.shape)}")
