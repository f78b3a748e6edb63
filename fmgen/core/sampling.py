"""``SamplingSpec``: how to draw samples (solver, steps, time grid, guidance, noise) as one unit.

Generation, FID, the quality report, ``sample.py`` and the benchmarks all take a spec, so a new
sampling option is one new field here, not an argument threaded through five modules. ``solve``
integrates a velocity field with the spec's solver on the spec's grid; ``nfe`` is the one
definition of the cost of a spec.

Pure torch math: no I/O, no config objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fmgen.core.grids import TIME_GRIDS, check_times, time_grid
from fmgen.core.guidance import check_interval
from fmgen.core.paths import GaussianPath
from fmgen.core.samplers import SAMPLERS, Churn, beta_sigma, get_sampler
from fmgen.core.solver_base import FINAL_STEPS, Field, Noise

SAMPLING_GRIDS = (*TIME_GRIDS, "list")
"""Grids of a spec: the spacings of ``time_grid``, or ``list``, the spec's own ``times``."""

_EVALS_PER_STEP = {
    "euler": 1,
    "sde": 1,
    "dpm++2m": 1,
    "dpm++3m": 1,
    "heun": 2,
    "midpoint": 2,
    "rk4": 4,
    "meanflow": 1,
}
# the evaluations of a "solver" step that ends at t = 1 (Heun: Euler; RK4: Heun's third order;
# the others, MeanFlow's one-evaluation step included, as any of their steps)
_EVALS_LAST_SOLVER_STEP = {**_EVALS_PER_STEP, "heun": 1, "rk4": 3}


