"""The command line: argument parsing and the error boundary. Nothing in fmgen imports it.

``train.py``, ``sample.py``, ``python -m fmgen.evaluate``, ``python -m fmgen.ema``, ``python -m fmgen.data prepare`` and the
``fmgen`` command land here. Errors a user can fix (``FmgenError``: a bad config, missing data,
an incompatible checkpoint) print one line and exit with status 2, never a traceback from deep
inside.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fmgen.base import FmgenError
from fmgen.core import FINAL_STEPS, SAMPLERS, SAMPLING_GRIDS, SamplingSpec


def run_guarded(fn: Callable[[], int]) -> int:
    """Run a command; an FmgenError becomes ``error: MESSAGE`` on stderr and exit status 2."""
    try:
        rc = fn()
    except FmgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    _leave_process_group()
    return rc


def _leave_process_group() -> None:
    """Close torchrun's process group (``fmgen.train.dist.leave_process_group``) after a command
    that succeeded; only on success: after an error a peer may be gone, and the exit status
    already says what happened. A process with a group has imported torch.distributed."""
    if "torch.distributed" in sys.modules:
        from fmgen.train.dist import leave_process_group

        leave_process_group()


def device_from_arg(text: str | None) -> Any:
    """``--device``: None (the accelerator's) or a torch device that exists on this machine."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise FmgenError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise FmgenError(
                f"--device {text}: this machine has {count} CUDA device(s); use "
                f"{'cpu' if not count else f'cuda:0..cuda:{count - 1}'}"
            )
    elif device.type != "cpu":
        raise FmgenError(f"--device {text!r}: fmgen runs on cpu or cuda devices")
    return device


def writable_dir(folder: Path, flag: str) -> Path:
    """Create ``folder`` (for an output flag) or fail naming the flag, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmgenError(
            f"{flag}: cannot create {folder} ({e.strerror}); choose a writable path"
        ) from None
    if not os.access(folder, os.W_OK):
        raise FmgenError(f"{flag}: {folder} is not writable; choose a writable path")
    return folder


def non_negative(value: int, flag: str) -> int:
    if value < 0:
        raise FmgenError(f"{flag} must be >= 0; got {value}")
    return value


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The options of a ``SamplingSpec``; each defaults to the checkpoint config's."""
    g = p.add_argument_group("sampling (default: the checkpoint config's sample.* options)")
    g.add_argument("--sampler", choices=tuple(SAMPLERS), default=None, help="the solver")
    g.add_argument("--steps", type=int, default=None, help="solver steps")
    g.add_argument(
        "--time-grid",
        choices=SAMPLING_GRIDS,
        default=None,
        help="time steps uniform in t, EDM (Karras) spacing in sigma = beta / alpha, uniform in "
        "log-SNR, or the list given by --times",
    )
    g.add_argument("--rho", type=float, default=None, help="the edm grid's exponent (EDM: 7)")
    g.add_argument(
        "--times",
        type=_times,
        default=None,
        help="an explicit grid, e.g. 0,0.3,0.6,0.9,1 (sets --time-grid list and the steps)",
    )
    g.add_argument(
        "--final-step",
        choices=FINAL_STEPS,
        default=None,
        help="the step that ends at t = 1: denoise (return the data prediction) or the solver's",
    )
    g.add_argument(
        "--churn", type=float, default=None, help="heun: EDM's stochastic churn S_churn (0 = off)"
    )
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance w of u_null + w (u_cond - u_null): 0 = the unconditional "
        "model alone, 1 = the conditional model alone (no guidance), > 1 extrapolates away from "
        "the unconditional prediction (stronger class adherence, less diversity); default: the "
        "checkpoint config's sample.guidance",
    )
    g.add_argument(
        "--guidance-interval",
        type=_interval,
        default=None,
        metavar="LO,HI",
        help="guidance only at LO <= t <= HI (t: 0 noise, 1 data), the conditional model alone "
        "elsewhere (Kynkaanniemi et al. 2024), e.g. 0.25,0.8; 'none': at every t; default: the "
        "checkpoint config's sample.guidance_interval",
    )
    g.add_argument(
        "--sde-sigma", type=float, default=None, help="SDE noise scale: sigma_t = s * beta_t"
    )
    g.add_argument("--t-start", type=float, default=None, help="first time of the grid (0 = noise)")


def _floats(text: str, expected: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None


def _times(text: str) -> tuple[float, ...]:
    return _floats(text, "a comma-separated list of times, e.g. 0,0.5,0.9,1")


def _interval(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()  # guidance at every t
    return _floats(text, "LO,HI (two times, 0 = noise, 1 = data), e.g. 0.25,0.8, or none")


_SPEC_FLAGS = {"sampler": "sampler", "steps": "steps", "grid": "time_grid",
               "guidance": "guidance", "sde_sigma": "sde_sigma", "t_start": "t_start",
               "rho": "rho", "final_step": "final_step", "churn": "churn",
               "guidance_interval": "guidance_interval"}  # fmt: skip


def spec_from_args(base: SamplingSpec, args: Any) -> SamplingSpec:
    """``base`` with the sampling options given on the command line; a bad value names its flag.

    ``--times`` is one change of three spec fields (the list grid, its times, its steps), unless
    --time-grid or --steps say otherwise; the spec then checks that they agree.
    """
    changes: dict[str, Any] = {}
    given: dict[str, Any] = {}  # the flags the user gave, for the error message
    times = getattr(args, "times", None)
    if times is not None:
        changes = {"grid": "list", "times": times, "steps": len(times) - 1}
        given["times"] = ",".join(map(str, times))
    elif getattr(args, "time_grid", None) not in (None, "list") and base.grid == "list":
        changes["times"] = ()  # leaving the list grid drops its times
    for field, attr in _SPEC_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            changes[field] = given[attr] = value
    if changes.get("guidance_interval") == ():  # --guidance-interval none
        changes["guidance_interval"] = None
        given["guidance_interval"] = "none"
        base = dataclasses.replace(base, guidance_interval=None)  # replace() skips None values
    try:
        return base.replace(**changes)
    except ValueError as e:
        flags = " ".join(f"--{attr.replace('_', '-')} {_flag_text(v)}" for attr, v in given.items())
        raise FmgenError(f"{flags}: {e}") from None


def _flag_text(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``fmgen train|sample|eval|ema|prepare|index ...``"""
    from fmgen.cli.ema import main as ema_main
    from fmgen.cli.evaluate import main as eval_main
    from fmgen.cli.index import main as index_main
    from fmgen.cli.prepare import main as prepare_main
    from fmgen.cli.sample import main as sample_main
    from fmgen.cli.train import main as train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "sample": sample_main, "eval": eval_main, "ema": ema_main,
                "prepare": prepare_main, "index": index_main}  # fmt: skip
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            f"usage: fmgen {{{','.join(commands)}}} [options]   (fmgen COMMAND --help for details)"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])
