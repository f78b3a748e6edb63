"""What every solver of ``fmgen.core.samplers`` and ``fmgen.core.multistep`` shares: the field and
callback types, the ``Step`` a callback sees, the checks of their arguments and the data
prediction x0_hat of a velocity. Pure torch math (+ tqdm)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmgen.core.paths import GaussianPath

Field = Callable[[Tensor, Tensor], Tensor]
"""field(x (B, ...), t (B,)) -> velocity (B, ...)."""

FINAL_STEPS = ("denoise", "solver")
"""The step that ends at t = 1: x0_hat from the velocity (one evaluation), or the solver's own."""


@dataclass(frozen=True)
class Step:
    """What a callback sees after step ``i``: the interval [t, t_next] and the new x."""

    i: int
    t: float
    t_next: float
    x: Tensor  # (B, ...) the state at t_next


Callback = Callable[[Step], None]
Noise = Callable[[Tensor], Tensor]
"""noise(x (B, ...)) -> standard normal draws of x's shape, dtype and device."""


def check_ts(ts: Tensor) -> list[float]:
    """ts as Python floats after checking: 1-D, at least 2 entries, strictly increasing, in [0, 1]."""
    if not isinstance(ts, Tensor) or ts.ndim != 1 or ts.numel() < 2:
        shape = tuple(ts.shape) if isinstance(ts, Tensor) else type(ts).__name__
        raise ValueError(f"ts must be a 1-D tensor of at least 2 times; got {shape}")
    times = ts.detach().double().cpu().tolist()
    if any(math.isnan(v) for v in times) or times[0] < 0 or times[-1] > 1:
        raise ValueError(
            f"ts must lie in [0, 1] (0 = noise, 1 = data); got [{times[0]:.6g}, {times[-1]:.6g}]"
        )
    if any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError("ts must be strictly increasing (from noise t = 0 towards data t = 1)")
    return times


def check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] < 1 or not x.is_floating_point():
        what = (
            f"{x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, Tensor)
            else type(x).__name__
        )
        raise ValueError(
            f"x must be a floating-point tensor of shape (B, ...) with B >= 1; got {what}"
        )


def check_final(final_step: str, path: GaussianPath | None, times: list[float]) -> bool:
    """Whether the step ending at t = 1 denoises; a denoising step needs the path."""
    if final_step not in FINAL_STEPS:
        raise ValueError(
            f"final_step {final_step!r} is not one of {', '.join(map(repr, FINAL_STEPS))}"
        )
    denoise = final_step == "denoise" and times[-1] >= 1.0
    if denoise and path is None:
        raise ValueError(
            "final_step='denoise' needs the path (x0_hat comes from the velocity through it): "
            "pass path=..."
        )
    return denoise


def need_path(path: GaussianPath | None, name: str) -> GaussianPath:
    if not isinstance(path, GaussianPath):
        raise ValueError(f"{name} needs the Gaussian path (its schedule): pass path=...")
    return path


def progress(times: list[float], disable: bool, desc: str):
    return tqdm(range(len(times) - 1), disable=disable, desc=desc, leave=False)


def at_time(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def x0_hat(path: GaussianPath, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The data prediction x0_hat = D(x, t) of the velocity u (docs/math.md, affine in D)."""
    return path.convert(u, x, t, "velocity", "x0")


def draw_noise(x: Tensor, generator: torch.Generator | None, noise: Noise | None) -> Tensor:
    """Standard normal draws of x's shape: ``noise(x)`` when given, else from ``generator``."""
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    dw = noise(x)
    if not isinstance(dw, Tensor) or dw.shape != x.shape:
        got = tuple(dw.shape) if isinstance(dw, Tensor) else type(dw).__name__
        raise ValueError(f"noise(x) must return a tensor of x's shape {tuple(x.shape)}; got {got}")
    return dw.to(device=x.device, dtype=x.dtype)


def one_noise_source(generator: torch.Generator | None, noise: Noise | None) -> None:
    if noise is not None and generator is not None:
        raise ValueError("give the noise's source once: generator or noise, not both")
