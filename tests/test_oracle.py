"""The oracle (exact marginals of a weighted Dirac mixture) against independent computations.

- posterior weights are recomputed here by Bayes' rule from ``path.conditional_log_prob``;
- the score is autograd of ``log_prob``; ``log_prob`` is torch.distributions' mixture density;
- the velocity satisfies the continuity equation and the SDE drift the Fokker-Planck equation
  (central finite differences in t, autograd divergence and Laplacian in x);
- the conversions, the constant gap (posterior variance) and the error messages.

Relative residuals of the PDE tests are |residual| / (sum of the absolute values of its terms),
per point: the identities hold to ~1e-9 (the finite difference in t), a missing term gives
4e-3 to 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from fmgen.core.oracle import Oracle
from fmgen.core.paths import PATHS, PREDICTION_TYPES, get_path

F64 = torch.float64
PATH_NAMES = list(PATHS)
UNBALANCED = [0.1, 0.45, 0.05, 0.15, 0.25]
WEIGHTS = {"uniform": None, "unbalanced": UNBALANCED}
TIMES = [0.05, 0.3, 0.6, 0.9]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_oracle(name: str, dim: int = 2, weights=UNBALANCED, seed: int = 0) -> Oracle:
    """K = 5 points in ``dim`` dimensions, spread at unit scale."""
    w = None if weights is None else torch.tensor(weights, dtype=F64)
    return Oracle(1.5 * rand(5, dim, seed=seed), get_path(name), w)


def points(oracle: Oracle, t: float, n: int = 12, seed: int = 1) -> torch.Tensor:
    """Points drawn from p_t itself (so p_t(x) is not vanishingly small there)."""
    gen = torch.Generator().manual_seed(seed)
    z = oracle.data[torch.randint(0, oracle.data.shape[0], (n,), generator=gen)]
    eps = torch.randn(z.shape, generator=gen, dtype=F64)
    return oracle.path.sample(z, torch.full((n,), t, dtype=F64), eps).x


def weights_of(oracle: Oracle) -> torch.Tensor:
    return oracle.log_weights.exp()


def path_schedule(oracle: Oracle, t: float):
    return oracle.path.schedule(torch.tensor(t, dtype=F64))


def torch_mixture(oracle: Oracle, t: float) -> torch.distributions.Distribution:
    """sum_k w_k N(alpha_t z_k, beta_t^2 I) as a torch.distributions mixture."""
    s = path_schedule(oracle, t)
    comp = torch.distributions.Independent(
        torch.distributions.Normal(s.alpha * oracle.data, s.beta), 1
    )
    return torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=weights_of(oracle)), comp
    )


def posterior_ref(oracle: Oracle, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """p(k | x_t = x) by Bayes' rule from the path's conditional density, shape (B, K)."""
    b, k = x.shape[0], oracle.data.shape[0]
    t = torch.as_tensor(t, dtype=F64).expand(b)
    xs = x.repeat_interleave(k, 0)  # (B*K, D): row b*K + j pairs x_b with z_j
    zs = oracle.data.repeat(b, *([1] * (x.ndim - 1)))
    logp = oracle.path.conditional_log_prob(xs, zs, t.repeat_interleave(k)).reshape(b, k)
    return torch.softmax(logp + weights_of(oracle).log(), dim=1)


def per_component(oracle: Oracle, fn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """fn(x_b, z_k, t_b) for every pair, shape (B, K, D)."""
    b, k = x.shape[0], oracle.data.shape[0]
    t = torch.as_tensor(t, dtype=F64).expand(b)
    xs, zs = x.repeat_interleave(k, 0), oracle.data.repeat(b, 1)
    return fn(xs, zs, t.repeat_interleave(k)).reshape(b, k, -1)


def marginal_targets(oracle: Oracle, x: torch.Tensor, t: torch.Tensor) -> dict:
    """Posterior means of the four conditional targets, computed explicitly over k from the
    formulas of docs/math.md written out here (not the path's conditional_* methods)."""
    path, post = oracle.path, posterior_ref(oracle, x, t)

    def target(kind: str):
        def fn(xs, zs, ts):
            s = path.schedule(ts)
            alpha, beta, dalpha, dbeta = (v[:, None] for v in (s.alpha, s.beta, s.dalpha, s.dbeta))
            eps = (xs - alpha * zs) / beta  # the noise that puts z at x: x = alpha z + beta eps
            return {
                "x0": zs,
                "eps": eps,
                "velocity": dalpha * zs + dbeta * eps,
                "score": -eps / beta,
            }[kind]

        return fn

    fns = {kind: target(kind) for kind in PREDICTION_TYPES}
    return {
        k: torch.einsum("bk,bkd->bd", post, per_component(oracle, f, x, t)) for k, f in fns.items()
    }


def autograd_score(oracle: Oracle, x: torch.Tensor, t) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(oracle.log_prob(x, t).sum(), x)
    return g


# --- 3. conversions on the oracle's marginal quantities ------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
def test_predict_is_posterior_mean(name):
    """Oracle.predict(kind) = E[conditional target | x_t = x], with the posterior recomputed here;
    denoise/velocity/score agree with predict; posterior matches Bayes' rule."""
    oracle = make_oracle(name)
    t = torch.linspace(0.1, 0.9, 12, dtype=F64)
    x = torch.cat([points(oracle, s, n=1, seed=i) for i, s in enumerate(t.tolist())])
    post = oracle.posterior(x, t)
    torch.testing.assert_close(post, posterior_ref(oracle, x, t), rtol=1e-14, atol=1e-14)
    targets = marginal_targets(oracle, x, t)
    close = lambda a, b, **kw: torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, **kw)  # noqa: E731
    for kind in PREDICTION_TYPES:
        close(oracle.predict(x, t, kind), targets[kind], msg=kind)
    torch.testing.assert_close(oracle.denoise(x, t), targets["x0"], rtol=1e-14, atol=1e-14)
    close(oracle.velocity(x, t), targets["velocity"])
    close(oracle.score(x, t), targets["score"])


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("src", PREDICTION_TYPES)
@pytest.mark.parametrize("dst", PREDICTION_TYPES)
def test_convert_marginal(name, src, dst):
    """convert(src -> dst) maps the oracle's marginal prediction onto the directly computed one."""
    oracle = make_oracle(name, dim=3)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    x = torch.cat([points(oracle, s, n=1, seed=i) for i, s in enumerate(t.tolist())])
    targets = marginal_targets(oracle, x, t)
    out = oracle.path.convert(oracle.predict(x, t, src), x, t, src, dst)
    torch.testing.assert_close(out, targets[dst], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("t", TIMES)
def test_named_conversions_against_autograd_score(name, t):
    """score_from_velocity(oracle velocity) = grad log p_t and velocity_from_score(grad log p_t)
    = oracle velocity; the 'course notes' formula of docs/math.md's warning does not match."""
    oracle = make_oracle(name)
    path, x, tt = oracle.path, points(oracle, t), torch.tensor(t, dtype=F64)
    score, u = autograd_score(oracle, x, tt), oracle.velocity(x, tt)
    torch.testing.assert_close(path.score_from_velocity(u, x, tt), score, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(path.velocity_from_score(score, x, tt), u, rtol=1e-12, atol=1e-12)
    s = path.schedule(tt)
    wrong = (s.alpha / s.beta**2) * u + (s.dalpha / s.alpha - s.dbeta / s.beta) * x
    assert (wrong - score).abs().max() > 1e-2


@pytest.mark.parametrize("t", TIMES)
def test_linear_conversions_written_out_marginal(t):
    """For linear, literally: s = (t u - x) / (1 - t) and u = x / t + ((1 - t) / t) s."""
    oracle = make_oracle("linear")
    x = points(oracle, t)
    s, u = autograd_score(oracle, x, t), oracle.velocity(x, t)
    torch.testing.assert_close(s, (t * u - x) / (1 - t), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(u, x / t + ((1 - t) / t) * s, rtol=1e-12, atol=1e-12)


# --- 4. and 5. score and density -----------------------------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_score_is_gradient_of_log_prob(name, weights):
    """Oracle.score = autograd grad_x of Oracle.log_prob, at several t and per-sample t."""
    oracle = make_oracle(name, dim=3, weights=WEIGHTS[weights])
    for t in TIMES:
        x, tt = points(oracle, t), torch.tensor(t, dtype=F64)
        score, ref = oracle.score(x, tt), autograd_score(oracle, x, tt)
        torch.testing.assert_close(score, ref, rtol=1e-13, atol=1e-13, msg=str(t))
    tb = torch.linspace(0.05, 0.95, 12, dtype=F64)
    x = rand(12, 3, seed=5)
    score, ref = oracle.score(x, tb), autograd_score(oracle, x, tb)
    torch.testing.assert_close(score, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("dim", [1, 2])
def test_log_prob_matches_torch_mixture(name, dim):
    """log_prob = log sum_k w_k N(x; alpha z_k, beta^2 I), evaluated by torch.distributions."""
    oracle = make_oracle(name, dim=dim)
    for t in TIMES:
        x = torch.cat([points(oracle, t), 4 * rand(4, dim, seed=9)])
        ref = torch_mixture(oracle, t).log_prob(x)
        torch.testing.assert_close(oracle.log_prob(x, t), ref, rtol=1e-14, atol=1e-14, msg=str(t))


@pytest.mark.parametrize("name", PATH_NAMES)
def test_log_prob_integrates_to_one(name):
    """In 1-D, the trapezoid integral of exp(log_prob) over a wide grid is 1."""
    oracle = make_oracle(name, dim=1)
    x = torch.linspace(-12, 12, 4801, dtype=F64)[:, None]
    for t in [0.1, 0.5, 0.9]:
        mass = torch.trapezoid(oracle.log_prob(x, t).exp(), x[:, 0])
        assert abs(mass.item() - 1) < 1e-14, (t, mass.item())


# --- 6. and 7. continuity and Fokker-Planck ------------------------------------------------


PDE_TIMES = [0.06, 0.25, 0.5, 0.75, 0.94]
# Loose on purpose: the residual is the O(h^2) error of the central difference in t at h = 1e-6
# (1e-7 at h = 1e-5, 1e-3 at h = 1e-3); measured worst 4.2e-9 over all paths, dims and sigmas.
PDE_TOL = 1e-7
# A missing term must leave a residual above this (measured at least 4e-3, see test_fokker_planck).
MISSING_TERM_MIN = 1e-3


def pde_points(oracle: Oracle, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """n points from p_t at each of PDE_TIMES, batched with per-sample t: x (B, D), t (B,)."""
    x = torch.cat([points(oracle, t, n=n, seed=i) for i, t in enumerate(PDE_TIMES)])
    return x, torch.tensor(PDE_TIMES, dtype=F64).repeat_interleave(n)


def divergence_terms(field: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d_i field_i(x) per axis, shape (B, D), by autograd (points of the batch are independent)."""
    grads = [
        torch.autograd.grad(field[:, i].sum(), x, retain_graph=True)[0] for i in range(x.shape[1])
    ]
    return torch.stack([g[:, i] for i, g in enumerate(grads)], 1)


def pde_terms(oracle: Oracle, x: torch.Tensor, t: torch.Tensor, h: float = 1e-6) -> dict:
    """The terms of the continuity / Fokker-Planck equations at (x, t), each (B,) or (B, D).

    dpdt: central difference in t; div_pu, div_ps: d_i(p u_i), d_i(p s_i); lap: d_i d_i p.
    """
    with torch.no_grad():
        dpdt = (oracle.log_prob(x, t + h).exp() - oracle.log_prob(x, t - h).exp()) / (2 * h)
    x = x.detach().requires_grad_(True)
    p = oracle.log_prob(x, t).exp()  # (B,)
    (grad_p,) = torch.autograd.grad(p.sum(), x, create_graph=True)  # (B, D)
    return {
        "dpdt": dpdt,
        "div_pu": divergence_terms(p[:, None] * oracle.velocity(x, t), x),
        "div_ps": divergence_terms(p[:, None] * oracle.score(x, t), x),
        "lap": divergence_terms(grad_p, x),
    }


def relative_residual(dpdt: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
    """|dp/dt + sum of terms| / (|dp/dt| + sum of |terms|), per point; terms are (B, D)."""
    res = dpdt + sum(term.sum(1) for term in terms)
    return res.abs() / (dpdt.abs() + sum(term.abs().sum(1) for term in terms))


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("dim", [2, 3])
def test_continuity_equation(name, dim):
    """dp_t/dt + div(p_t u_t) = 0 for the oracle velocity, at t from 0.06 to 0.94."""
    oracle = make_oracle(name, dim=dim)
    x, t = pde_points(oracle)
    terms = pde_terms(oracle, x, t)
    rel = relative_residual(terms["dpdt"], terms["div_pu"])
    assert rel.max() < PDE_TOL, rel.max().item()


SIGMAS = {"constant-0.7": lambda beta: 0.7 + 0 * beta, "half-beta": lambda beta: 0.5 * beta}


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_fokker_planck(name, sigma):
    """For the SDE drift f = u + sigma^2/2 s: dp/dt + div(p f) - sigma^2/2 Lap p = 0 (relative
    residual below PDE_TOL); with the score term left out of the drift the residual is above
    MISSING_TERM_MIN at every t (smallest, ~4e-3, for sigma = beta / 2 near t = 1)."""
    oracle = make_oracle(name, dim=2)
    x, t = pde_points(oracle)
    half_var = (0.5 * SIGMAS[sigma](oracle.path.schedule(t).beta) ** 2)[:, None]  # (B, 1)
    terms = pde_terms(oracle, x, t)
    dpdt, div_pu, div_ps, lap = (terms[k] for k in ("dpdt", "div_pu", "div_ps", "lap"))
    rel = relative_residual(dpdt, div_pu, half_var * div_ps, -half_var * lap)
    assert rel.max() < PDE_TOL, rel.max().item()
    bad = relative_residual(dpdt, div_pu, -half_var * lap).reshape(len(PDE_TIMES), -1)
    assert (bad.amax(1) > MISSING_TERM_MIN).all(), bad.amax(1).tolist()


# --- 8. the constant gap -------------------------------------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("kind", ["velocity", "score"])
def test_posterior_variance_is_the_gap(name, kind):
    """f(c) = E_{k | x}|target(x | z_k) - c|^2 is minimised at the oracle's marginal target,
    with f(c) = f(oracle) + |c - oracle|^2, and the minimum equals *_posterior_variance."""
    oracle = make_oracle(name, dim=3)
    path = oracle.path
    cond = path.conditional_velocity if kind == "velocity" else path.conditional_score
    marginal = oracle.velocity if kind == "velocity" else oracle.score
    variance = getattr(oracle, f"{kind}_posterior_variance")
    for t in TIMES:
        x, tt = points(oracle, t), torch.tensor(t, dtype=F64)
        post = posterior_ref(oracle, x, tt)  # (B, K)
        targets = per_component(oracle, cond, x, tt)  # (B, K, D)

        def f(c):
            return (post * ((targets - c[:, None, :]) ** 2).sum(-1)).sum(1)  # noqa: B023

        best = marginal(x, tt)
        # absolute: *_posterior_variance is c^2 (E|z|^2 - |E z|^2), whose cancellation leaves an
        # error ~ eps c^2 E|z|^2 even where the variance itself is ~0 (measured worst 1.3e-13)
        torch.testing.assert_close(f(best), variance(x, tt), rtol=0, atol=1e-11, msg=str(t))
        assert (f(best) > 0).all()
        for seed in range(3):
            delta = 0.1 * rand(*x.shape, seed=10 + seed)
            torch.testing.assert_close(
                f(best + delta), f(best) + (delta**2).sum(1), rtol=1e-13, atol=1e-13, msg=str(t)
            )
            assert (f(best + delta) > f(best)).all()


# --- 9. errors -----------------------------------------------------------------------------


def test_oracle_rejects_bad_data():
    path = get_path("linear")
    with pytest.raises(ValueError, match=r"^data must have shape \(K, \.\.\.\)"):
        Oracle(rand(4), path)
    with pytest.raises(ValueError, match=r"^data must have shape"):
        Oracle(rand(0, 2), path)


BAD_WEIGHTS = {
    "wrong-length": [1.0, 1.0, 1.0],
    "2-d": [[1.0], [1.0], [1.0], [1.0]],
    "negative": [1.0, -0.5, 1.0, 1.0],
    "all-zero": [0.0, 0.0, 0.0, 0.0],
    "nan": [1.0, math.nan, 1.0, 1.0],
    "inf": [1.0, math.inf, 1.0, 1.0],
}


@pytest.mark.parametrize("why", BAD_WEIGHTS)
def test_oracle_rejects_bad_weights(why):
    with pytest.raises(ValueError, match=r"^weights must be finite and non-negative"):
        Oracle(rand(4, 2), get_path("linear"), torch.tensor(BAD_WEIGHTS[why], dtype=F64))


def test_oracle_rejects_bad_x_t_and_prediction_type():
    oracle = make_oracle("vp-cosine", dim=2)
    x = rand(3, 2)
    for bad_x in (rand(3, 3), rand(3), rand(3, 2, 1)):
        with pytest.raises(ValueError, match=r"^x must have shape \(B, 2\)"):
            oracle.velocity(bad_x, 0.5)
        with pytest.raises(ValueError, match=r"^x must have shape"):
            oracle.log_prob(bad_x, 0.5)
    with pytest.raises(ValueError, match=r"^t must be a scalar or have shape \(B,\)"):
        oracle.score(x, torch.full((4,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"^t must lie in \[0, 1\]"):
        oracle.velocity(x, 1.2)
    with pytest.raises(ValueError, match=r"^t must lie"):
        oracle.log_prob(x, torch.tensor([0.5, -0.1, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="prediction type") as err:
        oracle.predict(x, 0.5, "noise")
    for kind in PREDICTION_TYPES:
        assert kind in str(err.value)


# --- 10. numerical stability ---------------------------------------------------------------


@pytest.mark.parametrize("name", PATH_NAMES)
def test_finite_and_nearest_point_near_t1(name):
    """At t = 1 - 1e-6 everything is finite and denoise returns the data point nearest to
    x / alpha; x_t drawn from z_j denoises to z_j."""
    oracle = make_oracle(name, dim=3, weights=None)
    t = 1 - 1e-6
    x = torch.cat([2 * rand(16, 3, seed=3), points(oracle, t)])
    for fn in (oracle.velocity, oracle.score, oracle.denoise, oracle.log_prob):
        assert torch.isfinite(fn(x, t)).all(), fn.__name__
    for kind in ("velocity_posterior_variance", "score_posterior_variance"):
        assert torch.isfinite(getattr(oracle, kind)(x, t)).all(), kind
    alpha = path_schedule(oracle, t).alpha
    nearest = torch.cdist(x, alpha * oracle.data).argmin(1)
    torch.testing.assert_close(oracle.denoise(x, t), oracle.data[nearest], rtol=0, atol=1e-14)
    z = oracle.data[torch.arange(12) % 5]
    x = oracle.path.sample(z, torch.full((12,), t, dtype=F64), rand(12, 3, seed=4)).x
    torch.testing.assert_close(oracle.denoise(x, t), z, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_far_apart_points_stay_finite(name):
    """Points 1e3 apart and queries far from all of them (p_t(x|z) underflows to 0 for every k)
    give finite values that still match torch.distributions and autograd."""
    data = torch.tensor([[-1e3, 0.0], [1e3, 0.0], [0.0, 1e3]], dtype=F64)
    oracle = Oracle(data, get_path(name), torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    x = torch.cat([1e3 * rand(6, 2, seed=6), torch.tensor([[5e3, -5e3]], dtype=F64)])
    for t in [0.2, 0.5, 0.9]:
        # every p_t(x_far | z_k) underflows: a direct log(sum_k w_k p_t(x | z_k)) would be -inf
        log_dens = per_component(
            oracle, oracle.path.conditional_log_prob, x, torch.tensor(t, dtype=F64)
        )
        assert (log_dens[-1].exp() == 0).all()
        for fn in (oracle.velocity, oracle.score, oracle.denoise, oracle.log_prob):
            assert torch.isfinite(fn(x, t)).all(), (fn.__name__, t)
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)  # noqa: E731
        close(oracle.posterior(x, t).sum(1), torch.ones(7, dtype=F64))
        close(oracle.log_prob(x, t), torch_mixture(oracle, t).log_prob(x))
        close(oracle.score(x, t), autograd_score(oracle, x, t))
