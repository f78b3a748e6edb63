"""Training losses (CFM and DSM) and training-time sampling.

A network is a callable ``net(x, t, y) -> prediction`` (called as ``net(x, t)`` when there are no
labels, so an unconditional network may take two arguments) with an attribute ``prediction_type``
(one of ``paths.PREDICTION_TYPES``) saying what its output means; wrappers such as DDP
(``.module``) and ``torch.compile`` (``._orig_mod``) are looked through. The loss converts the
prediction into the type it regresses (velocity for CFM, score for DSM) through the path.

Every loss returns per-sample values of shape (B,): the squared error averaged over the non-batch
axes. The caller reduces (and may log per t-bin). ``t`` and ``eps`` are arguments, so a loss is a
deterministic function of its inputs.

    CFM:  | v_theta(x_t, t) - (dalpha_t z + dbeta_t eps) |^2
    DSM:  lambda(t) | s_theta(x_t, t) + eps / beta_t |^2

The gradients equal those of the marginal losses (regressing on the oracle's u_t(x), s_t(x));
the loss values differ by the posterior variance of the conditional target (see oracle.py).

Pure torch math: no I/O, no distributed code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fmgen.core.paths import GaussianPath, check_prediction_type, check_time, expand_time

TIME_SAMPLINGS = ("uniform", "logit-normal", "mode")
DSM_WEIGHTINGS = ("beta2", "none", "snr")
REWEIGHTINGS = ("none", "edm", "min-snr")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # SD3's mode sampling is monotone only here

_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / FSDP, torch.compile


def prediction_type_of(net: Callable) -> str:
    """The ``prediction_type`` declared by ``net``, looking through DDP / compile wrappers."""
    seen = net
    for _ in range(8):  # wrappers nest at most a few levels (compile inside DDP, ...)
        declared = getattr(seen, "prediction_type", None)
        if declared is not None:
            return check_prediction_type(declared)
        inner = next((getattr(seen, a) for a in _WRAPPER_ATTRS if hasattr(seen, a)), None)
        if inner is None:
            break
        seen = inner
    raise AttributeError(
        f"{type(net).__name__} has no attribute 'prediction_type' (nor do its .module / "
        f"._orig_mod wrappers): the loss needs to know what the network predicts; set it to one "
        f"of velocity, eps, score, x0"
    )


def sample_time(
    batch_size: int,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    t_min: float = 1e-5,
    t_max: float = 1 - 1e-5,
    loc: float = 0.0,
    scale: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """Training times t of shape (B,), all in [t_min, t_max].

    The default range [1e-5, 1 - 1e-5] keeps away from t = 0 (alpha = 0: eps / score -> velocity
    is 0/0) and t = 1 (beta = 0: every conversion to or from velocity or score divides by
    beta); pass t_min = 0, t_max = 1 for the closed interval.

    - ``uniform``: U(t_min, t_max).
    - ``logit-normal``: sigmoid(N(loc, scale^2)) mapped affinely onto [t_min, t_max] (as in SD3;
      loc > 0 puts more weight near the data end t = 1). The affine map keeps the shape and
      piles no mass on the ends, unlike clamping.
    - ``mode``: SD3's mode sampling with heavy tails (Esser et al. 2024, eq. 20): u ~ U(0, 1),
      f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) in SD3's time (1 = noise), so t = 1 - f(u)
      here; s = ``mode_scale`` > 0 favours the middle, s < 0 the ends, s = 0 is uniform. f is
      monotone for s in [-1, 2 / (pi - 2)]; then mapped onto [t_min, t_max] like the others.
    """
    if kind not in TIME_SAMPLINGS:
        raise ValueError(
            f"unknown time sampling {kind!r}; valid time samplings: {', '.join(TIME_SAMPLINGS)}"
        )
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1; got t_min={t_min}, t_max={t_max}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0; got {batch_size}")
    dtype = dtype or torch.get_default_dtype()
    if kind == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
    elif kind == "mode":
        lo, hi = MODE_SCALE_RANGE
        if not lo <= mode_scale <= hi:
            raise ValueError(f"mode sampling needs mode_scale in [{lo}, {hi:.4f}] (monotone); "
                             f"got {mode_scale}")  # fmt: skip
        v = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
        u = v + mode_scale * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)  # 1 - f(v)
    else:
        if scale <= 0:
            raise ValueError(f"logit-normal needs scale > 0; got {scale}")
        n = torch.randn(batch_size, generator=generator, device=device, dtype=dtype)
        u = torch.sigmoid(loc + scale * n)
    return (t_min + (t_max - t_min) * u).clamp(t_min, t_max)  # clamp: rounding of the affine map


def _predict(net: Callable, x: Tensor, t: Tensor, y: Tensor | None, path: GaussianPath, dst: str):
    src = prediction_type_of(net)
    pred = net(x, t) if y is None else net(x, t, y)
    if pred.shape != x.shape:
        raise ValueError(
            f"the network returned shape {tuple(pred.shape)}; expected the input's {tuple(x.shape)}"
        )
    pred = pred.to(torch.promote_types(pred.dtype, x.dtype))  # autocast may return bf16
    return path.convert(pred, x.to(pred.dtype), t, src, dst, check=False)  # t checked by the loss


def cfm_loss(
    net: Callable,
    z: Tensor,
    path: GaussianPath,
    *,
    t: Tensor,
    eps: Tensor,
    y: Tensor | None = None,
    check_t: bool = True,
) -> Tensor:
    """Conditional flow matching: mean over non-batch axes of |v_theta(x_t, t) - u_t(x_t | z)|^2.

    Args:
        net: ``net(x, t, y)`` (``net(x, t)`` when y is None) with a ``prediction_type``;
            non-velocity outputs are converted.
        z: (B, ...) data; t: (B,) times; eps: (B, ...) noise; y: (B,) labels or None.
        check_t: validate t (one host-device sync); a caller whose times are in [0, 1] by
            construction (the training loop draws them with ``sample_time``) passes False.

    Returns:
        (B,) per-sample losses.
    """
    if check_t:
        t = check_time(t)  # once per call, not once per conversion
    ps = path.sample(z, t, eps, check=False)
    v = _predict(net, ps.x, t, y, path, "velocity")  # (B, ...)
    return ((v - ps.velocity) ** 2).flatten(1).mean(1)


def dsm_weight(path: GaussianPath, t: Tensor, weighting: str, *, check_t: bool = True) -> Tensor:
    """lambda(t) of the DSM loss, shape of t.

    - ``beta2``: beta_t^2, so lambda |s + eps/beta|^2 = |eps_hat - eps|^2 (eps-prediction MSE).
    - ``none``: 1, the plain score-matching error (large near t = 1 where beta -> 0).
    - ``snr``: alpha_t^2 = beta_t^2 * SNR(t) with SNR = alpha^2 / beta^2, i.e. the eps-prediction
      MSE weighted by the signal-to-noise ratio (bounded, since alpha <= 1 on every path).
    """
    if weighting not in DSM_WEIGHTINGS:
        raise ValueError(
            f"unknown DSM weighting {weighting!r}; valid weightings: {', '.join(DSM_WEIGHTINGS)}"
        )
    s = path.schedule(t, check=check_t)  # checks t (once per DSM call)
    if weighting == "beta2":
        return s.beta**2
    if weighting == "snr":
        return s.alpha**2
    return torch.ones_like(s.beta)


def dsm_loss(
    net: Callable,
    z: Tensor,
    path: GaussianPath,
    *,
    t: Tensor,
    eps: Tensor,
    y: Tensor | None = None,
    weighting: str = "beta2",
    check_t: bool = True,
) -> Tensor:
    """Denoising score matching: lambda(t) * mean over non-batch axes of |s_theta + eps / beta|^2.

    ``lambda`` is chosen by ``weighting`` (see ``dsm_weight``); non-score outputs are converted;
    ``check_t`` as in ``cfm_loss``.
    Singular at t = 1 (beta = 0): keep training times below 1 - t_min.

    Returns:
        (B,) per-sample losses.
    """
    # validates the name (and t, unless told not to) before the forward pass
    lam = dsm_weight(path, t, weighting, check_t=check_t)
    ps = path.sample(z, t, eps, check=False)
    s = _predict(net, ps.x, t, y, path, "score")  # (B, ...)
    beta = expand_time(path.schedule(t, check=False).beta, ps.x)
    err = ((s + ps.eps / beta) ** 2).flatten(1).mean(1)
    return lam.to(err.dtype) * err


def x0_weight(path: GaussianPath, t: Tensor, reweight: str, *, gamma: float = 5.0,
              sigma_data: float = 0.5) -> Tensor:  # fmt: skip
    """The weight lambda_x0(t) that ``reweight`` puts on the data-prediction error |D - z|^2.

    With SNR = alpha^2 / beta^2 and sigma = beta / alpha (EDM's noise level of x / alpha):

    - ``edm``: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
      = SNR + 1 / sigma_data^2 (Karras et al. 2022, Table 1).
    - ``min-snr``: min(SNR, gamma) (Hang et al. 2023: min-SNR-gamma; their eps-loss weight
      min(SNR, gamma) / SNR is the same weighting, written on the eps error).
    """
    if reweight not in REWEIGHTINGS or reweight == "none":
        raise ValueError(f"x0_weight takes one of edm, min-snr; got {reweight!r}")
    s = path.schedule(t, check=False)
    snr = (s.alpha / s.beta) ** 2
    if reweight == "edm":
        return snr + 1.0 / sigma_data**2
    return snr.clamp(max=gamma)


def native_x0_weight(path: GaussianPath, t: Tensor, loss: str,
                     dsm_weighting: str = "beta2") -> Tensor:  # fmt: skip
    """The weight that the per-sample loss ``loss`` already puts on |D - z|^2, shape of t.

    At fixed x_t every prediction is affine in D with a coefficient c(t) on D: the velocity
    u = (dbeta / beta) x + (dalpha - dbeta alpha / beta) D and the score s = (alpha D - x) /
    beta^2. So |v_hat - v|^2 = (dalpha - dbeta alpha / beta)^2 |D_hat - z|^2 (CFM) and
    lambda |s_hat - s|^2 = lambda (alpha / beta^2)^2 |D_hat - z|^2 (DSM).
    """
    s = path.schedule(t, check=False)
    if loss == "cfm":
        return (s.dalpha - s.dbeta * s.alpha / s.beta) ** 2
    if loss == "dsm":
        return dsm_weight(path, t, dsm_weighting, check_t=False) * (s.alpha / s.beta**2) ** 2
    raise ValueError(f"unknown loss {loss!r}; valid losses: cfm, dsm")


def reweight_factor(path: GaussianPath, t: Tensor, reweight: str, loss: str, *,
                    dsm_weighting: str = "beta2", gamma: float = 5.0,
                    sigma_data: float = 0.5) -> Tensor:  # fmt: skip
    """r(t) with r(t) * loss(t) = lambda_x0(t) |D_hat - z|^2: the factor that turns the per-sample
    loss ``loss`` into the ``reweight`` weighting (``x0_weight``), whatever the network predicts
    (the conversions are affine at fixed x_t). ``none``: ones. Finite for t in (0, 1)."""
    if reweight not in REWEIGHTINGS:
        raise ValueError(
            f"unknown reweighting {reweight!r}; valid reweightings: {', '.join(REWEIGHTINGS)}"
        )
    if reweight == "none":
        return torch.ones_like(t)
    native = native_x0_weight(path, t, loss, dsm_weighting)
    return x0_weight(path, t, reweight, gamma=gamma, sigma_data=sigma_data) / native


LOSSES: dict[str, Callable[..., Tensor]] = {"cfm": cfm_loss, "dsm": dsm_loss}

MEANFLOW = "meanflow"
"""The name of MeanFlow's loss (``fmgen.core.meanflow.meanflow_loss``): it takes the end r of an
averaging interval and the guidance terms besides LOSSES' arguments, so it is not among them."""
LOSS_NAMES = (*LOSSES, MEANFLOW)


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under ``name``; an unknown name lists the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]
