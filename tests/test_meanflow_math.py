"""MeanFlow's math (fmgen.core.meanflow) against an exact average velocity, in float64.

The data are a Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) with s_k > 0, whose marginal
velocity on a Gaussian path is in closed form (``GaussianMixture``; checked here against the
continuity equation and, as s -> 0, against the Dirac oracle) and smooth up to t = 1. The exact
average velocity u*(x, t, r) = (Phi_{t->r}(x) - x) / (r - t) is the mean of RK4's slopes over
``U_STEPS`` equal steps of [t, r] (``average_velocity``): differentiable by torch.func.jvp, and
v(x, t) itself at r = t.

Measured (float64, this file's points): u* is within 5e-13 (relative) of plain RK4 at 3200
steps; the MeanFlow target of u* equals u* to 2.2e-12 (linear) and 2.6e-12 (vp-cosine), tested
to 1e-10, and the wrong sign v - (r - t) du*/dt misses by 1.2-1.4; one-, two- and three-step
samples with u* match an independent 1000-step RK4 to 2.5e-12 - 7.6e-12 (tested to 1e-10). The
whole file runs in ~17 s on one busy core, most of it the jvp through u*'s 600 RK4 steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fmgen.core.losses import sample_time
from fmgen.core.meanflow import (
    adaptive_weight,
    meanflow_loss,
    meanflow_target,
    sample_interval_times,
    sample_meanflow,
)
from fmgen.core.oracle import Oracle
from fmgen.core.paths import get_path
from fmgen.core.samplers import SAMPLERS, sample_rk4
from fmgen.core.sampling import SamplingSpec, nfe, solve
from fmgen.core.solver_base import FINAL_STEPS, Step

F64 = torch.float64
PATHS = ["linear", "vp-cosine"]
MEANS = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=F64)  # (K, D)
STDS = torch.tensor([0.5, 0.4, 0.6], dtype=F64)  # (K,)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # (K,)
U_STEPS = 400  # RK4 steps of u* (and 200, extrapolated): ~5e-13 from the converged value
REF_STEPS = 1000  # the independent reference's steps (another count than u*'s)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # torch's first forward-mode AD call scripts its jvp decompositions (torch internals)
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


class GaussianMixture:
    """Data z ~ sum_k w_k N(mu_k, s_k^2 I) noised by ``path``: closed-form p_t and velocity.

    Given component k, x_t = alpha z + beta eps ~ N(alpha mu_k, S_k I), S_k = alpha^2 s_k^2 +
    beta^2, and (z, eps, x_t) are jointly Gaussian, so E[dalpha z + dbeta eps | x_t = x, k] =
    dalpha mu_k + (dalpha alpha s_k^2 + dbeta beta) / S_k (x - alpha mu_k). The marginal
    velocity is their mean under p(k | x_t = x), a softmax of log w_k + log N(x; alpha mu_k, S_k I).
    At s_k = 0 this is the Dirac oracle's u_t(x | D).

    The formulas use no Python numbers and ``lifted`` gives the constants a zero tangent: under
    torch.func.jvp an op between a dual and a plain tensor or number takes a slow path (~0.2 ms
    on this CPU, 10-30x a dual-dual op), which would make the jvp of u* take ~20 s.
    """

    def __init__(self, path, means=MEANS, stds=STDS, weights=WEIGHTS):
        self.path, self.means, self.var_data = path, means, stds**2  # (K, D), (K,)
        self.log_weights = torch.log(weights / weights.sum())  # (K,)
        self.half_dim = torch.tensor(means.shape[1] / 2, dtype=means.dtype)

    def lifted(self, zero: torch.Tensor) -> GaussianMixture:
        """The same mixture, its constants plus ``zero`` (a 0-d dual zero inside a jvp)."""
        out = copy.copy(self)
        for name in ("means", "var_data", "log_weights", "half_dim"):
            setattr(out, name, getattr(self, name) + zero)
        return out

    def _parts(self, x, t):
        s = self.path.schedule(t, check=False)  # no sync, and t may carry a jvp tangent
        alpha, beta = s.alpha[:, None], s.beta[:, None]  # (B, 1)
        var = alpha**2 * self.var_data + beta**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * self.means  # (B, K, D)
        # log w_k + log N(x; alpha mu_k, S_k I) + (D / 2) log(2 pi)
        logits = self.log_weights - (diff**2).sum(-1) / (var + var) - self.half_dim * torch.log(var)
        return s, var, diff, logits

    def log_prob(self, x, t):
        """log p_t(x), shape (B,)."""
        logits = self._parts(x, t)[3]
        return torch.logsumexp(logits, dim=1) - self.half_dim * math.log(2 * math.pi)

    def velocity(self, x, t):
        """The marginal velocity v(x, t), x (B, D), t (B,) -> (B, D)."""
        s, var, diff, logits = self._parts(x, t)
        # p(k | x) written out (torch.softmax's jvp is slow); no max shift: these tests' logits
        # stay above -100, far from exp's underflow at -745
        w = torch.exp(logits)
        post = w / w.sum(dim=1, keepdim=True)  # (B, K)
        alpha, beta, dalpha, dbeta = (v[:, None] for v in (s.alpha, s.beta, s.dalpha, s.dbeta))
        gain = (dalpha * alpha * self.var_data + dbeta * beta) / var  # (B, K)
        v_k = dalpha[:, :, None] * self.means + gain[:, :, None] * diff  # (B, K, D)
        return (post[:, :, None] * v_k).sum(1)


def rk4_average(field, x, t, r, steps):
    """(Phi_{t->r}(x) - x) / (r - t) by RK4 on ``steps`` equal steps of [t, r]: the mean of the
    increments' slopes, so no division by r - t (r = t gives v(x, t)). Numbers enter once per
    call, not per step (see ``GaussianMixture``)."""
    h = (r - t) / steps  # (B,)
    half_h, hx = h / 2, h[:, None]
    half_hx, sixth_hx = hx / 2, hx / 6
    y, tau, total = x, t, torch.zeros_like(x)
    for _ in range(steps):
        k1 = field(y, tau)
        k2 = field(y + half_hx * k1, tau + half_h)
        k3 = field(y + half_hx * k2, tau + half_h)
        k4 = field(y + hx * k3, tau + h)
        slope6 = k1 + k2 + k2 + k3 + k3 + k4  # 6 x RK4's slope
        y = y + sixth_hx * slope6
        tau = tau + h  # rounding drift ~ steps * 1e-16 of the interval
        total = total + slope6
    return total / (6 * steps)


def average_velocity(field, x, t, r, steps=U_STEPS):
    """u*(x, t, r) = (Phi_{t->r}(x) - x) / (r - t): RK4 on ``steps`` and ``steps / 2`` steps,
    Richardson-extrapolated, (16 u_N - u_{N/2}) / 15, which cancels RK4's h^4 error term.
    Measured at 400: 5e-13 from plain RK4 at 3200 steps (plain RK4 at 400: 1e-10), for 3/4
    of the cost of plain RK4 at 800 (1e-11), which matters inside a jvp."""
    fine = rk4_average(field, x, t, r, steps)
    return (16 * fine - rk4_average(field, x, t, r, steps // 2)) / 15


def exact_average(path_name: str):
    """The mixture on the path and its exact average velocity u*(x, t, r)."""
    gmm = GaussianMixture(get_path(path_name))

    def u_star(x, t, r):
        zero = (r - r).sum()  # a dual zero inside meanflow_target's jvp (r's tangent is 0)
        return average_velocity(gmm.lifted(zero).velocity, x, t, r)

    return gmm, u_star


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def noise(n: int, dim: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- the Gaussian mixture's velocity --------------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
def test_mixture_velocity_solves_the_continuity_equation(path_name):
    """d/dt log p + div v + v . grad log p = 0 (autograd in x and t), relative residual
    < 1e-10 per point (measured ~1e-16; a wrong gain gives O(1))."""
    gmm = GaussianMixture(get_path(path_name))
    x = noise(12, seed=1).requires_grad_(True)
    t = torch.linspace(0.02, 0.98, 12, dtype=F64).requires_grad_(True)
    logp = gmm.log_prob(x, t)
    dlogp_dx, dlogp_dt = torch.autograd.grad(logp.sum(), (x, t), create_graph=True)
    v = gmm.velocity(x, t)
    div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
    terms = torch.stack([dlogp_dt, div, (v * dlogp_dx).sum(1)])  # (3, B)
    residual = terms.sum(0).abs() / terms.abs().sum(0)
    print(f"{path_name}: continuity residual {residual.max():.1e}")
    assert residual.max() < 1e-10


@pytest.mark.parametrize("path_name", PATHS)
def test_mixture_velocity_is_the_dirac_oracle_at_zero_width(path_name):
    path = get_path(path_name)
    gmm = GaussianMixture(path, stds=torch.zeros(3, dtype=F64))
    oracle = Oracle(MEANS, path, WEIGHTS)
    x, t = noise(9, seed=2), torch.tensor([0.1, 0.5, 0.9], dtype=F64).repeat(3)
    torch.testing.assert_close(gmm.velocity(x, t), oracle.velocity(x, t), rtol=1e-12, atol=1e-12)


# --- the identity and the target ------------------------------------------------------------------

PAIRS = [(0.0, 1.0), (0.0, 0.4), (0.2, 0.7), (0.6, 1.0), (0.9, 1.0), (0.3, 0.3), (0.0, 0.0),
         (1.0, 1.0)]  # fmt: skip


@pytest.mark.parametrize("path_name", PATHS)
def test_target_of_the_exact_average_velocity_is_itself(path_name):
    """u* = v + (r - t) du*/dt: meanflow_target(u*, x, t, r, v(x, t)) equals u* to 1e-10
    relative (measured ~1e-12) on every (t, r) of PAIRS, r = t rows included (exactly v there);
    the wrong sign v - (r - t) du*/dt misses by orders of magnitude."""
    gmm, u_star = exact_average(path_name)
    per = 4
    t = torch.tensor([a for a, _ in PAIRS], dtype=F64).repeat_interleave(per)
    r = torch.tensor([b for _, b in PAIRS], dtype=F64).repeat_interleave(per)
    x = 1.5 * noise(len(t), seed=3)
    v = gmm.velocity(x, t)
    want = u_star(x, t, r)
    got = meanflow_target(u_star, x, t, r, v)
    print(f"{path_name}: target vs u* {rel(got, want):.1e}")
    assert got.shape == x.shape and not got.requires_grad
    assert rel(got, want) < 1e-10
    equal = r == t
    assert torch.equal(got[equal], v[equal])  # r = t: v alone, no jvp
    moving = ~equal
    wrong = 2 * v - got  # v - (r - t) du/dt
    print(f"{path_name}: wrong sign {rel(wrong[moving], want[moving]):.1e}")
    assert rel(wrong[moving], want[moving]) > 1e-2


def test_target_runs_the_jvp_on_the_moving_rows_only():
    """The r = t rows are left out of the jvp (the field never sees them); with no such row
    the field sees the whole batch, with no moving row it is never called."""
    gmm, u_star = exact_average("linear")
    seen = []

    def u(x, t, r):
        seen.append(x.shape[0])
        return rk4_average(gmm.velocity, x, t, r, steps=8)

    x, t = noise(8, seed=4), torch.full((8,), 0.2, dtype=F64)
    v = gmm.velocity(x, t)
    r = t.clone()
    r[[1, 6]] = 0.9
    meanflow_target(u, x, t, r, v)
    assert seen == [2]
    seen.clear()
    meanflow_target(u, x, t, torch.full_like(t, 0.9), v)
    assert seen == [8]
    seen.clear()
    assert torch.equal(meanflow_target(u, x, t, t, v), v) and seen == []


# --- sampling: one and few steps with the exact average velocity ----------------------------------

GRIDS = [(0.0, 1.0), (0.0, 0.5, 1.0), (0.1, 0.35, 0.8, 0.95)]


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("times", GRIDS, ids=["1-step", "2-step", "3-step-inside"])
def test_steps_of_the_exact_average_velocity_are_the_flow(path_name, times):
    """x_{i+1} = x_i + (t_{i+1} - t_i) u*(x_i, t_i, t_{i+1}) ends where an independent RK4
    (fmgen's, REF_STEPS steps, Heun's third order on a last step to t = 1) ends: to 1e-10
    relative (measured ~1e-12) in one step from noise to data, two, or three inside (0, 1)."""
    gmm, u_star = exact_average(path_name)
    x0 = noise(32, seed=5)
    ts = torch.tensor(times, dtype=F64)
    got = sample_meanflow(u_star, x0, ts)
    ref = sample_rk4(gmm.velocity, x0, torch.linspace(times[0], times[-1], REF_STEPS + 1,
                                                      dtype=F64), final_step="solver")  # fmt: skip
    print(f"{path_name} {times}: meanflow vs RK4 {rel(got, ref):.1e}")
    assert rel(got, ref) < 1e-10


def test_sampler_counts_calls_and_steps():
    """One evaluation per step whatever final_step says (never at t = 1), nfe(meanflow, k) = k,
    a callback after every step, registered under 'meanflow' and solved from a spec."""
    calls = []

    def u(x, t, r):
        calls.append((t[0].item(), r[0].item()))
        assert t.shape == r.shape == (x.shape[0],) and t.dtype == x.dtype
        return torch.ones_like(x)

    assert SAMPLERS["meanflow"] is sample_meanflow
    ts = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=F64)
    for final in FINAL_STEPS:
        calls.clear()
        seen: list[Step] = []
        x = sample_meanflow(u, noise(3), ts, final_step=final, callback=seen.append)
        assert calls == [(0.0, 0.25), (0.25, 0.7), (0.7, 1.0)]
        assert len(calls) == nfe("meanflow", 3, final_step=final) == 3
        assert [(s.i, s.t, s.t_next) for s in seen] == [(0, 0.0, 0.25), (1, 0.25, 0.7),
                                                        (2, 0.7, 1.0)]  # fmt: skip
        assert torch.equal(seen[-1].x, x)
        torch.testing.assert_close(x, noise(3) + 1.0, rtol=0, atol=1e-15)
    assert nfe("meanflow", 5, t_end=0.5) == 5
    calls.clear()
    spec = SamplingSpec("meanflow", 2, grid="list", times=(0.0, 0.5, 1.0), final_step="denoise")
    solve(spec, u, noise(3), path=get_path("linear"))
    assert calls == [(0.0, 0.5), (0.5, 1.0)] and spec.nfe == 2
    with pytest.raises(ValueError, match="final_step"):
        sample_meanflow(u, noise(3), ts, final_step="last")
    with pytest.raises(ValueError, match="ts"):
        sample_meanflow(u, noise(3), torch.tensor([0.5, 0.2]))


# --- (t, r) sampling --------------------------------------------------------------------------------


def test_interval_times_order_share_range_and_marginal():
    """100k rows: t <= r, r == t on a binomial share within 4 sigma of equal_share, all in
    [t_min, t_max]; with equal_share 0 the pooled draws are logit-normal(loc, 1): P(t > 1/2) =
    Phi(loc) (more mass near the data for loc > 0), and the paper's time 1 - t has logit mean
    -loc (its -0.4)."""
    n, share = 100_000, 0.75
    gen = torch.Generator().manual_seed(0)
    t, r = sample_interval_times(n, equal_share=share, t_min=0.01, t_max=0.99, generator=gen,
                                 dtype=F64)  # fmt: skip
    assert t.shape == r.shape == (n,) and t.dtype == F64
    assert bool((t <= r).all())
    assert bool((t >= 0.01).all() and (r <= 0.99).all())
    equal = (t == r).sum().item()
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(equal - n * share) < 4 * sigma, (equal, n * share, sigma)
    for loc in (0.4, -0.4):
        t, r = sample_interval_times(n, loc=loc, equal_share=0.0, generator=gen, dtype=F64)
        pooled = torch.cat([t, r])
        assert bool((t < r).all())
        above = (pooled > 0.5).double().mean().item()
        want = 0.5 * (1 + math.erf(loc / math.sqrt(2)))  # Phi(loc): 0.655 at loc 0.4
        assert abs(above - want) < 4 * math.sqrt(want * (1 - want) / (2 * n)), (above, want)
        paper_logit = torch.logit(1 - pooled).mean().item()
        assert abs(paper_logit + loc) < 4 / math.sqrt(2 * n)
    t, r = sample_interval_times(1000, equal_share=1.0, generator=gen)
    assert torch.equal(t, r)


def test_interval_times_draw_order_is_fixed():
    """A seed gives the same (t, r) every time, and they are the documented draws: two
    sample_time(B) then torch.rand(B), from the one generator."""

    def draw(seed, **kw):
        return sample_interval_times(64, generator=torch.Generator().manual_seed(seed), **kw)

    for kind in ("logit-normal", "uniform"):
        a, b = draw(3, kind=kind), draw(3, kind=kind)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], draw(4, kind=kind)[0])
        gen = torch.Generator().manual_seed(3)
        first = sample_time(64, kind, loc=0.4, generator=gen)
        second = sample_time(64, kind, loc=0.4, generator=gen)
        equal = torch.rand(64, generator=gen) < 0.75
        lo, hi = torch.minimum(first, second), torch.maximum(first, second)
        assert torch.equal(a[0], lo) and torch.equal(a[1], torch.where(equal, lo, hi))
    with pytest.raises(ValueError, match="equal_share"):
        sample_interval_times(4, equal_share=1.5)


# --- the loss -----------------------------------------------------------------------------------------

CLASSES = 3
NULL = CLASSES  # the null condition's label (the embedding's last row)


class TinyNet(torch.nn.Module):
    """u_theta(x, t, y, r): a float64 MLP of (x, t, r, label embedding), seeded weights."""

    prediction_type = "velocity"

    def __init__(self, dim: int = 2, hidden: int = 16, seed: int = 0):
        super().__init__()
        self.embed = torch.nn.Embedding(CLASSES + 1, 4, dtype=F64)
        self.inp = torch.nn.Linear(dim + 2 + 4, hidden, dtype=F64)
        self.out = torch.nn.Linear(hidden, dim, dtype=F64)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=F64))

    def forward(self, x, t, y=None, r=None):
        r = t if r is None else r
        e = self.embed(y) if y is not None else torch.zeros(x.shape[0], 4, dtype=x.dtype)
        h = torch.tanh(self.inp(torch.cat([x, t[:, None], r[:, None], e], 1)))  # (B, hidden)
        return self.out(h)  # (B, D)


def batch(n: int = 12, seed: int = 6):
    """Data, noise, (t, r) with a third of the rows r = t (t = 0 and r = 1 among them), labels
    with the dropped rows set to NULL, and keep."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    t = torch.rand(n, generator=gen, dtype=F64) * 0.6
    r = t + torch.rand(n, generator=gen, dtype=F64) * (1 - t)
    t[0], r[1] = 0.0, 1.0
    r[::3] = t[::3]
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    keep = torch.rand(n, generator=gen) < 0.6
    keep[:2] = True
    y = torch.where(keep, labels, torch.full_like(labels, NULL))
    return z, eps, t, r, y, torch.full_like(labels, NULL), keep


