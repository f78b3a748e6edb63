"""Sampler accuracy and cost with the exact oracle field (no training).

For each path, sampler, time grid (uniform in t, or EDM spacing in sigma = beta / alpha) and
step count: the mean L2 distance of the samples to the reference solution (RK4 with many steps
of the EDM grid from the same noise; on vp-linear the uniform grid's last step would leave noise
in the reference itself), the mean distance to the nearest data point, and the wall time per
field evaluation. The SDE follows other trajectories than the ODE, so its distance to the ODE
reference is not an error and is left out ("-").

    python bench/samplers.py            # defaults finish in well under a minute on a CPU
    python bench/samplers.py --help
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from fmgen import (
    PATHS,
    SAMPLERS,
    TIME_GRIDS,
    Oracle,
    beta_sigma,
    count_nfe,
    get_path,
    get_sampler,
    time_grid,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--grids", nargs="+", default=list(TIME_GRIDS), choices=list(TIME_GRIDS))
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--points", type=int, default=64, help="data points K")
    p.add_argument("--dim", type=int, default=16, help="data dimension D")
    p.add_argument("--samples", type=int, default=256, help="samples N per run")
    p.add_argument("--ref-steps", type=int, default=400, help="RK4 steps of the reference")
    p.add_argument("--sde-sigma", type=float, default=1.0, help="sigma_t = sde_sigma * beta_t")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randn(args.points, args.dim, generator=gen, dtype=dtype)  # (K, D)
    x0 = torch.randn(args.samples, args.dim, generator=gen, dtype=dtype)  # (N, D)
    print(
        f"oracle of {args.points} points in {args.dim} dims, {args.samples} samples, {args.dtype}, "
        f"reference RK4 {args.ref_steps} edm steps; err = mean |x - x_ref|, dist = mean distance "
        f"to the nearest data point"
    )
    header = f"{'path':<10} {'sampler':<7} {'grid':<7} {'steps':>5} {'NFE':>5} {'err':>10} {'dist':>10} {'us/NFE':>9}"
    print(header)
    print("-" * len(header))
    t_all = time.perf_counter()
    for path_name in args.paths:
        path = get_path(path_name)
        oracle = Oracle(data, path)
        ref_ts = time_grid(args.ref_steps, spacing="edm", path=path, dtype=dtype)
        ref = get_sampler("rk4")(oracle.velocity, x0, ref_ts)
        ref_dist = torch.cdist(ref, data).min(1).values.mean().item()
        print(
            f"{path_name:<10} {'ref rk4':<7} {'edm':<7} {args.ref_steps:>5} {'':>5} {'':>10} {ref_dist:>10.3e}"
        )
        for name, grid, steps in itertools.product(args.samplers, args.grids, args.steps):
            field = count_nfe(oracle.velocity)
            kwargs = {}
            if name == "sde":
                sde_gen = torch.Generator().manual_seed(args.seed + 1)
                kwargs = {
                    "path": path,
                    "sigma": beta_sigma(path, args.sde_sigma),
                    "generator": sde_gen,
                }
            ts = time_grid(steps, spacing=grid, path=path, dtype=dtype)
            start = time.perf_counter()
            x = get_sampler(name)(field, x0, ts, **kwargs)
            elapsed = time.perf_counter() - start
            err = "-" if name == "sde" else f"{(x - ref).norm(dim=1).mean().item():.3e}"
            dist = torch.cdist(x, data).min(1).values.mean().item()
            us = 1e6 * elapsed / field.calls
            print(
                f"{path_name:<10} {name:<7} {grid:<7} {steps:>5} {field.calls:>5} {err:>10} {dist:>10.3e} {us:>9.1f}"
            )
    print(f"total {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
