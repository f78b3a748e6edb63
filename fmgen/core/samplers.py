"""ODE and SDE solvers from noise (t = 0) to data (t = 1): Euler, Heun (with EDM's churn),
midpoint, RK4, Euler-Maruyama, and the registry that also holds the multistep DPM-Solver++
(``fmgen.core.multistep``) and the MeanFlow sampler (``fmgen.core.meanflow``, whose field is an
average velocity u(x, t, r), not a velocity).

Every sampler has one signature, ``sample_x(field, x, ts, *, path=None, final_step="solver",
callback=None, disable=True)`` (the stochastic ones, ``sample_euler_maruyama`` and Heun with
``churn``, add the source of their noise, ``generator`` or ``noise``), and returns the final x:

- ``field(x, t) -> velocity``: x (B, ...), t (B,); the solvers know nothing of networks or
  training. ``fmgen.core.guidance`` turns a network of any prediction type into a field
  (``velocity_field``) and applies classifier-free guidance (``cfg_field``, ``cfg_net``).
- ``ts``: (N+1,) increasing times in [0, 1]; ``fmgen.core.grids.time_grid`` makes one, uniform
  in t, with the EDM spacing in sigma = beta / alpha, or uniform in log-SNR.
- ``path``: the Gaussian path, for what needs the schedule: the data prediction
  x0_hat = D(x, t) from the velocity (``path.convert``), DPM-Solver++, churn, the SDE's score.
- ``final_step``: ``"solver"`` takes the solver's own last step; ``"denoise"`` makes the step
  that ends at t = 1 return x0_hat at t_{N-1}, one evaluation (on the linear path exactly the
  Euler step: x + (1 - t) u = D).
- ``callback(Step)`` is called after every step with the step index, the interval and the new x.
- ``disable`` turns off the tqdm progress bar (off by default: the math stays silent).

The field is never evaluated at t = 1, where beta = 0 and every conversion is singular: when
``ts`` ends at 1, Heun's last "solver" step is an Euler step (EDM, Algorithm 2), RK4's is
Heun's third-order method (nodes 0, 1/3, 2/3, three evaluations), the midpoint's node t + h/2
lies inside the interval, and DPM-Solver++'s update tends to x0_hat as lambda -> inf. For a field
smooth up to t = 1 one such step (local error O(h^2), resp. O(h^4)) would keep the global
orders 2 and 4. But u_t contains (dbeta_t / beta_t) x, singular at t = 1 on every path, so the
last interval limits the order of any solver in t: measured on a single data point (exact
solution alpha_t z + beta_t eps, tests/test_samplers.py), vp-cosine gives order 2 for Euler,
Heun and RK4 alike, vp-linear (beta ~ sqrt(1 - t)) well below 1, and linear is exact. Away from
t = 1 (``t_end < 1``) the orders are the textbook 1, 2, 2, 4 (Euler, Heun, midpoint, RK4), and
2 for DPM-Solver++(2M), 3 for (3M). The denoising last step sidesteps the singularity: D is smooth at t = 1.

Pure torch math (+ tqdm): no I/O, no config objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fmgen.core.grids import sigma_of, time_of_sigma
from fmgen.core.meanflow import sample_meanflow
from fmgen.core.multistep import sample_dpmpp_2m, sample_dpmpp_3m
from fmgen.core.paths import GaussianPath, expand_time
from fmgen.core.solver_base import (
    Callback,
    Field,
    Noise,
    Step,
    at_time,
    check_final,
    check_ts,
    check_x,
    draw_noise,
    need_path,
    one_noise_source,
    progress,
    x0_hat,
)

Sigma = float | Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic Heun (Karras et al. 2022, Algorithm 2): noise added before each step.

    Each step from t_i first raises the noise level sigma_i = beta / alpha to
    sigma_hat = (1 + gamma) sigma_i, gamma = min(s_churn / N, sqrt(2) - 1) where
    s_min <= sigma_i <= s_max (else 0), by fresh noise of scale s_noise, then takes the Heun
    step from t_hat = sigma^-1(sigma_hat) to t_{i+1}. The names are EDM's (S_churn, S_tmin,
    S_tmax, S_noise; its t is our sigma); s_churn = 0 is the deterministic Heun.
    """

    s_churn: float
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("s_churn", "s_min", "s_noise"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"churn {name} must be a finite number >= 0; got {v}")
        if not self.s_max >= self.s_min:
            raise ValueError(f"churn needs s_max >= s_min; got {self.s_max} < {self.s_min}")