def hand_target(u_net, z, eps, t, r, y, null, keep, guidance=1.0, kappa=0.0, h=1e-5):
    """On the linear path x = t z + (1 - t) eps, v = z - eps; v~ folds guidance in on the kept
    rows; du/dt in the direction (v~, 1, 0) by a central difference of step h (not a jvp)."""
    x, v = t[:, None] * z + (1 - t[:, None]) * eps, z - eps
    with torch.no_grad():
        u_cond, u_null = u_net(x, t, y, r=t), u_net(x, t, null, r=t)
        folded = guidance * v + kappa * u_cond + (1 - guidance - kappa) * u_null
        v_t = torch.where(keep[:, None], folded, v)
        ahead = u_net(x + h * v_t, t + h, y, r=r)
        behind = u_net(x - h * v_t, t - h, y, r=r)
    return x, v_t + (r - t)[:, None] * (ahead - behind) / (2 * h)


@pytest.mark.parametrize(("guidance", "kappa"), [(1.0, 0.0), (2.0, 0.0), (2.5, 0.4)])
def test_loss_value_is_the_hand_computation(guidance, kappa):
    """sg(w) |u_theta - u_tgt|^2 with w = 1 / (err + c): to 1e-8 relative (the central
    difference's error); t = 0, r = 1 and r = t rows, kept and dropped rows included."""
    net = TinyNet()
    z, eps, t, r, y, null, keep = batch()
    x, target = hand_target(net, z, eps, t, r, y, null, keep, guidance, kappa)
    err = ((net(x, t, y, r=r) - target) ** 2).mean(1)
    want = err / (err + 1e-3)
    got = meanflow_loss(net, z, get_path("linear"), t=t, r=r, eps=eps, y=y, null=null, keep=keep,
                        guidance=guidance, kappa=kappa)  # fmt: skip
    assert got.shape == (12,)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)
    plain = meanflow_loss(net, z, get_path("linear"), t=t, r=r, eps=eps, y=y, null=null,
                          keep=keep, guidance=guidance, kappa=kappa, power=0.0)  # fmt: skip
    torch.testing.assert_close(plain, err, rtol=1e-8, atol=0)  # power 0: the plain MSE


