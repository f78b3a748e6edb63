"""Recipe options: loss reweightings over t (EDM, min-SNR-gamma), SD3's mode time sampling, EDM2's
inverse-sqrt learning rate and learned uncertainty, REPA: the math in float64, and the heads'
training, exact resume and export."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import ROOT, run_main, train_tiny
from test_train import latest, weights

from fmgen.config import Config, ConfigError, load_config, validate
from fmgen.core import get_path, reweight_factor, sample_time
from fmgen.core.losses import cfm_loss, dsm_loss, native_x0_weight, x0_weight
from fmgen.models import load_model
from fmgen.models.store import HEADS_FILE, read_tensors
from fmgen.train.heads import LogVar, learning_rate

PATHS = [get_path("linear"), get_path("vp-cosine"), get_path("vp-linear")]


class Linear64(torch.nn.Module):
    """A deterministic float64 'network' x, t -> prediction of a given type."""

    def __init__(self, prediction_type: str, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.prediction_type = prediction_type

    def forward(self, x, t):
        flat = x.flatten(1) @ self.w
        return (flat * (1 + t[:, None])).reshape(x.shape)


@pytest.mark.parametrize("path", PATHS, ids=repr)
@pytest.mark.parametrize("loss", ["cfm", "dsm-beta2", "dsm-none", "dsm-snr"])
@pytest.mark.parametrize("prediction", ["velocity", "eps", "x0", "score"])
@pytest.mark.parametrize("reweight", ["edm", "min-snr"])
def test_reweighted_loss_is_the_weight_on_the_data_prediction_error(path, loss, prediction, reweight):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    net = Linear64(prediction, 6)
    name, _, weighting = loss.partition("-")
    if name == "cfm":
        native = cfm_loss(net, z, path, t=t, eps=eps)
    else:
        native = dsm_loss(net, z, path, t=t, eps=eps, weighting=weighting)
    r = reweight_factor(path, t, reweight, name, dsm_weighting=weighting or "beta2",
                        gamma=3.0, sigma_data=0.7)  # fmt: skip
    # the same loss written on the data prediction D_hat directly
    x = path.sample(z, t, eps).x
    d_hat = path.convert(net(x, t), x, t, prediction, "x0")
    err = ((d_hat - z) ** 2).flatten(1).mean(1)
    want = x0_weight(path, t, reweight, gamma=3.0, sigma_data=0.7) * err
    torch.testing.assert_close(r * native, want, rtol=1e-11, atol=0)
    # and the native loss is its own weight times that error
    nat_w = native_x0_weight(path, t, name, weighting or "beta2")
    torch.testing.assert_close(native, nat_w * err, rtol=1e-11, atol=0)


def test_edm_and_min_snr_weights_are_the_papers_formulas():
    path = get_path("vp-cosine")
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    s = path.schedule(t)
    sigma, sd = s.beta / s.alpha, 0.5
    edm = (sigma**2 + sd**2) / (sigma * sd) ** 2  # Karras et al. 2022, Table 1
    torch.testing.assert_close(x0_weight(path, t, "edm", sigma_data=sd), edm, rtol=1e-13, atol=0)
    snr = (s.alpha / s.beta) ** 2
    # Hang et al. 2023 write min-SNR on the eps error: weight min(SNR, gamma) / SNR there
    eps_weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    on_x0 = x0_weight(path, t, "min-snr", gamma=5.0)
    torch.testing.assert_close(on_x0, eps_weight * snr, rtol=1e-13, atol=0)
    assert (snr > 5).any() and (snr < 5).any()  # both branches of the min were taken
    assert torch.equal(reweight_factor(path, t, "none", "cfm"), torch.ones_like(t))
    with pytest.raises(ValueError, match="unknown reweighting 'snr2'.*edm, min-snr"):
        reweight_factor(path, t, "snr2", "cfm")


def test_mode_sampling_has_sd3s_quantiles_and_is_uniform_at_scale_zero():
    n, s = 400_000, 1.29
    g = torch.Generator().manual_seed(0)
    t = sample_time(n, "mode", generator=g, t_min=0.0, t_max=1.0, mode_scale=s,
                    dtype=torch.float64)  # fmt: skip
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    # SD3 eq. 20 in its time (1 = noise): t_sd3 = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u),
    # decreasing in u, so the q-quantile of fmgen's t = 1 - t_sd3 is 1 - f(q)
    f = 1 - q - s * (torch.cos(math.pi * q / 2) ** 2 - 1 + q)
    emp = torch.quantile(t[:100_000], q)  # torch.quantile takes at most 2^24 elements; plenty
    assert (emp - (1 - f)).abs().max() < 4e-3  # ~3 standard errors of a quantile at n = 1e5
    assert abs(float(t.mean()) - 0.5) < 3e-3  # symmetric about 1/2
    a = sample_time(1000, "mode", generator=torch.Generator().manual_seed(3), mode_scale=0.0)
    b = sample_time(1000, "uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"mode_scale in \[-1.0, 1.75"):
        sample_time(4, "mode", mode_scale=2.0)


def test_inverse_sqrt_learning_rate_is_edm2s_schedule():
    cfg = Config()
    cfg.optim.lr, cfg.optim.warmup_images = 1e-2, 1000
    assert learning_rate(cfg, 500) == pytest.approx(5e-3, rel=1e-15)
    assert learning_rate(cfg, 10**6) == 1e-2  # constant after the warm-up
    cfg.optim.schedule, cfg.optim.decay_images = "inverse-sqrt", 4000
    assert learning_rate(cfg, 500) == pytest.approx(5e-3, rel=1e-15)  # warm-up first
    assert learning_rate(cfg, 4000) == 1e-2
    assert learning_rate(cfg, 16000) == pytest.approx(5e-3, rel=1e-15)  # 1 / sqrt(4)
    assert learning_rate(cfg, 36000) == pytest.approx(1e-2 / 3, rel=1e-15)
    cfg.optim.decay_images = 0
    with pytest.raises(ConfigError, match="inverse-sqrt needs optim.decay_images > 0"):
        validate(cfg)


def test_uncertainty_starts_at_zero_and_learns_the_log_of_each_times_loss():
    torch.manual_seed(0)
    head = LogVar()
    t = torch.rand(512)
    assert torch.equal(head(t), torch.zeros(512))  # zero init: the loss as it is
    true = 0.3 + 2 * t  # a loss that grows with t
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(600):
        u = head(t)
        (true / u.exp() + u).mean().backward()
        opt.step()
        opt.zero_grad()
    # minimised by u = ln L(t) (d/du: 1 - L e^{-u} = 0)
    assert (head(t) - true.log()).abs().max() < 0.05


MODULE = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(1, 12, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3))  # (B, 12)

def make():
    return Net()
"""


