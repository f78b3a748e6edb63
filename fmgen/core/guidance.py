"""Wrappers that turn a network into the velocity field the solvers integrate: any prediction
type (``velocity_field``) and classifier-free guidance (``cfg_field``, ``cfg_net``), optionally
limited to an interval of t (``interval``; Kynkaanniemi et al. 2024, ``guidance_interval_of_sigmas``).

Pure torch math: no I/O, no config objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fmgen.core.grids import time_of_sigma
from fmgen.core.paths import GaussianPath, check_prediction_type
from fmgen.core.solver_base import Field

DEFAULT_T_MIN = 1e-4  # velocity_field keeps non-velocity predictions at t in [t_min, 1 - t_min]

Interval = tuple[float, float]
"""(lo, hi): guidance acts where lo <= t <= hi, with 0 <= lo < hi <= 1 (t = 0 noise, t = 1 data)."""


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


def check_interval(interval: Interval | None) -> Interval | None:
    """``interval`` as a tuple of two floats after checking 0 <= lo < hi <= 1; None passes."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be two times (lo, hi) in fmgen's t (0 = noise, 1 = data), "
            f"e.g. (0.25, 0.8); got {interval!r}"
        ) from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(
            f"guidance_interval ({lo:g}, {hi:g}) must satisfy 0 <= lo < hi <= 1 in fmgen's t "
            "(0 = noise, 1 = data), e.g. (0.25, 0.8)"
        )
    return lo, hi


def guidance_interval_of_sigmas(path: GaussianPath, sigma_lo: float, sigma_hi: float) -> Interval:
    """The interval of t where sigma_lo < sigma(t) <= sigma_hi, sigma = beta / alpha (EDM's
    noise level of x / alpha = z + sigma eps): Kynkaanniemi et al.'s (sigma_lo, sigma_hi].

    sigma falls as t rises, so the noisy end sigma_hi gives lo = sigma^-1(sigma_hi) and
    sigma_lo gives hi; on the linear path t = 1 / (1 + sigma). The paper's intervals are EDM's
    sigmas for data of standard deviation sigma_data = 0.5 (EDM2 on ImageNet-512 latents: (0.28,
    2.9], linear path t in [0.256, 0.781]; SD-XL (0.28, 5.42]); data of another scale moves them.
    The one boundary point t = lo that this closed interval adds has measure zero.
    """
    if not 0.0 <= sigma_lo < sigma_hi:
        raise ValueError(f"need 0 <= sigma_lo < sigma_hi; got ({sigma_lo}, {sigma_hi})")
    sig = torch.tensor([sigma_hi, sigma_lo], dtype=torch.float64)
    lo, hi = time_of_sigma(path, sig).tolist()
    return lo, (1.0 if sigma_lo == 0 else hi)


def cfg_field(
    cond: Field, uncond: Field, scale: float, *, interval: Interval | None = None
) -> Field:
    """Classifier-free guidance of two fields: uncond + scale * (cond - uncond).

    Two evaluations per call; for one network with a label argument ``cfg_net`` batches both
    halves into one call. scale = 1 returns ``cond`` and scale = 0 returns ``uncond`` exactly,
    with one evaluation. With ``interval`` = (lo, hi) guidance acts where lo <= t <= hi and
    ``cond`` alone (one evaluation) answers elsewhere, as in ``cfg_net``.
    """
    interval = check_interval(interval)
    if scale == 1.0:
        return cond
    if scale == 0.0:
        plain = uncond
    else:

        def plain(x: Tensor, t: Tensor) -> Tensor:
            u = uncond(x, t)
            return u + scale * (cond(x, t) - u)

    if interval is None:
        return plain
    return _limited(plain, cond, interval)


def cfg_net(
    net: Callable[[Tensor, Tensor, Tensor], Tensor],
    cond: Tensor,
    null: Tensor,
    scale: float,
    *,
    interval: Interval | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance of a conditional ``net(x, t, c)`` in one batched call.

    Returns ``(x, t) -> out(null) + scale * (out(cond) - out(null))`` where the conditional and
    null halves go through the network as one batch of 2B. Guidance is affine and so are the
    prediction-type conversions, so guiding the raw output (any prediction type) equals guiding
    its velocity: wrap the result in ``velocity_field``. scale = 1 (resp. 0) makes a single
    call of size B with ``cond`` (resp. ``null``), exactly the conditional (resp.
    unconditional) output.

    With ``interval`` = (lo, hi) (Kynkaanniemi et al. 2024: guidance harms at high noise and is
    unneeded at low noise) guidance acts where lo <= t <= hi; at a t outside it the call is
    ``net(x, t, cond)`` on the B rows alone, the conditional output. Deciding that costs one
    host read of t per call. The solvers give every row the same t; rows on both sides of a
    boundary take the guided batch and keep the conditional half where t lies outside.

    Args:
        cond: (B, ...) conditions (class labels, embeddings), fixed for the whole trajectory.
        null: the "empty" condition, the same shape as ``cond`` (e.g. the null label).
        interval: None (guidance at every t) or (lo, hi) with 0 <= lo < hi <= 1.
    """
    if null.shape != cond.shape:
        raise ValueError(
            f"null must have the shape of cond {tuple(cond.shape)}; got {tuple(null.shape)}"
        )
    interval = check_interval(interval)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, cond)

    if scale == 1.0:
        return conditional
    if scale == 0.0:

        def plain(x: Tensor, t: Tensor) -> Tensor:
            return net(x, t, null)

    else:
        both = torch.cat([cond, null])  # (2B, ...)

        def plain(x: Tensor, t: Tensor) -> Tensor:
            out = net(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, ...)
            c, u = out.chunk(2)
            return u + scale * (c - u)

    if interval is None:
        return plain
    return _limited(plain, conditional, interval)


def _limited(guided: Field, conditional: Field, interval: Interval) -> Field:
    """``guided`` where lo <= t <= hi, ``conditional`` elsewhere, each called only for a batch
    with a row that needs it (rows on both sides: both on every row, then chosen per row)."""
    lo, hi = interval

    def field(x: Tensor, t: Tensor) -> Tensor:
        inside = (t >= lo) & (t <= hi)  # (B,)
        n = int(inside.sum())  # one host read per call: how many rows are guided
        if n == 0:
            return conditional(x, t)
        if n == x.shape[0]:
            return guided(x, t)
        rows = inside.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        return torch.where(rows, guided(x, t), conditional(x, t))

    return field
