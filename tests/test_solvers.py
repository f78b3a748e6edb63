"""Time grids (logsnr, list, rho), the denoising last step, midpoint, DPM-Solver++(2M), EDM churn,
guidance with every solver, and the sampler benchmark, all with the exact oracle field."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from fmgen.core.grids import TIME_GRIDS, check_times, sigma_of, time_grid, time_of_sigma
from fmgen.core.guidance import cfg_field, velocity_field
from fmgen.core.multistep import (
    FEW_STEPS,
    MIN_STEP_RATIO,
    _dpmpp_increment,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
)
from fmgen.core.oracle import Oracle
from fmgen.core.paths import PREDICTION_TYPES, get_path
from fmgen.core.samplers import (
    SAMPLERS,
    Churn,
    count_nfe,
    get_sampler,
    sample_euler,
    sample_heun,
    sample_midpoint,
    sample_rk4,
)
from fmgen.core.sampling import SAMPLING_GRIDS, SamplingSpec, nfe, solve, steps_within
from fmgen.core.solver_base import FINAL_STEPS

F64 = torch.float64
PATHS = ["linear", "vp-cosine", "vp-linear"]
DATA = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.3, -0.8]], dtype=F64)  # K=4, D=2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise(n: int, dim: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_data(k: int = 64, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def nearest_distance(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.flatten(1), data.flatten(1)).min(1).values


def slope(steps: list[int], errors: list[float]) -> float:
    """-d log(error) / d log(steps), least squares: the observed order of convergence."""
    lx = torch.tensor(steps, dtype=F64).log()
    ly = torch.tensor(errors, dtype=F64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return -float((lx * ly).sum() / (lx * lx).sum())


# --- time grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("t_start", "t_end"), [(0.0, 1.0), (0.3, 1.0), (0.0, 0.7), (0.2, 0.9)])
def test_logsnr_grid_is_uniform_in_log_snr(path_name, t_start, t_end):
    """steps + 1 strictly increasing times from exactly t_start to exactly t_end; at the interior
    times log-SNR = 2 log(alpha / beta) is evenly spaced to 1e-9 between -2 log sigma_max
    (sigma_max = 80 clamped to sigma(t_start)) and -2 log sigma_min (0.002, or sigma(t_end) when
    t_end < 1; with t_end = 1 a last point t = 1 follows)."""
    path = get_path(path_name)
    sigma_hi = min(80.0, sigma_of(path, torch.tensor(t_start, dtype=F64)).item())
    sigma_lo = 0.002 if t_end == 1.0 else sigma_of(path, torch.tensor(t_end, dtype=F64)).item()
    for steps in (1, 2, 18, 100):
        ts = time_grid(steps, t_start, t_end, spacing="logsnr", path=path, dtype=F64)
        assert ts.shape == (steps + 1,) and ts[0].item() == t_start and ts[-1].item() == t_end
        assert bool((ts[1:] > ts[:-1]).all())
        n = steps if t_end == 1.0 else steps + 1
        want = torch.linspace(-2 * math.log(sigma_hi), -2 * math.log(sigma_lo), n, dtype=F64)
        s = path.schedule(ts[:n])
        got = 2 * torch.log(s.alpha / s.beta)
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-9, atol=1e-9)


def test_logsnr_is_the_edm_grid_as_rho_grows():
    """Uniform in log sigma is the rho -> inf limit of uniform in sigma^(1/rho)."""
    path = get_path("vp-cosine")
    a = time_grid(12, spacing="logsnr", path=path, dtype=F64)
    b = time_grid(12, spacing="edm", path=path, rho=1e6, dtype=F64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = time_grid(12, spacing="edm", path=path, dtype=F64)  # rho = 7: another grid
    assert (a - c).abs().max() > 1e-2


def test_spec_grids_rho_and_list():
    path = get_path("vp-linear")
    assert SAMPLING_GRIDS == (*TIME_GRIDS, "list") and "logsnr" in TIME_GRIDS
    for grid in TIME_GRIDS:
        spec = SamplingSpec(steps=9, grid=grid, t_start=0.1)
        want = time_grid(9, 0.1, spacing=grid, path=path, dtype=F64)
        assert torch.equal(spec.time_grid(path, dtype=F64), want)
    rho3 = SamplingSpec(steps=9, grid="edm", rho=3.0).time_grid(path, dtype=F64)
    assert torch.equal(rho3, time_grid(9, spacing="edm", path=path, rho=3.0, dtype=F64))
    assert (rho3 - SamplingSpec(steps=9, grid="edm").time_grid(path, dtype=F64)).abs().max() > 1e-3
    times = (0.0, 0.3, 0.6, 0.9, 1.0)
    spec = SamplingSpec(steps=4, grid="list", times=times)
    assert torch.equal(spec.time_grid(path, dtype=F64), torch.tensor(times, dtype=F64))
    assert spec.nfe == nfe("heun", 4) == 7
    short = SamplingSpec(steps=3, grid="list", times=[0.2, 0.5, 0.7, 0.95], t_start=0.2)
    assert short.times == (0.2, 0.5, 0.7, 0.95) and short.t_end == 0.95
    assert short.nfe == 6  # no step ends at t = 1: three full Heun steps
    assert hash(short) == hash(SamplingSpec(steps=3, grid="list", times=(0.2, 0.5, 0.7, 0.95),
                                            t_start=0.2))  # fmt: skip
    json.dumps(short.to_dict(), allow_nan=False)  # records stay plain JSON
    json.dumps(SamplingSpec(churn=5.0).to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"grid": "list"}, r"grid 'list' needs times"),
        ({"times": (0.0, 0.5, 1.0)}, r"set grid='list' or drop times"),
        ({"grid": "list", "times": (0.0, 0.5, 1.0)}, r"make 2 steps; got steps=20 \(set steps=2\)"),
        ({"grid": "list", "times": (0.0, 0.6, 0.5, 1.0), "steps": 3}, "strictly increasing"),
        ({"grid": "list", "times": (0.0, 0.5, 0.5, 1.0), "steps": 3}, "strictly increasing"),
        ({"grid": "list", "times": (0.1, 0.5, 1.0), "steps": 2}, r"start at t_start = 0.0"),
        ({"grid": "list", "times": (0.0, 0.5, 1.5), "steps": 2}, r"lie in \[0, 1\]"),
        ({"grid": "list", "times": (0.0,), "steps": 1}, "at least two"),
        ({"grid": "list", "times": (0.0, float("nan")), "steps": 1}, "finite"),
        ({"grid": "list", "times": ("a", "b"), "steps": 1}, "sequence of numbers"),
        ({"grid": "karras"}, "uniform, edm, logsnr, list"),
        ({"rho": 0.0}, "rho must be a finite number > 0"),
        ({"final_step": "last"}, "denoise, solver"),
        ({"churn": -1.0}, "churn must be a finite number >= 0"),
        ({"churn": 1.0, "sampler": "euler"}, "churn is an option of the heun sampler"),
        ({"churn": 1.0, "churn_sigma_min": 2.0, "churn_sigma_max": 1.0}, "churn_sigma_max"),
        ({"churn_noise": float("inf")}, "churn_noise"),
        ({"sampler": "dpm++"}, r"midpoint, dpm\+\+2m"),
        ({"lower_order_few_steps": "yes"}, "lower_order_few_steps must be true or false"),
        ({"guidance_interval": (0.7, 0.3)}, r"guidance_interval \(0.7, 0.3\) must satisfy"),
    ],
)
def test_spec_errors_name_the_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        SamplingSpec(**changes)


def test_check_times():
    assert check_times([0, 0.5, 1]) == (0.0, 0.5, 1.0)
    assert check_times((0.25, 0.75), t_start=0.25) == (0.25, 0.75)
    with pytest.raises(ValueError, match="start below 1"):
        check_times((1.0, 1.5))


# --- the denoising last step ----------------------------------------------------------------------


def test_denoise_step_is_the_euler_step_on_the_linear_path():
    """alpha = t, beta = 1 - t: u = (D - x) / (1 - t), so x0_hat = x + (1 - t) u, the Euler step
    from t to 1, for any velocity (not only the oracle's): equal to 1e-12 in float64."""
    path = get_path("linear")
    x, u = noise(64, seed=1), 3 * noise(64, seed=2)
    for t in (0.0, 0.1, 0.5, 0.9, 0.999):
        tb = torch.full((64,), t, dtype=F64)
        x0 = path.convert(u, x, tb, "velocity", "x0")
        torch.testing.assert_close(x0, x + (1 - t) * u, rtol=0, atol=1e-12)
    oracle = Oracle(random_data(), path)
    x0 = noise(32, dim=16, seed=3)
    for steps, grid in itertools.product((1, 5, 20), ("uniform", "logsnr")):
        ts = time_grid(steps, spacing=grid, path=path, dtype=F64)
        for sampler in (sample_euler, sample_heun):  # Heun's own last step is an Euler step
            a = sampler(oracle.velocity, x0, ts, path=path, final_step="denoise")
            b = sampler(oracle.velocity, x0, ts, path=path, final_step="solver")
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path_name", PATHS)
def test_heun_with_the_denoising_step_lands_on_data(path_name):
    """Heun, 20 uniform steps (the default spec): every sample within 1e-3 of one of 64 points in
    16 dims. On vp-linear the solver's own last step leaves beta_{1-h} / 2 ~ 0.04 |eps| of noise
    (tests/test_samplers.py); the denoising step removes it."""
    data = random_data()
    path = get_path(path_name)
    oracle = Oracle(data, path)
    x0 = noise(128, dim=16, seed=4)
    spec = SamplingSpec("heun", 20)
    assert spec.final_step == "denoise" and spec.grid == "uniform" and spec.nfe == 39
    dist = nearest_distance(solve(spec, oracle.velocity, x0, path=path), data)
    solver_dist = nearest_distance(
        solve(spec.replace(final_step="solver"), oracle.velocity, x0, path=path), data
    )
    print(
        f"{path_name}: max distance {dist.max():.2e} (solver's last step {solver_dist.max():.2e})"
    )
    assert dist.max() < 1e-3
    if path_name == "vp-linear":
        assert solver_dist.max() > 0.1


@pytest.mark.parametrize("path_name", PATHS)
def test_sde_last_step_denoises(path_name):
    """The SDE's last step returns x0_hat as well: with 20 steps it ends on the data."""
    data = random_data()
    path = get_path(path_name)
    oracle = Oracle(data, path)
    spec = SamplingSpec("sde", 20, sde_sigma=1.0)
    counter = count_nfe(oracle.velocity)
    x = solve(
        spec, counter, noise(64, dim=16), path=path, generator=torch.Generator().manual_seed(0)
    )
    assert counter.calls == spec.nfe == 20
    assert nearest_distance(x, data).max() < 1e-3


# --- midpoint and DPM-Solver++(2M) ----------------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
def test_midpoint_and_dpmpp_orders_away_from_t1(path_name):
    """Observed orders on [0, 0.7] (the field is smooth there) against a 1000-step RK4 reference:
    the fitted slope of log error vs log steps over 8..64 steps lies in [1.7, 2.3] for midpoint
    and for DPM-Solver++(2M) on the uniform, edm and logsnr grids (measured 1.81..2.11). (2M) runs
    with lower_order_few_steps=False: the order of its update at every step count; the default
    first-order last step below 15 steps doubles the 8-step error on linear/uniform (1.8e-2 ->
    3.8e-2, slope 2.43), and the default's order from 16 steps on has its own test."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0 = noise(64, seed=1)
    ref = sample_rk4(oracle.velocity, x0, time_grid(1000, t_end=0.7, dtype=F64))
    steps = [8, 16, 32, 64]
    runs = [("midpoint", "uniform")] + [("dpm++2m", g) for g in TIME_GRIDS]
    for name, grid in runs:
        errs = []
        for n in steps:
            ts = time_grid(n, t_end=0.7, spacing=grid, path=path, dtype=F64)
            kw = {"lower_order_few_steps": False} if name == "dpm++2m" else {}
            x = get_sampler(name)(oracle.velocity, x0, ts, path=path, **kw)
            errs.append((x - ref).norm(dim=1).mean().item())
        order = slope(steps, errs)
        print(f"{path_name} {name} {grid}: errors {[f'{e:.2e}' for e in errs]} slope {order:.2f}")
        assert 1.7 <= order <= 2.3, (name, grid, errs)


@pytest.mark.parametrize("solver", [sample_dpmpp_2m, sample_dpmpp_3m])
@pytest.mark.parametrize("path_name", PATHS)
def test_dpmpp_is_exact_on_one_data_point(path_name, solver):
    """With one data point D = z everywhere, and the data-prediction exponential integrator
    beta_{i+1} / beta_i (x_i - alpha_i z) + alpha_{i+1} z is exact: x_t = alpha_t z + beta_t eps
    to round-off on any grid, from 2 steps on, to t < 1 and to t = 1 (x = z)."""
    z = torch.tensor([[0.7, -0.4]], dtype=F64)
    path = get_path(path_name)
    oracle = Oracle(z, path)
    eps = noise(16, seed=2)
    s0 = path.schedule(torch.tensor(0.0, dtype=F64))
    x0 = s0.alpha * z + s0.beta * eps  # alpha_0 > 0 on vp-linear
    for steps, grid in itertools.product((2, 3, 10), TIME_GRIDS):
        ts = time_grid(steps, t_end=0.8, spacing=grid, path=path, dtype=F64)
        s = path.schedule(ts[-1])
        want = s.alpha * z + s.beta * eps
        got = solver(oracle.velocity, x0, ts, path=path)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        ends_at_one = time_grid(steps, spacing=grid, path=path, dtype=F64)
        got = solver(oracle.velocity, x0, ends_at_one, path=path)
        torch.testing.assert_close(got, z.expand_as(got), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dpm++2m", "dpm++3m"])
def test_dpmpp_needs_the_path(name):
    with pytest.raises(ValueError, match=re.escape(f"{name} needs the Gaussian path")):
        get_sampler(name)(lambda x, t: x, noise(2), time_grid(3, t_end=0.5))


def test_dpmpp_3m_update_is_exact_for_a_quadratic_data_prediction():
    """The (3M) bracket integrates exp(tau - h) D(lambda_i + tau) over [0, h] exactly when D is a
    quadratic in lambda, on uneven steps (the reference: the closed form of that integral).
    Halving the second difference, as diffusers'
    third-order multistep update does, leaves an error of 0.02 here."""
    a, b, c = 0.3, 0.7, 1.1  # D(l) = a + b l + c l^2 around lambda_i = 0

    def d_of(lam: float) -> torch.Tensor:
        return torch.tensor([a + b * lam + c * lam**2], dtype=F64)

    for h, h1, h2 in [(0.5, 0.4, 0.6), (2.0, 0.3, 1.7), (0.01, 0.02, 0.005)]:
        e = math.exp(-h)
        # int_0^h e^(tau - h) tau^k dtau for k = 0, 1, 2
        i0, i1, i2 = 1 - e, h - 1 + e, h * h - 2 * h + 2 - 2 * e
        want = a * i0 + b * i1 + c * i2
        past = [(d_of(-h1 - h2), h2), (d_of(-h1), h1)]
        got = _dpmpp_increment(d_of(0.0), past, h).item()
        assert abs(got - want) <= 1e-14 * max(1.0, abs(want)), (h, got, want)


def exact_states(oracle: Oracle, x0: torch.Tensor, ends: list[float], steps: int) -> dict:
    """{t: x at t} from ``x0`` at t = 0 for each t in ``ends``: RK4 with ``steps`` uniform steps on
    [0, t], all ends in one batched solve (a call per end costs ~16x as long: the field's per-call
    overhead dominates at B = 64). Row block i runs on s in [0, T], T = max(ends), at t = s c_i with
    c_i = t_i / T, so dx/ds = c_i v(x, s c_i): the same steps as ``time_grid(steps, t_end=t_i)``,
    and no step ends at t = 1 (where RK4 would take its last-step variant)."""
    top = max(ends)
    c = torch.tensor(ends, dtype=F64).div(top).repeat_interleave(len(x0))  # (E * B,)

    def field(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return c[:, None] * oracle.velocity(x, s * c)

    x = sample_rk4(field, x0.repeat(len(ends), 1), time_grid(steps, t_end=top, dtype=F64))
    return dict(zip(ends, x.split(len(x0)), strict=True))


@pytest.mark.parametrize("path_name", PATHS)
def test_dpmpp_local_orders_along_the_exact_solution(path_name):
    """One step from exact states and data predictions at lambda_c - 2.1 h, lambda_c - 0.8 h,
    lambda_c (t = 0.5) to lambda_c + h, against the exact x there (RK4, 2000 steps): the local
    error falls like h^4 for the (3M) update (measured slopes 3.81..3.99 over h = 0.4..0.05) and
    like h^3 with one past D, the (2M) update (2.99..3.08)."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0 = noise(64, seed=1)
    s = path.schedule(torch.tensor(0.5, dtype=F64))
    lam_c = math.log(s.alpha / s.beta)
    hs = [0.4, 0.2, 0.1, 0.05]
    lams_of = {h: [lam_c - 2.1 * h, lam_c - 0.8 * h, lam_c, lam_c + h] for h in hs}
    ts_of = {h: time_of_sigma(path, torch.exp(-torch.tensor(lams, dtype=F64))).tolist()
             for h, lams in lams_of.items()}  # fmt: skip
    xs_at = exact_states(oracle, x0, [t for ts in ts_of.values() for t in ts], steps=2000)
    errs: dict[int, list[float]] = {1: [], 2: []}
    for h in hs:
        lams, ts = lams_of[h], ts_of[h]
        xs = [xs_at[t] for t in ts]
        sch = path.schedule(torch.tensor(ts, dtype=F64))
        alpha, beta = sch.alpha.tolist(), sch.beta.tolist()
        ds = []
        for x, t in zip(xs[:3], ts[:3], strict=True):
            tb = torch.full((64,), t, dtype=F64)
            ds.append(path.convert(oracle.velocity(x, tb), x, tb, "velocity", "x0"))
        past = [(ds[0], lams[1] - lams[0]), (ds[1], lams[2] - lams[1])]
        for n_past in (1, 2):
            incr = _dpmpp_increment(ds[2], past[-n_past:], lams[3] - lams[2])
            x_next = (beta[3] / beta[2]) * xs[2] + alpha[3] * incr
            errs[n_past].append((x_next - xs[3]).norm(dim=1).mean().item())
    o2, o3 = -slope(hs, errs[1]), -slope(hs, errs[2])  # slope() is -d log err / d log steps
    print(f"{path_name}: 2M {errs[1]} slope {o2:.2f}; 3M {errs[2]} slope {o3:.2f}")
    assert 2.8 <= o2 <= 3.3 and 3.7 <= o3 <= 4.3


@pytest.mark.parametrize("path_name", PATHS)
def test_dpmpp_3m_is_more_accurate_than_2m_at_equal_steps(path_name):
    """On [0, 0.7] against a 1000-step RK4 reference, the (3M) update beats (2M)'s at 8, 16, 32
    and 64 steps on every grid (lower_order_few_steps=False; measured ratios 1.3..7). Its global
    order stays near 2 on the uniform grid of vp-cosine (measured 2.0): the start after alpha = 0
    takes first-order steps whose length in lambda does not shrink with the step count; on the
    other grids 2.2..2.9. With the defaults the two agree to the bit at 8 steps (fewer than 15:
    at most second order) and (3M) wins from 16 steps."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0 = noise(64, seed=1)
    ref = sample_rk4(oracle.velocity, x0, time_grid(1000, t_end=0.7, dtype=F64))
    for grid, n in itertools.product(TIME_GRIDS, [8, 16, 32, 64]):
        ts = time_grid(n, t_end=0.7, spacing=grid, path=path, dtype=F64)
        for full in (True, False):
            kw = {"path": path, "lower_order_few_steps": not full}
            x2 = sample_dpmpp_2m(oracle.velocity, x0, ts, **kw)
            x3 = sample_dpmpp_3m(oracle.velocity, x0, ts, **kw)
            e2, e3 = ((x - ref).norm(dim=1).mean().item() for x in (x2, x3))
            if full or n >= FEW_STEPS:
                assert e3 < e2, (grid, n, full, e3, e2)
            else:
                assert torch.equal(x3, x2), (grid, n)


def dpmpp_states(solver, field, x0, ts, path, **kw) -> list[torch.Tensor]:
    """x_0 and the state after every step of a DPM-Solver++ run."""
    xs = [x0]
    solver(field, x0, ts, path=path, callback=lambda step: xs.append(step.x), **kw)
    return xs


def dpmpp_update(field, xs, ts, path, i: int, n_past: int) -> torch.Tensor:
    """The step from xs[i] with the D's of the ``n_past`` states before it: first order (0),
    (2M) (1) or (3M) (2), recomputed from the run's states."""
    times = ts.tolist()
    sch = path.schedule(ts)
    alpha, beta = sch.alpha.tolist(), sch.beta.tolist()
    lam = (sch.alpha.log() - sch.beta.log()).tolist()

    def d(j: int) -> torch.Tensor:
        tb = torch.full((xs[j].shape[0],), times[j], dtype=F64)
        return path.convert(field(xs[j], tb), xs[j], tb, "velocity", "x0")

    past = [(d(j), lam[j + 1] - lam[j]) for j in range(i - n_past, i)]
    incr = _dpmpp_increment(d(i), past, lam[i + 1] - lam[i])
    return (beta[i + 1] / beta[i]) * xs[i] + alpha[i + 1] * incr


@pytest.mark.parametrize("path_name", PATHS)
def test_dpmpp_few_steps_take_lower_order(path_name):
    """On a grid of fewer than 15 steps (lower_order_few_steps) the last step is the first-order
    update and every other at most (2M)'s, (3M) included; with lower_order_few_steps=False, and at
    15 steps, (3M) takes third order up to its last step. The grid stops at t = 0.9 (the last step
    is a real step, not the denoising limit) and starts at 0.1 (finite lambda), evenly in
    log-SNR (no step-ratio rule acts)."""
    path = get_path(path_name)
    field = Oracle(DATA, path).velocity
    x0 = noise(16, seed=3)

    def near(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-12)

    n = 8
    ts = time_grid(n, 0.1, 0.9, spacing="logsnr", path=path, dtype=F64)
    for solver, top in ((sample_dpmpp_2m, 1), (sample_dpmpp_3m, 2)):
        xs = dpmpp_states(solver, field, x0, ts, path)
        assert near(xs[n], dpmpp_update(field, xs, ts, path, n - 1, 0))
        for i in range(1, n - 1):
            assert near(xs[i + 1], dpmpp_update(field, xs, ts, path, i, 1)), (solver, i)
        off = dpmpp_states(solver, field, x0, ts, path, lower_order_few_steps=False)
        for i in range(top, n):
            assert near(off[i + 1], dpmpp_update(field, off, ts, path, i, top)), (solver, i)
        assert (off[n] - dpmpp_update(field, off, ts, path, n - 1, 0)).abs().max() > 1e-6
    two = dpmpp_states(sample_dpmpp_2m, field, x0, ts, path)
    assert torch.equal(dpmpp_states(sample_dpmpp_3m, field, x0, ts, path)[-1], two[-1])
    n = FEW_STEPS
    ts = time_grid(n, 0.1, 0.9, spacing="logsnr", path=path, dtype=F64)
    xs = dpmpp_states(sample_dpmpp_3m, field, x0, ts, path)
    for i in (2, n - 2, n - 1):
        assert near(xs[i + 1], dpmpp_update(field, xs, ts, path, i, 2)), i


def test_dpmpp_drops_a_past_step_shorter_than_half_the_current_one():
    """A past D enters the update only if its step is >= MIN_STEP_RATIO = 1/2 of the current
    one: after a step 0.2 long in lambda, a step of 1.0 is first order (its (2M) weight would
    be 1 / (2 r) = 2.5); with 0.5 one step back and 0.2 two steps back, a step of 0.5 is (2M);
    ratios of 0.55 keep (3M). lower_order_few_steps is off (these grids have few steps)."""
    path = get_path("vp-cosine")
    field = Oracle(DATA, path).velocity
    x0 = noise(16, seed=4)
    assert MIN_STEP_RATIO == 0.5

    def grid(hs: list[float]) -> torch.Tensor:
        lam = -1.5 + torch.tensor([0.0, *hs], dtype=F64).cumsum(0)
        return time_of_sigma(path, torch.exp(-lam))

    cases = [  # lambda steps, the step looked at, the past D's it may use
        ([0.5, 0.5, 0.2, 1.0], 3, 0),
        ([0.5, 0.2, 0.5, 0.5], 3, 1),
        ([0.5, 0.5, 0.55, 1.0, 1.0], 3, 2),
        ([0.5, 0.5, 0.55, 1.0, 1.0], 4, 2),
    ]
    for hs, i, n_past in cases:
        ts = grid(hs)
        xs = dpmpp_states(sample_dpmpp_3m, field, x0, ts, path, lower_order_few_steps=False)
        got = xs[i + 1]
        assert torch.allclose(got, dpmpp_update(field, xs, ts, path, i, n_past), rtol=0, atol=1e-12)
        other = dpmpp_update(field, xs, ts, path, i, 2 if n_past < 2 else 1)
        assert (got - other).abs().max() > 1e-6, (hs, i)


def test_builtin_grids_keep_lambda_step_ratios_above_the_rule():
    """The step-ratio rule is for hand-made grids: on every path, grid and start, from 2 to 64
    steps, consecutive finite lambda-steps (the step that ends at t = 1 aside: it returns D)
    keep h_{i-1} / h_i >= 0.54, and h_{i-2} / h_i >= 0.41 (measured 0.548 and 0.416: the
    second-to-last step of long uniform grids, and edm's first steps after t_start > 0)."""
    low0, low1 = math.inf, math.inf
    for path_name, grid, t_start in itertools.product(PATHS, TIME_GRIDS, (0.0, 0.3, 0.6, 0.9)):
        path = get_path(path_name)
        for n in range(2, 65):
            ts = time_grid(n, t_start, spacing=grid, path=path, dtype=F64)
            sch = path.schedule(ts[:-1])
            h = (sch.alpha.log() - sch.beta.log()).diff().tolist()  # the steps before t = 1
            h = [v for v in h if math.isfinite(v)]  # after lambda = -inf the history restarts
            low0 = min([low0] + [a / b for a, b in zip(h, h[1:], strict=False)])
            low1 = min([low1] + [a / b for a, b in zip(h, h[2:], strict=False)])
    assert low0 >= 0.54 and low1 >= 0.41, (low0, low1)


@pytest.mark.parametrize("path_name", PATHS)
def test_dpmpp_default_orders_hold_from_16_steps(path_name):
    """With the defaults (lower_order_few_steps on) the observed global orders on [0, 0.7] over
    16..128 steps, where lower_order_few_steps does not act: (2M) in [1.8, 2.2] on every grid and
    path (measured 1.90..2.09), (3M) >= 1.9 (measured 1.94..2.89: its start after alpha = 0 is
    first order, see test_dpmpp_3m_is_more_accurate_than_2m_at_equal_steps)."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0 = noise(64, seed=1)
    ref = sample_rk4(oracle.velocity, x0, time_grid(1000, t_end=0.7, dtype=F64))
    steps = [16, 32, 64, 128]
    for grid in TIME_GRIDS:
        orders = {}
        for name in ("dpm++2m", "dpm++3m"):
            errs = []
            for n in steps:
                ts = time_grid(n, t_end=0.7, spacing=grid, path=path, dtype=F64)
                x = get_sampler(name)(oracle.velocity, x0, ts, path=path)
                errs.append((x - ref).norm(dim=1).mean().item())
            orders[name] = slope(steps, errs)
            print(f"{path_name} {name} {grid}: errors {[f'{e:.2e}' for e in errs]} "
                  f"slope {orders[name]:.2f}")  # fmt: skip
        assert 1.8 <= orders["dpm++2m"] <= 2.2, (grid, orders)
        assert orders["dpm++3m"] >= 1.9, (grid, orders)


def test_midpoint_final_steps_differ_only_in_the_last_step():
    path = get_path("vp-cosine")
    oracle = Oracle(DATA, path)
    x0, ts = noise(8), time_grid(6, dtype=F64)
    seen = {}
    for final in FINAL_STEPS:
        counter = count_nfe(oracle.velocity)
        steps = []
        sample_midpoint(counter, x0, ts, path=path, final_step=final, callback=steps.append)
        seen[final] = (counter.calls, steps)
    assert seen["solver"][0] == 12 and seen["denoise"][0] == 11
    for a, b in zip(seen["solver"][1][:-1], seen["denoise"][1][:-1], strict=True):
        assert torch.equal(a.x, b.x)
    assert not torch.allclose(seen["solver"][1][-1].x, seen["denoise"][1][-1].x)


# --- EDM churn ---------------------------------------------------------------------------------------


def per_sample_noise(first: int, count: int):
    """noise(x) with one generator per sample index, as fmgen.eval.generate.sde_noise draws it."""
    gens = [torch.Generator().manual_seed(1000 + first + j) for j in range(count)]
    return lambda x: torch.stack(
        [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens]
    )


def test_churn_raises_sigma_by_one_plus_gamma_inside_its_range():
    """Each step's first evaluation is at t_hat with sigma(t_hat) = (1 + gamma) sigma(t_i),
    gamma = min(S_churn / N, sqrt(2) - 1), for S_min <= sigma(t_i) <= S_max; at t_i elsewhere."""
    path = get_path("vp-cosine")
    oracle = Oracle(DATA, path)
    steps, churn = 10, Churn(s_churn=3.0, s_min=0.05, s_max=2.0)
    ts = time_grid(steps, spacing="edm", path=path, dtype=F64)
    counter = count_nfe(oracle.velocity)
    sample_heun(counter, noise(4), ts, path=path, churn=churn, final_step="denoise",
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    firsts = torch.tensor(counter.times[0::2], dtype=F64)  # (N,): Heun's first evaluations
    assert counter.calls == nfe("heun", steps) == 19
    sig_i = sigma_of(path, ts[:-1])
    gamma = min(3.0 / steps, math.sqrt(2) - 1)
    inside = (sig_i >= 0.05) & (sig_i <= 2.0)
    assert 0 < int(inside.sum()) < steps
    want = torch.where(inside, (1 + gamma) * sig_i, sig_i)
    torch.testing.assert_close(sigma_of(path, firsts), want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("path_name", PATHS)
def test_churn_noise_keeps_the_marginal(path_name):
    """For one data point, x_t = alpha_t z + beta_t eps moved back to sigma_hat by churn must be
    distributed as x_{t_hat}: mean alpha_hat z and per-dimension std beta_hat (20000 draws:
    4 standard errors on the mean, 3% on the std)."""
    from fmgen.core.samplers import _churn

    path = get_path(path_name)
    z = torch.tensor([[2.0, -1.0]], dtype=F64)
    n, t = 20000, 0.6
    s = path.schedule(torch.tensor(t, dtype=F64))
    x = s.alpha * z + s.beta * noise(n, seed=5)
    sigma = (s.beta / s.alpha).item()
    sigma_0 = sigma_of(path, torch.tensor(0.0, dtype=F64)).item()
    # a small churn, and one beyond sigma(0) where that is finite (vp-linear: ~140): t_hat = 0
    for factor in (1.2, 1e6):
        x_hat, t_hat = _churn(path, x, t, factor * sigma, sigma_0, 1.0,
                              torch.Generator().manual_seed(6), None)  # fmt: skip
        h = path.schedule(torch.tensor(t_hat, dtype=F64))
        if factor * sigma >= sigma_0:
            assert t_hat == 0.0 and path_name == "vp-linear"
        else:
            assert (h.beta / h.alpha).item() == pytest.approx(factor * sigma, rel=1e-8)
        assert torch.isfinite(x_hat).all()
        se = h.beta.item() / math.sqrt(n)
        assert (x_hat.mean(0) - h.alpha * z[0]).abs().max() < 4 * se
        torch.testing.assert_close(x_hat.std(0), h.beta.expand(2), rtol=0.03, atol=0)


def test_churn_draws_are_per_sample_and_zero_churn_is_heun():
    path = get_path("vp-linear")
    oracle = Oracle(DATA, path)
    x0 = noise(6)
    spec = SamplingSpec("heun", 8, churn=10.0)
    assert spec.stochastic and not SamplingSpec("heun", 8).stochastic
    run = lambda x, nz: solve(spec, oracle.velocity, x, path=path, noise=nz)  # noqa: E731
    whole = run(x0, per_sample_noise(0, 6))
    split = torch.cat([run(x0[:2], per_sample_noise(0, 2)), run(x0[2:], per_sample_noise(2, 4))])
    torch.testing.assert_close(whole, split, rtol=0, atol=1e-12)  # a function of (seed, index)
    assert not torch.allclose(whole, run(x0, per_sample_noise(1, 6)))  # the draws matter
    gen = torch.Generator().manual_seed(0)
    a = solve(spec, oracle.velocity, x0, path=path, generator=gen)
    gen = torch.Generator().manual_seed(0)
    b = solve(spec, oracle.velocity, x0, path=path,
              noise=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))  # fmt: skip
    assert torch.equal(a, b)  # noise(x) and a generator are one source
    plain = solve(spec.replace(churn=0.0), oracle.velocity, x0, path=path)
    off = sample_heun(oracle.velocity, x0, spec.time_grid(path, dtype=F64), path=path,
                      churn=Churn(0.0), final_step="denoise")  # fmt: skip
    assert torch.equal(plain, off)
    with pytest.raises(ValueError, match="not both"):
        solve(spec, oracle.velocity, x0, path=path, generator=gen, noise=per_sample_noise(0, 6))
    with pytest.raises(ValueError, match="churn needs s_max >= s_min"):
        Churn(1.0, s_min=2.0, s_max=1.0)


@pytest.mark.parametrize("path_name", PATHS)
def test_churn_samples_land_on_data_with_the_right_weights(path_name):
    """Heun with churn (S_churn = 20) on the 0.6/0.3/0.1 mixture of tests/test_samplers.py: the
    counts of 3000 samples pass Pearson's chi-square (2 dof, p = 0.001: 13.816), every sample
    within 1e-3 of a point."""
    data = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]], dtype=F64)
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
    path = get_path(path_name)
    oracle = Oracle(data, path, weights)
    spec = SamplingSpec("heun", 30, churn=20.0)
    x = solve(spec, oracle.velocity, noise(3000, seed=7), path=path,
              generator=torch.Generator().manual_seed(8))  # fmt: skip
    d = torch.cdist(x, data)
    counts = torch.bincount(d.argmin(1), minlength=3).to(F64)
    chi2 = ((counts - 3000 * weights) ** 2 / (3000 * weights)).sum().item()
    print(f"{path_name}: counts {counts.tolist()} chi2 {chi2:.2f}")
    assert chi2 < 13.816
    assert d.min(1).values.max() < 1e-3


# --- every solver x grid x prediction type, with guidance ------------------------------------------

SOLVERS = [*SAMPLERS, "heun+churn"]
LIST_TIMES = (0.0, 0.2, 0.45, 0.7, 0.9, 1.0)


def as_field(solver: str, field):
    """meanflow integrates an average field u(x, t, r), which a velocity is not: give it
    u(x, t, r) = field(x, t) (its steps are then Euler's)."""
    return (lambda x, t, r: field(x, t)) if solver == "meanflow" else field


def spec_of(solver: str, grid: str, guidance: float) -> SamplingSpec:
    sampler, churn = ("heun", 5.0) if solver == "heun+churn" else (solver, 0.0)
    if grid == "list":
        return SamplingSpec(sampler, len(LIST_TIMES) - 1, guidance, grid="list", times=LIST_TIMES,
                            churn=churn)  # fmt: skip
    return SamplingSpec(sampler, 6, guidance, grid=grid, churn=churn)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("grid", SAMPLING_GRIDS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_grid_and_prediction_type_with_guidance(solver, grid, prediction_type):
    """Conditional field: the oracle of two of the four points; unconditional: all four; each a
    network of the given prediction type turned into a velocity. Guidance 2.5 gives finite
    samples with the spec's NFE; guidance 1 gives exactly the conditional field's samples (the
    same noise for the stochastic ones). That guidance acts: tests/test_samplers.py."""
    for path_name in PATHS:
        path = get_path(path_name)
        fields = []
        for data in (DATA[:2], DATA):
            oracle = Oracle(data, path)
            net = lambda x, t, o=oracle: o.predict(x, t, prediction_type)  # noqa: E731
            fields.append(velocity_field(net, path, prediction_type))
        cond, uncond = fields
        x0 = noise(8, seed=9)
        out = {}
        for w in (2.5, 1.0):
            spec = spec_of(solver, grid, w)
            counter = count_nfe(cfg_field(cond, uncond, w))
            out[w] = solve(spec, as_field(solver, counter), x0, path=path,
                           noise=per_sample_noise(0, 8))  # fmt: skip
            assert torch.isfinite(out[w]).all() and out[w].shape == x0.shape
            assert counter.calls == spec.nfe
        alone = solve(spec, as_field(solver, cond), x0, path=path, noise=per_sample_noise(0, 8))
        assert torch.equal(out[1.0], alone)


# --- the sampler benchmark -------------------------------------------------------------------------


def run_bench(*args: str) -> list[dict]:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "samplers.py"), "--json", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


# --- the config keys and command-line flags of the new options -----------------------------------


def test_config_keys_make_the_spec():
    from fmgen.config import ConfigError, load_config, sampling_spec

    digits = ROOT / "configs" / "digits.yaml"
    cfg = load_config(digits, ["sample.sampler=heun", "sample.time_grid=list", "sample.times=[0, 0.4, 0.8, 1]",
                               "sample.steps=3", "sample.final_step=solver", "sample.churn=4",
                               "sample.churn_sigma_max=10", "sample.rho=5"])  # fmt: skip
    spec = sampling_spec(cfg)
    assert (spec.grid, spec.times, spec.steps, spec.final_step) == (
        "list",
        (0, 0.4, 0.8, 1),
        3,
        "solver",
    )
    assert (spec.churn, spec.churn_sigma_max, spec.rho) == (4.0, 10.0, 5.0)
    # the job's choice (bench/nfe_sweep.py): the defaults but for the sampler, grid and steps
    want = SamplingSpec(sampler="dpm++2m", grid="edm", steps=10, guidance=2.0)
    assert sampling_spec(load_config(digits)) == want
    for override, needle in [("sample.final_step=last", "sample.final_step"),
                             ("sample.time_grid=list", "grid 'list' needs times"),
                             ("sample.churn=-1", "churn must be"),
                             ("sample.rho=0", "rho must be")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            load_config(digits, [override])


def test_config_guidance_interval_and_lower_order_few_steps():
    """sample.guidance_interval ([] = every t) and sample.lower_order_few_steps reach the spec, its
    record and its caption; a bad interval is one error naming the key, the value and the fix."""
    from fmgen.config import ConfigError, load_config, sampling_spec

    digits = ROOT / "configs" / "digits.yaml"
    assert sampling_spec(load_config(digits)).guidance_interval is None
    cfg = load_config(digits, ["sample.guidance_interval=[0.25, 0.8]",
                               "sample.lower_order_few_steps=false", "sample.sampler=dpm++3m"])  # fmt: skip
    spec = sampling_spec(cfg)
    assert spec.guidance_interval == (0.25, 0.8) and spec.lower_order_few_steps is False
    assert spec.to_dict()["guidance_interval"] == [0.25, 0.8]
    assert spec.to_dict()["lower_order_few_steps"] is False
    assert "guidance 2.0 in t [0.25, 0.8]" in spec.describe()
    assert "full order on few steps" in spec.describe()
    for override, needle in [
        ("sample.guidance_interval=[0.5]", r"sample.guidance_interval: \[0.5\] must be \[\] "),
        ("sample.guidance_interval=[0.1, 0.2, 0.3]", r"e.g. \[0.25, 0.8\]"),
        ("sample.guidance_interval=[0.8, 0.25]", r"guidance_interval \(0.8, 0.25\) must satisfy"),
        ("sample.guidance_interval=[0.2, 1.5]", r"0 <= lo < hi <= 1"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(digits, [override])


def test_sampling_flags():
    import argparse

    from fmgen.base import FmgenError
    from fmgen.cli import add_sampling_args, spec_from_args

    p = argparse.ArgumentParser()
    add_sampling_args(p)

    def spec(base: SamplingSpec, *argv: str) -> SamplingSpec:
        return spec_from_args(base, p.parse_args(argv))

    base = SamplingSpec()
    got = spec(base, "--times", "0,0.5,0.9,1", "--sampler", "dpm++2m", "--final-step", "solver")
    assert (got.grid, got.times, got.steps, got.sampler) == ("list", (0, 0.5, 0.9, 1), 3, "dpm++2m")
    assert got.final_step == "solver"
    assert spec(base, "--time-grid", "edm", "--rho", "3").rho == 3.0
    assert spec(base, "--churn", "2").churn == 2.0
    assert spec(got, "--time-grid", "logsnr", "--steps", "7").times == ()  # leaving the list
    for argv, needle in [(["--times", "0,0.5,1", "--steps", "5"], "--times 0.0,0.5,1.0 --steps 5: "),
                         (["--time-grid", "list"], "--time-grid list: grid 'list' needs times"),
                         (["--churn", "1", "--sampler", "rk4"], "churn is an option of the heun"),
                         (["--guidance-interval", "0.8,0.2"],
                          r"--guidance-interval 0.8,0.2: guidance_interval \(0.8, 0.2\) must"),
                         (["--guidance-interval", "0.5"], r"--guidance-interval 0.5: .*two times")]:  # fmt: skip
        with pytest.raises(FmgenError, match=needle):
            spec(base, *argv)
    limited = spec(base, "--guidance-interval", "0.25,0.8")
    assert limited.guidance_interval == (0.25, 0.8)
    assert spec(limited, "--guidance-interval", "none").guidance_interval is None
    assert spec(limited, "--steps", "3").guidance_interval == (0.25, 0.8)  # kept unless given
    with pytest.raises(SystemExit):
        p.parse_args(["--times", "0,x"])


# the bench integrates the oracle's velocity: every sampler but meanflow (an average field's)
VELOCITY_SAMPLERS = [name for name in SAMPLERS if name != "meanflow"]
BENCH_ARGS = ("--samples", "128", "--ref-steps", "200", "--nfe", "4", "6", "8", "10", "20", "50")


# the tests that read bench_rows share one xdist worker: the bench runs once (~15 s), not per worker
BENCH_GROUP = pytest.mark.xdist_group("sampler-bench")


@pytest.fixture(scope="module")
def bench_rows() -> list[dict]:
    """bench/samplers.py --json at its default data (64 points, 16 dims, float64), fewer samples."""
    return run_bench(*BENCH_ARGS)


@pytest.mark.parametrize("final_step", ["denoise", "solver"])
def test_steps_within_a_budget_are_the_most_that_fit(final_step):
    for sampler in SAMPLERS:
        for budget in range(1, 41):
            s = steps_within(sampler, budget, final_step=final_step)
            assert s == 1 or nfe(sampler, s, final_step=final_step) <= budget
            assert nfe(sampler, s + 1, final_step=final_step) > budget


@BENCH_GROUP
def test_bench_json_lines(bench_rows):
    """One object per (path, solver, grid, NFE budget's steps), with the evaluations counted as
    nfe() says; the reference is tight and shares the noise: Heun on the uniform grid at NFE 49
    ends within 1e-9 of it on every path."""
    refs = [r for r in bench_rows if r["reference"]]
    assert [r["path"] for r in refs] == PATHS and all(r["err"] == 0 for r in refs)
    runs = [r for r in bench_rows if not r["reference"]]
    combos = {(r["path"], r["solver"], r["grid"]) for r in runs}
    assert combos == set(itertools.product(PATHS, VELOCITY_SAMPLERS, TIME_GRIDS))
    for r in runs:
        assert r["nfe"] == nfe(r["solver"], r["steps"]) <= 50
        assert (r["err"] is None) == (r["solver"] == "sde") == (r["other_point"] is None)
        assert r["dist"] >= 0 and r["us_per_nfe"] > 0
        if r["err"] is not None:
            assert 0 <= r["other_point"] <= 1 and r["err"] >= 0
    for path_name in PATHS:
        (heun,) = [r for r in runs if (r["path"], r["solver"], r["grid"], r["nfe"]) ==
                   (path_name, "heun", "uniform", 49)]  # fmt: skip
        assert heun["err"] < 1e-9 and heun["other_point"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="measured (128 samples here): no solver and grid at NFE <= 10, DPM-Solver++(3M) included, "
    "beats Heun/uniform at NFE 19 on any path; with the denoising last step every sample ends on a "
    "data point and the error counts the samples that end on another point than the reference's "
    "(bench column other_point). At the bench's 256 samples none wins either (best: vp-linear "
    "2M/uniform 0.148 vs 0.080; 3M runs as 2M below 15 steps, where its third order, 0.068 here, "
    "loses on a trained model: fmgen.core.multistep); vp-cosine's uniform grid is uniform in the "
    "angle arctan(sigma), where Heun is hard to beat",
)
@BENCH_GROUP
@pytest.mark.parametrize("path_name", PATHS)
def test_bench_best_solver_at_nfe_10_beats_heun_at_nfe_20(bench_rows, path_name):
    runs = [r for r in bench_rows if r["path"] == path_name and not r["reference"]]
    best = min((r for r in runs if r["nfe"] <= 10 and r["err"] is not None), key=lambda r: r["err"])
    (heun,) = [r for r in runs if (r["solver"], r["grid"], r["nfe"]) == ("heun", "uniform", 19)]
    print(f"{path_name}: best at NFE <= 10 {best['solver']}/{best['grid']} NFE {best['nfe']} "
          f"err {best['err']:.3e}; heun/uniform NFE 19 err {heun['err']:.3e}")  # fmt: skip
    assert best["err"] < heun["err"]


def test_nfe_sweep_markdown_is_a_readme_table_with_the_pick():
    """bench/nfe_sweep.py's table: rows sampler / grid (/ interval when several), columns the NFE
    budgets, a cell's NFE in brackets when the steps that fit spend less; the pick is the best
    run at NFE <= 10 with its FID relative to Heun / uniform at 20 steps."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nfe_sweep", ROOT / "bench" / "nfe_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.parse_interval("none") is None and sweep.parse_interval("0.25,0.8") == (0.25, 0.8)

    def row(sampler, grid, budget, nfe, steps, fid, interval="all t"):
        return {"sampler": sampler, "grid": grid, "interval": interval, "steps": steps,
                "nfe": nfe, "fid": fid, "budget": budget}  # fmt: skip

    rows = [row("heun", "uniform", 10, 9, 5, 120.04), row("heun", "uniform", 20, 19, 10, 100.0),
            row("dpm++2m", "edm", 10, 10, 10, 70.0), row("dpm++2m", "edm", 20, 20, 20, 90.0)]  # fmt: skip
    ref = row("heun", "uniform", 0, 39, 20, 100.0)
    md = sweep.markdown(rows, [10, 20], "FID (test)", ref)
    assert md[:6] == ["FID (test)", "", "| sampler / grid | NFE 10 | NFE 20 |",
                      "| --- | --- | --- |", "| heun / uniform | 120.0 (9) | 100.0 (19) |",
                      "| dpm++2m / edm | 70.0 | 90.0 |"]  # fmt: skip
    assert md[7].startswith("(n): the NFE spent")
    assert md[-1] == ("pick at NFE <= 10: dpm++2m / edm (10 steps, NFE 10) FID 70.0, 0.70x the FID "
                      "of heun / uniform at 20 steps (NFE 39): 100.0")  # fmt: skip
    rows = rows[2:] + [row("dpm++2m", "edm", 10, 10, 10, 60.0, interval="t 0.25-0.8")]
    md = sweep.markdown(rows, [10, 20], "FID (test)", ref)
    assert "| dpm++2m / edm / t 0.25-0.8 | 60.0 | - |" in md
    assert not any(line.startswith("(n)") for line in md)  # every run spent its budget
    assert md[-1].startswith("pick at NFE <= 10: dpm++2m / edm / t 0.25-0.8 (10 steps, NFE 10)")


def test_dpmpp_3m_runs_as_2m_under_guidance_unless_told_otherwise():
    """lower_order_guided (default on): with guidance > 1 (3M) takes (2M)'s steps, Lu et al.'s
    advice for guided sampling; at guidance 1, or with the rule off, its third order acts (20
    steps: lower_order_few_steps does not). The record and the caption say which solver ran."""
    path = get_path("linear")
    cond, uncond = (Oracle(d, path).velocity for d in (DATA[:2], DATA))
    x0 = noise(8, seed=3)

    # a grid that stops at t = 0.8: at t = 1 the oracle's samples snap onto its data points
    times = tuple(torch.linspace(0, 0.8, 21, dtype=F64).tolist())

    def run(sampler: str, guidance: float, **kw) -> torch.Tensor:
        spec = SamplingSpec(sampler, 20, guidance, grid="list", times=times, **kw)
        return solve(spec, cfg_field(cond, uncond, guidance), x0, path=path)

    assert torch.equal(run("dpm++3m", 2.0), run("dpm++2m", 2.0))
    assert not torch.equal(run("dpm++3m", 1.0), run("dpm++2m", 1.0))
    assert not torch.equal(run("dpm++3m", 2.0, lower_order_guided=False), run("dpm++2m", 2.0))
    spec = SamplingSpec("dpm++3m", 20, 2.0)
    assert spec.solver == "dpm++2m" and "as dpm++2m under guidance" in spec.describe()
    assert SamplingSpec("dpm++3m", 20, 1.0).solver == "dpm++3m"
    assert SamplingSpec("dpm++3m", 20, 2.0, lower_order_guided=False).solver == "dpm++3m"
    assert spec.to_dict()["lower_order_guided"] is True
    from fmgen.config import load_config, sampling_spec

    cfg = load_config(ROOT / "configs" / "digits.yaml", ["sample.lower_order_guided=false"])
    assert sampling_spec(cfg).lower_order_guided is False
