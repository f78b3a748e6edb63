"""Backbones that read text: ``unet-text`` (diffusers' ``UNet2DConditionModel``) and ``dit-text``
(diffusers' ``PixArtTransformer2DModel``, with the pooled text added to its adaLN-single).

Text conditioning builds the text variant of ``model.type`` (``unet`` -> ``unet-text``, ``dit`` ->
``dit-text``), with the same ``model.unet.*`` / ``model.dit.*`` options. Both take the token
states through cross-attention with the token mask (padding never gets attention) and the pooled
vector through the time embedding.

Why PixArt's transformer for the DiT (``bench/text_backbones.py`` measures both at equal width
and depth): cross-attention honours the token mask, so a prompt's result does not depend on the
padding to ``text.max_length``; diffusers' ``SD3Transformer2DModel`` (MMDiT) runs joint attention
over image and text tokens with no mask, so its padded tokens take part in every block. PixArt
has no pooled-text input of its own; ``TextDiT`` adds one (an MLP of the pooled vector added to
the timestep embedding, which feeds every block's adaLN-single modulation and the final layer).
"""

from __future__ import annotations

import inspect

import torch

# ModelMixin must be a name of this module (see fmgen.models.dit): diffusers' pipeline loader
# finds a custom component's loading method through the base classes in its module
from diffusers import ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel  # noqa: F401
from diffusers.models.normalization import AdaLayerNormSingle
from torch import Tensor, nn

from fmgen.config import Config
from fmgen.models.backbones import BackboneSpec, Shape, register_backbone
from fmgen.models.conditioning import Conditioning, TextConditioning
from fmgen.models.dit import check_dit
from fmgen.models.interval import IntervalEmbedding
from fmgen.models.text import TextEmbedding
from fmgen.models.unet import TIME_SCALE, check_unet


def _dims(conditioning: Conditioning) -> tuple[int, int]:
    assert isinstance(conditioning, TextConditioning), "text backbones need text conditioning"
    return conditioning.token_dim, conditioning.pooled_dim


# --- unet-text -----------------------------------------------------------------------------------


