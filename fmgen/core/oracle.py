"""Exact marginal quantities of a finite data set (a weighted mixture of Dirac points).

For data {z_1..z_K} with weights w_k, the posterior over k given x_t = x is a softmax over k of
``log w_k - |x - alpha_t z_k|^2 / (2 beta_t^2)``. Every conditional quantity on a Gaussian path
is affine in z, so its posterior mean is the same expression at D = E[z | x_t = x]:
the marginal velocity is u_t(x | D) and the marginal score is s_t(x | D). This "oracle" is the
optimum of the CFM/DSM losses; it tests samplers and losses with no training at all.

Pure torch math; computed with log-sum-exp, batched and chunked to bound memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath, check_prediction_type, expand_time

_CHUNK_ELEMENTS = 1 << 24  # bound on the (B_chunk, K, D) difference tensor


class Oracle:
    """The exact denoiser, velocity, score and density of a weighted Dirac mixture.

    Args:
        data: (K, ...) the mixture's points.
        path: the Gaussian path that noises them.
        weights: (K,) non-negative mixture weights (normalised here); uniform if None.
    """

    def __init__(self, data: Tensor, path: GaussianPath, weights: Tensor | None = None):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (K, ...) with K >= 1; got {tuple(data.shape)}")
        self.data = data
        self.path = path
        if weights is None:
            weights = torch.full((data.shape[0],), 1.0 / data.shape[0], dtype=data.dtype)
        weights = torch.as_tensor(weights, dtype=data.dtype, device=data.device)
        if (
            weights.shape != (data.shape[0],)
            or not bool(torch.isfinite(weights).all())
            or bool((weights < 0).any())
            or weights.sum() <= 0
        ):
            raise ValueError(
                f"weights must be finite and non-negative with shape (K,) = ({data.shape[0]},) and "
                f"a positive sum; got shape {tuple(weights.shape)}, "
                f"first values {weights.flatten()[:8].tolist()}"
            )
        self.log_weights = torch.log(weights / weights.sum())

    def _check_x(self, x: Tensor) -> None:
        if x.shape[1:] != self.data.shape[1:]:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.data.shape[1:]))}) to match the "
                f"data; got {tuple(x.shape)}"
            )

    def _batch_time(self, x: Tensor, t: Tensor | float) -> Tensor:
        """t as shape (B,), so scalar and per-sample times share one code path."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return expand_time(t, x).flatten().expand(x.shape[0])

    def _sq_dist(self, x: Tensor, t: Tensor) -> Tensor:
        """|x_b - alpha_b z_k|^2 of shape (B, K), exact (no |a|^2 - 2ab + |b|^2 cancellation)."""
        alpha = self.path.schedule(t).alpha  # (B,)
        xf, zf = x.flatten(1), self.data.flatten(1)  # (B, D), (K, D)
        rows = max(1, _CHUNK_ELEMENTS // max(1, zf.numel()))
        out = []
        for i in range(0, xf.shape[0], rows):
            diff = (
                xf[i : i + rows, None, :] - alpha[i : i + rows, None, None] * zf[None]
            )  # (b, K, D)
            out.append((diff**2).sum(-1))
        return torch.cat(out)

    def posterior_logits(self, x: Tensor, t: Tensor) -> Tensor:
        """log w_k - |x - alpha z_k|^2 / (2 beta^2), shape (B, K); softmax gives p(k | x_t = x)."""
        self._check_x(x)
        t = self._batch_time(x, t)
        beta = self.path.schedule(t).beta[:, None]  # (B, 1)
        return self.log_weights - self._sq_dist(x, t) / (2 * beta**2)

    def posterior(self, x: Tensor, t: Tensor) -> Tensor:
        """p(k | x_t = x), shape (B, K)."""
        return torch.softmax(self.posterior_logits(x, t), dim=-1)

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        """D(x, t) = E[z | x_t = x], shape like x."""
        w = self.posterior(x, t)  # (B, K)
        return (w @ self.data.flatten(1)).reshape(x.shape)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """Marginal velocity E[u_t(x | z) | x_t = x] = u_t(x | D) (u is affine in z)."""
        return self.path.conditional_velocity(x, self.denoise(x, t), t)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """Marginal score E[s_t(x | z) | x_t = x] = s_t(x | D)."""
        return self.path.conditional_score(x, self.denoise(x, t), t)

    def predict(self, x: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The exact optimum of a network that predicts ``prediction_type``."""
        check_prediction_type(prediction_type)
        d = self.denoise(x, t)
        if prediction_type == "x0":
            return d
        if prediction_type == "velocity":
            return self.path.conditional_velocity(x, d, t)
        if prediction_type == "score":
            return self.path.conditional_score(x, d, t)
        return self.path.eps_from_x0(d, x, t)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        """log p_t(x) of the marginal path, shape (B,); differentiable in x and t."""
        self._check_x(x)
        t = self._batch_time(x, t)
        beta = self.path.schedule(t).beta  # (B,)
        dim = x[0].numel()
        logits = self.posterior_logits(x, t)  # (B, K)
        log_norm = -dim * torch.log(beta) - 0.5 * dim * math.log(2 * math.pi)
        return torch.logsumexp(logits, dim=-1) + log_norm

    def velocity_posterior_variance(self, x: Tensor, t: Tensor) -> Tensor:
        """Tr Var[u_t(x | z) | x_t = x], shape (B,): the pointwise gap L_CFM - L_FM (summed over dims).

        u_t(x | z) = c z + (dbeta / beta) x with c = dalpha - dbeta alpha / beta, so the
        posterior variance is c^2 Tr Var[z | x].
        """
        w = self.posterior(x, t)  # (B, K)
        zf = self.data.flatten(1)  # (K, D)
        second = w @ (zf**2).sum(-1)  # (B,)
        first = ((w @ zf) ** 2).sum(-1)  # (B,)
        s = self.path.schedule(self._batch_time(x, t))
        c = s.dalpha - s.dbeta * s.alpha / s.beta
        return c**2 * (second - first).clamp_min(0)

    def score_posterior_variance(self, x: Tensor, t: Tensor) -> Tensor:
        """Tr Var[s_t(x | z) | x_t = x], shape (B,): the pointwise gap L_DSM - L_SM (unweighted)."""
        w = self.posterior(x, t)
        zf = self.data.flatten(1)
        var = (w @ (zf**2).sum(-1) - ((w @ zf) ** 2).sum(-1)).clamp_min(0)
        s = self.path.schedule(self._batch_time(x, t))
        return (s.alpha / s.beta**2) ** 2 * var
