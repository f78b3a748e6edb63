"""Gaussian paths: the time convention, the schedules' derivatives, the conditional objects and
errors on bad input.

Every check compares two independent computations (a closed form written out here, a finite
difference in t, autograd in x, torch.distributions), never a hard-coded output of the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from fmgen.core.paths import PATHS, PREDICTION_TYPES, get_path

F64 = torch.float64
PATH_NAMES = list(PATHS)
VP_NAMES = ["vp-cosine", "vp-linear"]
B0, B1 = 0.1, 20.0  # the documented vp-linear defaults


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grid(lo: float, hi: float, n: int = 49) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=F64)


# --- 1. time convention --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "vp-cosine"])
def test_noise_at_t0_data_at_t1(name):
    """t = 0 is noise and t = 1 is data: x_0 = eps and x_1 = z, with alpha_1 = 1, beta_1 = 0."""
    path = get_path(name)
    z, eps = rand(5, 3, seed=1), rand(5, 3, seed=2)
    x0 = path.sample(z, torch.zeros(5, dtype=F64), eps).x
    x1 = path.sample(z, torch.ones(5, dtype=F64), eps).x
    torch.testing.assert_close(x0, eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(x1, z, rtol=0, atol=1e-15)
    s0, s1 = (path.schedule(torch.tensor(v, dtype=F64)) for v in (0.0, 1.0))
    assert abs(s0.alpha.item()) < 1e-15 and s0.beta.item() == 1.0
    assert s1.alpha.item() == 1.0 and abs(s1.beta.item()) < 1e-15


def test_vp_linear_endpoints():
    """vp-linear: x_1 = z exactly; at t = 0, alpha_0 = exp(-(b1-b0)/4 - b0/2) ~ 0.0066, not 0."""
    path = get_path("vp-linear")
    z, eps = rand(5, 3, seed=1), rand(5, 3, seed=2)
    s0, s1 = (path.schedule(torch.tensor(v, dtype=F64)) for v in (0.0, 1.0))
    alpha0 = math.exp(-(B1 - B0) / 4 - B0 / 2)
    assert 0.005 < alpha0 < 0.008  # "about 0.007" in docs/math.md
    assert math.isclose(s0.alpha.item(), alpha0, rel_tol=1e-14)
    assert math.isclose(s0.beta.item(), math.sqrt(1 - alpha0**2), rel_tol=1e-14)
    assert s1.alpha.item() == 1.0 and s1.beta.item() == 0.0
    x0 = path.sample(z, torch.zeros(5, dtype=F64), eps).x
    torch.testing.assert_close(x0, alpha0 * z + math.sqrt(1 - alpha0**2) * eps, rtol=0, atol=1e-14)
    x1 = path.sample(z, torch.ones(5, dtype=F64), eps).x
    torch.testing.assert_close(x1, z, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_schedule_closed_forms(name):
    """alpha_t, beta_t equal the table of docs/math.md, written out here."""
    t = grid(0, 1)
    s = get_path(name).schedule(t)
    if name == "linear":
        alpha, beta = t, 1 - t
    elif name == "vp-cosine":
        alpha, beta = torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2)
    else:
        alpha = torch.exp(-((1 - t) ** 2) * (B1 - B0) / 4 - (1 - t) * B0 / 2)
        beta = torch.sqrt(1 - alpha**2)
    torch.testing.assert_close(s.alpha, alpha, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s.beta, beta, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", VP_NAMES)
def test_variance_preserving(name):
    """VP paths keep alpha^2 + beta^2 = 1 for all t in [0, 1]."""
    s = get_path(name).schedule(grid(0, 1))
    torch.testing.assert_close(s.alpha**2 + s.beta**2, torch.ones_like(s.alpha), rtol=0, atol=1e-14)


def test_schedule_monotone():
    """alpha grows from noise to data and beta shrinks, for every path."""
    t = grid(0, 1)
    for name in PATH_NAMES:
        s = get_path(name).schedule(t)
        assert (s.alpha.diff() > 0).all() and (s.beta.diff() < 0).all(), name


# --- 2. derivatives ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_finite_differences(name):
    """dalpha, dbeta equal central finite differences of alpha, beta in t at interior t."""
    path, h = get_path(name), 1e-5
    t = grid(0.02, 0.98)
    s, sp, sm = path.schedule(t), path.schedule(t + h), path.schedule(t - h)
    for d, up, down in [(s.dalpha, sp.alpha, sm.alpha), (s.dbeta, sp.beta, sm.beta)]:
        fd = (up - down) / (2 * h)
        rel = ((d - fd).abs() / fd.abs().clamp_min(1e-12)).max().item()
        # loose on purpose: the O(h^2) truncation error of the central difference at h = 1e-5
        # (measured worst 7e-9 for the steep vp-linear schedule, 7e-11 vp-cosine, 7e-12 linear)
        assert rel < 1e-7, rel


@pytest.mark.parametrize("name", PATH_NAMES)
def test_sample_velocity_is_time_derivative(name):
    """PathSample.velocity = d/dt x_t (fixed z, eps) = u_t(x_t | z); linear gives z - eps."""
    path, h = get_path(name), 1e-5
    z, eps = rand(6, 2, seed=3), rand(6, 2, seed=4)
    t = torch.linspace(0.05, 0.95, 6, dtype=F64)
    ps = path.sample(z, t, eps)
    fd = (path.sample(z, t + h, eps).x - path.sample(z, t - h, eps).x) / (2 * h)
    # loose on purpose: the O(h^2) error of the central difference at h = 1e-5 (measured worst
    # 1e-9 absolute, for vp-linear)
    torch.testing.assert_close(ps.velocity, fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(
        path.conditional_velocity(ps.x, z, t), ps.velocity, rtol=1e-14, atol=1e-14
    )
    if name == "linear":  # dalpha = 1, dbeta = -1: exact in floating point
        torch.testing.assert_close(ps.velocity, z - eps, rtol=1e-15, atol=1e-15)


# --- conditional score and log-density -----------------------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
def test_conditional_log_prob_and_score(name):
    """conditional_log_prob = log N(x; alpha z, beta^2 I) (torch.distributions), its x-gradient
    is conditional_score, and at x = x_t the score is -eps / beta."""
    path = get_path(name)
    z, eps = rand(6, 3, seed=5), rand(6, 3, seed=6)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    s = path.schedule(t)
    x = path.sample(z, t, eps).x.requires_grad_(True)
    logp = path.conditional_log_prob(x, z, t)
    ref = torch.distributions.Normal(s.alpha[:, None] * z, s.beta[:, None]).log_prob(x).sum(1)
    torch.testing.assert_close(logp, ref, rtol=1e-14, atol=1e-14)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(path.conditional_score(x, z, t), grad, rtol=1e-14, atol=1e-14)
    score = path.conditional_score(x, z, t)
    torch.testing.assert_close(score, -eps / s.beta[:, None], rtol=1e-13, atol=1e-13)


# --- 3. conversions on conditional quantities ----------------------------------------------


def conditional_targets(name: str, d: int = 3, b: int = 8) -> tuple:
    """x = x_t and the four exact conditional targets built from (z, eps), at t in [0.1, 0.9]."""
    path = get_path(name)
    z, eps = rand(b, d, seed=7), rand(b, d, seed=8)
    t = torch.linspace(0.1, 0.9, b, dtype=F64)
    s = path.schedule(t)
    alpha, beta, dalpha, dbeta = (v[:, None] for v in (s.alpha, s.beta, s.dalpha, s.dbeta))
    x = alpha * z + beta * eps
    targets = {"x0": z, "eps": eps, "velocity": dalpha * z + dbeta * eps, "score": -eps / beta}
    return path, x, t, targets


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("src", PREDICTION_TYPES)
@pytest.mark.parametrize("dst", PREDICTION_TYPES)
def test_convert_conditional(name, src, dst):
    """convert(src -> dst) maps each exact conditional target onto the other (all 16 pairs)."""
    path, x, t, targets = conditional_targets(name)
    out = path.convert(targets[src], x, t, src, dst)
    torch.testing.assert_close(out, targets[dst], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_named_conversions_conditional(name):
    """The named direct formulas of docs/math.md map exact conditional targets onto each other."""
    path, x, t, tg = conditional_targets(name)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # noqa: E731
    close(path.score_from_velocity(tg["velocity"], x, t), tg["score"])
    close(path.velocity_from_score(tg["score"], x, t), tg["velocity"])
    close(path.eps_from_x0(tg["x0"], x, t), tg["eps"])
    close(path.score_from_eps(tg["eps"], x, t), tg["score"])
    close(path.velocity_from_x0_eps(tg["x0"], tg["eps"], x, t), tg["velocity"])


def test_linear_conversions_written_out():
    """For linear: s = (t u - x) / (1 - t) and u = x / t + ((1 - t) / t) s, literally."""
    path, x, t, tg = conditional_targets("linear")
    tt = t[:, None]
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)  # noqa: E731
    close(tg["score"], (tt * tg["velocity"] - x) / (1 - tt))
    close(tg["velocity"], x / tt + (1 - tt) / tt * tg["score"])
    close(path.score_from_velocity(tg["velocity"], x, t), tg["score"])


def test_eps_score_conversion_finite_at_t0():
    """eps <-> score is proportional (score = -eps / beta), so it stays finite at t = 0."""
    path = get_path("linear")
    x, eps = rand(4, 2, seed=9), rand(4, 2, seed=10)
    t = torch.zeros(4, dtype=F64)
    # beta_0 = 1: exact in floating point
    torch.testing.assert_close(
        path.convert(eps, x, t, "eps", "score"), -eps, rtol=1e-15, atol=1e-15
    )
    torch.testing.assert_close(
        path.convert(-eps, x, t, "score", "eps"), eps, rtol=1e-15, atol=1e-15
    )


def test_python_float_time_keeps_float64():
    """A Python float t gives the same float64 result as a float64 tensor t (no float32 rounding)."""
    path = get_path("vp-cosine")
    x, z = rand(4, 2, seed=11), rand(4, 2, seed=12)
    t64 = torch.tensor(0.3, dtype=F64)
    for fn in (path.conditional_velocity, path.conditional_score):
        torch.testing.assert_close(fn(x, z, 0.3), fn(x, z, t64), rtol=1e-14, atol=1e-14)
    u = path.conditional_velocity(x, z, t64)
    torch.testing.assert_close(
        path.convert(u, x, 0.3, "velocity", "score"),
        path.convert(u, x, t64, "velocity", "score"),
        rtol=1e-14,
        atol=1e-14,
    )


# --- 9. errors -----------------------------------------------------------------------------


def test_unknown_path_lists_valid_names():
    with pytest.raises(ValueError, match="unknown path") as err:
        get_path("cosine-vp")
    for name in PATH_NAMES:
        assert name in str(err.value)


def test_unknown_prediction_type_lists_valid_ones():
    path, x = get_path("linear"), rand(2, 2)
    for src, dst in [("v", "eps"), ("eps", "noise")]:
        with pytest.raises(ValueError, match="prediction type") as err:
            path.convert(x, x, torch.full((2,), 0.5, dtype=F64), src, dst)
        for kind in PREDICTION_TYPES:
            assert kind in str(err.value)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_outside_unit_interval_names_t(bad):
    path, x = get_path("linear"), rand(3, 2)
    with pytest.raises(ValueError, match=r"^t must lie in \[0, 1\]"):
        path.schedule(torch.tensor([0.5, bad], dtype=F64))
    with pytest.raises(ValueError, match=r"^t must lie"):
        path.conditional_velocity(x, x, torch.tensor([0.2, 0.5, bad], dtype=F64))
    with pytest.raises(ValueError, match=r"^t must lie"):
        path.sample(x, bad)


def test_shape_mismatches_name_the_argument():
    path, t = get_path("vp-cosine"), torch.full((3,), 0.5, dtype=F64)
    x, other = rand(3, 2), rand(3, 4)
    with pytest.raises(ValueError, match="x and z"):
        path.conditional_velocity(x, other, t)
    with pytest.raises(ValueError, match="x and z"):
        path.conditional_score(x, other, t)
    with pytest.raises(ValueError, match="z and eps"):
        path.sample(x, t, other)
    with pytest.raises(ValueError, match="pred and x"):
        path.convert(other, x, t, "velocity", "score")
    with pytest.raises(ValueError, match=r"^t must be a scalar or have shape \(B,\)"):
        path.conditional_velocity(x, x, torch.full((4,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"^t must be a scalar"):
        path.sample(x, torch.full((3, 1), 0.5, dtype=F64))


def test_named_conversions_reject_shape_mismatch():
    """The named direct conversions do not broadcast a (B, 1) prediction against (B, D) x."""
    path, t = get_path("linear"), torch.full((3,), 0.5, dtype=F64)
    x, narrow = rand(3, 2), rand(3, 1)
    calls = {
        "u and x": lambda: path.score_from_velocity(narrow, x, t),
        "score and x": lambda: path.velocity_from_score(narrow, x, t),
        "x0 and x": lambda: path.eps_from_x0(narrow, x, t),
        "eps and x": lambda: path.score_from_eps(narrow, x, t),
    }
    for names, call in calls.items():
        with pytest.raises(ValueError, match=names):
            call()
    with pytest.raises(ValueError, match="eps and x"):
        path.velocity_from_x0_eps(x, narrow, x, t)


def test_vp_linear_rejects_bad_betas():
    with pytest.raises(ValueError, match="b0"):
        get_path("vp-linear", b0=5.0, b1=1.0)