# --- ODE solvers ---------------------------------------------------------------------------------


def sample_euler(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Explicit Euler: first order, one field evaluation per step."""
    times = check_ts(ts)
    check_x(x)
    denoise = check_final(final_step, path, times)
    for i in progress(times, disable, "euler"):
        t, t_next = times[i], times[i + 1]
        tb = at_time(t, x)
        u = field(x, tb)
        x = x0_hat(path, u, x, tb) if denoise and t_next >= 1.0 else x + (t_next - t) * u
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def sample_heun(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    churn: Churn | None = None,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Heun (explicit trapezoid, EDM Algorithm 2): second order, two evaluations per step.

    A "solver" step that ends at t = 1 is a plain Euler step, so the field is never evaluated
    at t = 1. ``churn`` (needs ``path``) adds EDM's noise before each step (``Churn``); its
    draws are ``noise(x)`` when given (standard normal of x's shape, one call per noisy step),
    else ``torch.randn(generator=generator)``, as for the SDE.
    """
    times = check_ts(ts)
    check_x(x)
    denoise = check_final(final_step, path, times)
    one_noise_source(generator, noise)
    if churn is not None and churn.s_churn > 0:
        path = need_path(path, "heun with churn")
        sigmas = sigma_of(path, torch.tensor(times, dtype=torch.float64)).tolist()
        sigma_0 = sigma_of(path, torch.zeros((), dtype=torch.float64)).item()
    else:
        churn = None
    n = len(times) - 1
    for i in progress(times, disable, "heun"):
        t, t_next = times[i], times[i + 1]
        t_hat = t
        if churn is not None and churn.s_min <= sigmas[i] <= churn.s_max:
            gamma = min(churn.s_churn / n, math.sqrt(2) - 1)
            if gamma > 0 and math.isfinite(sigmas[i]):  # sigma = inf: x is pure noise already
                x, t_hat = _churn(path, x, t, sigmas[i] * (1 + gamma), sigma_0, churn.s_noise,
                                  generator, noise)  # fmt: skip
        tb = at_time(t_hat, x)
        d = field(x, tb)
        if denoise and t_next >= 1.0:
            x = x0_hat(path, d, x, tb)
        elif t_next < 1.0:
            x_euler = x + (t_next - t_hat) * d
            x = x + 0.5 * (t_next - t_hat) * (d + field(x_euler, at_time(t_next, x)))
        else:
            x = x + (t_next - t_hat) * d
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def _churn(
    path: GaussianPath,
    x: Tensor,
    t: float,
    sigma_hat: float,
    sigma_0: float,
    s_noise: float,
    generator: torch.Generator | None,
    noise: Noise | None,
) -> tuple[Tensor, float]:
    """x at t moved back to the noise level sigma_hat > sigma(t): (x_hat, t_hat).

    EDM adds sqrt(sigma_hat^2 - sigma^2) noise to x / alpha; on x itself that is
    x_hat = (alpha_hat / alpha) x + sqrt(beta_hat^2 - (alpha_hat / alpha)^2 beta^2) s_noise eps,
    finite also where alpha_hat = 0 (sigma_hat beyond sigma(0): t_hat = 0, pure noise).
    """
    if sigma_hat >= sigma_0:
        t_hat = 0.0
    else:
        t_hat = time_of_sigma(path, torch.tensor(sigma_hat, dtype=torch.float64), 0.0, t).item()
    s = path.schedule(torch.tensor([t, t_hat], dtype=torch.float64))
    (alpha, alpha_hat), (beta, beta_hat) = s.alpha.tolist(), s.beta.tolist()
    k = alpha_hat / alpha
    std = math.sqrt(max(beta_hat**2 - (k * beta) ** 2, 0.0)) * s_noise
    return k * x + std * draw_noise(x, generator, noise), t_hat


def sample_midpoint(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Explicit midpoint: x + h u(x + h/2 u(x, t), t + h/2); second order, two evaluations per
    step. Its second node lies inside the interval, so it needs no special last step."""
    times = check_ts(ts)
    check_x(x)
    denoise = check_final(final_step, path, times)
    for i in progress(times, disable, "midpoint"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = at_time(t, x)
        k1 = field(x, tb)
        if denoise and t_next >= 1.0:
            x = x0_hat(path, k1, x, tb)
        else:
            x = x + h * field(x + 0.5 * h * k1, at_time(t + 0.5 * h, x))
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def sample_rk4(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Classical Runge-Kutta: fourth order, four evaluations per step.

    A "solver" step that ends at t = 1 uses Heun's third-order method instead (nodes t, t + h/3,
    t + 2h/3, three evaluations), so the field is never evaluated at t = 1 (see the module
    docstring for the order near t = 1).
    """
    times = check_ts(ts)
    check_x(x)
    denoise = check_final(final_step, path, times)
    for i in progress(times, disable, "rk4"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = at_time(t, x)
        k1 = field(x, tb)
        if denoise and t_next >= 1.0:
            x = x0_hat(path, k1, x, tb)
        elif t_next < 1.0:
            k2 = field(x + 0.5 * h * k1, at_time(t + 0.5 * h, x))
            k3 = field(x + 0.5 * h * k2, at_time(t + 0.5 * h, x))
            k4 = field(x + h * k3, at_time(t_next, x))
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            k2 = field(x + h / 3 * k1, at_time(t + h / 3, x))
            k3 = field(x + 2 * h / 3 * k2, at_time(t + 2 * h / 3, x))
            x = x + h / 4 * (k1 + 3 * k3)
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


# --- SDE solver ----------------------------------------------------------------------------------


def beta_sigma(path: GaussianPath, sigma: float) -> Callable[[Tensor], Tensor]:
    """sigma_t = sigma * beta_t: vanishes at t = 1, where the score term grows like 1 / beta_t."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0; got {sigma}")
    return lambda t: sigma * path.schedule(t).beta


def sample_euler_maruyama(
    field: Field,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath,
    sigma: Sigma,
    final_step: str = "solver",
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Euler-Maruyama for dX = [u + sigma_t^2 / 2 * s] dt + sigma_t dW (same marginals as the ODE).

    The score s comes from the velocity through ``path.score_from_velocity`` (finite at t = 0).
    ``sigma`` is a float (constant) or a callable t (B,) -> (B,) such as ``beta_sigma(path, s)``.
    The last step adds no noise, so the result is the mean of the final transition; with
    ``final_step="denoise"`` a last step that ends at t = 1 returns x0_hat instead.

    The increments are ``noise(x)`` when given (a callable returning standard normal draws of
    x's shape, called once per noisy step), else ``torch.randn(generator=generator)``. A batch
    drawn from one generator depends on the batch's composition; ``noise`` lets the caller
    draw each sample's increments from that sample's own stream (``fmgen.eval.generate``).
    """
    times = check_ts(ts)
    check_x(x)
    path = need_path(path, "the SDE")
    denoise = check_final(final_step, path, times)
    one_noise_source(generator, noise)
    sigma_fn = sigma if callable(sigma) else (lambda t: torch.full_like(t, float(sigma)))
    last = len(times) - 2
    for i in progress(times, disable, "sde"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = at_time(t, x)
        u = field(x, tb)
        if denoise and t_next >= 1.0:
            x = x0_hat(path, u, x, tb)
        else:
            sig = expand_time(torch.as_tensor(sigma_fn(tb), dtype=x.dtype, device=x.device), x)
            score = path.score_from_velocity(u, x, tb)
            x = x + h * (u + 0.5 * sig**2 * score)
            if i < last:
                x = x + math.sqrt(h) * sig * draw_noise(x, generator, noise)
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


# --- registry and evaluation counts --------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "rk4": sample_rk4,
    "sde": sample_euler_maruyama,
    "midpoint": sample_midpoint,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++3m": sample_dpmpp_3m,
    "meanflow": sample_meanflow,  # integrates an AVERAGE field u(x, t, r), not a velocity
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered under ``name``; an unknown name lists the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


class CountingField:
    """Wraps a field and counts its evaluations (``calls``) and the times it saw (``times``)."""

    def __init__(self, field: Field):
        self.field = field
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.times.append(float(t.max()))
        return self.field(x, t)


def count_nfe(field: Field) -> CountingField:
    """A counting wrapper around ``field``; read ``.calls`` after sampling."""
    return CountingField(field)
