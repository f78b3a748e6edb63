"""ODE/SDE samplers with the exact oracle field: accuracy, orders, mixture weights, wrappers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fmgen.core.grids import TIME_GRIDS, time_grid
from fmgen.core.guidance import cfg_field, cfg_net, guidance_interval_of_sigmas, velocity_field
from fmgen.core.oracle import Oracle
from fmgen.core.paths import PREDICTION_TYPES, get_path
from fmgen.core.samplers import (
    SAMPLERS,
    beta_sigma,
    count_nfe,
    get_sampler,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sample_rk4,
)
from fmgen.core.sampling import SamplingSpec, nfe, solve
from fmgen.core.solver_base import FINAL_STEPS, Step

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PATHS = ["linear", "vp-cosine", "vp-linear"]
DATA = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.3, -0.8]], dtype=F64)  # K=4, D=2


def noise(n: int, dim: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run(name: str, field, x, ts, path=None, seed: int = 0, **kwargs):
    if name == "meanflow":  # integrates an average field u(x, t, r): give it u = field(x, t)
        return get_sampler(name)(lambda x, t, r: field(x, t), x, ts, path=path, **kwargs)
    if name == "sde":
        gen = torch.Generator().manual_seed(seed)
        sigma = beta_sigma(path, 1.0)
        return sample_euler_maruyama(field, x, ts, path=path, sigma=sigma, generator=gen, **kwargs)
    return get_sampler(name)(field, x, ts, path=path, **kwargs)


def nearest(x: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(x.flatten(1), data.flatten(1))  # (N, K)
    return d.min(1).values, d.argmin(1)


@pytest.mark.parametrize("path_name", PATHS)
def test_heun_oracle_lands_on_data(path_name):
    """100 Heun steps from N(0, I): every sample within 1e-2 of a data point.

    vp-linear has beta_t ~ sqrt(b0 (1 - t)) near t = 1: the last Euler step from t = 1 - h
    removes only about half of the remaining noise beta_{1-h} (h dbeta / beta ~ -1/2), which
    is 0.015 |eps| on a uniform 100-step grid. Its grid is therefore refined near t = 1
    (t = 1 - (1 - u)^2, last step 1e-4); linear and vp-cosine use the uniform grid.
    """
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    ts = time_grid(100, dtype=F64)
    if path_name == "vp-linear":
        ts = 1 - (1 - ts) ** 2
    x = sample_heun(oracle.velocity, noise(256), ts)
    dist, k = nearest(x, DATA)
    print(f"{path_name}: max distance to data {dist.max():.2e}")
    assert dist.max() < 1e-2
    assert torch.bincount(k, minlength=4).min() > 0  # every point is reached


def test_heun_oracle_images():
    """The same on image-shaped data (1, 4, 4), uniform grid."""
    data = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    oracle = Oracle(data, get_path("vp-cosine"))
    x0 = torch.randn(32, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = sample_heun(oracle.velocity, x0, time_grid(100, dtype=F64))
    assert x.shape == x0.shape
    assert nearest(x, data)[0].max() < 1e-2


def orders(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]


@pytest.mark.parametrize("path_name", PATHS)
def test_convergence_orders(path_name):
    """Euler ~1, Heun ~2, RK4 ~4 against a 400-step RK4 reference, on [0, 0.7].

    The end t_end = 0.7 < 1 keeps the problem smooth (the field has a 1/beta_t term singular at
    t = 1; see the samplers module docstring). Observed orders are log2 of error ratios for
    steps 20/40/80/160 (RK4: 10/20/40, before round-off).
    """
    oracle = Oracle(DATA, get_path(path_name))
    x0 = noise(64, seed=1)
    ref = sample_rk4(oracle.velocity, x0, time_grid(400, t_end=0.7, dtype=F64))
    found = {}
    for name, steps in (
        ("euler", [20, 40, 80, 160]),
        ("heun", [20, 40, 80, 160]),
        ("rk4", [10, 20, 40]),
    ):
        errs = [
            (run(name, oracle.velocity, x0, time_grid(n, t_end=0.7, dtype=F64)) - ref)
            .norm(dim=1)
            .mean()
            .item()
            for n in steps
        ]
        found[name] = orders(errs)
        print(
            f"{path_name} {name}: errors {[f'{e:.2e}' for e in errs]} orders {[f'{o:.2f}' for o in found[name]]}"
        )
    assert all(0.8 <= o <= 1.3 for o in found["euler"])
    assert all(1.7 <= o <= 2.4 for o in found["heun"])
    assert all(3.5 <= o <= 4.6 for o in found["rk4"])


def test_orders_up_to_t1_single_point():
    """Up to t = 1 with an exact solution: one data point z gives x_1 = z + 0 for any eps,
    x_t = alpha_t z + beta_t eps. On vp-cosine the special last steps (Heun: Euler, RK4:
    Heun-3) keep the field away from t = 1 and every solver converges with order ~2, limited
    by the 1/beta_t singularity of the field at t = 1 (module docstring)."""
    z = torch.tensor([[0.7, -0.4]], dtype=F64)
    oracle = Oracle(z, get_path("vp-cosine"))
    x0 = noise(16, seed=2)
    for name in ("euler", "heun", "rk4"):
        errs = [
            (run(name, oracle.velocity, x0, time_grid(n, dtype=F64)) - z).norm(dim=1).mean().item()
            for n in (10, 20, 40, 80)
        ]
        print(f"vp-cosine to t=1 {name}: orders {[f'{o:.2f}' for o in orders(errs)]}")
        assert all(1.8 <= o <= 2.3 for o in orders(errs))
        assert errs[-1] < 1e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_never_evaluates_at_t1_and_nfe(name):
    path = get_path("linear")
    oracle = Oracle(DATA, path)

    def guarded(x, t):
        if bool((t >= 1 - 1e-12).any()):
            raise AssertionError(f"field evaluated at t = {t.max().item()}")
        return oracle.velocity(x, t)

    for steps, final in itertools.product((1, 2, 7), FINAL_STEPS):
        counter = count_nfe(guarded)
        x = run(name, counter, noise(8), time_grid(steps, dtype=F64), path=path, final_step=final)
        assert torch.isfinite(x).all()
        assert counter.calls == nfe(name, steps, final_step=final)
        assert max(counter.times) < 1
        counter = count_nfe(guarded)  # a grid ending before 1 gets full steps
        run(name, counter, noise(8), time_grid(steps, t_end=0.5, dtype=F64), path=path,
            final_step=final)  # fmt: skip
        assert counter.calls == nfe(name, steps, t_end=0.5, final_step=final)
    names = ("euler", "heun", "rk4", "sde", "midpoint", "dpm++2m", "dpm++3m")
    assert [nfe(n, 10, final_step="solver") for n in names] == [10, 19, 39, 10, 20, 10, 10]
    assert [nfe(n, 10) for n in names] == [10, 19, 37, 10, 19, 10, 10]  # the last step denoises
    assert [nfe(n, 10, t_end=0.5) for n in names] == [10, 20, 40, 10, 20, 10, 10]


# --- mixture weights: chi-square goodness of fit --------------------------------------------------

SEPARATED = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]], dtype=F64)
WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=F64)
CHI2_CRIT_DOF2_P001 = 13.816  # upper 0.001 quantile of chi^2 with 2 degrees of freedom (tables)


@pytest.mark.parametrize("spacing", TIME_GRIDS)
@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("name", ["sde", "heun"])
def test_unbalanced_mixture_weights(name, path_name, spacing):
    """Sampling the oracle of a 0.6/0.3/0.1 mixture reproduces the weights, on either time grid.

    Each of N = 3000 samples is assigned to its nearest point; the counts are tested against
    N * w with Pearson's chi-square (2 dof) at p = 0.001, critical value 13.816. Fixed seeds.
    A sampler that ignored the weights (1/3 each) would give chi^2 in the thousands.
    """
    path = get_path(path_name)
    oracle = Oracle(SEPARATED, path, WEIGHTS)
    n = 3000
    ts = time_grid(100, spacing=spacing, path=path, dtype=F64)
    x = run(name, oracle.velocity, noise(n, seed=3), ts, path=path, seed=4)
    dist, k = nearest(x, SEPARATED)
    counts = torch.bincount(k, minlength=3).to(F64)
    expected = n * WEIGHTS
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    print(f"{name} {path_name} {spacing}: counts {counts.tolist()} chi2 {chi2:.2f} (crit. 13.816)")
    assert chi2 < CHI2_CRIT_DOF2_P001
    assert dist.max() < 0.1  # samples sit on the points (vp-linear: ~0.05 on a uniform grid)


def test_sde_noise_matters_and_sigma_zero_is_euler():
    path = get_path("vp-cosine")
    oracle = Oracle(DATA, path)
    x0, ts = noise(16), time_grid(20, dtype=F64)
    a = sample_euler_maruyama(oracle.velocity, x0, ts, path=path, sigma=0.0)
    torch.testing.assert_close(a, sample_euler(oracle.velocity, x0, ts))
    gen = torch.Generator().manual_seed(0)
    b = sample_euler_maruyama(oracle.velocity, x0, ts, path=path, sigma=0.5, generator=gen)
    gen = torch.Generator().manual_seed(0)
    c = sample_euler_maruyama(
        oracle.velocity, x0, ts, path=path, sigma=lambda t: 0.5 * torch.ones_like(t), generator=gen
    )
    torch.testing.assert_close(b, c)  # float sigma == constant callable
    assert not torch.allclose(a, b)


def test_sde_noise_callable_replaces_the_generator():
    """``noise(x)`` supplies the increments: the same draws give the same result as a generator,
    per-sample streams make a batch split exact, and a wrong shape or both sources are refused."""
    path = get_path("vp-cosine")
    oracle = Oracle(DATA, path)
    x0, ts = noise(6), time_grid(10, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    a = sample_euler_maruyama(oracle.velocity, x0, ts, path=path, sigma=0.5, generator=gen)
    gen = torch.Generator().manual_seed(0)
    calls = []

    def from_gen(x):
        calls.append(x.shape)
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)

    b = sample_euler_maruyama(oracle.velocity, x0, ts, path=path, sigma=0.5, noise=from_gen)
    assert torch.equal(a, b) and calls == [x0.shape] * 9  # no noise on the last step

    def per_sample(first, count):  # one stream per sample index
        gens = [torch.Generator().manual_seed(100 + first + j) for j in range(count)]
        return lambda x: torch.stack(
            [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens]
        )

    field = lambda x, t: -x  # noqa: E731 (elementwise: no batch-dependent rounding)
    run = lambda x, nz: sample_euler_maruyama(field, x, ts, path=path, sigma=0.5, noise=nz)  # noqa: E731
    whole = run(x0, per_sample(0, 6))
    split = torch.cat([run(x0[:2], per_sample(0, 2)), run(x0[2:], per_sample(2, 4))])
    assert torch.equal(whole, split)
    assert not torch.allclose(whole, run(x0, per_sample(1, 6)))  # the draws do matter
    with pytest.raises(ValueError, match=r"shape \(6, 2\); got \(6, 3\)"):
        run(x0, lambda x: torch.zeros(6, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="not both"):
        sample_euler_maruyama(field, x0, ts, path=path, sigma=0.5, noise=from_gen,
                              generator=torch.Generator())  # fmt: skip


# --- wrappers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
def test_prediction_type_wrapper(path_name):
    """velocity / eps / score / x0 oracles sampled from the same noise agree (t clamped at 1e-4)."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0, ts = noise(64, seed=5), time_grid(50, dtype=F64)
    out = {}
    for p in PREDICTION_TYPES:
        field = velocity_field(lambda x, t, p=p: oracle.predict(x, t, p), path, p)
        out[p] = sample_heun(field, x0, ts)
    for p in PREDICTION_TYPES:
        err = (out[p] - out["velocity"]).norm(dim=1).max().item()
        assert err < 1e-2, (p, err)


