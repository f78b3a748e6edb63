"""Backbones with a second time input, for models of the average velocity (``loss.name: meanflow``).

A MeanFlow model predicts u(x, t, r), the average velocity over [t, r] of the ODE through x at
time t (``fmgen.core.meanflow``), so its network reads two times. Each backbone keeps its time
embedding of t and adds an embedding of the interval h = r - t (Geng et al. 2025 condition on
(t, t - r) in their time, the best of their ablations) to it:

- ``unet-meanflow`` / ``unet-text-meanflow``: the interval's embedding joins the U-Net's class
  embedding (labels, the pooled text, or nothing for an unconditional model), which diffusers'
  U-Nets add to the time embedding;
- ``dit-meanflow``: every block's adaLN-Zero embedding (its timestep MLP plus its label table)
  gets an interval MLP of its own, as it has a timestep MLP of its own;
- ``dit-text-meanflow``: the adaLN-single embedding of ``TextDiT`` adds the interval MLP.

The interval MLP's output layer starts at zero, so an untrained model's u does not depend on r
and its r = t output is the flow-matching velocity of the same network. The subclasses keep
their parent's signature (``functools.wraps``), so ``from_pretrained`` of an export rebuilds them.

``forward_ad_ready`` prepares a module for ``torch.func.jvp`` (the MeanFlow target's d/dt u).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# ModelMixin must be a name of this module (see fmgen.models.dit): diffusers' pipeline loader
# finds a custom component's loading method through the base classes in its module
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel  # noqa: F401
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmgen.config import Config
from fmgen.models.backbones import BackboneSpec, Shape, register_backbone
from fmgen.models.conditioning import Conditioning
from fmgen.models.dit import DiT, build_dit, check_dit
from fmgen.models.interval import IntervalEmbedding, zero_output
from fmgen.models.text import TextEmbedding
from fmgen.models.text_backbones import TextDiT, build_text_dit, build_text_unet
from fmgen.models.unet import TIME_SCALE, build_unet, check_unet


class WithInterval(nn.Module):
    """A class embedding (``inner``: labels, pooled text, or None) plus the interval's: called
    with the pair (condition, h) that the average backbones pass as their ``class_labels``."""

    def __init__(self, inner: nn.Module | None, dim: int):
        super().__init__()
        self.inner = inner
        self.interval = IntervalEmbedding(dim)

    def forward(self, pair: tuple[Tensor | None, Tensor]) -> Tensor:
        cond, h = pair
        if self.inner is None:
            return self.interval(h, self.interval.mlp.linear_1.weight.dtype)
        own = self.inner(cond)  # (B, dim)
        return own + self.interval(h, own.dtype)


def _pair(class_labels: Tensor | None, interval: Tensor | None, like: Tensor) -> tuple:
    h = interval if interval is not None else torch.zeros(like.shape[0], device=like.device)
    return class_labels, h


class AverageUNet(UNet2DModel):
    """``UNet2DModel`` whose class embedding also embeds the interval: ``forward(...,
    interval=h)`` with h (B,) = 1000 (r - t); None means r = t."""

    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_embedding = WithInterval(self.class_embedding, self.time_embedding.linear_2.out_features)

    def forward(self, sample, timestep, class_labels=None, return_dict=True, *, interval=None):
        pair = _pair(class_labels, interval, sample)
        return super().forward(sample, timestep, class_labels=pair, return_dict=return_dict)


class AverageTextUNet(UNet2DConditionModel):
    """``UNet2DConditionModel`` whose pooled-text projection also embeds the interval."""

    @functools.wraps(UNet2DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_embedding = WithInterval(self.class_embedding, self.time_embedding.linear_2.out_features)

    def forward(self, sample, timestep, *args, class_labels=None, interval=None, **kwargs):
        pair = _pair(class_labels, interval, sample)
        return super().forward(sample, timestep, *args, class_labels=pair, **kwargs)


class AverageDiT(DiT):
    """fmgen's ``DiT`` whose every block's label embedding also embeds the interval."""

    @functools.wraps(DiT.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.transformer_blocks:
            emb = block.norm1.emb
            emb.class_embedder = WithInterval(emb.class_embedder, emb.timestep_embedder.linear_2.out_features)

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, interval=None, **kwargs):
        pair = _pair(class_labels, interval, hidden_states)
        return super().forward(hidden_states, timestep, pair, *args, **kwargs)


# --- build and call ----------------------------------------------------------------------------


def _zero_intervals(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, IntervalEmbedding):
            zero_output(m)  # after any initialisation of the backbone's own (init_like_dit)
    return model


def build_average_unet(cfg: Config, shape: Shape, conditioning: Conditioning) -> AverageUNet:
    return _zero_intervals(build_unet(cfg, shape, conditioning, AverageUNet))


def build_average_text_unet(cfg: Config, shape: Shape, conditioning: Conditioning) -> AverageTextUNet:
    return _zero_intervals(build_text_unet(cfg, shape, conditioning, AverageTextUNet))


def build_average_dit(cfg: Config, shape: Shape, conditioning: Conditioning) -> AverageDiT:
    return _zero_intervals(build_dit(cfg, shape, conditioning, AverageDiT))


def build_average_text_dit(cfg: Config, shape: Shape, conditioning: Conditioning) -> TextDiT:
    return _zero_intervals(build_text_dit(cfg, shape, conditioning, interval_embedding=True))


def call_average_unet(unet: AverageUNet, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor) -> Tensor:
    return unet(x, t * TIME_SCALE, class_labels=cond, interval=(r - t) * TIME_SCALE).sample


def call_average_text_unet(unet: AverageTextUNet, x: Tensor, t: Tensor, emb: TextEmbedding,
                           r: Tensor) -> Tensor:  # fmt: skip
    return unet(x, t * TIME_SCALE, encoder_hidden_states=emb.tokens, class_labels=emb.pooled,
                encoder_attention_mask=emb.mask, interval=(r - t) * TIME_SCALE).sample  # fmt: skip


def call_average_dit(dit: AverageDiT, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor) -> Tensor:
    if cond is None:  # unconditional: the one class
        cond = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return dit(x, t * TIME_SCALE, class_labels=cond, interval=(r - t) * TIME_SCALE).sample


def call_average_text_dit(dit: TextDiT, x: Tensor, t: Tensor, emb: TextEmbedding, r: Tensor) -> Tensor:
    return dit(x, encoder_hidden_states=emb.tokens, timestep=t * TIME_SCALE,
               added_cond_kwargs={"pooled": emb.pooled, "interval": (r - t) * TIME_SCALE},
               encoder_attention_mask=emb.mask).sample  # (B, C, H, W)  # fmt: skip


UNET_MEANFLOW = register_backbone(
    BackboneSpec("unet-meanflow", AverageUNet, build=build_average_unet, call=call_average_unet,
                 check=check_unet, text_variant="unet-text-meanflow", reads_interval=True)  # fmt: skip
)
UNET_TEXT_MEANFLOW = register_backbone(
    BackboneSpec("unet-text-meanflow", AverageTextUNet, build=build_average_text_unet,
                 call=call_average_text_unet, check=check_unet, reads_text=True,
                 reads_interval=True)  # fmt: skip
)
DIT_MEANFLOW = register_backbone(
    BackboneSpec("dit-meanflow", AverageDiT, build=build_average_dit, call=call_average_dit,
                 check=check_dit, text_variant="dit-text-meanflow", reads_interval=True)  # fmt: skip
)
DIT_TEXT_MEANFLOW = register_backbone(
    BackboneSpec("dit-text-meanflow", TextDiT, build=build_average_text_dit,
                 call=call_average_text_dit, check=check_dit, reads_text=True,
                 reads_interval=True)  # fmt: skip
)


# --- forward-mode AD ---------------------------------------------------------------------------


@contextlib.contextmanager
def forward_ad_ready(module: nn.Module) -> Iterator[None]:
    """Let ``torch.func.jvp`` run through ``module`` (torch 2.13), for the calls inside.

    - Attention through the math kernel: the fused CPU and CUDA attention kernels have no
      forward-mode derivative ("Trying to use forward AD with _scaled_dot_product_flash_attention
      _for_cpu that does not support it").
    - GroupNorm inputs made contiguous: its forward-mode formula views the tangent, which fails on
      the permuted layout diffusers' attention blocks leave ("view size is not compatible with
      input tensor's size and stride"); the values are the same.
    - Autocast off (the caller passes float32 inputs): under CPU autocast the forward-mode
      convolution meets a float32 tangent and a bfloat16 weight and fails; the MeanFlow target
      is a stop-gradient regression target, so computing it in float32 costs accuracy nothing.
    """
    hooks = [m.register_forward_pre_hook(_contiguous_input) for m in module.modules()
             if isinstance(m, nn.GroupNorm)]  # fmt: skip
    device = next(module.parameters()).device.type
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.autocast(device, enabled=False):
            yield
    finally:
        for h in hooks:
            h.remove()


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])