@dataclass(frozen=True)
class SamplingSpec:
    """The options of a sampling run; invalid values raise ValueError naming the field.

    Attributes:
        sampler: a name of ``SAMPLERS`` (euler, heun, rk4, sde, midpoint, dpm++2m,
            dpm++3m, meanflow). ``meanflow`` integrates an average-velocity field u(x, t, r)
            (``fmgen.core.meanflow``), one evaluation per step whatever ``final_step`` says;
            ``solve`` passes it the field it is given, which must then be such a field.
        steps: solver steps (the grid has steps + 1 times).
        guidance: classifier-free guidance scale; 1 = the conditional model alone, 0 = the
            unconditional one, > 1 pushes away from the unconditional prediction.
        guidance_interval: None (guidance at every t) or (lo, hi), 0 <= lo < hi <= 1: guidance
            acts where lo <= t <= hi, and outside it the conditional prediction alone answers,
            one network call of B rows instead of 2B (Kynkaanniemi et al. 2024, "Applying
            guidance in a limited interval improves sample and distribution quality"). The
            paper gives (sigma_lo, sigma_hi] in EDM's sigma = beta / alpha, which falls as t
            rises: lo = sigma^-1(sigma_hi), hi = sigma^-1(sigma_lo), on the linear path
            t = 1 / (1 + sigma) (``fmgen.core.guidance.guidance_interval_of_sigmas``); EDM2's
            (0.28, 2.9] is t in [0.256, 0.781] there.
        sde_sigma: SDE noise scale s of sigma_t = s * beta_t (sde only).
        t_start: first time of the grid (0 = pure noise).
        grid: a name of ``SAMPLING_GRIDS``: uniform, edm, logsnr (``time_grid``'s spacings) or
            list (the ``times`` below).
        rho: the edm grid's exponent (steps even in sigma^(1/rho)); EDM's 7.
        times: the list grid: steps + 1 strictly increasing times from t_start, the last <= 1;
            empty for the other grids.
        final_step: the step that ends at t = 1: ``denoise`` returns x0_hat, the data
            prediction of the velocity at t_{N-1} (one evaluation), ``solver`` the solver's own
            step (see ``fmgen.core.samplers``).
        churn: EDM's S_churn for Heun (0 = off): the noise added before each step (``Churn``).
        churn_sigma_min, churn_sigma_max: the range of sigma = beta / alpha where churn acts
            (EDM's S_tmin, S_tmax; None = no upper bound).
        churn_noise: EDM's S_noise, the scale of the churn noise.
        lower_order_few_steps: dpm++2m / dpm++3m on grids of fewer than 15 steps: first order
            for the last step, at most second order for the others (diffusers'
            ``lower_order_final`` lowers the last two; measured on a trained model, dpm++3m's
            third order loses to dpm++2m at 10 steps on every grid: ``fmgen.core.multistep``).
            The other solvers keep no past evaluations and ignore it.
        lower_order_guided: dpm++3m with guidance > 1 runs as dpm++2m (``solver``). Lu et al.
            2022 (DPM-Solver++) find high-order solvers unstable for guided sampling and
            recommend the second-order multistep there; diffusers' DPMSolverMultistepScheduler
            says solver_order=2 for guided sampling, 3 for unconditional. Measured on the default
            job's trained model at 20 steps: with guidance 2 (3M)'s FD is 0.4% / 10% / 4% above
            (2M)'s on the uniform / edm / logsnr grids, with guidance 1 within +-2% of it
            (README, Performance). False keeps the third order under guidance.
    """

    sampler: str = "heun"
    steps: int = 20
    guidance: float = 1.0
    sde_sigma: float = 0.5
    t_start: float = 0.0
    grid: str = "uniform"
    rho: float = 7.0
    times: tuple[float, ...] = ()
    final_step: str = "denoise"
    churn: float = 0.0
    churn_sigma_min: float = 0.0
    churn_sigma_max: float | None = None
    churn_noise: float = 1.0
    lower_order_few_steps: bool = True
    guidance_interval: tuple[float, float] | None = None
    lower_order_guided: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.grid not in SAMPLING_GRIDS:
            raise ValueError(f"time grid {self.grid!r} is not one of {', '.join(SAMPLING_GRIDS)}")
        if self.final_step not in FINAL_STEPS:
            raise ValueError(
                f"final_step {self.final_step!r} is not one of {', '.join(FINAL_STEPS)}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1; got {self.steps!r}")
        for name in ("guidance", "sde_sigma", "churn", "churn_sigma_min", "churn_noise"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        hi = self.churn_sigma_max
        if hi is not None and not (_is_number(hi) and hi >= self.churn_sigma_min):
            raise ValueError(
                f"churn_sigma_max must be None (no bound) or a number >= churn_sigma_min = "
                f"{self.churn_sigma_min}; got {hi!r}"
            )
        if self.churn > 0 and self.sampler != "heun":
            raise ValueError(
                f"churn is an option of the heun sampler; got sampler {self.sampler!r} with "
                f"churn {self.churn} (set sampler='heun' or churn=0)"
            )
        # a tuple of floats (from a YAML list or a caller's), so the spec stays hashable
        object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        for flag in ("lower_order_few_steps", "lower_order_guided"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false; got {getattr(self, flag)!r}")
        if not (_is_number(self.rho) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0; got {self.rho!r}")
        if not (_is_number(self.t_start) and 0.0 <= self.t_start < 1.0):
            raise ValueError(f"t_start must lie in [0, 1); got {self.t_start!r}")
        self._check_list_grid()

    def _check_list_grid(self) -> None:
        if isinstance(self.times, (list, range)):  # from YAML or a caller: keep the spec hashable
            object.__setattr__(self, "times", tuple(self.times))
        if self.grid != "list":
            if self.times:
                raise ValueError(
                    f"times are the list grid's; got times with grid {self.grid!r} "
                    "(set grid='list' or drop times)"
                )
            return
        if not self.times:
            raise ValueError("grid 'list' needs times, e.g. times=(0.0, 0.5, 0.8, 1.0)")
        times = check_times(self.times, self.t_start)
        object.__setattr__(self, "times", times)  # a tuple of floats, hashable and exact
        if len(times) != self.steps + 1:
            raise ValueError(
                f"the list grid's {len(times)} times make {len(times) - 1} steps; got "
                f"steps={self.steps} (set steps={len(times) - 1})"
            )

    def replace(self, **changes: Any) -> SamplingSpec:
        """A copy with the given fields changed; None values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def t_end(self) -> float:
        """The last time of the grid: 1 except for a list that stops short of it."""
        return self.times[-1] if self.grid == "list" else 1.0

    @property
    def solver(self) -> str:
        """The solver that runs: ``sampler``, except dpm++3m with guidance > 1 under
        ``lower_order_guided``, which runs as dpm++2m."""
        if self.sampler == "dpm++3m" and self.lower_order_guided and self.guidance > 1:
            return "dpm++2m"
        return self.sampler

    @property
    def stochastic(self) -> bool:
        """Whether solving draws noise beyond the initial x (the SDE, Heun with churn)."""
        return self.sampler == "sde" or self.churn > 0

    @property
    def nfe(self) -> int:
        """Field evaluations per sample (see ``nfe``)."""
        return nfe(self.sampler, self.steps, t_end=self.t_end, final_step=self.final_step)

    def time_grid(
        self, path: GaussianPath, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The spec's time grid, shape (steps + 1,)."""
        if self.grid == "list":
            return torch.tensor(self.times, device=device, dtype=dtype or torch.float64)
        return time_grid(self.steps, self.t_start, spacing=self.grid, path=path, rho=self.rho,
                         device=device, dtype=dtype)  # fmt: skip

    def churn_options(self) -> Churn | None:
        """The spec's ``Churn`` for Heun, or None when churn is off."""
        if self.churn == 0:
            return None
        hi = math.inf if self.churn_sigma_max is None else float(self.churn_sigma_max)
        return Churn(float(self.churn), float(self.churn_sigma_min), hi, float(self.churn_noise))

    def describe(self) -> str:
        """A short caption, e.g. ``heun, 20 uniform steps, guidance 2.0``."""
        default = SamplingSpec()
        sde = f", sde_sigma {self.sde_sigma}" if self.sampler == "sde" else ""
        start = f", from t={self.t_start}" if self.t_start else ""
        rho = f" (rho {self.rho})" if self.grid == "edm" and self.rho != default.rho else ""
        final = ", solver's last step" if self.final_step == "solver" else ""
        churn = f", churn {self.churn}" if self.churn else ""
        if self.sampler.startswith("dpm++") and not self.lower_order_few_steps:
            final += ", full order on few steps"
        if self.solver != self.sampler:
            final += f", as {self.solver} under guidance"
        if self.grid == "list":
            rho = f" ({', '.join(f'{t:g}' for t in self.times)})"
        interval = ""
        if self.guidance_interval is not None:
            interval = " in t [{:g}, {:g}]".format(*self.guidance_interval)
        return (
            f"{self.sampler}, {self.steps} {self.grid} steps{rho}, guidance {self.guidance}"
            f"{interval}{sde}{churn}{start}{final}"
        )

    def to_dict(self) -> dict[str, Any]:
        gi = self.guidance_interval
        return {**dataclasses.asdict(self), "times": list(self.times), "nfe": self.nfe,
                "guidance_interval": list(gi) if gi is not None else None}  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def nfe(sampler: str, steps: int, *, t_end: float = 1.0, final_step: str = "denoise") -> int:
    """Field evaluations per sample of ``sampler`` over ``steps`` steps of a grid ending at ``t_end``.

    The one definition used by FID records, benchmarks and sweeps. Each step costs its solver's
    evaluations (euler, sde, dpm++2m, dpm++3m, meanflow: 1; heun, midpoint: 2; rk4: 4), except a
    step that ends at t = 1: with ``final_step="denoise"`` (``SamplingSpec``'s default) it costs
    1 (x0_hat from one velocity), with ``"solver"`` Heun's costs 1 (an Euler step) and RK4's 3
    (Heun's third-order method); MeanFlow's costs 1 either way (its own step, no x0_hat). Heun
    with churn costs what Heun does. With guidance each evaluation is ONE network call on a batch
    of 2B (``cfg_net``), so guidance does not change the count; it doubles the
    work per call (a ``guidance_interval`` leaves the calls outside it at B).
    """
    get_sampler(sampler)
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step {final_step!r} is not one of {', '.join(FINAL_STEPS)}")
    per_step = _EVALS_PER_STEP[sampler]
    if t_end < 1.0:
        return per_step * steps
    last = 1 if final_step == "denoise" else _EVALS_LAST_SOLVER_STEP[sampler]
    return per_step * (steps - 1) + last


def steps_within(sampler: str, budget: int, *, final_step: str = "denoise") -> int:
    """The most steps of ``sampler`` whose ``nfe`` fits ``budget`` (at least 1): sweeps at equal cost."""
    s = 1
    while nfe(sampler, s + 1, final_step=final_step) <= budget:
        s += 1
    return s


def solve(
    spec: SamplingSpec,
    field: Field,
    x: Tensor,
    *,
    path: GaussianPath,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
) -> Tensor:
    """Integrate ``field`` from x (B, ...) at spec.t_start to the grid's end as the spec says.

    The noise of a stochastic spec (the SDE's increments, Heun's churn) comes from ``noise(x)``
    (standard normal draws of x's shape) or else ``generator``; deterministic solvers ignore both.
    """
    ts = spec.time_grid(path, device=x.device, dtype=x.dtype)
    kwargs: dict[str, Any] = {"path": path, "final_step": spec.final_step}
    if spec.solver in ("dpm++2m", "dpm++3m"):
        kwargs["lower_order_few_steps"] = spec.lower_order_few_steps
    elif spec.sampler == "sde":
        kwargs |= {"sigma": beta_sigma(path, spec.sde_sigma), "generator": generator,
                   "noise": noise}  # fmt: skip
    elif spec.churn > 0:
        kwargs |= {"churn": spec.churn_options(), "generator": generator, "noise": noise}
    return get_sampler(spec.solver)(field, x, ts, **kwargs)