@pytest.mark.parametrize("path_name", ["linear", "vp-cosine"])
@pytest.mark.parametrize("prediction_type", ["eps", "score", "x0"])
def test_velocity_field_finite_at_t0(path_name, prediction_type):
    """alpha_0 = 0 makes eps/score -> velocity 0/0 at t = 0; the wrapper's clamp keeps it finite
    and close to the true velocity there."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x, t0 = noise(32), torch.zeros(32, dtype=F64)
    raw = path.convert(oracle.predict(x, t0, prediction_type), x, t0, prediction_type, "velocity")
    if prediction_type != "x0":
        assert not torch.isfinite(raw).all()  # the singularity the clamp is there for
    u = velocity_field(lambda x, t: oracle.predict(x, t, prediction_type), path, prediction_type)(
        x, t0
    )
    assert torch.isfinite(u).all()
    torch.testing.assert_close(u, oracle.velocity(x, t0), rtol=0, atol=1e-2)


def test_cfg_field():
    def cond(x, t):
        return x + 1.0

    def uncond(x, t):
        return 2.0 * x

    x, t = noise(5), torch.full((5,), 0.3, dtype=F64)
    assert torch.equal(cfg_field(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.equal(cfg_field(cond, uncond, 0.0)(x, t), uncond(x, t))
    torch.testing.assert_close(cfg_field(cond, uncond, 3.0)(x, t), 2 * x + 3 * (1 - x))
    torch.testing.assert_close(cfg_field(cond, uncond, 0.5)(x, t), 2 * x + 0.5 * (1 - x))


def test_cfg_net_one_batched_call():
    """cfg_net evaluates the conditional and null halves in ONE network call of 2B rows."""
    null_label = 9
    calls = []

    def net(x, t, y):  # a label-dependent "network": x * (1 + y) + t
        calls.append(x.shape[0])
        return x * (1.0 + y[:, None].to(x.dtype)) + t[:, None]

    x, t, y = noise(5), torch.full((5,), 0.3, dtype=F64), torch.tensor([0, 1, 2, 3, 4])
    null = torch.full_like(y, null_label)
    cond, uncond = net(x, t, y), net(x, t, null)
    calls.clear()
    for w in (0.5, 2.5, -1.0):
        torch.testing.assert_close(cfg_net(net, y, null, w)(x, t), uncond + w * (cond - uncond))
    assert calls == [10, 10, 10]
    calls.clear()
    assert torch.equal(cfg_net(net, y, null, 1.0)(x, t), cond)
    assert torch.equal(cfg_net(net, y, null, 0.0)(x, t), uncond)
    assert calls == [5, 5]  # the pure cases need only the half they use
    with pytest.raises(ValueError, match="shape of cond"):
        cfg_net(net, y, null[:3], 2.0)
    # in a sampler, guidance 0 samples the unconditional field and 1 the conditional one
    ts = time_grid(5, t_end=0.9, dtype=F64)
    for w, labels in ((0.0, null), (1.0, y)):
        got = sample_heun(cfg_net(net, y, null, w), x, ts)
        assert torch.equal(got, sample_heun(lambda x, t, lab=labels: net(x, t, lab), x, ts))


def label_net(calls: list[int]):
    def net(x, t, y):  # a label- and time-dependent "network": x * (1 + y) + t
        calls.append(x.shape[0])
        return x * (1.0 + y[:, None].to(x.dtype)) + t[:, None]

    return net


def test_cfg_net_guidance_interval():
    """Inside [lo, hi] the guided output, to the bit that of plain guidance; outside it the
    conditional output from ONE call of B rows (no doubled batch); rows on both sides get
    each their own; the interval [0, 1] is plain guidance at every t."""
    calls: list[int] = []
    net = label_net(calls)
    x, y = noise(5), torch.tensor([0, 1, 2, 3, 4])
    null = torch.full_like(y, 9)
    interval = (0.25, 0.75)
    for w in (0.0, 2.5):
        limited, plain = cfg_net(net, y, null, w, interval=interval), cfg_net(net, y, null, w)
        for tv in (0.25, 0.5, 0.75):  # inside, ends included
            t = torch.full((5,), tv, dtype=F64)
            calls.clear()
            rows = 5 if w == 0.0 else 10  # guidance 0 is the null half alone
            assert torch.equal(limited(x, t), plain(x, t)) and calls == [rows, rows]
        for tv in (0.0, 0.2, 0.8, 0.999):
            t = torch.full((5,), tv, dtype=F64)
            calls.clear()
            assert torch.equal(limited(x, t), net(x, t, y)) and calls == [5, 5]
        t = torch.tensor([0.1, 0.3, 0.5, 0.9, 0.75], dtype=F64)
        inside = torch.tensor([False, True, True, False, True])
        want = torch.where(inside[:, None], plain(x, t), net(x, t, y))
        assert torch.equal(limited(x, t), want)
        everywhere = cfg_net(net, y, null, w, interval=(0.0, 1.0))
        for tv in (0.0, 0.4, 1.0):
            t = torch.full((5,), tv, dtype=F64)
            assert torch.equal(everywhere(x, t), plain(x, t))

    # cfg_field: the same rule for two fields
    def cond(x, t):
        return x + 1.0

    def uncond(x, t):
        return 2.0 * x

    f = cfg_field(cond, uncond, 3.0, interval=interval)
    t_in, t_out = torch.full((5,), 0.5, dtype=F64), torch.full((5,), 0.9, dtype=F64)
    assert torch.equal(f(x, t_in), cfg_field(cond, uncond, 3.0)(x, t_in))
    assert torch.equal(f(x, t_out), cond(x, t_out))


@pytest.mark.parametrize(
    ("interval", "match"),
    [
        ((0.8, 0.2), r"guidance_interval \(0.8, 0.2\) must satisfy 0 <= lo < hi <= 1"),
        ((0.5, 0.5), r"0 <= lo < hi <= 1"),
        ((-0.1, 0.5), r"0 <= lo < hi <= 1"),
        ((0.2, 1.5), r"0 <= lo < hi <= 1"),
        ((0.5,), r"two times \(lo, hi\).*got \(0.5,\)"),
        ((0.1, 0.2, 0.3), r"two times \(lo, hi\)"),
        (0.5, r"two times \(lo, hi\)"),
    ],
)
def test_guidance_interval_errors_name_the_value_and_the_fix(interval, match):
    net = label_net([])
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        cfg_net(net, y, y, 2.0, interval=interval)
    with pytest.raises(ValueError, match=match):
        SamplingSpec(guidance=2.0, guidance_interval=interval)


def test_guided_sampling_in_an_interval():
    """A 10-step Heun run with guidance in t [0.3, 0.7]: the calls at t inside take 2B rows, those
    outside B; the result equals integrating the conditional field, switched to the guided one
    inside, by hand; with the interval [0, 1] it equals plain guidance."""
    calls: list[int] = []
    net = label_net(calls)
    x0, y = noise(4), torch.tensor([0, 1, 2, 3])
    null = torch.full_like(y, 9)
    ts = time_grid(10, t_end=0.95, dtype=F64)
    spec = SamplingSpec("heun", 10, 2.0, grid="list", times=tuple(ts.tolist()),
                        guidance_interval=[0.3, 0.7])  # fmt: skip
    assert (
        spec.guidance_interval == (0.3, 0.7) and "guidance 2.0 in t [0.3, 0.7]" in spec.describe()
    )
    assert spec.to_dict()["guidance_interval"] == [0.3, 0.7]
    path = get_path("linear")
    got = solve(spec, cfg_net(net, y, null, 2.0, interval=spec.guidance_interval), x0, path=path)
    seen = [(c, t) for c, t in zip(calls, count_times(spec, ts, path), strict=True)]
    assert all((c == 8) == (0.3 <= t <= 0.7) for c, t in seen) and {c for c, _ in seen} == {4, 8}
    plain = cfg_net(net, y, null, 2.0)

    def by_hand(x, t):
        return plain(x, t) if 0.3 <= t[0].item() <= 0.7 else net(x, t, y)

    assert torch.equal(got, solve(spec, by_hand, x0, path=path))
    everywhere = spec.replace(guidance_interval=(0.0, 1.0))
    want = solve(everywhere.replace(), plain, x0, path=path)
    assert torch.equal(solve(everywhere, cfg_net(net, y, null, 2.0, interval=(0.0, 1.0)), x0,
                             path=path), want)  # fmt: skip


def count_times(spec, ts, path) -> list[float]:
    """The times at which ``spec``'s solver evaluates a field, in order."""
    seen: list[float] = []

    def field(x, t):
        seen.append(t[0].item())
        return x

    solve(spec, field, noise(4), path=path)
    return seen


