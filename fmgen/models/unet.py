"""``model.type: unet``: diffusers' ``UNet2DModel``, class-conditional through its class embedding.

Its options are ``model.unet.*`` (``fmgen.config.UNetConfig``) and are checked here. The U-Net's
sinusoidal time embedding is tuned for DDPM's integer steps in [0, 1000), so fmgen's t in [0, 1]
reaches it as 1000 t; the conditioning's null label is one extra row of its class embedding.
"""

from __future__ import annotations

from diffusers import UNet2DModel
from torch import Tensor

from fmgen.config import Config, ConfigError
from fmgen.models.backbones import BackboneSpec, Shape, register_backbone
from fmgen.models.conditioning import Conditioning

TIME_SCALE = 1000.0


def check_unet(cfg: Config, shape: Shape) -> None:
    u = cfg.model.unet
    blocks = u.block_out_channels
    if u.layers_per_block <= 0:
        raise ConfigError(f"model.unet.layers_per_block: must be > 0, got {u.layers_per_block}")
    if u.norm_num_groups <= 0 or not blocks or any(c <= 0 or c % u.norm_num_groups for c in blocks):
        raise ConfigError(
            f"model.unet.block_out_channels: {blocks} must be positive multiples of "
            f"model.unet.norm_num_groups={u.norm_num_groups}"
        )
    for i in u.attention_levels:
        if not 0 <= i < len(blocks):
            raise ConfigError(
                f"model.unet.attention_levels: level {i} does not exist; valid levels "
                f"0..{len(blocks) - 1}"
            )
    if not 0 <= u.dropout < 1:
        raise ConfigError(f"model.unet.dropout: must lie in [0, 1), got {u.dropout}")
    factor = 2 ** (len(blocks) - 1)
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(
            f"the U-Net's input {shape[1]}x{shape[2]} (data.resolution) must be divisible by "
            f"2^(len(model.unet.block_out_channels)-1)={factor} (one downsampling per extra block)"
        )


def build_unet(cfg: Config, shape: Shape, conditioning: Conditioning,
               cls: type[UNet2DModel] = UNet2DModel) -> UNet2DModel:  # fmt: skip
    """A UNet2DModel (or its subclass ``cls``) for samples of ``shape``; one extra class row is
    the null label."""
    u = cfg.model.unet
    n = len(u.block_out_channels)
    attn = set(u.attention_levels)
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    return cls(
        sample_size=shape[1],
        in_channels=shape[0],
        out_channels=shape[0],
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        dropout=u.dropout,
        num_class_embeds=conditioning.num_embeddings,
    )


def call_unet(unet: UNet2DModel, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    return unet(x, t * TIME_SCALE, class_labels=cond).sample


UNET = register_backbone(
    BackboneSpec("unet", UNet2DModel, build=build_unet, call=call_unet, check=check_unet,
                 text_variant="unet-text", interval_variant="unet-meanflow")  # fmt: skip
)
