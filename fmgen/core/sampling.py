"""``SamplingSpec``: how to draw samples (solver, steps, time grid, guidance, SDE noise) as one unit.

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

from fmgen.core.grids import TIME_GRIDS, time_grid
from fmgen.core.paths import GaussianPath
from fmgen.core.samplers import SAMPLERS, Field, Noise, beta_sigma, get_sampler


@dataclass(frozen=True)
class SamplingSpec:
    """The options of a sampling run; invalid values raise ValueError naming the field.

    Attributes:
        sampler: a name of ``SAMPLERS`` (euler, heun, rk4, sde).
        steps: solver steps (the grid has steps + 1 times).
        guidance: classifier-free guidance scale; 1 = the conditional model alone, 0 = the
            unconditional one, > 1 pushes away from the unconditional prediction.
        sde_sigma: SDE noise scale s of sigma_t = s * beta_t (sde only).
        t_start: first time of the grid (0 = pure noise).
        grid: a name of ``TIME_GRIDS`` (uniform, edm).
    """

    sampler: str = "heun"
    steps: int = 20
    guidance: float = 1.0
    sde_sigma: float = 0.5
    t_start: float = 0.0
    grid: str = "uniform"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.grid not in TIME_GRIDS:
            raise ValueError(f"time grid {self.grid!r} is not one of {', '.join(TIME_GRIDS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1; got {self.steps!r}")
        for name in ("guidance", "sde_sigma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
        if not (isinstance(self.t_start, (int, float)) and 0.0 <= self.t_start < 1.0):
            raise ValueError(f"t_start must lie in [0, 1); got {self.t_start!r}")

    def replace(self, **changes: Any) -> SamplingSpec:
        """A copy with the given fields changed; None values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def nfe(self) -> int:
        """Field evaluations per sample (see ``nfe``)."""
        return nfe(self.sampler, self.steps)

    def times(
        self, path: GaussianPath, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The spec's time grid, shape (steps + 1,)."""
        return time_grid(
            self.steps, self.t_start, spacing=self.grid, path=path, device=device, dtype=dtype
        )

    def describe(self) -> str:
        """A short caption, e.g. ``heun, 20 uniform steps, guidance 2.0``."""
        sde = f", sde_sigma {self.sde_sigma}" if self.sampler == "sde" else ""
        start = f", from t={self.t_start}" if self.t_start else ""
        return (
            f"{self.sampler}, {self.steps} {self.grid} steps, guidance {self.guidance}{sde}{start}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "nfe": self.nfe}


def nfe(sampler: str, steps: int, *, t_end: float = 1.0) -> int:
    """Field evaluations per sample of ``sampler`` over ``steps`` steps of a grid ending at ``t_end``.

    The one definition used by FID records, benchmarks and sweeps. With guidance each
    evaluation is ONE network call on a batch of 2B (``cfg_net``), so guidance does not change
    the count; it doubles the work per call.
    """
    get_sampler(sampler)
    ends_at_one = int(t_end >= 1.0)  # the special last step saves one evaluation
    per_step = {"euler": 1, "sde": 1, "heun": 2, "rk4": 4}[sampler]
    return per_step * steps - (ends_at_one if per_step > 1 else 0)


def solve(
    spec: SamplingSpec,
    field: Field,
    x: Tensor,
    *,
    path: GaussianPath,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
) -> Tensor:
    """Integrate ``field`` from x (B, ...) at spec.t_start to t = 1 as the spec says.

    The SDE's increments come from ``noise(x)`` (standard normal draws of x's shape) or else
    ``generator``; the ODE solvers ignore both.
    """
    ts = spec.times(path, device=x.device, dtype=x.dtype)
    kwargs: dict[str, Any] = {}
    if spec.sampler == "sde":
        kwargs = {"path": path, "sigma": beta_sigma(path, spec.sde_sigma), "generator": generator,
                  "noise": noise}  # fmt: skip
    return get_sampler(spec.sampler)(field, x, ts, **kwargs)
