"""ODE and SDE solvers from noise (t = 0) to data (t = 1), guidance and prediction-type wrappers.

Every sampler has one signature, ``sample_x(field, x, ts, *, path=None, final_step="solver",
callback=None, disable=True)`` (the stochastic ones, ``sample_euler_maruyama`` and Heun with
``churn``, add the source of their noise, ``generator`` or ``noise``), and returns the final x:

- ``field(x, t) -> velocity``: x (B, ...), t (B,); the solvers know nothing of networks or
  training. ``velocity_field`` turns a network of any prediction type into a field;
  ``cfg_field`` (two fields) and ``cfg_net`` (one network, one batched call) apply
  classifier-free guidance.
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
2 for DPM-Solver++(2M). The denoising last step sidesteps the singularity: D is smooth at t = 1.

Pure torch math (+ tqdm): no I/O, no config objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmgen.core.grids import sigma_of, time_of_sigma
from fmgen.core.paths import GaussianPath, check_prediction_type, expand_time

Field = Callable[[Tensor, Tensor], Tensor]
"""field(x (B, ...), t (B,)) -> velocity (B, ...)."""

FINAL_STEPS = ("denoise", "solver")
"""The step that ends at t = 1: x0_hat from the velocity (one evaluation), or the solver's own."""


@dataclass(frozen=True)
class Step:
    """What a callback sees after step ``i``: the interval [t, t_next] and the new x."""

    i: int
    t: float
    t_next: float
    x: Tensor  # (B, ...) the state at t_next


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


Callback = Callable[[Step], None]
Sigma = float | Callable[[Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]
"""noise(x (B, ...)) -> standard normal draws of x's shape, dtype and device."""

DEFAULT_T_MIN = 1e-4  # velocity_field keeps non-velocity predictions at t in [t_min, 1 - t_min]


# --- validation ----------------------------------------------------------------------------------


def _check_ts(ts: Tensor) -> list[float]:
    """ts as Python floats after checking: 1-D, at least 2 entries, strictly increasing, in [0, 1]."""
    if not isinstance(ts, Tensor) or ts.ndim != 1 or ts.numel() < 2:
        shape = tuple(ts.shape) if isinstance(ts, Tensor) else type(ts).__name__
        raise ValueError(f"ts must be a 1-D tensor of at least 2 times; got {shape}")
    times = ts.detach().double().cpu().tolist()
    if any(math.isnan(v) for v in times) or times[0] < 0 or times[-1] > 1:
        raise ValueError(
            f"ts must lie in [0, 1] (0 = noise, 1 = data); got [{times[0]:.6g}, {times[-1]:.6g}]"
        )
    if any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError("ts must be strictly increasing (from noise t = 0 towards data t = 1)")
    return times


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] < 1 or not x.is_floating_point():
        what = (
            f"{x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, Tensor)
            else type(x).__name__
        )
        raise ValueError(
            f"x must be a floating-point tensor of shape (B, ...) with B >= 1; got {what}"
        )


def _check_final(final_step: str, path: GaussianPath | None, times: list[float]) -> bool:
    """Whether the step ending at t = 1 denoises; a denoising step needs the path."""
    if final_step not in FINAL_STEPS:
        raise ValueError(
            f"final_step {final_step!r} is not one of {', '.join(map(repr, FINAL_STEPS))}"
        )
    denoise = final_step == "denoise" and times[-1] >= 1.0
    if denoise and path is None:
        raise ValueError(
            "final_step='denoise' needs the path (x0_hat comes from the velocity through it): "
            "pass path=..."
        )
    return denoise


def _need_path(path: GaussianPath | None, name: str) -> GaussianPath:
    if not isinstance(path, GaussianPath):
        raise ValueError(f"{name} needs the Gaussian path (its schedule): pass path=...")
    return path


def _steps(times: list[float], disable: bool, desc: str):
    return tqdm(range(len(times) - 1), disable=disable, desc=desc, leave=False)


