"""Sampler accuracy and cost with the exact oracle field (no training).

For each path, solver, time grid and NFE budget (the most steps whose ``fmgen.nfe`` fits it):
the mean L2 distance of the samples to a tight reference from the same noise (RK4 with many
steps of the EDM grid, ending on the denoised estimate like every run here by default), the
share of samples that end nearest another data point than the reference's ("other"), the mean
distance to the nearest data point, and the wall time per field evaluation. The data are an
oracle's: K random points in D dims, so the exact ODE ends on a data point, and with the
denoising last step so does nearly every sample: the error is then mostly the other-point share
times the distance between points (samples that took another turn), not a small truncation
error. The SDE follows other trajectories than the ODE, so its distance to the ODE reference is
not an error and is left out ("-", or null in JSON).

    python bench/samplers.py            # defaults finish in well under a minute on a CPU
    python bench/samplers.py --json     # one JSON object per line per (path, solver, grid, NFE)
    python bench/samplers.py --help
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fmgen import (
    FINAL_STEPS,
    PATHS,
    SAMPLERS,
    TIME_GRIDS,
    Oracle,
    SamplingSpec,
    count_nfe,
    get_path,
    solve,
    steps_within,
)

# the oracle gives a velocity; meanflow integrates an average velocity u(x, t, r), which the
# oracle has in no closed form (tests/test_meanflow_math.py integrates one for a mixture)
VELOCITY_SAMPLERS = [name for name in SAMPLERS if name != "meanflow"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--samplers", nargs="+", default=VELOCITY_SAMPLERS, choices=VELOCITY_SAMPLERS)
    p.add_argument("--grids", nargs="+", default=list(TIME_GRIDS), choices=list(TIME_GRIDS))
    p.add_argument("--nfe", nargs="+", type=int, default=[4, 6, 8, 10, 20, 50],
                   help="NFE budgets: each run takes the most steps that fit")  # fmt: skip
    p.add_argument("--final-step", choices=FINAL_STEPS, default="denoise")
    p.add_argument("--points", type=int, default=64, help="data points K")
    p.add_argument("--dim", type=int, default=16, help="data dimension D")
    p.add_argument("--samples", type=int, default=256, help="samples N per run")
    p.add_argument("--ref-steps", type=int, default=400, help="RK4 steps of the reference")
    p.add_argument("--sde-sigma", type=float, default=1.0, help="sigma_t = sde_sigma * beta_t")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = p.parse_args(argv)
    for flag in ("points", "dim", "samples", "ref_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if min(args.nfe) < 1:
        p.error(f"--nfe budgets must be >= 1; got {args.nfe}")
    return args


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One result per (path, solver, grid, steps): a reference row first for each path."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randn(args.points, args.dim, generator=gen, dtype=dtype)  # (K, D)
    x0 = torch.randn(args.samples, args.dim, generator=gen, dtype=dtype)  # (N, D)

    def dist_to_data(x: torch.Tensor) -> float:
        return torch.cdist(x, data).min(1).values.mean().item()

    def nearest_point(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, data).argmin(1)  # (N,)

    for path_name in args.paths:
        path = get_path(path_name)
        oracle = Oracle(data, path)
        ref_spec = SamplingSpec("rk4", args.ref_steps, grid="edm", final_step=args.final_step)
        ref = solve(ref_spec, oracle.velocity, x0, path=path)
        ref_point = nearest_point(ref)
        yield {"path": path_name, "solver": "rk4", "grid": "edm", "steps": args.ref_steps,
               "nfe": ref_spec.nfe, "reference": True, "err": 0.0, "other_point": 0.0,
               "dist": dist_to_data(ref)}  # fmt: skip
        for name, grid in itertools.product(args.samplers, args.grids):
            for steps in sorted(
                {steps_within(name, b, final_step=args.final_step) for b in args.nfe}
            ):
                spec = SamplingSpec(name, steps, grid=grid, sde_sigma=args.sde_sigma,
                                    final_step=args.final_step)  # fmt: skip
                field = count_nfe(oracle.velocity)
                sde_gen = torch.Generator().manual_seed(args.seed + 1)
                start = time.perf_counter()
                x = solve(spec, field, x0, path=path, generator=sde_gen)
                elapsed = time.perf_counter() - start
                if field.calls != spec.nfe:
                    raise RuntimeError(f"{spec.describe()}: {field.calls} evaluations, nfe() says {spec.nfe}")  # fmt: skip
                err = other = None  # the SDE's paths are not the ODE's
                if not spec.stochastic:
                    err = (x - ref).norm(dim=1).mean().item()
                    other = (nearest_point(x) != ref_point).double().mean().item()
                yield {"path": path_name, "solver": name, "grid": grid, "steps": steps,
                       "nfe": field.calls, "reference": False, "err": err, "other_point": other,
                       "dist": dist_to_data(x), "us_per_nfe": 1e6 * elapsed / field.calls}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.json:
        print(
            f"oracle of {args.points} points in {args.dim} dims, {args.samples} samples, "
            f"{args.dtype}, final step {args.final_step!r}, reference RK4 {args.ref_steps} edm "
            "steps; err = mean |x - x_ref|, dist = mean distance to the nearest data point"
        )
        header = f"{'path':<10} {'solver':<8} {'grid':<7} {'steps':>5} {'NFE':>5} {'err':>10} {'other':>6} {'dist':>10} {'us/NFE':>9}"
        print(header)
        print("-" * len(header))
    t_all = time.perf_counter()
    for r in rows(args):
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        name = "ref rk4" if r["reference"] else r["solver"]
        err = "-" if r["err"] is None or r["reference"] else f"{r['err']:.3e}"
        other = "-" if r["other_point"] is None or r["reference"] else f"{r['other_point']:.3f}"
        us = f"{r['us_per_nfe']:.1f}" if "us_per_nfe" in r else ""
        print(f"{r['path']:<10} {name:<8} {r['grid']:<7} {r['steps']:>5} {r['nfe']:>5} {err:>10} {other:>6} {r['dist']:>10.3e} {us:>9}")  # fmt: skip
    if not args.json:
        print(f"total {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
