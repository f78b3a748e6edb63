"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") in fmgen's time.

Time convention: t = 0 noise, t = 1 data (the paper's is the reverse, t = 1 noise, and writes
u(z, r, t) with r < t; here u(x, t, r) with r >= t, the later time nearer the data).

The network predicts the AVERAGE velocity over [t, r] along the ODE dx/dtau = v(x, tau):

    (r - t) u(x_t, t, r) = integral_t^r v(x_tau, tau) dtau = Phi_{t->r}(x_t) - x_t

so one step x_r = x_t + (r - t) u(x_t, t, r) is exact, and u(x, t, t) = v(x, t). Since
Phi_{t->r}(x_t) = x_r does not change as t moves along the trajectory, d/dt of the line above
gives -u + (r - t) du/dt = -v, the MeanFlow identity

    u(x_t, t, r) = v(x_t, t) + (r - t) du/dt,   du/dt = v . grad_x u + partial_t u

(the total derivative along the trajectory: one forward-mode jvp of u at (x, t, r) with
tangents (v, 1, 0)). Training regresses u_theta on sg(v + (r - t) du_theta/dt) with the
conditional velocity in place of v (its expectation given x_t is the marginal one, and the
target is affine in v). docs/math.md derives it and lists the tests.

Pure torch math: no I/O, no config objects, no distributed code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fmgen.core.losses import prediction_type_of, sample_time
from fmgen.core.paths import GaussianPath, check_time, expand_time
from fmgen.core.solver_base import (
    FINAL_STEPS,
    Callback,
    Step,
    at_time,
    check_ts,
    check_x,
    progress,
)

AverageField = Callable[[Tensor, Tensor, Tensor], Tensor]
"""u(x (B, ...), t (B,), r (B,)) -> the average velocity over [t, r], (B, ...)."""


