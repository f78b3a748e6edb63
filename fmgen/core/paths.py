"""Gaussian conditional probability paths and conversions between prediction types.

Time convention (one for the whole project): ``t = 0`` is pure noise, ``t = 1`` is data.

    x_t = alpha_t z + beta_t eps,   eps ~ N(0, I),   alpha_0 = 0, beta_0 = 1, alpha_1 = 1, beta_1 = 0

Names: ``z`` data, ``eps`` noise, ``x`` the current point, ``alpha, beta, dalpha, dbeta`` the
schedule and its time derivatives. A network declares what it predicts, one of
``PREDICTION_TYPES``:

- ``velocity``: u(x, t), the ODE velocity (flow matching)
- ``eps``: the noise estimate E[eps | x_t = x]
- ``score``: grad_x log p_t(x)
- ``x0``: the clean-data estimate D(x, t) = E[z | x_t = x] (named ``x0`` as in the diffusion
  literature; in this time convention the data sit at t = 1)

All four are affine in D (docs/math.md), so any one converts into any other. The
conversions divide by alpha or beta and are singular at t = 0 or t = 1; callers keep t inside
(0, 1) there (samplers end with an Euler step that never evaluates the field at t = 1).

This module is pure torch math: no I/O, no config objects, no distributed code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("velocity", "eps", "score", "x0")


@dataclass(frozen=True)
class Schedule:
    """Schedule values at time ``t``; every field has the shape of ``t``."""

    alpha: Tensor
    beta: Tensor
    dalpha: Tensor
    dbeta: Tensor


@dataclass(frozen=True)
class PathSample:
    """A draw ``x_t = alpha_t z + beta_t eps`` with its conditional velocity target."""

    x: Tensor  # (B, ...) the noisy point x_t
    t: Tensor  # (B,)
    z: Tensor  # (B, ...) data
    eps: Tensor  # (B, ...) noise
    velocity: Tensor  # (B, ...) dalpha_t z + dbeta_t eps


def check_prediction_type(name: str) -> str:
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction type {name!r}; valid prediction types: {', '.join(PREDICTION_TYPES)}"
        )
    return name


def check_time(t: Tensor | float, name: str = "t") -> Tensor:
    """Return ``t`` as a tensor, raising a clear error if any value lies outside [0, 1]."""
    t = torch.as_tensor(t)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    # one fused test, so one host-device sync however many conditions
    if t.numel() and bool((torch.isnan(t) | (t < 0) | (t > 1)).any()):
        raise ValueError(
            f"{name} must lie in [0, 1] (0 = noise, 1 = data); got values in "
            f"[{t.min().item():.6g}, {t.max().item():.6g}]"
        )
    return t


def expand_time(v: Tensor, x: Tensor, name: str = "t") -> Tensor:
    """Broadcast a per-sample value (scalar or shape (B,)) against ``x`` of shape (B, ...)."""
    if v.ndim == 0:
        return v.to(x.dtype)
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must be a scalar or have shape (B,) = ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}; got shape {tuple(v.shape)}"
        )
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


class GaussianPath(ABC):
    """p_t(x | z) = N(x; alpha_t z, beta_t^2 I), described by alpha_t, beta_t and derivatives."""

    name: str = ""

    @abstractmethod
    def _schedule(self, t: Tensor) -> Schedule: ...

    def schedule(self, t: Tensor | float, *, check: bool = True) -> Schedule:
        """alpha_t, beta_t, dalpha_t, dbeta_t at ``t`` (any shape), after checking t in [0, 1].

        ``check=False`` skips the check (a host-device sync) for times a caller has checked
        already: the losses check their t once per call, not in every conversion.
        """
        return self._schedule(check_time(t) if check else torch.as_tensor(t))

    def _coeffs(self, t: Tensor | float, x: Tensor, check: bool = True) -> Schedule:
        # at least x's precision: a Python float t would otherwise become float32 and round
        # alpha, beta of a float64 x (relative error ~1e-7)
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.to(device=x.device, dtype=torch.promote_types(t.dtype, x.dtype))
        else:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        s = self.schedule(t, check=check)
        return Schedule(*(expand_time(v, x) for v in (s.alpha, s.beta, s.dalpha, s.dbeta)))

    # --- sampling and conditional quantities -------------------------------------------------

    def sample(
        self, z: Tensor, t: Tensor, eps: Tensor | None = None, *, check: bool = True
    ) -> PathSample:
        """Draw x_t given data ``z`` (B, ...) and times ``t`` (B,); ``eps`` defaults to N(0, I)."""
        if eps is None:
            eps = torch.randn_like(z)
        _check_same_shape(z, eps, "z", "eps")
        s = self._coeffs(t, z, check)
        x = s.alpha * z + s.beta * eps
        return PathSample(
            x=x, t=torch.as_tensor(t), z=z, eps=eps, velocity=s.dalpha * z + s.dbeta * eps
        )

    def conditional_velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """u_t(x | z) = dalpha z + (dbeta / beta) (x - alpha z)."""
        _check_same_shape(x, z, "x", "z")
        s = self._coeffs(t, x)
        return s.dalpha * z + s.dbeta / s.beta * (x - s.alpha * z)

    def conditional_score(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """s_t(x | z) = -(x - alpha z) / beta^2."""
        _check_same_shape(x, z, "x", "z")
        s = self._coeffs(t, x)
        return -(x - s.alpha * z) / s.beta**2

    def conditional_log_prob(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """log N(x; alpha z, beta^2 I), summed over all but the batch axis: shape (B,)."""
        _check_same_shape(x, z, "x", "z")
        s = self._coeffs(t, x)
        d = x[0].numel()
        sq = ((x - s.alpha * z) ** 2).flatten(1).sum(1)
        beta = s.beta.flatten()
        return -sq / (2 * beta**2) - d * torch.log(beta) - 0.5 * d * math.log(2 * math.pi)

    # --- conversions: direct formulas of docs/math.md ----------------------------------------

    def score_from_velocity(self, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """s = (alpha u - dalpha x) / (beta (dalpha beta - alpha dbeta))."""
        _check_same_shape(u, x, "u", "x")
        s = self._coeffs(t, x)
        return (s.alpha * u - s.dalpha * x) / (s.beta * (s.dalpha * s.beta - s.alpha * s.dbeta))

    def velocity_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """u = (dalpha / alpha) x + beta (dalpha beta / alpha - dbeta) s."""
        _check_same_shape(score, x, "score", "x")
        s = self._coeffs(t, x)
        return s.dalpha / s.alpha * x + s.beta * (s.dalpha * s.beta / s.alpha - s.dbeta) * score

    def eps_from_x0(self, x0: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """eps_hat = (x - alpha D) / beta."""
        _check_same_shape(x0, x, "x0", "x")
        s = self._coeffs(t, x)
        return (x - s.alpha * x0) / s.beta

    def score_from_eps(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """score = -eps_hat / beta."""
        _check_same_shape(eps, x, "eps", "x")
        return -eps / self._coeffs(t, x).beta

    def velocity_from_x0_eps(self, x0: Tensor, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """velocity = dalpha D + dbeta eps_hat."""
        _check_same_shape(x0, x, "x0", "x")
        _check_same_shape(eps, x, "eps", "x")
        s = self._coeffs(t, x)
        return s.dalpha * x0 + s.dbeta * eps

    # --- conversions: generic, between any two prediction types ------------------------------

    def _affine(self, kind: str, s: Schedule) -> tuple[Tensor, Tensor]:
        """(a, b) such that prediction = a x + b D, with D = E[z | x_t = x]."""
        zero, one = torch.zeros_like(s.alpha), torch.ones_like(s.alpha)
        if kind == "x0":
            return zero, one
        if kind == "eps":
            return one / s.beta, -s.alpha / s.beta
        if kind == "score":
            return -one / s.beta**2, s.alpha / s.beta**2
        return s.dbeta / s.beta, s.dalpha - s.dbeta * s.alpha / s.beta  # velocity

    def convert(
        self, pred: Tensor, x: Tensor, t: Tensor, src: str, dst: str, *, check: bool = True
    ) -> Tensor:
        """Convert a prediction of type ``src`` at (x, t) into type ``dst``.

        Every type is affine in D: ``pred = a_src x + b_src D``, so D = (pred - a_src x) / b_src
        and the result is a_dst x + b_dst D. Singular where b_src = 0 (alpha = 0 for eps/score,
        t = 0) or where beta = 0 (t = 1); eps <-> score is direct and finite wherever beta > 0.
        """
        check_prediction_type(src)
        check_prediction_type(dst)
        _check_same_shape(pred, x, "pred", "x")
        if src == dst:
            return pred
        if {src, dst} == {"eps", "score"}:
            # proportional (score = -eps / beta): going through D would be 0/0 where alpha = 0
            beta = self._coeffs(t, x, check).beta
            return -pred / beta if dst == "score" else -pred * beta
        s = self._coeffs(t, x, check)
        a_src, b_src = self._affine(src, s)
        a_dst, b_dst = self._affine(dst, s)
        d = (pred - a_src * x) / b_src
        return a_dst * x + b_dst * d

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(GaussianPath):
    """CondOT / rectified flow: alpha = t, beta = 1 - t; conditional velocity z - eps."""

    name = "linear"

    def _schedule(self, t: Tensor) -> Schedule:
        return Schedule(t, 1 - t, torch.ones_like(t), -torch.ones_like(t))


class CosinePath(GaussianPath):
    """Variance preserving cosine path: alpha = sin(pi t / 2), beta = cos(pi t / 2)."""

    name = "vp-cosine"

    def _schedule(self, t: Tensor) -> Schedule:
        a = 0.5 * math.pi * t
        return Schedule(
            torch.sin(a), torch.cos(a), 0.5 * math.pi * torch.cos(a), -0.5 * math.pi * torch.sin(a)
        )


class VPLinearPath(GaussianPath):
    """DDPM / score-SDE VP path with a linear beta(s) from b0 to b1, in reversed time s = 1 - t.

    alpha_t = exp(-(1-t)^2 (b1-b0)/4 - (1-t) b0/2), beta_t = sqrt(1 - alpha_t^2);
    alpha_0 is about 0.007 (not 0) with the defaults b0 = 0.1, b1 = 20.
    """

    name = "vp-linear"

    def __init__(self, b0: float = 0.1, b1: float = 20.0):
        if not 0 <= b0 < b1:
            raise ValueError(f"vp-linear needs 0 <= b0 < b1; got b0={b0}, b1={b1}")
        self.b0, self.b1 = float(b0), float(b1)

    def _schedule(self, t: Tensor) -> Schedule:
        s = 1 - t
        log_alpha = -(s**2) * (self.b1 - self.b0) / 4 - s * self.b0 / 2
        alpha = torch.exp(log_alpha)
        dalpha = alpha * (s * (self.b1 - self.b0) / 2 + self.b0 / 2)
        beta = torch.sqrt(-torch.expm1(2 * log_alpha))  # stable 1 - alpha^2 near t = 1
        return Schedule(alpha, beta, dalpha, -alpha * dalpha / beta)

    def __repr__(self) -> str:
        return f"VPLinearPath(b0={self.b0}, b1={self.b1})"


PATHS: dict[str, type[GaussianPath]] = {
    "linear": LinearPath,
    "vp-cosine": CosinePath,
    "vp-linear": VPLinearPath,
}


def get_path(name: str, **kwargs) -> GaussianPath:
    """Build a path by name; an unknown name raises an error listing the valid ones."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid paths: {', '.join(PATHS)}")
    return PATHS[name](**kwargs)
