"""CFM / DSM losses: the gradient theorem of docs/math.md, the constant gap, conversions, errors.

Monte-Carlo tolerances: a quantity is estimated as the mean over independent batches (or
samples) with a fixed seed; its standard error SE comes from the spread of the batch means. For
a vector (a gradient), under the null hypothesis E|mean d|^2 = sum_j SE_j^2, so we require
|mean d| <= 3 sqrt(sum_j SE_j^2) (the normalised squared norm is ~ chi^2_P / P with mean 1;
exceeding 9 is far out in the tail). For a scalar we require |mean| <= 4 SE.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmgen.core.losses import (
    DSM_WEIGHTINGS,
    LOSSES,
    cfm_loss,
    dsm_loss,
    get_loss,
    prediction_type_of,
    sample_time,
)
from fmgen.core.oracle import Oracle
from fmgen.core.paths import PREDICTION_TYPES, get_path

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


DATA = torch.tensor([[1.0, 0.5], [-1.0, 0.8], [0.2, -1.2], [1.5, -0.7]], dtype=F64)  # K=4, D=2


class MLP(nn.Module):
    """A small float64 network net(x, t, y) for 2-D data."""

    def __init__(self, prediction_type: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.prediction_type = prediction_type
        self.body = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).to(F64)

    def forward(self, x, t, y=None):
        return self.body(torch.cat([x, t[:, None]], dim=1))  # (B, 2)


class OracleNet:
    """The exact optimum predicting ``predicts``; it declares ``declared`` (default: the same)."""

    def __init__(self, oracle: Oracle, predicts: str, declared: str | None = None):
        self.oracle, self.predicts = oracle, predicts
        self.prediction_type = declared or predicts

    def __call__(self, x, t, y=None):
        return self.oracle.predict(x, t, self.predicts)


def draw(n: int, gen: torch.Generator, *, t_min: float = 0.01, t_max: float = 0.99):
    z = DATA[torch.randint(0, DATA.shape[0], (n,), generator=gen)]
    t = sample_time(n, generator=gen, dtype=F64, t_min=t_min, t_max=t_max)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    return z, t, eps


def flat_grad(loss: torch.Tensor, net: nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return torch.cat([g.flatten() for g in grads])


def gradient_gap(kind: str, target_shift: float = 0.0, batches: int = 40, n: int = 4000):
    """Batch estimates of grad L_conditional - grad L_marginal (same draws); returns stats.

    ``target_shift`` adds a constant to the marginal target (the negative control).
    """
    if kind == "cfm":
        path, net = get_path("linear"), MLP("velocity")
    else:
        path, net = get_path("vp-cosine"), MLP("eps")
    oracle = Oracle(DATA, path)
    gen = torch.Generator().manual_seed(1234)
    diffs, marg = [], []
    for _ in range(batches):
        z, t, eps = draw(n, gen)
        x = path.sample(z, t, eps).x
        if kind == "cfm":
            cond = cfm_loss(net, z, path, t=t, eps=eps).mean()
            target = oracle.velocity(x, t) + target_shift
            marginal = ((net(x, t) - target) ** 2).mean(1).mean()
        else:
            cond = dsm_loss(net, z, path, t=t, eps=eps, weighting="beta2").mean()
            beta = path.schedule(t).beta[:, None]
            target = oracle.score(x, t) + target_shift
            marginal = (beta**2 * (-net(x, t) / beta - target) ** 2).mean(1).mean()
        g_cond, g_marg = flat_grad(cond, net), flat_grad(marginal, net)
        diffs.append(g_cond - g_marg)
        marg.append(g_marg)
    d = torch.stack(diffs)  # (batches, P)
    mean_d = d.mean(0)
    se = d.std(0) / batches**0.5
    g_marg = torch.stack(marg).mean(0)
    return mean_d.norm().item(), 3 * se.norm().item(), g_marg.norm().item()


@pytest.mark.parametrize("kind", ["cfm", "dsm"])
def test_gradient_theorem(kind):
    gap, tol, scale = gradient_gap(kind)
    print(
        f"{kind}: |grad L_cond - grad L_marg| / |grad L_marg| = {gap / scale:.2e}, "
        f"tolerance 3 SE = {tol / scale:.2e}"
    )
    assert gap <= tol, (gap, tol)
    assert tol < 0.2 * scale  # the test has power: the MC error is small against the gradient


@pytest.mark.parametrize("kind", ["cfm", "dsm"])
def test_gradient_theorem_negative_control(kind):
    gap, tol, scale = gradient_gap(kind, target_shift=0.3, batches=10)
    print(f"{kind} wrong target: relative gap {gap / scale:.2e}, tolerance {tol / scale:.2e}")
    assert gap > 3 * tol


def _within(values: torch.Tensor, sigmas: float = 4.0) -> tuple[float, float]:
    mean, se = values.mean().item(), (values.std() / values.numel() ** 0.5).item()
    assert abs(mean) <= sigmas * se, (mean, se)
    return mean, se


@pytest.mark.parametrize("path_name", ["linear", "vp-cosine", "vp-linear"])
def test_constant_gap_cfm(path_name):
    """L_CFM - L_FM at the same (t, x_t) has mean Tr Var[u | x_t] / D (the posterior variance)."""
    path = get_path(path_name)
    oracle, net = Oracle(DATA, path), MLP("velocity", seed=3)
    z, t, eps = draw(50_000, torch.Generator().manual_seed(7))
    x = path.sample(z, t, eps).x
    with torch.no_grad():
        gap = oracle.velocity_posterior_variance(x, t) / 2  # (B,), D = 2
        cfm = cfm_loss(net, z, path, t=t, eps=eps)
        fm = ((net(x, t) - oracle.velocity(x, t)) ** 2).mean(1)
        _within(cfm - fm - gap)
        # the oracle is the optimum: its CFM loss is the gap alone (zero excess loss)
        excess = cfm_loss(OracleNet(oracle, "velocity"), z, path, t=t, eps=eps) - gap
        mean, se = _within(excess)
    print(f"{path_name}: oracle excess CFM loss {mean:.2e} +- {se:.1e}, gap {gap.mean():.3f}")
    assert gap.mean() > 10 * se  # a non-trivial gap, resolved by the sample


def test_constant_gap_dsm():
    path = get_path("vp-cosine")
    oracle = Oracle(DATA, path)
    z, t, eps = draw(50_000, torch.Generator().manual_seed(8))
    x = path.sample(z, t, eps).x
    beta2 = path.schedule(t).beta ** 2
    gap = beta2 * oracle.score_posterior_variance(x, t) / 2
    for weighting, lam in (("beta2", beta2), ("none", torch.ones_like(t))):
        loss = dsm_loss(OracleNet(oracle, "score"), z, path, t=t, eps=eps, weighting=weighting)
        _within(loss - lam / beta2 * gap)


@pytest.mark.parametrize("loss_name", ["cfm", "dsm"])
def test_shapes_and_determinism(loss_name):
    path = get_path("linear")
    data = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    oracle = Oracle(data, path)
    gen = torch.Generator().manual_seed(1)
    z = data[torch.tensor([0, 1, 2, 0, 1])]
    t = sample_time(5, generator=gen, dtype=F64, t_min=0.1, t_max=0.9)
    eps = torch.randn(z.shape, generator=gen, dtype=F64)
    net = OracleNet(oracle, "x0")
    loss = get_loss(loss_name)
    a, b = loss(net, z, path, t=t, eps=eps), loss(net, z, path, t=t, eps=eps)
    assert a.shape == (5,)
    assert torch.equal(a, b)
    c = loss(net, z, path, t=t, eps=torch.randn(z.shape, generator=gen, dtype=F64))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("path_name", ["linear", "vp-cosine", "vp-linear"])
@pytest.mark.parametrize("loss_name", ["cfm", "dsm"])
def test_conversion_inside_loss(path_name, loss_name):
    """Oracles of every prediction type give the same loss at interior t."""
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    z, t, eps = draw(256, torch.Generator().manual_seed(2), t_min=0.02, t_max=0.98)
    losses = {
        p: LOSSES[loss_name](OracleNet(oracle, p), z, path, t=t, eps=eps) for p in PREDICTION_TYPES
    }
    for p in PREDICTION_TYPES:
        torch.testing.assert_close(losses[p], losses["velocity"], rtol=1e-12, atol=1e-12)
    # and a wrong declaration changes it: the conversion is really applied
    wrong = OracleNet(oracle, "eps", declared="x0")
    assert not torch.allclose(LOSSES[loss_name](wrong, z, path, t=t, eps=eps), losses["velocity"])


def test_dsm_beta2_is_eps_mse_and_weightings():
    path = get_path("vp-cosine")
    net = MLP("eps", seed=5)
    z, t, eps = draw(64, torch.Generator().manual_seed(4))
    x = path.sample(z, t, eps).x
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)  # noqa: E731
    with torch.no_grad():
        eps_mse = ((net(x, t) - eps) ** 2).mean(1)
        close(dsm_loss(net, z, path, t=t, eps=eps), eps_mse)
        s = path.schedule(t)
        close(
            dsm_loss(net, z, path, t=t, eps=eps, weighting="snr"), s.alpha**2 / s.beta**2 * eps_mse
        )
        close(dsm_loss(net, z, path, t=t, eps=eps, weighting="none"), eps_mse / s.beta**2)


def test_dsm_eps_net_finite_at_t0():
    """eps -> score is -eps / beta, finite at t = 0 (the generic conversion through D is 0/0)."""
    path = get_path("linear")
    net = MLP("eps")
    z, _, eps = draw(8, torch.Generator().manual_seed(0))
    t = torch.zeros(8, dtype=F64)
    assert torch.isfinite(dsm_loss(net, z, path, t=t, eps=eps)).all()


def test_prediction_type_through_wrappers_and_missing():
    inner = MLP("x0")

    class Wrapper(nn.Module):  # like DDP (.module) or torch.compile (._orig_mod)
        def __init__(self, attr, mod):
            super().__init__()
            setattr(self, attr, mod)

        def forward(self, x, t, y=None):
            return inner(x, t, y)

    wrapped = Wrapper("module", Wrapper("_orig_mod", inner))
    assert prediction_type_of(wrapped) == "x0"
    compiled_like = Wrapper("_orig_mod", inner)
    z, t, eps = draw(4, torch.Generator().manual_seed(0))
    path = get_path("linear")
    torch.testing.assert_close(
        cfm_loss(compiled_like, z, path, t=t, eps=eps),
        cfm_loss(inner, z, path, t=t, eps=eps),
        rtol=1e-15,
        atol=1e-15,
    )
    with pytest.raises(AttributeError, match="prediction_type"):
        cfm_loss(lambda x, t, y: x, z, path, t=t, eps=eps)
    bad = MLP("x0")
    bad.prediction_type = "noise"
    with pytest.raises(ValueError, match="velocity, eps, score, x0"):
        cfm_loss(bad, z, path, t=t, eps=eps)


def test_bad_names_list_valid_ones():
    with pytest.raises(ValueError, match="cfm, dsm"):
        get_loss("mse")
    with pytest.raises(ValueError, match="uniform, logit-normal"):
        sample_time(4, "beta")
    z, t, eps = draw(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=", ".join(DSM_WEIGHTINGS)):
        dsm_loss(MLP("eps"), z, get_path("linear"), t=t, eps=eps, weighting="min-snr")


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_losses_check_their_times_once(bad, monkeypatch):
    """A time outside [0, 1] is an error of the loss call; its conversions do not check again."""
    import fmgen.core.losses as losses_module

    z, t, eps = draw(4, torch.Generator().manual_seed(0))
    t[2] = bad
    path = get_path("vp-cosine")
    for loss, net in ((cfm_loss, MLP("eps")), (dsm_loss, MLP("velocity"))):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            loss(net, z, path, t=t, eps=eps)
    calls = []
    real = losses_module.check_time
    monkeypatch.setattr(losses_module, "check_time", lambda t: calls.append(1) or real(t))
    cfm_loss(MLP("eps"), z, path, t=torch.full_like(t, 0.5), eps=eps)
    assert calls == [1]


@pytest.mark.parametrize("kind", ["uniform", "logit-normal"])
def test_sample_time_range_and_distribution(kind):
    gen = torch.Generator().manual_seed(0)
    t = sample_time(20_000, kind, generator=gen, dtype=F64, t_min=0.1, t_max=0.7, loc=0.5)
    assert t.shape == (20_000,) and t.dtype == F64
    assert t.min() >= 0.1 and t.max() <= 0.7
    if kind == "uniform":
        assert abs(t.mean().item() - 0.4) < 4 * 0.6 / 12**0.5 / 20_000**0.5
    else:  # sigmoid(N(0.5, 1)) has median sigmoid(0.5), mapped onto [0.1, 0.7]
        median = 0.1 + 0.6 * torch.sigmoid(torch.tensor(0.5)).item()
        # Monte Carlo: the sample median's SE is 1 / (2 f(median) sqrt(n)) ~ 1.3e-3 here (8 SE)
        assert abs(t.median().item() - median) < 0.01
    again = sample_time(20_000, kind, generator=torch.Generator().manual_seed(0), dtype=F64,
                        t_min=0.1, t_max=0.7, loc=0.5)  # fmt: skip
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="t_min"):
        sample_time(4, kind, t_min=0.8, t_max=0.2)


@pytest.mark.parametrize("path_name", ["linear", "vp-cosine", "vp-linear"])
@pytest.mark.parametrize("loss_name", ["cfm", "dsm"])
def test_oracle_is_the_minimum(path_name, loss_name):
    """Perturbing the oracle's prediction raises the loss, by about the perturbation's size.

    At the same draws, L(oracle + d) - L(oracle) = mean(lambda |d|^2) + 2 mean(lambda d . (oracle
    - target)); the cross term has mean zero (the oracle is the conditional mean of the target),
    so the increase is mean(lambda |d|^2) up to Monte-Carlo error (checked within 4 SE).
    """
    path = get_path(path_name)
    oracle = Oracle(DATA, path)
    predicts = "velocity" if loss_name == "cfm" else "score"
    z, t, eps = draw(20_000, torch.Generator().manual_seed(11), t_min=0.05, t_max=0.95)
    lam = path.schedule(t).beta ** 2 if loss_name == "dsm" else torch.ones_like(t)
    base = LOSSES[loss_name](OracleNet(oracle, predicts), z, path, t=t, eps=eps)
    for shift in (torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([-0.1, 0.0], dtype=F64)):

        def perturbed(x, t, y=None, shift=shift):
            return oracle.predict(x, t, predicts) + shift * torch.cos(3 * x)  # (B, 2)

        perturbed.prediction_type = predicts
        loss = LOSSES[loss_name](perturbed, z, path, t=t, eps=eps)
        x = path.sample(z, t, eps).x
        size = lam * ((shift * torch.cos(3 * x)) ** 2).mean(1)  # (B,)
        assert loss.mean() > base.mean()
        _within(loss - base - size)


def test_conditional_and_unconditional_nets():
    """y reaches a class-conditional net; y = None calls a two-argument net(x, t)."""
    path = get_path("linear")
    z, t, eps = draw(16, torch.Generator().manual_seed(3))

    def uncond(x, t):
        return x * t[:, None]

    uncond.prediction_type = "velocity"
    x = path.sample(z, t, eps).x
    torch.testing.assert_close(
        cfm_loss(uncond, z, path, t=t, eps=eps),
        ((uncond(x, t) - (z - eps)) ** 2).mean(1),
        rtol=1e-15,
        atol=1e-15,
    )

    seen = []

    def cond(x, t, y):
        seen.append(y)
        return x + y[:, None].to(x.dtype)

    cond.prediction_type = "x0"
    y = torch.arange(16) % 3
    a = dsm_loss(cond, z, path, t=t, eps=eps, y=y)
    assert seen[0] is y and a.shape == (16,)
    assert not torch.allclose(a, dsm_loss(cond, z, path, t=t, eps=eps, y=torch.zeros_like(y)))


def test_sample_time_default_range_avoids_the_ends():
    for kind in ("uniform", "logit-normal"):
        t = sample_time(50_000, kind, generator=torch.Generator().manual_seed(0), dtype=F64,
                        scale=4.0)  # fmt: skip
        assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5
    t = sample_time(4, t_min=0.0, t_max=1.0)  # the closed interval on request
    assert t.min() >= 0.0 and t.max() <= 1.0


@pytest.mark.parametrize("loss", [cfm_loss, dsm_loss])
def test_check_t_false_skips_only_the_check(loss):
    """The training loop's times are valid by construction: with check_t=False the loss reads
    no tensor on the host (no sync) and gives bit-identical values."""
    z, t, eps = draw(6, torch.Generator().manual_seed(1))
    path, net = get_path("vp-cosine"), MLP("eps")
    checked = loss(net, z, path, t=t, eps=eps)
    reads = []
    real = torch.Tensor.__bool__
    torch.Tensor.__bool__ = lambda self: reads.append(1) or real(self)
    try:
        unchecked = loss(net, z, path, t=t, eps=eps, check_t=False)
        loss(net, z, path, t=t, eps=eps)  # the default still checks: the read is counted
    finally:
        torch.Tensor.__bool__ = real
    assert torch.equal(checked, unchecked)
    assert len(reads) == 1
