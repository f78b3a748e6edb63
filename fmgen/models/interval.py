"""The embedding of the interval h = r - t that average-velocity backbones add to their time
embedding (``fmgen.models.average``, ``fmgen.models.text_backbones.TextDiT``)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

PROJ_CHANNELS = 256  # sinusoidal features of the interval (DiT's and PixArt's timestep width)


class IntervalEmbedding(nn.Module):
    """An MLP of sinusoidal features of the interval h (B,), scaled like the time (1000 h);
    the output layer starts at zero."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = Timesteps(PROJ_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(PROJ_CHANNELS, dim)
        zero_output(self)

    def forward(self, h: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(self.proj(h).to(dtype))  # (B, dim)


def zero_output(emb: IntervalEmbedding) -> None:
    nn.init.zeros_(emb.mlp.linear_2.weight)
    nn.init.zeros_(emb.mlp.linear_2.bias)