def sample_interval_times(
    batch_size: int,
    *,
    kind: str = "logit-normal",
    loc: float = 0.4,
    scale: float = 1.0,
    mode_scale: float = 1.29,
    equal_share: float = 0.75,
    t_min: float = 1e-5,
    t_max: float = 1 - 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Training intervals (t, r), each of shape (B,), t <= r, both in [t_min, t_max].

    Each row takes two draws of ``fmgen.core.losses.sample_time(kind, loc, scale, mode_scale,
    t_min, t_max)``, sorted (t the smaller), and then a share ``equal_share`` of the rows gets r = t
    (plain flow matching: u(x, t, t) = v). The paper's best (its Table 1) is logit-normal(-0.4,
    1) in ITS time (1 = noise), which is loc = +0.4 here (logit(1 - s) = -logit(s)), with 25%
    of the rows r != t.

    Draw order from ``generator`` (fixed: a seed gives the same intervals in every process):
    1. ``sample_time(B)``: the first time of every row;
    2. ``sample_time(B)``: the second time of every row;
    3. ``torch.rand(B)``: row b gets r = t where this draw < ``equal_share``.
    (For logit-normal each ``sample_time`` is one ``torch.randn(B)``, for uniform one
    ``torch.rand(B)``.)
    """
    if not 0.0 <= equal_share <= 1.0:
        raise ValueError(f"equal_share must lie in [0, 1]; got {equal_share}")
    draw = dict(kind=kind, loc=loc, scale=scale, mode_scale=mode_scale, t_min=t_min, t_max=t_max,
                generator=generator, device=device, dtype=dtype)  # fmt: skip
    first = sample_time(batch_size, **draw)  # (B,)
    second = sample_time(batch_size, **draw)  # (B,)
    equal = torch.rand(batch_size, generator=generator, device=device, dtype=first.dtype)
    t, r = torch.minimum(first, second), torch.maximum(first, second)
    return t, torch.where(equal < equal_share, t, r)


def _jvp_target(u: AverageField, x: Tensor, t: Tensor, r: Tensor, v: Tensor) -> Tensor:
    """v + (r - t) du/dt on every row, du/dt from one jvp with tangents (v, 1, 0); no grad."""
    with torch.no_grad():
        tangents = (v.to(x.dtype), torch.ones_like(t), torch.zeros_like(r))
        _, dudt = torch.func.jvp(u, (x, t, r), tangents)  # (B, ...)
        return v + expand_time(r - t, v) * dudt.to(v.dtype)


def meanflow_target(u: AverageField, x: Tensor, t: Tensor, r: Tensor, v: Tensor) -> Tensor:
    """The MeanFlow regression target sg(v + (r - t) du/dt), du/dt = v . grad_x u + partial_t u.

    du/dt comes from ONE ``torch.func.jvp`` of ``u`` at (x, t, r) with tangents (v, 1, 0),
    under ``torch.no_grad``. Rows with r == t take v alone and are left out of the jvp (75% of
    a batch of ``sample_interval_times``' default; the jvp costs about three forward passes):
    ``u`` is called on the rows with r != t only, so a ``u`` that closes over per-row tensors
    (labels) would see the wrong rows; ``meanflow_loss`` selects them itself. Choosing the rows
    is one host-device sync.

    Args:
        u: the average field u(x, t, r) (forward-mode differentiable).
        x: (B, ...) points at time t; t, r: (B,) with t <= r; v: (B, ...) the velocity at
            (x, t) (the conditional one in training), also the jvp's tangent in x.

    Returns:
        (B, ...) detached target, of v's dtype promoted with x's.
    """
    target = v.detach().to(torch.promote_types(v.dtype, x.dtype)).clone()
    x, t, r = x.detach(), t.detach(), r.detach()
    rows = _moving_rows(t, r)
    if rows is None:
        return _jvp_target(u, x, t, r, target)
    if rows.numel():
        target[rows] = _jvp_target(u, x[rows], t[rows], r[rows], target[rows])
    return target


def _moving_rows(t: Tensor, r: Tensor) -> Tensor | None:
    """Indices of the rows with r != t; None when that is every row (no indexing needed)."""
    moving = r != t
    rows = moving.nonzero().squeeze(1)  # the one sync of the target
    return None if rows.numel() == moving.numel() else rows


def _take(y: Any, rows: Tensor) -> Any:
    """The conditions of ``rows``: of a tensor (B, ...), of the tensors in a mapping or a
    dataclass (text conditions: tokens, mask, pooled), or None."""
    if y is None:
        return None
    if isinstance(y, Tensor):
        return y[rows]
    if isinstance(y, Mapping):
        return type(y)({k: _take(v, rows) for k, v in y.items()})
    if dataclasses.is_dataclass(y) and not isinstance(y, type):
        return dataclasses.replace(
            y, **{f.name: _take(getattr(y, f.name), rows) for f in dataclasses.fields(y)}
        )
    raise TypeError(
        f"conditions y must be a tensor, a mapping or dataclass of tensors, or None; got "
        f"{type(y).__name__}"
    )


def adaptive_weight(err: Tensor, *, power: float = 1.0, c: float = 1e-3) -> Tensor:
    """The paper's adaptive loss weight sg(1 / (err + c)^power), shape of err (B,).

    ``power`` 0 gives ones (plain MSE); 1 (the paper's best on ImageNet) makes the weighted
    loss err / (err + c), about 1 per sample: every sample pulls with a similar gradient
    norm, so the few large errors do not dominate. ``err`` is fmgen's per-sample squared error,
    the MEAN over the non-batch axes (the paper writes the squared norm, a sum), so ``c`` is
    on the scale of a mean squared error per element.
    """
    if power < 0 or c < 0:
        raise ValueError(f"adaptive_weight needs power >= 0 and c >= 0; got {power}, {c}")
    if power == 0:
        return torch.ones_like(err)
    return (err.detach() + c).pow(-power)


def meanflow_loss(
    net: Callable,
    z: Tensor,
    path: GaussianPath,
    *,
    t: Tensor,
    r: Tensor,
    eps: Tensor,
    y: Any = None,
    target_net: Callable | None = None,
    null: Any = None,
    keep: Tensor | None = None,
    guidance: float = 1.0,
    kappa: float = 0.0,
    power: float = 1.0,
    c: float = 1e-3,
    check_t: bool = True,
) -> Tensor:
    """Per-sample MeanFlow loss sg(w) * mean over non-batch axes of |u_theta - sg(u_tgt)|^2.

    x = alpha_t z + beta_t eps and the conditional velocity v = dalpha_t z + dbeta_t eps;
    u_tgt = v~ + (r - t) du/dt (``meanflow_target``). With classifier-free guidance folded
    into the target (paper Sec. 4.2 and its appendix's kappa), on rows where ``keep`` is True

        v~ = guidance v + kappa u(x, t, t | y) + (1 - guidance - kappa) u(x, t, t | null)

    and v~ = v on the other rows (their condition was dropped to null, they learn the
    unconditional field). With guidance = 1 and kappa = 0, v~ = v and there is no extra call.

    Args:
        net: ``net(x, t, y, r=r)`` (y may be None) with ``prediction_type == "velocity"`` (the
            average velocity; DDP / compile wrappers are looked through).
        z: (B, ...) data; t, r: (B,) times with t <= r; eps: (B, ...) noise.
        y: (B, ...) conditions as the network sees them (the dropped rows already null), a
            mapping or dataclass of such tensors, or None.
        target_net: the same network unwrapped of DDP (default ``net``), called under no_grad
            for the jvp and the guidance terms, so they neither sync gradients nor keep graphs.
        null: (B, ...) null conditions; keep: (B,) bool, True where y is the real condition.
            Both needed (with y) when guidance != 1 or kappa != 0.
        power, c: the adaptive weight (``adaptive_weight``); power 0 = plain MSE.
        check_t: validate t, r in [0, 1] and t <= r (one host-device sync).

    Returns:
        (B,) per-sample losses; the gradient flows through u_theta(x, t, r) only.
    """
    declared = prediction_type_of(net)
    if declared != "velocity":
        raise ValueError(
            f"meanflow_loss needs a network that predicts the (average) velocity; got "
            f"prediction_type {declared!r}"
        )
    guided = guidance != 1.0 or kappa != 0.0
    if guided and (y is None or null is None or keep is None):
        raise ValueError(
            f"guidance {guidance} / kappa {kappa} fold classifier-free guidance into the target "
            f"and need y, null and keep; got y {_given(y)}, null {_given(null)}, keep {_given(keep)}"
        )
    if check_t:
        t, r = check_time(t), check_time(r, "r")
        if bool((r < t).any()):
            raise ValueError("meanflow_loss needs t <= r (r is the later time, nearer the data)")
    target_net = net if target_net is None else target_net
    ps = path.sample(z, t, eps, check=False)
    x, v = ps.x, ps.velocity  # (B, ...)

    with torch.no_grad():
        v_tilde = v
        if guided:
            u_null = target_net(x, t, null, r=t).to(v.dtype)  # u(x, t, t | null)
            v_tilde = guidance * v + (1 - guidance - kappa) * u_null
            if kappa != 0.0:
                v_tilde = v_tilde + kappa * target_net(x, t, y, r=t).to(v.dtype)
            v_tilde = torch.where(expand_time(keep, v).bool(), v_tilde, v)
        target = v_tilde.clone()
        rows = _moving_rows(t, r)
        if rows is None:
            target = _jvp_target(lambda xs, ts, rs: target_net(xs, ts, y, r=rs), x, t, r, v_tilde)
        elif rows.numel():
            y_rows = _take(y, rows)
            target[rows] = _jvp_target(lambda xs, ts, rs: target_net(xs, ts, y_rows, r=rs),
                                       x[rows], t[rows], r[rows], v_tilde[rows])  # fmt: skip

    pred = net(x, t, y, r=r)
    if pred.shape != x.shape:
        raise ValueError(
            f"the network returned shape {tuple(pred.shape)}; expected the input's {tuple(x.shape)}"
        )
    pred = pred.to(torch.promote_types(pred.dtype, x.dtype))  # autocast may return bf16
    err = ((pred - target.to(pred.dtype)) ** 2).flatten(1).mean(1)  # (B,)
    return adaptive_weight(err, power=power, c=c) * err


def _given(v: Any) -> str:
    return "None" if v is None else "given"


def sample_meanflow(
    field: AverageField,
    x: Tensor,
    ts: Tensor,
    *,
    path: GaussianPath | None = None,
    final_step: str = "solver",
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """MeanFlow steps x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i, t_{i+1}): one evaluation each.

    ``field`` is an ``AverageField`` u(x, t, r) (t, r of shape (B,)); exact for the true
    average velocity on any grid (ts = [0, 1] is the one-step sampler). The signature is the
    other samplers' (``fmgen.core.samplers``); ``path`` is not needed and ``final_step`` is
    checked and ignored: the step to t = 1 is a MeanFlow step too, its field evaluated at
    t_{N-1} < 1, where nothing is singular.
    """
    times = check_ts(ts)
    check_x(x)
    if final_step not in FINAL_STEPS:
        raise ValueError(
            f"final_step {final_step!r} is not one of {', '.join(map(repr, FINAL_STEPS))}"
        )
    for i in progress(times, disable, "meanflow"):
        t, t_next = times[i], times[i + 1]
        x = x + (t_next - t) * field(x, at_time(t, x), at_time(t_next, x))
        if callback is not None:
            callback(Step(i, t, t_next, x))
    return x
