"""``model.type: dit``: diffusers' ``DiTTransformer2DModel``, a SiT when trained on a flow path.

Its options are ``model.dit.*`` (``fmgen.config.DiTConfig``) and are checked here. How fmgen's
call maps onto the DiT:

- t in [0, 1] reaches its sinusoidal timestep embedding as 1000 t: the embedding's frequencies
  (max period 10,000) are tuned for DDPM's integer steps in [0, 1000); fed t in [0, 1], its
  low-frequency half would be nearly constant and the network could hardly tell times apart.
- Labels: the DiT's label table has ``num_embeds_ada_norm`` real rows plus one "dropped" row
  at index ``num_embeds_ada_norm``, which is exactly fmgen's null label ``num_classes``. The DiT
  would also drop labels itself while training (10%, from the global RNG); fmgen drops them
  already, seeded per sample (``Conditioning.dropout_mask``), so ``DiT`` switches that off.
- Unconditional models: the DiT's adaLN-Zero always takes a label, so they get one class
  (``num_embeds_ada_norm=1``) and every sample the constant label 0.
- No learned variance: ``out_channels = in_channels``, so the output is the prediction alone.
"""

from __future__ import annotations

import functools

import torch

# ModelMixin must be a name of this module: diffusers' pipeline loader finds the loading method
# of a component outside its libraries by looking its base classes up in the component's module
# (model_index.json records DiT as ["fmgen.models.dit", "DiT"]); without it FlowPipeline
# .from_pretrained of a DiT export fails with "cannot be loaded"
from diffusers import DiTTransformer2DModel, ModelMixin  # noqa: F401
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor, nn

from fmgen.config import Config, ConfigError
from fmgen.models.backbones import BackboneSpec, Shape, register_backbone
from fmgen.models.conditioning import Conditioning

TIME_SCALE = 1000.0


class DiT(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose label embeddings never drop labels themselves.

    The signature (and so the saved ``config.json``) is diffusers' own: ``functools.wraps``
    hands diffusers' config machinery the parent's parameters, and ``from_pretrained`` of an
    export builds this class again, dropout off.
    """

    @functools.wraps(DiTTransformer2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for m in self.modules():
            if isinstance(m, LabelEmbedding):
                m.dropout_prob = 0.0  # fmgen's seeded dropout is the only one


def check_dit(cfg: Config, shape: Shape) -> None:
    d = cfg.model.dit
    for key in ("patch_size", "depth", "width", "heads"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"model.dit.{key}: must be > 0, got {getattr(d, key)}")
    if d.width % d.heads:
        raise ConfigError(
            f"model.dit.width: {d.width} must be divisible by model.dit.heads={d.heads} "
            f"(each head gets width / heads channels)"
        )
    if d.width % 4:
        raise ConfigError(
            f"model.dit.width: {d.width} must be a multiple of 4 (the 2-D sin-cos position "
            f"embedding splits it in four)"
        )
    if not 0 <= d.dropout < 1:
        raise ConfigError(f"model.dit.dropout: must lie in [0, 1), got {d.dropout}")
    if shape[1] % d.patch_size or shape[2] % d.patch_size:
        raise ConfigError(
            f"model.dit.patch_size: {d.patch_size} does not divide the DiT's input "
            f"{shape[1]}x{shape[2]} (data.resolution, after the autoencoder stage); choose a "
            f"patch size that divides {shape[1]}"
        )


def label_table(emb: nn.Module) -> nn.Embedding:
    """The label table of a block's adaLN-Zero embedding (looking through a wrapper's ``inner``)."""
    labels = emb.class_embedder
    return getattr(labels, "inner", labels).embedding_table


def init_like_dit(dit: DiTTransformer2DModel) -> None:
    """The DiT paper's initialisation (facebookresearch/DiT ``initialize_weights``).

    diffusers keeps PyTorch's defaults; adaLN-Zero means the modulations and the output layer
    start at zero, so every block starts as the identity and the network predicts 0.
    """
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    proj = dit.pos_embed.proj.weight  # (width, C, p, p): xavier as the linear layer it is
    nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    nn.init.zeros_(dit.pos_embed.proj.bias)
    for block in dit.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(label_table(emb).weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: shift, scale and gates start at 0
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_dit(cfg: Config, shape: Shape, conditioning: Conditioning, cls: type[DiT] = DiT) -> DiT:
    """A DiT (or its subclass ``cls``) for samples of ``shape``; its extra "dropped" label row is
    fmgen's null label."""
    d = cfg.model.dit
    rows = conditioning.num_embeddings  # real classes + the null label, or None
    dit = cls(
        num_attention_heads=d.heads,
        attention_head_dim=d.width // d.heads,
        in_channels=shape[0],
        out_channels=shape[0],
        num_layers=d.depth,
        dropout=d.dropout,
        sample_size=shape[1],
        patch_size=d.patch_size,
        num_embeds_ada_norm=rows - 1 if rows else 1,
    )
    table = label_table(dit.transformer_blocks[0].norm1.emb)
    assert table.num_embeddings == (rows or 2), "diffusers' DiT label table changed its layout"
    init_like_dit(dit)
    return dit


def call_dit(dit: DiT, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    if cond is None:  # unconditional: the one class
        cond = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return dit(x, t * TIME_SCALE, class_labels=cond).sample  # (B, C, H, W)


DIT = register_backbone(
    BackboneSpec("dit", DiT, build=build_dit, call=call_dit, check=check_dit, text_variant="dit-text",
                 interval_variant="dit-meanflow")
)
