"""Multistep exponential integrators: DPM-Solver++(2M) and (3M) (Lu et al. 2022), one field
evaluation per step, in lambda = log(alpha / beta) with the data prediction D = x0_hat.

They share ``fmgen.core.samplers``' signature; ``path`` is required (lambda and D come from its
schedule). The update is exact for the part of the ODE that is linear in x, so a grid is judged
by how well D is a polynomial of lambda over the last two or three steps: where D turns fast
(the noise levels at which samples decide for a mode), short steps in lambda matter most.

Two rules lower a step's order where the polynomial through the past D's is not to be trusted
(``step_order``, ``usable_past``):

- few steps (``lower_order_few_steps``, default on): a grid of fewer than ``FEW_STEPS`` = 15
  steps takes first order on its last step and at most second order on every other one, so
  (3M) runs as (2M) there. diffusers' DPMSolverMultistepScheduler (``lower_order_final``, Lu et
  al.'s "stabilizing trick" for fewer than 15 steps) lowers only the last two steps. That is
  not enough on the default job's trained model (guidance 2): with it, (3M)'s samples lie farther
  from the converged ODE solution (60-step runs of either solver agree to 0.01) than (2M)'s over
  whole 10-step runs on every grid, mean distance edm 1.92 vs 0.86 (2.14 without the rule; the
  largest class of unguided samples 17%, 29% without, 13% with (2M)), logsnr 0.58 vs 0.51,
  uniform 0.32 vs 0.26, while at 20 steps it ties or wins (edm 0.152 vs 0.156, logsnr 0.082 vs
  0.117, uniform 0.128 vs 0.128). The harm is not only at the end (docs/math.md: third order
  on one mid-noise step of the 10-step edm grid is enough). With the exact oracle field (no
  network error) (3M) wins at 10 steps too: the extrapolation through three D's multiplies the
  network's error of D by the sum of its weights' magnitudes, 4.9 to 7.4 on the edm grid's steps
  at 10 steps against (2M)'s 2.2. A step ending at t = 1 returns D, the first-order update's
  limit, whatever the rule says.
- step ratio: a past D enters the update only if its step h_j is at least ``MIN_STEP_RATIO``
  = 1/2 of the current one, r = h_j / h_i >= 1/2; the newest too short one and everything older
  are dropped.

A third rule lives in ``SamplingSpec`` (``lower_order_guided``), which knows the guidance scale
this module never sees: with guidance > 1, (3M) runs as (2M), as Lu et al. advise for guided
sampling; on the default job's model at 20 steps (3M)'s third order costs 0.4-10% FD with
guidance 2 and is within 2% of (2M) without guidance.

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

FEW_STEPS = 15
"""``lower_order_few_steps`` acts on grids of fewer steps (diffusers' and Lu et al.'s threshold:
"stabilizes the sampling for steps < 15, especially for steps <= 10")."""

MIN_STEP_RATIO = 0.5
"""The least r = h_j / h_i with which a past D (of the step h_j) enters the update of step h_i.

The (2M) bracket is phi1 (D_i + (D_i - D_{i-1}) / (2 r)): below r = 1/2 the weight of the
difference, 1 / (2 r), exceeds 1, so the extrapolation reaches farther past lambda_i than its two
nodes lie apart, and errors e of the network's D_i and D_{i-1} enter Dbar up to (1 + 1/r) e > 3 e
(-> inf as r -> 0; first order: e). (3M)'s second difference divides by r1 (r0 + r1) too. The
built-in grids keep h_{i-1} / h_i >= 0.54 and h_{i-2} / h_i >= 0.41 (2 to 64 steps, any t_start;
below 1/2 only on the step before the denoising one, where from 15 steps on uniform grids (3M)
drops to (2M)), so the rule is for hand-made list grids, where a short step before a long one
would extrapolate a slope taken over a fraction of the step it is used on."""


def sample_dpmpp_2m(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    lower_order_few_steps: bool = True,
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
    second-order term would have r = 0. On a grid of fewer than 15 steps the last step is first
    order (``lower_order_few_steps``), and a D_{i-1} whose step is under half of h_i is left out
    (``MIN_STEP_RATIO``).
    """
    return _multistep(2, field, x, ts, path, final_step, lower_order_few_steps, callback, disable)


def sample_dpmpp_3m(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    lower_order_few_steps: bool = True,
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
    step that ends at t = 1 returns D_i, the update's limit. On a grid of fewer than 15 steps
    every step is at most second order and the last one first order (``lower_order_few_steps``;
    the module docstring says why); a past D whose step is under half of h_i is left out with
    all older ones (``MIN_STEP_RATIO``).
    """
    return _multistep(3, field, x, ts, path, final_step, lower_order_few_steps, callback, disable)


def _multistep(
    order: int,
    field: Field,
    x: Tensor,
    ts: Tensor,
    path: GaussianPath | None,
    final_step: str,
    lower_order_few_steps: bool,
    callback: Callback | None,
    disable: bool,
) -> Tensor:
    """The loop of (2M) (``order`` 2) and (3M) (``order`` 3): one D per step, the last
    ``order - 1`` of them with their steps' h kept for the next updates; each step uses as many
    of them as ``step_order`` and ``usable_past`` allow."""
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
            k = step_order(order, i, len(times) - 1, lower_order_few_steps) - 1
            incr = _dpmpp_increment(d, usable_past(past, h, k), h)  # none after lambda = -inf
            x = (beta[i + 1] / beta[i]) * x + alpha[i + 1] * incr
            past = [] if math.isinf(h) else [*past, (d, h)][1 - order :]
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def step_order(order: int, i: int, steps: int, lower_order_few_steps: bool) -> int:
    """The highest order step ``i`` of ``steps`` may take: ``order``, except on a grid of fewer
    than ``FEW_STEPS`` steps under ``lower_order_few_steps``: first order for the last step, at
    most second order for the others."""
    if lower_order_few_steps and steps < FEW_STEPS:
        return 1 if i == steps - 1 else min(order, 2)
    return order


def usable_past(past: list[tuple[Tensor, float]], h: float, k: int) -> list[tuple[Tensor, float]]:
    """The newest at most ``k`` entries (D_j, h_j) of ``past`` that the update of step h may use:
    newest first, each with h_j >= ``MIN_STEP_RATIO`` h; the first too short one ends them."""
    kept: list[tuple[Tensor, float]] = []
    for d_j, h_j in reversed(past[max(0, len(past) - k) :] if k > 0 else []):
        if h_j < MIN_STEP_RATIO * h:
            break
        kept.insert(0, (d_j, h_j))
    return kept


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