def test_guidance_folds_into_the_target_on_kept_rows_only():
    """r = t on every row: the target is v~ itself, w v + (1 - w) u(x, t, t | null) on kept
    rows and v on dropped rows; with v alone on the kept rows the loss would differ."""
    net = TinyNet()
    z, eps, t, _, y, null, keep = batch()
    x, v = t[:, None] * z + (1 - t[:, None]) * eps, z - eps
    with torch.no_grad():
        pred, u_null = net(x, t, y, r=t), net(x, t, null, r=t)
    w = 3.0
    folded = torch.where(keep[:, None], w * v + (1 - w) * u_null, v)
    got = meanflow_loss(net, z, get_path("linear"), t=t, r=t, eps=eps, y=y, null=null, keep=keep,
                        guidance=w, power=0.0)  # fmt: skip
    torch.testing.assert_close(got, ((pred - folded) ** 2).mean(1), rtol=1e-13, atol=0)
    unguided = ((pred - v) ** 2).mean(1)
    assert torch.equal(got[~keep], unguided[~keep])
    assert bool(((got[keep] - unguided[keep]).abs() > 1e-6).all())


def grads(net, loss):
    net.zero_grad()
    loss.sum().backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("case", ["jvp", "guidance-no-jvp"])
def test_no_gradient_flows_through_the_target_or_the_weight(case):
    """The loss's gradient is autograd of sg(w) |u_theta - sg(u_tgt)|^2 (to 1e-7 relative: the
    reference's target is a central difference), and differs from the gradient of the same
    loss with the gradient let through the target or through the weight. "jvp": rows with
    r != t, no guidance; "guidance-no-jvp": r = t on every row, guidance 2 (the target holds
    u_theta(x, t, t | null))."""
    net = TinyNet()
    z, eps, t, r, y, null, keep = batch()
    guidance = 1.0 if case == "jvp" else 2.0
    if case == "guidance-no-jvp":
        r = t
    got = grads(net, meanflow_loss(net, z, get_path("linear"), t=t, r=r, eps=eps, y=y, null=null,
                                   keep=keep, guidance=guidance))  # fmt: skip

    def loss_of(stop_target: bool, stop_weight: bool):
        x, target = hand_target(net, z, eps, t, r, y, null, keep, guidance)
        if not stop_target:  # the same target, computed with the gradient on
            with torch.enable_grad():
                x, v = t[:, None] * z + (1 - t[:, None]) * eps, z - eps
                folded = guidance * v + (1 - guidance) * net(x, t, null, r=t)
                v_t = torch.where(keep[:, None], folded, v)
                h = 1e-5
                dudt = (net(x + h * v_t, t + h, y, r=r) - net(x - h * v_t, t - h, y, r=r)) / (2 * h)
                target = v_t + (r - t)[:, None] * dudt
        err = ((net(x, t, y, r=r) - target) ** 2).mean(1)
        w = 1 / (err + 1e-3)
        return (w.detach() if stop_weight else w) * err

    want = grads(net, loss_of(True, True))
    assert rel(got, want) < 1e-7
    for leaky in (loss_of(False, True), loss_of(True, False)):
        assert rel(grads(net, leaky), want) > 1e-3


