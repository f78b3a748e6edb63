"""Power-function EMA and its post-hoc reconstruction (EDM2: Karras et al. 2024, Sec. 3, App. C).

A power-function EMA of exponent ``gamma`` averages the parameter trajectory theta(tau) with the
profile ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on [0, t], so its width grows with
training: ``sigma_rel``, the profile's standard deviation relative to t, is fixed instead of a
half-life. Counted in images seen with steps of ``t_delta`` images, its update is

    theta_hat <- beta theta_hat + (1 - beta) theta,    beta = (1 - t_delta / t)^(gamma + 1)

where t is the images seen after the step. The weight it gives the parameters of the step that
ends at t_k is exactly the profile's mass on (t_k - t_delta, t_k], so the discrete EMA is the
continuous profile applied to a piecewise-constant trajectory, for any t_delta.

Post hoc: snapshots of a few profiles (their ``gamma_i`` and times ``t_i``) are combined with the
weights x that make ``sum_i x_i p_i`` the least-squares fit (in L2 over tau) of the profile of
another ``(gamma, t)``; the inner products of power profiles have a closed form.

Pure math (torch and math only): no I/O, no config objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SIGMA_REL_MAX = math.sqrt(1 / 12)
"""sigma_rel of gamma = 0 (the plain average of the whole trajectory); larger values would need
gamma < 0, whose profile grows without bound near tau = 0 and is not tracked."""


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), the profile's relative width."""
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of a relative width 0 < sigma_rel < sqrt(1/12) (EDM2 Alg. 2).

    Squaring and clearing the denominators of ``gamma_to_sigma_rel`` gives the cubic
    ``g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0`` with ``s = sigma_rel^-2 > 12``. It is negative at
    g = 0 and convex for g > -7/3, so it has one positive root, and Newton's method started to its
    right (at 1 / sigma_rel, above the root since sigma_rel < 1 / (g + 2)) decreases to it
    monotonically: iterate until a step no longer decreases g.
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (gamma > 0), got {sigma_rel}"
        )
    s = sigma_rel**-2
    g = 1 / sigma_rel
    while True:
        value = ((g + 7) * g + 16 - s) * g + 12 - s
        slope = (3 * g + 14) * g + 16 - s
        nxt = g - value / slope
        if not nxt < g:
            return g
        g = nxt


def power_ema_beta(gamma: float, t: float, t_delta: float) -> float:
    """The decay of the update that brings the EMA from t - t_delta to t (images seen)."""
    return (1 - t_delta / t) ** (gamma + 1)


def power_profile_dot(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """``integral p_a(tau) p_b(tau) dtau`` of two power profiles (broadcast, float64).

    The integral runs to m = min(t_a, t_b); with M = max(t_a, t_b) and gamma_M the exponent of the
    profile that ends at M it is ``(gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) *
    (m / M)^gamma_M / M``, written with the ratio m / M <= 1 so that large gammas cannot overflow.
    """
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))  # fmt: skip
    longer = torch.where(t_a < t_b, gamma_b, gamma_a)
    big = torch.maximum(t_a, t_b)
    ratio = torch.minimum(t_a, t_b) / big
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * ratio**longer / big


@dataclass(frozen=True)
class PosthocWeights:
    """Weights on snapshots that reconstruct the EMA of one (gamma, t).

    Attributes:
        weights: (n,) float64, the coefficient of each snapshot (they sum to about 1).
        profile_error: ||sum_i x_i p_i - p|| / ||p|| in L2 over tau: 0 when the target is in
            the snapshots' span, small when it is well covered.
    """

    weights: Tensor
    profile_error: float


def posthoc_weights(
    t: Tensor, gamma: Tensor, t_target: float, gamma_target: float
) -> PosthocWeights:
    """Least-squares weights on snapshots (times ``t`` (n,), exponents ``gamma`` (n,)) whose
    combined profile best matches the power profile of ``(gamma_target, t_target)``.

    Solves the normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p>`` by
    least squares (snapshots of one profile at nearby times make A nearly singular; the
    rank-revealing solver then picks a solution among the equally good ones). Times are divided
    by t_target first: the inner products scale as 1 / t, and the weights do not change.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1) / t_target
    gamma = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
    if t.shape != gamma.shape or t.numel() == 0:
        raise ValueError(f"need one gamma per snapshot time and at least one, got {t.shape} and {gamma.shape}")  # fmt: skip
    one, g = torch.ones((), dtype=torch.float64), torch.tensor(gamma_target, dtype=torch.float64)
    a = power_profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])  # (n, n)
    b = power_profile_dot(t, gamma, one, g)  # (n,)
    x = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]  # (n,)
    norm2 = power_profile_dot(one, g, one, g)
    err2 = (x @ a @ x - 2 * x @ b + norm2) / norm2
    return PosthocWeights(x, math.sqrt(max(float(err2), 0.0)))
