"""ODE and SDE solvers from noise (t = 0) to data (t = 1), guidance and prediction-type wrappers.

Every sampler has one signature, ``sample_x(field, x, ts, *, callback=None, disable=True)``
(the SDE, ``sample_euler_maruyama``, adds ``path``, ``sigma`` and the source of its increments,
``generator`` or ``noise``), and returns the final x:

- ``field(x, t) -> velocity``: x (B, ...), t (B,); the solvers know nothing of networks or
  training. ``velocity_field`` turns a network of any prediction type into a field;
  ``cfg_field`` (two fields) and ``cfg_net`` (one network, one batched call) apply
  classifier-free guidance.
- ``ts``: (N+1,) increasing times in [0, 1]; ``fmgen.core.grids.time_grid`` makes one, uniform
  in t or with the EDM spacing in sigma = beta / alpha (steps shrinking towards t = 1).
- ``callback(Step)`` is called after every step with the step index, the interval and the new x.
- ``disable`` turns off the tqdm progress bar (off by default: the math stays silent).

The field is never evaluated at t = 1, where beta = 0 and every conversion is singular: when
``ts`` ends at 1, Heun's last step is an Euler step (EDM, Algorithm 2) and RK4's last step is
Heun's third-order method (nodes 0, 1/3, 2/3, three evaluations). For a field smooth up to
t = 1 one such step (local error O(h^2), resp. O(h^4)) would keep the global orders 2 and 4.
But u_t contains (dbeta_t / beta_t) x, singular at t = 1 on every path, so the last interval
limits the order of any solver: measured on a single data point (exact solution
alpha_t z + beta_t eps, tests/test_samplers.py), vp-cosine gives order 2 for Euler, Heun and RK4
alike, vp-linear (beta ~ sqrt(1 - t)) well below 1, and linear is exact. Away from t = 1
(``t_end < 1``) the orders are the textbook 1, 2, 4.

Pure torch math (+ tqdm): no I/O, no config objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmgen.core.paths import GaussianPath, check_prediction_type, expand_time

Field = Callable[[Tensor, Tensor], Tensor]
"""field(x (B, ...), t (B,)) -> velocity (B, ...)."""


@dataclass(frozen=True)
class Step:
    """What a callback sees after step ``i``: the interval [t, t_next] and the new x."""

    i: int
    t: float
    t_next: float
    x: Tensor  # (B, ...) the state at t_next


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


def _steps(times: list[float], disable: bool, desc: str):
    return tqdm(range(len(times) - 1), disable=disable, desc=desc, leave=False)


def _at(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


# --- ODE solvers ---------------------------------------------------------------------------------


def sample_euler(
    field: Field, x: Tensor, ts: Tensor, *, callback: Callback | None = None, disable: bool = True
) -> Tensor:
    """Explicit Euler: first order, one field evaluation per step."""
    times = _check_ts(ts)
    _check_x(x)
    for i in _steps(times, disable, "euler"):
        t, h = times[i], times[i + 1] - times[i]
        x = x + h * field(x, _at(t, x))
        if callback is not None:
            callback(Step(i, t, times[i + 1], x))
    return x


def sample_heun(
    field: Field, x: Tensor, ts: Tensor, *, callback: Callback | None = None, disable: bool = True
) -> Tensor:
    """Heun (explicit trapezoid, EDM Algorithm 2): second order, two evaluations per step.

    A step that ends at t = 1 is a plain Euler step, so the field is never evaluated at t = 1.
    """
    times = _check_ts(ts)
    _check_x(x)
    for i in _steps(times, disable, "heun"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        d = field(x, _at(t, x))
        x_euler = x + h * d
        if t_next < 1.0:
            x = x + 0.5 * h * (d + field(x_euler, _at(t_next, x)))
        else:
            x = x_euler
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


def sample_rk4(
    field: Field, x: Tensor, ts: Tensor, *, callback: Callback | None = None, disable: bool = True
) -> Tensor:
    """Classical Runge-Kutta: fourth order, four evaluations per step.

    A step that ends at t = 1 uses Heun's third-order method instead (nodes t, t + h/3, t + 2h/3,
    three evaluations), so the field is never evaluated at t = 1 (see the module docstring for
    the order near t = 1).
    """
    times = _check_ts(ts)
    _check_x(x)
    for i in _steps(times, disable, "rk4"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        k1 = field(x, _at(t, x))
        if t_next < 1.0:
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
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """Euler-Maruyama for dX = [u + sigma_t^2 / 2 * s] dt + sigma_t dW (same marginals as the ODE).

    The score s comes from the velocity through ``path.score_from_velocity`` (finite at t = 0).
    ``sigma`` is a float (constant) or a callable t (B,) -> (B,) such as ``beta_sigma(path, s)``.
    The last step adds no noise, so the result is the mean of the final transition.

    The increments are ``noise(x)`` when given (a callable returning standard normal draws of
    x's shape, called once per noisy step), else ``torch.randn(generator=generator)``. A batch
    drawn from one generator depends on the batch's composition; ``noise`` lets the caller
    draw each sample's increments from that sample's own stream (``fmgen.eval.generate``).
    """
    times = _check_ts(ts)
    _check_x(x)
    if noise is not None and generator is not None:
        raise ValueError("give the SDE increments' source once: generator or noise, not both")
    sigma_fn = sigma if callable(sigma) else (lambda t: torch.full_like(t, float(sigma)))
    last = len(times) - 2
    for i in _steps(times, disable, "sde"):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        tb = _at(t, x)
        u = field(x, tb)
        sig = expand_time(torch.as_tensor(sigma_fn(tb), dtype=x.dtype, device=x.device), x)
        score = path.score_from_velocity(u, x, tb)
        x = x + h * (u + 0.5 * sig**2 * score)
        if i < last:
            if noise is None:
                dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                dw = noise(x)
                if not isinstance(dw, Tensor) or dw.shape != x.shape:
                    got = tuple(dw.shape) if isinstance(dw, Tensor) else type(dw).__name__
                    raise ValueError(
                        f"noise(x) must return a tensor of x's shape {tuple(x.shape)}; got {got}"
                    )
                dw = dw.to(device=x.device, dtype=x.dtype)
            x = x + math.sqrt(h) * sig * dw
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x


# --- registry and evaluation counts --------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "rk4": sample_rk4,
    "sde": sample_euler_maruyama,
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
