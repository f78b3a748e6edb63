"""Multistep exponential integrators: DPM-Solver++(2M) and (3M) (Lu et al. 2022), one field
evaluation per step, in lambda = log(alpha / beta) with the data prediction D = x0_hat.

They share ``fmgen.core.samplers``' signature; ``path`` is required (lambda and D come from its
schedule). The update is exact for the part of the ODE that is linear in x, so a grid is judged
by how well D is a polynomial of lambda over the last two or three steps: where D turns fast
(the noise levels at which samples decide for a mode), short steps in lambda matter most.

Pure torch math (+ tqdm): no I/O, no config objects.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath
from fmgen.core.solver_base import (
    Callback,
    Field,
    Step,
    at_time,
    check_final,
    check_ts,
    check_x,
    need_path,
    progress,
    x0_hat,
)


def sample_dpmpp_2m(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, one evaluation
    per step, in lambda = log(alpha / beta) with the data prediction D_i = x0_hat(x_i, t_i),
    taken from the velocity through the path (so any prediction type and guidance work):

        h_i = lambda_{i+1} - lambda_i,   r_i = h_{i-1} / h_i
        Dbar = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1}        (Dbar = D_0 on the first step)
        x_{i+1} = (beta_{i+1} / beta_i) x_i + alpha_{i+1} (1 - exp(-h_i)) Dbar

    Needs ``path``. At alpha_0 = 0 (lambda = -inf) the first step is x_1 = beta_1 x_0 +
    alpha_1 D_0, and the next one is first order too (r = inf). A step that ends at t = 1
    (lambda = inf) returns D_i, the update's limit, whatever ``final_step`` says: its
    second-order term would have r = 0.
    """
    return _multistep(2, field, x, ts, path, final_step, callback, disable)


def sample_dpmpp_3m(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """DPM-Solver++(3M): multistep, third order, one evaluation per step (Lu et al. 2022, the
    third-order multistep update of DPM-Solver++). Written here, not taken from diffusers'
    DPMSolverMultistepScheduler (which works on its own discrete timesteps, not a field on any
    Gaussian path), whose solver_order=3 update weights D2 by half (docs/math.md). With D_i,
    D_{i-1}, D_{i-2} and h_j = lambda_{j+1} - lambda_j:

        r0 = h_{i-1} / h_i,   r1 = h_{i-2} / h_i
        E0 = (D_i - D_{i-1}) / r0,   E1 = (D_{i-1} - D_{i-2}) / r1
        D1 = E0 + r0 / (r0 + r1) (E0 - E1),   D2 = 2 (E0 - E1) / (r0 + r1)
        phi1 = 1 - exp(-h_i),   phi2 = 1 - phi1 / h_i,   phi3 = phi2 / h_i - 1/2
        x_{i+1} = (beta_{i+1} / beta_i) x_i + alpha_{i+1} (phi1 D_i + phi2 D1 - phi3 D2)

    (the exact integral of exp(tau - h) times the quadratic through the three D's in lambda).
    Until two earlier D's exist the step is DPM-Solver++(2M)'s, and before that first order. A D taken at
    alpha = 0 (lambda = -inf, the first time of a grid from t = 0 on linear and vp-cosine)
    lies at no finite lambda, so the steps after it start over from first order, as in 2M. A
    step that ends at t = 1 returns D_i, the update's limit.
    """
    return _multistep(3, field, x, ts, path, final_step, callback, disable)


def _multistep(
    order: int,
    field: Field,
    x: Tensor,
    ts: Tensor,
    path: GaussianPath | None,
    final_step: str,
    callback: Callback | None,
    disable: bool,
) -> Tensor:
    """The loop of (2M) (``order`` 2) and (3M) (``order`` 3): one D per step, the last
    ``order - 1`` of them with their steps' h kept for the next updates."""
    name = f"dpm++{order}m"
    times = check_ts(ts)
    check_x(x)
    check_final(final_step, path, times)
    path = need_path(path, name)
    s = path.schedule(torch.tensor(times, dtype=torch.float64))
    alpha, beta = s.alpha.tolist(), s.beta.tolist()
    lam = (torch.log(s.alpha) - torch.log(s.beta)).tolist()  # -inf at alpha = 0, inf at beta = 0
    past: list[tuple[Tensor, float]] = []  # (D_j, h_j) of the previous finite steps, newest last
    for i in progress(times, disable, name):
        t, t_next = times[i], times[i + 1]
        tb = at_time(t, x)
        d = x0_hat(path, field(x, tb), x, tb)
        if t_next >= 1.0:
            x = d
        else:
            h = lam[i + 1] - lam[i]
            incr = _dpmpp_increment(d, past, h)  # past is empty after lambda = -inf
            x = (beta[i + 1] / beta[i]) * x + alpha[i + 1] * incr
            past = [] if math.isinf(h) else [*past, (d, h)][1 - order :]
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def _dpmpp_increment(d: Tensor, past: list[tuple[Tensor, float]], h: float) -> Tensor:
    """The bracket of the (3M) update, (x_{i+1} - (beta_{i+1} / beta_i) x_i) / alpha_{i+1}, from
    D_i = ``d``, step h = h_i and ``past`` = [(D_{i-2}, h_{i-2}), (D_{i-1}, h_{i-1})] (the last
    two, fewer at the start): third order with two, (2M) with one, first order with none."""
    phi1 = -math.expm1(-h)
    if not past:
        return phi1 * d
    d1, h1 = past[-1]
    if len(past) == 1:
        c = 0.5 * h / h1
        return phi1 * ((1 + c) * d - c * d1)
    d2, h2 = past[-2]
    r0, r1 = h1 / h, h2 / h
    e0, e1 = (d - d1) / r0, (d1 - d2) / r1  # first differences, in units of h
    d_1 = e0 + r0 / (r0 + r1) * (e0 - e1)  # h D'(lambda_i) + O(h^3)
    d_2 = 2 * (e0 - e1) / (r0 + r1)  # h^2 D''(lambda_i) + O(h^3)
    phi2 = 1 - phi1 / h
    phi3 = phi2 / h - 0.5
    return phi1 * d + phi2 * d_1 - phi3 * d_2
