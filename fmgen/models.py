"""The network: diffusers' ``UNet2DModel`` plus a wrapper that declares its prediction type.

The wrapper maps (x, t, y) with t in [0, 1] (0 = noise, 1 = data) to the declared target.
Class conditioning reserves one extra embedding row, index ``num_classes``, as the null
label used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from fmgen.config import ModelConfig
from fmgen.paths import GaussianPath, check_prediction_type

# UNet2DModel's sinusoidal time embedding is tuned for DDPM's integer steps in [0, 1000).
TIME_SCALE = 1000.0


def build_unet(
    cfg: ModelConfig, *, resolution: int, channels: int, num_classes: int
) -> UNet2DModel:
    """A UNet2DModel from the model config; one extra class row is the null label."""
    n = len(cfg.block_out_channels)
    attn = set(cfg.attention_levels)
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=num_classes + 1 if cfg.class_conditional else None,
    )


class FlowModel(nn.Module):
    """A network with a declared prediction type: ``forward(x, t, y) -> prediction``.

    Args:
        unet: the backbone; class-conditional when it has a class embedding.
        prediction_type: what the backbone's output means (velocity, eps, score or x0).
        num_classes: number of real classes; label ``num_classes`` is the null label.
    """

    def __init__(self, unet: UNet2DModel, prediction_type: str, num_classes: int):
        super().__init__()
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        self.num_classes = num_classes
        self.conditional = unet.config.num_class_embeds is not None

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) in [0, 1]; y: (B,) labels or None (unconditional)."""
        labels = None
        if self.conditional:
            labels = y if y is not None else torch.full_like(t, self.null_label, dtype=torch.long)
        elif y is not None and bool((y != self.null_label).any()):
            raise ValueError(
                "labels were given to a model built with model.class_conditional=false"
            )
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.unet(x, t * TIME_SCALE, class_labels=labels).sample

    def predict(
        self, x: Tensor, t: Tensor, y: Tensor | None, *, path: GaussianPath, as_type: str
    ) -> Tensor:
        """The prediction converted to ``as_type`` through the path's conversions."""
        out = self(x, t, y)
        return path.convert(out, x, t, self.prediction_type, as_type)


def drop_labels(y: Tensor, drop: Tensor, null_label: int) -> Tensor:
    """Replace labels by the null label where ``drop`` (a per-sample bool mask) is set."""
    return torch.where(drop, torch.full_like(y, null_label), y)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_gradient(params: list[nn.Parameter], loss: Callable[[], Tensor]) -> Tensor:
    """The gradient of ``loss()`` over ``params`` as one float64 vector; ``.grad`` left cleared."""
    for p in params:
        p.grad = None
    loss().backward()
    flat = torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]
    )
    for p in params:
        p.grad = None
    return flat.double()