def test_target_net_answers_the_jvp_and_guidance():
    """target_net (default net) computes the target under no_grad: a copy gives the same loss
    and no gradient of its own; another network changes the target as the hand computation
    says."""
    net = TinyNet()
    z, eps, t, r, y, null, keep = batch()
    path = get_path("linear")
    kw = dict(t=t, r=r, eps=eps, y=y, null=null, keep=keep, guidance=2.0, kappa=0.3)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(meanflow_loss(net, z, path, target_net=twin, **kw),
                               meanflow_loss(net, z, path, **kw), rtol=1e-14, atol=0)  # fmt: skip
    other = TinyNet(seed=1)
    loss = meanflow_loss(net, z, path, target_net=other, **kw)
    loss.sum().backward()
    assert all(p.grad is None for p in other.parameters())
    assert all(p.grad is not None for p in net.parameters())
    x, target = hand_target(other, z, eps, t, r, y, null, keep, 2.0, 0.3)
    err = ((net(x, t, y, r=r) - target) ** 2).mean(1)
    torch.testing.assert_close(loss.detach(), err / (err + 1e-3), rtol=1e-8, atol=0)


def test_adaptive_weight():
    err = torch.tensor([0.0, 1e-3, 0.5, 4.0], dtype=F64, requires_grad=True)
    assert torch.equal(adaptive_weight(err, power=0.0), torch.ones(4, dtype=F64))
    w = adaptive_weight(err, power=0.5, c=1e-2)
    assert not w.requires_grad
    torch.testing.assert_close(w, (err.detach() + 1e-2) ** -0.5, rtol=1e-15, atol=0)
    torch.testing.assert_close(adaptive_weight(err) * err, err / (err + 1e-3), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="power"):
        adaptive_weight(err, power=-1.0)


