"""Wrappers that turn a network into the velocity field the solvers integrate: any prediction
type (``velocity_field``) and classifier-free guidance (``cfg_field``, ``cfg_net``).

Pure torch math: no I/O, no config objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath, check_prediction_type
from fmgen.core.solver_base import Field

DEFAULT_T_MIN = 1e-4  # velocity_field keeps non-velocity predictions at t in [t_min, 1 - t_min]


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
