"""Time grids for the samplers: (N+1,) increasing times from noise (t = 0) towards data (t = 1).

``uniform`` spaces the steps evenly in t; ``edm`` spaces them as EDM does, evenly in
sigma^(1/rho) with sigma = beta / alpha, so they shrink towards the data; ``logsnr`` spaces them
evenly in the log signal-to-noise ratio 2 log(alpha / beta) = -2 log sigma (the rho -> inf limit
of ``edm``, the grid of DPM-Solver). ``check_times`` validates an explicit list of times.

Pure torch math: no I/O, no config objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath

TIME_GRIDS = ("uniform", "edm", "logsnr")
"""Spacings of ``time_grid``: uniform in t, EDM's in sigma = beta / alpha, uniform in log-SNR."""


def time_grid(
    steps: int,
    t_start: float = 0.0,
    t_end: float = 1.0,
    *,
    spacing: str = "uniform",
    path: GaussianPath | None = None,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``steps + 1`` increasing times from ``t_start`` to ``t_end`` (inclusive), shape (steps+1,).

    ``spacing="uniform"``: equal steps in t. ``spacing="edm"`` (Karras et al. 2022, eq. 5):
    equal steps in sigma^(1/rho), where sigma(t) = beta_t / alpha_t falls from sigma(0) (inf where
    alpha_0 = 0) to sigma(1) = 0, so the steps shrink towards t = 1, where the velocity's
    (dbeta / beta) x term is singular. With N points from the formula,

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    ``spacing="logsnr"``: equal steps in lambda = log(alpha / beta) = -log sigma,

        sigma_i = exp(log sigma_max + i / (N - 1) (log sigma_min - log sigma_max))

    (log-SNR = 2 lambda), so the end points' log-SNR, -inf at alpha = 0 and +inf at t = 1, are
    replaced by those of sigma_max and sigma_min. Both grids map sigma_i to t_i = sigma^-1(sigma_i)
    by bisection in float64 (``path`` is required) and handle the ends alike:

    - sigma_max is clamped to sigma(t_start), and the first time is t_start itself (the sampler
      starts from pure noise there), also when sigma(t_start) > sigma_max;
    - t_end = 1: N = steps, then a last point sigma = 0 (t = 1);
      t_end < 1: N = steps + 1 and sigma_min = sigma(t_end), so the last time is t_end.

    With few steps the interval that ends at sigma_min is long, and a solver in t meets the
    stiff (dbeta / beta) x term at its end: on the vp paths Heun and RK4 need about 10 steps
    or more on the edm grid (measured with the exact field: Heun on vp-linear diverges at 5 steps
    and misses the data by ~5 at 8); Euler does not need them, nor does a final step that
    returns the denoised estimate (``final_step="denoise"`` of ``SamplingSpec``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1; got t_start={t_start}, t_end={t_end}")
    if spacing == "uniform":
        return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=dtype)
    if spacing not in TIME_GRIDS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(TIME_GRIDS)}")
    if path is None:
        raise ValueError(
            f"spacing={spacing!r} needs the path (sigma = beta / alpha comes from its schedule): "
            f"call time_grid(..., spacing={spacing!r}, path=path)"
        )
    if not (rho > 0 and 0 < sigma_min < sigma_max):
        raise ValueError(
            f"need rho > 0 and 0 < sigma_min < sigma_max; got rho={rho}, "
            f"sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    ts = _sigma_spaced_times(steps, t_start, t_end, path, spacing, rho, sigma_min, sigma_max)
    ts = ts.to(device=device, dtype=dtype or torch.get_default_dtype())
    if bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError(
            f"the {spacing} grid of {steps} steps is not strictly increasing in {ts.dtype}; "
            "use fewer steps or float64"
        )
    return ts


def sigma_of(path: GaussianPath, t: Tensor) -> Tensor:
    """sigma(t) = beta_t / alpha_t, shape of t: inf where alpha = 0, 0 at t = 1."""
    s = path.schedule(t)
    return s.beta / s.alpha


def time_of_sigma(path: GaussianPath, sigmas: Tensor, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """t in [lo, hi] with sigma(t) = sigmas (float64, any shape), by bisection.

    sigma(t) is strictly decreasing, so a sigma above sigma(lo) gives lo and one below sigma(hi)
    gives hi; 60 halvings of [0, 1] reach float64 resolution.
    """
    sigmas = sigmas.to(torch.float64)
    lo_t = torch.full_like(sigmas, lo)
    hi_t = torch.full_like(sigmas, hi)
    for _ in range(60):
        mid = 0.5 * (lo_t + hi_t)
        above = sigma_of(path, mid) > sigmas  # the root lies right of mid
        lo_t, hi_t = torch.where(above, mid, lo_t), torch.where(above, hi_t, mid)
    return 0.5 * (lo_t + hi_t)


def _sigma_spaced_times(
    steps: int,
    t_start: float,
    t_end: float,
    path: GaussianPath,
    spacing: str,
    rho: float,
    sigma_min: float,
    sigma_max: float,
) -> Tensor:
    """The edm or logsnr grid of ``time_grid`` in float64 on the CPU, shape (steps+1,)."""
    ends = sigma_of(path, torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
    sigma_hi = min(sigma_max, ends[0])
    sigma_lo = ends[1] if t_end < 1.0 else sigma_min
    if not sigma_lo < sigma_hi:
        raise ValueError(
            f"sigma(t_start={t_start}) = {ends[0]:.3g} is not above sigma_min = {sigma_lo:.3g}; "
            "lower t_start or sigma_min"
        )
    n = steps + 1 if t_end < 1.0 else steps
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)  # (N,); [0.] when N = 1
    if spacing == "edm":
        hi, lo = sigma_hi ** (1 / rho), sigma_lo ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    else:  # logsnr
        hi, lo = math.log(sigma_hi), math.log(sigma_lo)
        sigmas = torch.exp(hi + ramp * (lo - hi))
    ts = time_of_sigma(path, sigmas, t_start, t_end)
    ts[0] = t_start
    if t_end < 1.0:
        ts[-1] = t_end
        return ts
    return torch.cat([ts, torch.ones(1, dtype=torch.float64)])


def check_times(times: Sequence[float], t_start: float | None = None) -> tuple[float, ...]:
    """An explicit grid as a tuple of floats, after checking it; a bad one raises ValueError.

    Needs at least two finite times, strictly increasing, the first equal to ``t_start`` (when
    given) and inside [0, 1), the last <= 1.
    """
    try:
        out = tuple(float(v) for v in times)
    except (TypeError, ValueError):
        raise ValueError(f"times must be a sequence of numbers; got {times!r}") from None
    if len(out) < 2:
        raise ValueError(f"times must hold at least two times (one step); got {list(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"times must be finite numbers; got {list(out)}")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(
            f"times must be strictly increasing (noise t = 0 to data t = 1); got {list(out)}"
        )
    if t_start is not None and out[0] != t_start:
        raise ValueError(
            f"times must start at t_start = {t_start}; got {out[0]} (set t_start={out[0]})"
        )
    if not (0.0 <= out[0] < 1.0 and out[-1] <= 1.0):
        raise ValueError(f"times must lie in [0, 1] and start below 1; got [{out[0]}, {out[-1]}]")
    return out