def test_loss_checks_and_output_dtype():
    """A network that does not predict the velocity, guidance without its conditions and
    t > r are errors that say so; a float32 output is promoted to x's float64."""
    z, eps, t, r, y, null, keep = batch()
    path = get_path("linear")
    net = TinyNet()
    net.prediction_type = "x0"
    with pytest.raises(ValueError, match="'x0'"):
        meanflow_loss(net, z, path, t=t, r=r, eps=eps, y=y)
    net = TinyNet()
    for missing in ("y", "null", "keep"):
        kw = dict(y=y, null=null, keep=keep) | {missing: None}
        with pytest.raises(ValueError, match=f"{missing} None"):
            meanflow_loss(net, z, path, t=t, r=r, eps=eps, guidance=2.0, **kw)
        with pytest.raises(ValueError, match="kappa"):
            meanflow_loss(net, z, path, t=t, r=r, eps=eps, kappa=0.2, **kw)
    with pytest.raises(ValueError, match="t <= r"):
        meanflow_loss(net, z, path, t=r, r=t, eps=eps, y=y)
    with pytest.raises(ValueError, match="r must lie in"):
        meanflow_loss(net, z, path, t=t, r=r + 1, eps=eps, y=y)

    class Half(TinyNet):
        def forward(self, x, t, y=None, r=None):
            return super().forward(x, t, y, r).float()

    loss = meanflow_loss(Half(), z, path, t=t, r=r, eps=eps, y=y)
    assert loss.dtype == F64 and bool(torch.isfinite(loss).all())
