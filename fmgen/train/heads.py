"""What a recipe adds to training besides the model: the learning-rate schedule, and the training
heads (EDM2's learned uncertainty u(t), REPA's projection MLP) with REPA's frozen target network.

The heads are a module of their own, not part of the model: they train with it (one optimizer,
DDP-wrapped like it, saved in checkpoints as ``heads.safetensors``) but sampling never runs them,
so exports, EMA and ``load_model`` see the model alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fmgen.config import Config, ConfigError
from fmgen.core import GaussianPath, reweight_factor
from fmgen.eval import feature_spec  # registers every feature network
from fmgen.eval.images import to_uint8
from fmgen.models import FlowModel

FOURIER_FEATURES = 64  # EDM2's logvar head reads 128 Fourier features of its c_noise


def learning_rate(cfg: Config, images: int) -> float:
    """The learning rate of the step that ends at ``images`` images seen.

    A linear warm-up over ``optim.warmup_images``, times the schedule's factor: 1 (constant), or
    EDM2's inverse square root 1 / sqrt(max(images / decay_images, 1)) (Karras et al. 2024,
    eq. 3: constant until decay_images, then ~ 1 / sqrt(images))."""
    o = cfg.optim
    lr = o.lr * min(1.0, images / max(1, o.warmup_images))
    if o.schedule == "inverse-sqrt":
        lr /= math.sqrt(max(images / o.decay_images, 1.0))
    return lr


class LogVar(nn.Module):
    """EDM2's uncertainty u(t): a linear map of fixed Fourier features of c = -logit(t) / 4, which
    on the linear path is EDM2's c_noise = ln(sigma) / 4 (sigma = (1 - t) / t = beta / alpha).

    The loss L(t) becomes L(t) / exp(u(t)) + u(t), minimised over u by u = ln E[L | t]: each t's
    loss is scaled by its own running size, so every noise level contributes alike
    (Karras et al. 2024, section 2, "uncertainty-based multi-task weighting")."""

    def __init__(self, features: int = FOURIER_FEATURES) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)  # EDM2's MPFourier: random frequencies and phases
        self.register_buffer("freqs", torch.randn(features, generator=g))
        self.register_buffer("phases", torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)  # u = 0 at the start: the loss as it is
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        t = t.float().clamp(1e-6, 1 - 1e-6)
        c = -torch.logit(t) / 4  # (B,)
        f = torch.cos(2 * math.pi * (c[:, None] * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(f).squeeze(1)  # (B,)


class RepaHead(nn.Module):
    """REPA's projector: a 3-layer MLP with SiLU from the backbone's hidden width to the target
    network's feature width, applied to each token, then averaged over the tokens (fmgen's
    feature seam gives one (B, D) vector per image, so the tokens' mean is aligned with it)."""

    def __init__(self, width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out))  # fmt: skip

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h).mean(1)  # (B, N, W) -> (B, D)