def build_text_unet(cfg: Config, shape: Shape, conditioning: Conditioning,
                    cls: type[UNet2DConditionModel] = UNet2DConditionModel) -> UNet2DConditionModel:  # fmt: skip
    """A UNet2DConditionModel: cross-attention to the tokens at ``model.unet.attention_levels``
    (default: every level but the first, full-resolution one) and in the middle block; the
    pooled vector projected into the time embedding (``class_embed_type="projection"``)."""
    u = cfg.model.unet
    token_dim, pooled_dim = _dims(conditioning)
    n = len(u.block_out_channels)
    attn = set(u.attention_levels) or set(range(1, n)) or {0}
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads
    heads = tuple(max(1, c // u.attention_head_dim) for c in u.block_out_channels)
    return cls(
        sample_size=shape[1],
        in_channels=shape[0],
        out_channels=shape[0],
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        norm_num_groups=u.norm_num_groups,
        dropout=u.dropout,
        cross_attention_dim=token_dim,
        attention_head_dim=heads,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=pooled_dim,
    )


def call_text_unet(unet: UNet2DConditionModel, x: Tensor, t: Tensor, emb: TextEmbedding) -> Tensor:
    return unet(x, t * TIME_SCALE, encoder_hidden_states=emb.tokens, class_labels=emb.pooled,
                encoder_attention_mask=emb.mask).sample  # fmt: skip


# --- dit-text ------------------------------------------------------------------------------------


class PooledAdaLayerNormSingle(AdaLayerNormSingle):
    """adaLN-single whose timestep embedding also gets an MLP of the pooled text (``pooled_dim``
    > 0) and, for average-velocity models, the interval's embedding (``interval``)."""

    def __init__(self, embedding_dim: int, pooled_dim: int, interval: nn.Module | None = None):
        super().__init__(embedding_dim, use_additional_conditions=False)
        self.pooled = None
        if pooled_dim:
            self.pooled = nn.Sequential(nn.Linear(pooled_dim, embedding_dim), nn.SiLU(),
                                        nn.Linear(embedding_dim, embedding_dim))  # fmt: skip
        self.interval = interval

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        emb = self.emb(timestep, resolution=None, aspect_ratio=None, batch_size=batch_size,
                       hidden_dtype=hidden_dtype)  # (B, width)
        extra = added_cond_kwargs or {}
        if self.pooled is not None and extra.get("pooled") is not None:
            emb = emb + self.pooled(extra["pooled"].to(emb.dtype))
        if self.interval is not None:
            h = extra.get("interval")
            h = torch.zeros(emb.shape[0], device=emb.device) if h is None else h
            emb = emb + self.interval(h, emb.dtype)
        return self.linear(self.silu(emb)), emb


class TextDiT(PixArtTransformer2DModel):
    """``PixArtTransformer2DModel`` with a pooled-text input (``pooled_channels``; 0 = none) and,
    for average-velocity models (``interval_embedding``), an embedding of the interval r - t
    passed as ``added_cond_kwargs["interval"]`` (``fmgen.models.average``).

    Its signature is diffusers' own plus these two, so the saved config.json rebuilds it with
    ``from_pretrained``.
    """

    def __init__(self, *args, pooled_channels: int = 0, interval_embedding: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(pooled_channels=pooled_channels, interval_embedding=interval_embedding)
        if pooled_channels or interval_embedding:
            interval = IntervalEmbedding(self.inner_dim) if interval_embedding else None
            self.adaln_single = PooledAdaLayerNormSingle(self.inner_dim, pooled_channels, interval)


_parent = inspect.signature(PixArtTransformer2DModel.__init__)
TextDiT.__init__.__signature__ = _parent.replace(  # type: ignore[attr-defined]
    parameters=[*_parent.parameters.values(),
                inspect.Parameter("pooled_channels", inspect.Parameter.KEYWORD_ONLY, default=0),
                inspect.Parameter("interval_embedding", inspect.Parameter.KEYWORD_ONLY,
                                  default=False)]
)  # fmt: skip


def build_text_dit(cfg: Config, shape: Shape, conditioning: Conditioning, *,
                   interval_embedding: bool = False) -> TextDiT:  # fmt: skip
    """A PixArt-style DiT: self-attention over patches, cross-attention to the tokens, the
    timestep and pooled text in adaLN-single. Output layer and cross-attention outputs start at
    zero (as DiT/PixArt initialise), so the untrained model predicts 0 and reads no text."""
    d = cfg.model.dit
    token_dim, pooled_dim = _dims(conditioning)
    dit = TextDiT(
        num_attention_heads=d.heads,
        attention_head_dim=d.width // d.heads,
        in_channels=shape[0],
        out_channels=shape[0],
        num_layers=d.depth,
        dropout=d.dropout,
        cross_attention_dim=d.width,
        caption_channels=token_dim,
        sample_size=shape[1],
        patch_size=d.patch_size,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        pooled_channels=pooled_dim,
        interval_embedding=interval_embedding,
    )
    for block in dit.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(dit.proj_out.weight)
    nn.init.zeros_(dit.proj_out.bias)
    return dit


def call_text_dit(dit: TextDiT, x: Tensor, t: Tensor, emb: TextEmbedding) -> Tensor:
    return dit(x, encoder_hidden_states=emb.tokens, timestep=t * TIME_SCALE,
               added_cond_kwargs={"pooled": emb.pooled},
               encoder_attention_mask=emb.mask).sample  # (B, C, H, W)  # fmt: skip


UNET_TEXT = register_backbone(
    BackboneSpec("unet-text", UNet2DConditionModel, build=build_text_unet, call=call_text_unet,
                 check=check_unet, reads_text=True, interval_variant="unet-text-meanflow")  # fmt: skip
)
DIT_TEXT = register_backbone(
    BackboneSpec("dit-text", TextDiT, build=build_text_dit, call=call_text_dit, check=check_dit,
                 reads_text=True, interval_variant="dit-text-meanflow")  # fmt: skip
)