@pytest.mark.slow
def test_repa_and_uncertainty_heads_train_resume_exactly_and_stay_out_of_exports(shards, tmp_path):
    (tmp_path / "feat.py").write_text(textwrap.dedent(MODULE))
    extra = ["train.deterministic=true", "loss.uncertainty=true", "loss.reweight=edm",
             "loss.time_sampling=mode", f"repa.feature_network=module:{tmp_path / 'feat.py'}:make",
             "optim.schedule=inverse-sqrt", "optim.decay_images=32", "repa.hidden=16"]  # fmt: skip
    full = train_tiny(shards, tmp_path / "full", 4, *extra)
    half = tmp_path / "half"
    first = train_tiny(shards, half, 2, *extra)
    h_mid = read_tensors(first.checkpoint, HEADS_FILE)
    second = train_tiny(shards, half, 4, *extra, resume="auto")
    (w_full, e_full), (w_res, e_res) = weights(latest(full.run_dir)), weights(latest(half))
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for a, b in zip(e_full, e_res, strict=True):
        assert torch.equal(a, b)
    h_full, h_res = (read_tensors(latest(d), HEADS_FILE) for d in (full.run_dir, half))
    assert set(h_full) >= {"logvar.linear.weight", "repa.mlp.4.weight"}
    for k in h_full:
        assert torch.equal(h_full[k], h_res[k]), k
    # the heads trained: the uncertainty left zero, the projector moved
    assert h_mid["logvar.linear.weight"].abs().sum() > 0
    assert not torch.equal(h_mid["repa.mlp.4.weight"], h_res["repa.mlp.4.weight"])
    # exports hold the model alone and sample
    loaded = load_model(second.export_dir)
    assert not any("repa" in n or "logvar" in n for n, _ in loaded.model.named_parameters())
    r = run_main("sample", "--checkpoint", second.export_dir, "--per-class", 1, "--steps", 2,
                 "--out", tmp_path / "g.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    # resuming without the heads is a one-line refusal
    with pytest.raises(Exception, match="has training heads"):
        train_tiny(shards, half, 6, "train.deterministic=true", resume="auto")


def test_repa_pulls_the_backbone_towards_the_target_and_names_a_bad_layer(shards, tmp_path):
    from fmgen.models import build_conditioning, build_model
    from fmgen.train.heads import RepaTarget, build_heads, recipe_terms

    (tmp_path / "feat.py").write_text(textwrap.dedent(MODULE))
    over = ["data.resolution=8", "model.unet.block_out_channels=[8,16]", f"data.path={shards}",
            f"repa.feature_network=module:{tmp_path / 'feat.py'}:make", "repa.hidden=8",
            f"train.run_dir={tmp_path / 'r'}"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "digits.yaml", over)
    torch.manual_seed(0)
    model = build_model(cfg, build_conditioning(cfg, 10))
    target = RepaTarget(cfg, "cpu")
    heads, capture = build_heads(cfg, model, target.dim)
    assert target.dim == 12 and heads.logvar is None and heads.repa is not None
    z, t, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4), torch.arange(4)
    with capture.on():
        model(z, t, y)
    assert capture.value.shape == (4, 16, 16)  # the mid block: 16 channels on a 4x4 map
    per = recipe_terms(cfg, get_path("linear"), torch.zeros(4), t, z, heads, capture, target)
    per.sum().backward()
    mid = model.backbone.mid_block
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mid.parameters())
    assert (per > 0).all() and (per <= 2 * cfg.repa.weight).all()  # 0.5 * (1 - cos)
    cfg.repa.layer = "nope"
    with pytest.raises(ConfigError, match="repa.layer: 'nope' is not a module"):
        build_heads(cfg, model, target.dim)