class TrainingHeads(nn.Module):
    """The recipe's trainable heads: ``logvar`` (loss.uncertainty) and ``repa`` (repa.*), each
    None when off. ``forward(t, hidden)`` -> (u (B,) or None, projected (B, D) or None)."""

    def __init__(self, logvar: LogVar | None, repa: RepaHead | None) -> None:
        super().__init__()
        self.logvar, self.repa = logvar, repa

    def forward(self, t: Tensor, hidden: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        u = self.logvar(t) if self.logvar is not None else None
        p = self.repa(hidden) if self.repa is not None and hidden is not None else None
        return u, p


def repa_layer(cfg: Config, model: FlowModel) -> nn.Module:
    """The backbone module REPA reads: ``repa.layer``, or the backbone's default."""
    modules = dict(model.backbone.named_modules())
    name = cfg.repa.layer
    if not name:
        if "mid_block" in modules:
            name = "mid_block"
        else:
            blocks = [n for n in modules if n.startswith("transformer_blocks.") and n.count(".") == 1]
            if not blocks:
                raise ConfigError(f"repa.layer: {model.spec.name} has no mid_block or "
                                  f"transformer_blocks; name a module of the backbone")  # fmt: skip
            name = blocks[max(0, len(blocks) // 3 - 1)]
    if name not in modules or not name:
        some = ", ".join(n for n in list(modules)[1:12])
        raise ConfigError(f"repa.layer: {name!r} is not a module of the {model.spec.name} "
                          f"backbone; e.g. {some}")  # fmt: skip
    return modules[name]


def as_tokens(h: Any) -> Tensor:
    """A module's output as tokens (B, N, W): feature maps (B, W, H, W') are flattened."""
    if isinstance(h, tuple):
        h = h[0]
    if not isinstance(h, Tensor) or h.ndim not in (3, 4):
        raise ConfigError(f"repa.layer: the module's output is {type(h).__name__} "
                          f"{tuple(getattr(h, 'shape', ()))}; REPA needs (B, C, H, W) maps or (B, N, C) "
                          f"tokens: name another module")  # fmt: skip
    return h.flatten(2).transpose(1, 2) if h.ndim == 4 else h


class Capture:
    """Keeps the latest output of a module (a forward hook) while ``active``."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.active = False
        module.register_forward_hook(self._hook)

    def __deepcopy__(self, memo: dict) -> Capture:
        return self  # a model copied for sampling (the EMA copy) keeps the hook, inactive

    def take(self) -> Tensor | None:
        """The captured tokens, released (a graph tensor must not outlive its step)."""
        value, self.value = self.value, None
        return value

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.active:
            self.value = as_tokens(out)

    @contextmanager
    def on(self):
        self.active, self.value = True, None
        try:
            yield self
        finally:
            self.active = False


class RepaTarget:
    """The frozen target: the feature network of ``repa.feature_network`` (the eval seam) applied
    to the clean images, (B, D) float32, no gradients. Images in the model's space are decoded
    first (latent models)."""

    def __init__(self, cfg: Config, device: Any, autoencoder: Any = None) -> None:
        # the user's factory may seed torch's global RNG: the run's random streams stay its own
        with torch.random.fork_rng(devices=[]):
            self.spec = feature_spec(
                cfg.repa.feature_network, path=cfg.repa.feature_network_path,
                resolution=cfg.data.resolution, channels=cfg.data.channels,
                cache_dir=Path(cfg.train.run_dir) / "cache", device=device,
                flags=("repa.feature_network", "repa.feature_network_path"),
            )  # fmt: skip
        if isinstance(self.spec.feature, int):
            raise ConfigError(f"repa.feature_network: {cfg.repa.feature_network} is not a module "
                              f"fmgen can run in training; use dinov2:, module: or torchscript:")  # fmt: skip
        self.autoencoder = autoencoder
        self.dim = self.spec.dim

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        if self.autoencoder is not None and self.autoencoder.kind != "identity":
            z = self.autoencoder.decode(z)
        return self.spec.feature(to_uint8(z)).float()  # the network sees images as stored


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per-sample 1 - cos(projection, target), shape (B,): REPA's negative cosine similarity,
    shifted by 1 so that it is 0 at perfect alignment."""
    return 1 - F.cosine_similarity(projected.float(), target, dim=1)


def recipe_terms(cfg: Config, path: GaussianPath, per_sample: Tensor, t: Tensor, z: Tensor,
                 heads: nn.Module | None, capture: Capture | None,
                 target: RepaTarget | None) -> Tensor:  # fmt: skip
    """The per-sample loss (B,) of the recipe: the path loss reweighted over t (loss.reweight),
    scaled by EDM2's uncertainty (loss.uncertainty), plus REPA's alignment term (repa.*)."""
    lc = cfg.loss
    if lc.reweight != "none":
        r = reweight_factor(path, t, lc.reweight, lc.name, dsm_weighting=lc.weighting,
                            gamma=lc.min_snr_gamma, sigma_data=lc.sigma_data)  # fmt: skip
        per_sample = per_sample * r.to(per_sample.dtype)
    if heads is None:
        return per_sample
    u, projected = heads(t, capture.take() if capture is not None else None)
    if u is not None:
        per_sample = per_sample / u.exp().to(per_sample.dtype) + u
    if projected is not None:
        assert target is not None
        per_sample = per_sample + cfg.repa.weight * repa_loss(projected, target(z))
    return per_sample


def build_heads(cfg: Config, model: FlowModel, target_dim: int) -> tuple[TrainingHeads | None, Capture | None]:
    """The config's heads (None when the recipe has none) and REPA's capture of the backbone
    layer. The layer's width is read from one forward pass of a small batch."""
    logvar = LogVar() if cfg.loss.uncertainty else None
    repa, capture = None, None
    if cfg.repa.feature_network:
        capture = Capture(repa_layer(cfg, model))
        p = next(model.parameters())
        x = torch.zeros((1, *model.sample_shape), device=p.device, dtype=p.dtype)
        with torch.no_grad(), capture.on():
            model(x, torch.full((1,), 0.5, device=p.device))
        assert capture.value is not None
        repa = RepaHead(capture.value.shape[-1], cfg.repa.hidden, target_dim).to(p.device)
    if logvar is None and repa is None:
        return None, None
    return TrainingHeads(logvar, repa).to(next(model.parameters()).device), capture