def test_guidance_interval_of_sigmas():
    """EDM2's (0.28, 2.9] in sigma = beta / alpha is t in [1 / 3.9, 1 / 1.28] on the linear path
    (t = 1 / (1 + sigma)); on every path sigma(lo) = sigma_hi and sigma(hi) = sigma_lo."""
    lo, hi = guidance_interval_of_sigmas(get_path("linear"), 0.28, 2.9)
    assert abs(lo - 1 / 3.9) < 1e-12 and abs(hi - 1 / 1.28) < 1e-12
    for name in ("vp-cosine", "vp-linear"):
        path = get_path(name)
        lo, hi = guidance_interval_of_sigmas(path, 0.28, 2.9)
        sch = path.schedule(torch.tensor([lo, hi], dtype=F64))
        torch.testing.assert_close(sch.beta / sch.alpha, torch.tensor([2.9, 0.28], dtype=F64))
    assert guidance_interval_of_sigmas(get_path("linear"), 0.0, 1e9)[1] == 1.0


def test_callback_and_time_grid():
    seen = []
    ts = time_grid(4, t_start=0.2, dtype=F64)
    torch.testing.assert_close(ts, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=F64))
    for name in SAMPLERS:
        seen.clear()
        x = run(name, lambda x, t: torch.ones_like(x), noise(3), ts, path=get_path("linear"))
        run(name, lambda x, t: torch.ones_like(x), noise(3), ts, path=get_path("linear"),
            callback=seen.append)  # fmt: skip
        assert all(isinstance(s, Step) for s in seen)
        assert [s.i for s in seen] == [0, 1, 2, 3]
        assert [s.t for s in seen] == pytest.approx([0.2, 0.4, 0.6, 0.8])
        assert [s.t_next for s in seen] == pytest.approx([0.4, 0.6, 0.8, 1.0])
        assert torch.equal(seen[-1].x, x)  # the state after the last step is the result


