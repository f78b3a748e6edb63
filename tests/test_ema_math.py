"""Power-function EMA and its post-hoc reconstruction (EDM2), in float64 on synthetic trajectories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fmgen.core.ema import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    posthoc_weights,
    power_ema_beta,
    power_profile_dot,
    sigma_rel_to_gamma,
)

F64 = torch.float64


def test_sigma_rel_and_gamma_round_trip_and_match_edm2():
    # EDM2 (Sec. 3.2) tracks gamma 16.97 and 6.94 for sigma_rel 0.05 and 0.10
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (1e-3, 0.01, 0.05, 0.1, 0.2, 0.28, SIGMA_REL_MAX * (1 - 1e-9)):
        g = sigma_rel_to_gamma(s)
        assert g > 0 and abs(gamma_to_sigma_rel(g) - s) <= 1e-14 * s, s
    assert gamma_to_sigma_rel(0.0) == SIGMA_REL_MAX
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.3, math.nan):
        with pytest.raises(ValueError, match="sigma_rel must lie in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_quadrature():
    """<p_a, p_b> in closed form == Gauss-Legendre quadrature of the profiles' product."""
    nodes, w = (torch.tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(200))
    for t_a, g_a, t_b, g_b in [(1.0, 2.0, 3.0, 7.5), (5.0, 16.97, 2.0, 6.94), (4.0, 0.5, 4.0, 1.5)]:
        m = min(t_a, t_b)  # (a small non-integer exponent sum, a kink at 0, needs a finer rule)
        tau, weights = (nodes + 1) * m / 2, w * m / 2  # [0, m]: both profiles vanish beyond it
        p_a, p_b = ((g + 1) * tau**g / t ** (g + 1) for t, g in ((t_a, g_a), (t_b, g_b)))
        numeric = (weights * p_a * p_b).sum()
        exact = power_profile_dot(*(torch.tensor(v, dtype=F64) for v in (t_a, g_a, t_b, g_b)))
        assert torch.allclose(exact, numeric, rtol=1e-12, atol=0), (t_a, g_a, t_b, g_b)


def power_ema(theta: torch.Tensor, gamma: float, t_delta: int, every: int = 0):
    """The EMA of a (steps, D) trajectory by the update rule; snapshots every ``every`` steps."""
    h, snaps = torch.zeros(theta.shape[1], dtype=F64), []
    for k in range(len(theta)):
        t = (k + 1) * t_delta
        beta = power_ema_beta(gamma, t, t_delta)
        h = beta * h + (1 - beta) * theta[k]
        if every and (k + 1) % every == 0:
            snaps.append((t, h.clone()))
    return h, snaps


def test_update_rule_weights_each_step_by_the_profile_mass():
    """The discrete EMA gives step k the profile's mass on ((k-1) B, k B]: exact in float64."""
    steps, batch, gamma = 50, 8, 6.94
    h, _ = power_ema(torch.eye(steps, dtype=F64), gamma, batch)  # column k: the weight of step k
    t = steps * batch
    k = torch.arange(1, steps + 1, dtype=F64) * batch
    mass = (k ** (gamma + 1) - (k - batch) ** (gamma + 1)) / t ** (gamma + 1)
    assert torch.allclose(h, mass, rtol=1e-12, atol=1e-15)
    assert abs(float(h.sum()) - 1) < 1e-12


@pytest.fixture(scope="module")
def trajectory():
    """2000 steps of 8 images of a 32-d 'parameter': decay, oscillation, drift, random walk."""
    gen = torch.Generator().manual_seed(0)
    steps, dim = 2000, 32
    k = torch.arange(1, steps + 1, dtype=F64)[:, None] / steps
    u, v, w = torch.randn(3, dim, dtype=F64, generator=gen)
    walk = torch.randn(steps, dim, dtype=F64, generator=gen).cumsum(0) / math.sqrt(steps)
    theta = u * torch.exp(-3 * k) + v * torch.sin(5 * k) + w * k + 0.3 * walk
    batch, every, tracked = 8, 50, (0.05, 0.10)
    times, gammas, snaps = [], [], []
    for s in tracked:
        g = sigma_rel_to_gamma(s)
        for t, h in power_ema(theta, g, batch, every)[1]:
            times.append(t)
            gammas.append(g)
            snaps.append(h)
    return (
        theta,
        batch,
        torch.tensor(times, dtype=F64),
        torch.tensor(gammas, dtype=F64),
        torch.stack(snaps),
    )


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_untracked_sigma_rel_is_reconstructed_within_1e3(trajectory, sigma_rel):
    theta, batch, times, gammas, snaps = trajectory
    gamma, t_end = sigma_rel_to_gamma(sigma_rel), len(theta) * batch
    direct, _ = power_ema(theta, gamma, batch)
    sol = posthoc_weights(times, gammas, t_end, gamma)
    rebuilt = sol.weights @ snaps  # (D,)
    err = float((rebuilt - direct).norm() / direct.norm())
    assert err < 1e-3, err
    # the test can fail: the nearest tracked profiles at the end are far from the target
    last = [snaps[i] for i in range(len(times)) if times[i] == t_end]
    assert min(float((h - direct).norm() / direct.norm()) for h in last) > 1e-2
    assert sol.profile_error < 1e-2


@pytest.mark.parametrize(("sigma_rel", "step"), [(0.05, 2000), (0.10, 2000), (0.10, 1000)])
def test_tracked_sigma_rel_comes_back_within_1e6(trajectory, sigma_rel, step):
    theta, batch, times, gammas, snaps = trajectory
    gamma = sigma_rel_to_gamma(sigma_rel)
    direct, _ = power_ema(theta[:step], gamma, batch)
    sol = posthoc_weights(times, gammas, step * batch, gamma)
    err = float((sol.weights @ snaps - direct).norm() / direct.norm())
    assert err < 1e-6, err
    assert sol.profile_error < 1e-6