def _at(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _x0(path: GaussianPath, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The data prediction x0_hat = D(x, t) of the velocity u (docs/math.md, affine in D)."""
    return path.convert(u, x, t, "velocity", "x0")


def _draw(x: Tensor, generator: torch.Generator | None, noise: Noise | None) -> Tensor:
    """Standard normal draws of x's shape: ``noise(x)`` when given, else from ``generator``."""
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    dw = noise(x)
    if not isinstance(dw, Tensor) or dw.shape != x.shape:
        got = tuple(dw.shape) if isinstance(dw, Tensor) else type(dw).__name__
        raise ValueError(f"noise(x) must return a tensor of x's shape {tuple(x.shape)}; got {got}")
    return dw.to(device=x.device, dtype=x.dtype)


def _one_source(generator: torch.Generator | None, noise: Noise | None) -> None:
    if noise is not None and generator is not None:
        raise ValueError("give the noise's source once: generator or noise, not both")


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
    times = _check_ts(ts)
    _check_x(x)
    denoise = _check_final(final_step, path, times)
    for i in _steps(times, disable, "euler"):
        t, t_next = times[i], times[i + 1]
        tb = _at(t, x)
        u = field(x, tb)
        x = _x0(path, u, x, tb) if denoise and t_next >= 1.0 else x + (t_next - t) * u
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
    times = _check_ts(ts)
    _check_x(x)
    denoise = _check_final(final_step, path, times)
    _one_source(generator, noise)
    if churn is not None and churn.s_churn > 0:
        path = _need_path(path, "heun with churn")
        sigmas = sigma_of(path, torch.tensor(times, dtype=torch.float64)).tolist()
        sigma_0 = sigma_of(path, torch.zeros((), dtype=torch.float64)).item()
    else:
        churn = None
    n = len(times) - 1
    for i in _steps(times, disable, "heun"):
        t, t_next = times[i], times[i + 1]
        t_hat = t
        if churn is not None and churn.s_min <= sigmas[i] <= churn.s_max:
            gamma = min(churn.s_churn / n, math.sqrt(2) - 1)
            if gamma > 0 and math.isfinite(sigmas[i]):  # sigma = inf: x is pure noise already
                x, t_hat = _churn(path, x, t, sigmas[i] * (1 + gamma), sigma_0, churn.s_noise,
                                  generator, noise)  # fmt: skip
        tb = _at(t_hat, x)
        d = field(x, tb)
        if denoise and t_next >= 1.0:
            x = _x0(path, d, x, tb)
        elif t_next < 1.0:
            x_euler = x + (t_next - t_hat) * d
            x = x + 0.5 * (t_next - t_hat) * (d + field(x_euler, _at(t_next, x)))
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
    return k * x + std * _draw(x, generator, noise), t_hat


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
    times = _check_ts(ts)
    _check_x(x)
    denoise = _check_final(final_step, path, times)
    for i in _steps(times, disable, "midpoint"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = _at(t, x)
        k1 = field(x, tb)
        if denoise and t_next >= 1.0:
            x = _x0(path, k1, x, tb)
        else:
            x = x + h * field(x + 0.5 * h * k1, _at(t + 0.5 * h, x))
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
    times = _check_ts(ts)
    _check_x(x)
    denoise = _check_final(final_step, path, times)
    for i in _steps(times, disable, "rk4"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = _at(t, x)
        k1 = field(x, tb)
        if denoise and t_next >= 1.0:
            x = _x0(path, k1, x, tb)
        elif t_next < 1.0:
            k2 = field(x + 0.5 * h * k1, _at(t + 0.5 * h, x))
            k3 = field(x + 0.5 * h * k2, _at(t + 0.5 * h, x))
            k4 = field(x + h * k3, _at(t_next, x))
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            k2 = field(x + h / 3 * k1, _at(t + h / 3, x))
            k3 = field(x + 2 * h / 3 * k2, _at(t + 2 * h / 3, x))
            x = x + h / 4 * (k1 + 3 * k3)
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


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
    times = _check_ts(ts)
    _check_x(x)
    _check_final(final_step, path, times)
    path = _need_path(path, "dpm++2m")
    s = path.schedule(torch.tensor(times, dtype=torch.float64))
    alpha, beta = s.alpha.tolist(), s.beta.tolist()
    lam = (torch.log(s.alpha) - torch.log(s.beta)).tolist()  # -inf at alpha = 0, inf at beta = 0
    d_prev, h_prev = None, math.nan
    for i in _steps(times, disable, "dpm++2m"):
        t, t_next = times[i], times[i + 1]
        tb = _at(t, x)
        d = _x0(path, field(x, tb), x, tb)
        if t_next >= 1.0:
            x = d
        else:
            h = lam[i + 1] - lam[i]
            if d_prev is None:
                d_bar = d
            else:
                c = 0.5 * h / h_prev  # 1 / (2 r); 0 after an infinite first step
                d_bar = (1 + c) * d - c * d_prev
            x = (beta[i + 1] / beta[i]) * x + alpha[i + 1] * -math.expm1(-h) * d_bar
            d_prev, h_prev = d, h
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
    times = _check_ts(ts)
    _check_x(x)
    path = _need_path(path, "the SDE")
    denoise = _check_final(final_step, path, times)
    _one_source(generator, noise)
    sigma_fn = sigma if callable(sigma) else (lambda t: torch.full_like(t, float(sigma)))
    last = len(times) - 2
    for i in _steps(times, disable, "sde"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = _at(t, x)
        u = field(x, tb)
        if denoise and t_next >= 1.0:
            x = _x0(path, u, x, tb)
        else:
            sig = expand_time(torch.as_tensor(sigma_fn(tb), dtype=x.dtype, device=x.device), x)
            score = path.score_from_velocity(u, x, tb)
            x = x + h * (u + 0.5 * sig**2 * score)
            if i < last:
                x = x + math.sqrt(h) * sig * _draw(x, generator, noise)
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


# --- wrappers: prediction type and guidance ------------------------------------------------------


def velocity_field(
    net_fn: Callable[[Tensor, Tensor], Tensor],
    path: GaussianPath,
    prediction_type: str,
    *,
    t_min: float = DEFAULT_T_MIN,
) -> Field:
    """The velocity field of ``net_fn(x, t)``, which returns a ``prediction_type`` prediction.

    eps / score / x0 predictions are converted through ``path.convert``, which divides by alpha
    (0 at t = 0 on linear and vp-cosine) or beta (0 at t = 1). For those types the network is
    evaluated and converted at t clamped into [t_min, 1 - t_min]: the first step of a grid that
    starts at t = 0 then uses the field at t_min (a change of O(t_min) in the result) instead
    of NaN. Velocity predictions pass through unchanged.
    """
    check_prediction_type(prediction_type)
    if not 0.0 < t_min < 0.5:
        raise ValueError(f"t_min must lie in (0, 0.5); got {t_min}")
    if prediction_type == "velocity":
        return net_fn

    def field(x: Tensor, t: Tensor) -> Tensor:
        t = t.clamp(t_min, 1 - t_min)
        return path.convert(net_fn(x, t), x, t, prediction_type, "velocity")

    return field


def cfg_field(cond: Field, uncond: Field, scale: float) -> Field:
    """Classifier-free guidance of two fields: uncond + scale * (cond - uncond).

    Two evaluations per call; for one network with a label argument ``cfg_net`` batches both
    halves into one call. scale = 1 returns ``cond`` and scale = 0 returns ``uncond`` exactly,
    with one evaluation.
    """
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond

    def field(x: Tensor, t: Tensor) -> Tensor:
        u = uncond(x, t)
        return u + scale * (cond(x, t) - u)

    return field


def cfg_net(
    net: Callable[[Tensor, Tensor, Tensor], Tensor],
    cond: Tensor,
    null: Tensor,
    scale: float,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance of a conditional ``net(x, t, c)`` in one batched call.

    Returns ``(x, t) -> out(null) + scale * (out(cond) - out(null))`` where the conditional and
    null halves go through the network as one batch of 2B. Guidance is affine and so are the
    prediction-type conversions, so guiding the raw output (any prediction type) equals guiding
    its velocity: wrap the result in ``velocity_field``. scale = 1 (resp. 0) makes a single
    call of size B with ``cond`` (resp. ``null``), exactly the conditional (resp.
    unconditional) output.

    Args:
        cond: (B, ...) conditions (class labels, embeddings), fixed for the whole trajectory.
        null: the "empty" condition, the same shape as ``cond`` (e.g. the null label).
    """
    if null.shape != cond.shape:
        raise ValueError(
            f"null must have the shape of cond {tuple(cond.shape)}; got {tuple(null.shape)}"
        )
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    if scale == 0.0:
        return lambda x, t: net(x, t, null)
    both = torch.cat([cond, null])  # (2B, ...)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = net(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
        c, u = out.chunk(2)
        return u + scale * (c - u)

    return guided