# --- time grids: uniform and EDM ------------------------------------------------------------------


def sigma_of(path, t) -> torch.Tensor:
    """The noise-to-signal ratio beta_t / alpha_t in float64."""
    s = path.schedule(torch.as_tensor(t, dtype=F64))
    return s.beta / s.alpha


def edm_sigmas(n: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n noise levels from sigma_max down to sigma_min."""
    frac = torch.arange(n, dtype=F64) / max(n - 1, 1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + frac * (lo - hi)) ** rho


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("t_start", "t_end"), [(0.0, 1.0), (0.3, 1.0), (0.0, 0.7), (0.2, 0.9)])
def test_edm_grid_follows_the_karras_formula(path_name, t_start, t_end):
    """steps + 1 strictly increasing times from exactly t_start to exactly t_end; at the interior
    times sigma(t_i) equals the EDM formula to 1e-9 (relative), with sigma_max = 80 clamped to
    sigma(t_start) (0.3 is below 80 on every path, 0 above) and sigma_min = 0.002, or
    sigma(t_end) when t_end < 1 (then no sigma = 0 point)."""
    path = get_path(path_name)
    sigma_max = min(80.0, sigma_of(path, t_start).item())
    for steps in (1, 2, 18, 100):
        ts = time_grid(steps, t_start, t_end, spacing="edm", path=path, dtype=F64)
        assert ts.shape == (steps + 1,) and ts.dtype == F64
        assert ts[0].item() == t_start and ts[-1].item() == t_end
        assert bool((ts[1:] > ts[:-1]).all())
        if t_end == 1.0:
            want = edm_sigmas(steps, sigma_max, 0.002)  # then t = 1 (sigma = 0)
        else:
            want = edm_sigmas(steps + 1, sigma_max, sigma_of(path, t_end).item())
        got = sigma_of(path, ts[: len(want)])
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-9, atol=0)
    ts32 = time_grid(18, t_start, t_end, spacing="edm", path=path)  # the default dtype
    assert ts32.dtype == torch.float32 and bool((ts32[1:] > ts32[:-1]).all())


def test_uniform_grid_is_the_default_and_unchanged():
    assert torch.equal(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    want = torch.linspace(0.1, 0.9, 6, dtype=F64)
    assert torch.equal(time_grid(5, 0.1, 0.9, dtype=F64), want)
    path = get_path("vp-linear")  # ignored by the uniform grid
    assert torch.equal(time_grid(5, 0.1, 0.9, spacing="uniform", path=path, dtype=F64), want)


def test_edm_grid_errors_name_the_fix():
    path = get_path("linear")
    with pytest.raises(ValueError, match="needs the path"):
        time_grid(10, spacing="edm")
    with pytest.raises(ValueError, match="uniform, edm"):
        time_grid(10, spacing="karras", path=path)
    with pytest.raises(ValueError, match="sigma_min"):  # sigma(0.9995) = 5e-4 < 0.002
        time_grid(10, 0.9995, spacing="edm", path=path)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        time_grid(10, spacing="edm", path=path, sigma_min=1.0, sigma_max=0.5)


@pytest.mark.parametrize("path_name", PATHS)
def test_edm_grid_lands_closer_to_data(path_name):
    """Heun from the same noise, equal NFE (20 and 100 steps, 39 and 199 evaluations).

    On vp-linear (beta ~ sqrt(1 - t)) the uniform grid's last Euler step leaves about half of
    beta_{1-h} as noise (0.04 at 100 steps); the EDM grid's last step starts at sigma = 0.002
    and leaves ~1e-3: more than 5x closer (measured ~12x at 100 steps, ~500x at 20). Elsewhere
    it is not worse by more than a factor 2.
    """
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    x0 = noise(256)
    for steps in (20, 100):
        dist = {}
        for spacing in TIME_GRIDS:
            ts = time_grid(steps, spacing=spacing, path=path, dtype=F64)
            x = sample_heun(oracle.velocity, x0, ts)
            d, k = nearest(x, DATA)
            dist[spacing] = d.max().item()
            assert torch.bincount(k, minlength=4).min() > 0  # every point is reached
        print(f"{path_name} heun {steps} steps: max distance to data {dist}")
        assert dist["edm"] <= 2 * dist["uniform"] + 1e-8
        assert dist["edm"] < 5e-3
        if path_name == "vp-linear":
            assert dist["edm"] < dist["uniform"] / 5


def test_validation():
    field, x = (lambda x, t: x), noise(2)
    for bad in (
        torch.tensor([0.0, 0.5, 0.4, 1.0]),  # decreasing
        torch.tensor([0.0, 0.5, 0.5, 1.0]),  # repeated
        torch.tensor([-0.1, 0.5]),  # outside [0, 1]
        torch.tensor([0.0, 1.2]),
        torch.tensor([[0.0, 1.0]]),  # not 1-D
        torch.tensor([0.5]),  # fewer than 2
    ):
        for name in SAMPLERS:
            with pytest.raises(ValueError, match="ts"):
                run(name, field, x, bad, path=get_path("linear"))
    for name in SAMPLERS:
        for bad_x in (
            x.numpy(),
            torch.ones(2, 2, dtype=torch.long),
            torch.zeros(0, 2),
            torch.tensor(1.0),
        ):
            with pytest.raises(ValueError, match="x must be a floating-point tensor of shape"):
                run(name, field, bad_x, time_grid(2), path=get_path("linear"))
    with pytest.raises(ValueError, match="euler, heun, rk4, sde"):
        get_sampler("dpm++")
    with pytest.raises(ValueError, match="euler, heun, rk4, sde"):
        nfe("ddim", 10)
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="velocity, eps, score, x0"):
        velocity_field(field, get_path("linear"), "v")
