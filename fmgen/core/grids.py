"""Time grids for the samplers: (N+1,) increasing times from noise (t = 0) towards data (t = 1).

``uniform`` spaces the steps evenly in t; ``edm`` spaces them as EDM does, evenly in
sigma^(1/rho) with sigma = beta / alpha, so they shrink towards the data.

Pure torch math: no I/O, no config objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath

TIME_GRIDS = ("uniform", "edm")
"""Spacings of ``time_grid``: uniform in t, or the EDM schedule in sigma = beta / alpha."""


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

    and t_i = sigma^-1(sigma_i), solved by bisection in float64 (``path`` is required):

    - sigma_max is clamped to sigma(t_start), and the first time is t_start itself (the sampler
      starts from pure noise there), also when sigma(t_start) > sigma_max;
    - t_end = 1: N = steps, then a last point sigma = 0 (t = 1);
      t_end < 1: N = steps + 1 and sigma_min = sigma(t_end), so the last time is t_end.

    With few steps the interval that ends at sigma_min is long, and a solver in t meets the
    stiff (dbeta / beta) x term at its end: on the vp paths Heun and RK4 need about 10 steps
    or more on this grid (measured with the exact field: Heun on vp-linear diverges at 5 steps
    and misses the data by ~5 at 8); Euler does not need them.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1; got t_start={t_start}, t_end={t_end}")
    if spacing == "uniform":
        return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=dtype)
    if spacing != "edm":
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(TIME_GRIDS)}")
    if path is None:
        raise ValueError(
            "spacing='edm' needs the path (sigma = beta / alpha comes from its schedule): "
            "call time_grid(..., spacing='edm', path=path)"
        )
    if not (rho > 0 and 0 < sigma_min < sigma_max):
        raise ValueError(
            f"need rho > 0 and 0 < sigma_min < sigma_max; got rho={rho}, "
            f"sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    ts = _edm_times(steps, t_start, t_end, path, rho, sigma_min, sigma_max)
    ts = ts.to(device=device, dtype=dtype or torch.get_default_dtype())
    if bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError(
            f"the edm grid of {steps} steps is not strictly increasing in {ts.dtype}; "
            "use fewer steps or float64"
        )
    return ts


def _edm_times(
    steps: int,
    t_start: float,
    t_end: float,
    path: GaussianPath,
    rho: float,
    sigma_min: float,
    sigma_max: float,
) -> Tensor:
    """The EDM grid of ``time_grid`` in float64 on the CPU, shape (steps+1,)."""

    def sigma_of(t: Tensor) -> Tensor:
        s = path.schedule(t)
        return s.beta / s.alpha  # inf where alpha = 0

    ends = sigma_of(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
    sigma_hi = min(sigma_max, ends[0])
    sigma_lo = ends[1] if t_end < 1.0 else sigma_min
    if not sigma_lo < sigma_hi:
        raise ValueError(
            f"sigma(t_start={t_start}) = {ends[0]:.3g} is not above sigma_min = {sigma_lo:.3g}; "
            "lower t_start or sigma_min"
        )
    n = steps + 1 if t_end < 1.0 else steps
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)  # (N,); [0.] when N = 1
    sigmas = (sigma_hi ** (1 / rho) + ramp * (sigma_lo ** (1 / rho) - sigma_hi ** (1 / rho))) ** rho
    # sigma(t) is strictly decreasing: bisect all N points at once; 60 halvings of [0, 1]
    # reach float64 resolution
    lo = torch.full_like(sigmas, t_start)
    hi = torch.full_like(sigmas, t_end)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = sigma_of(mid) > sigmas  # the root lies right of mid
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    ts = 0.5 * (lo + hi)
    ts[0] = t_start
    if t_end < 1.0:
        ts[-1] = t_end
        return ts
    return torch.cat([ts, torch.ones(1, dtype=torch.float64)])
