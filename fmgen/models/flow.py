"""``FlowModel``: a backbone with a declared prediction type, a conditioning and a sample shape.

The wrapper maps (x, t, c) with t in [0, 1] (0 = noise, 1 = data) to the declared target
(velocity, eps, score or x0). A model of the average velocity (``average``, trained with
``loss.name: meanflow``) also takes r >= t and returns u(x, t, r), the average velocity over [t, r];
at r = t (the default) that is the velocity. It knows its backbone only through the registry's
``BackboneSpec``, so generation, export and loading never read backbone-specific attributes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fmgen.config import Config
from fmgen.core.losses import MEANFLOW
from fmgen.core.paths import check_prediction_type
from fmgen.models.autoencoder import Autoencoder, build_autoencoder
from fmgen.models.backbones import (
    BackboneSpec,
    Shape,
    get_backbone,
    interval_backbone,
    text_backbone,
)
from fmgen.models.conditioning import (
    ClassLabels,
    Conditioning,
    TextConditioning,
    Unconditional,
    learned_encoder_module,
)
from fmgen.models.text import LEARNED, FrozenTextEncoder, encoder_architecture


class FlowModel(nn.Module):
    """A network with a declared prediction type: ``forward(x, t, c) -> prediction``.

    Args:
        backbone: the network (a module of ``spec.module_class``).
        spec: its registry entry (how to call and save it).
        prediction_type: what the backbone's output means (velocity, eps, score or x0).
        conditioning: the condition of a sample and its null value.
        sample_shape: (C, H, W) of the samples in the model's space.
        text_encoder: the learned text encoder, trained with the backbone (None: none; a frozen
            encoder is never a submodule: it lives in the conditioning, outside the parameters).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, *, prediction_type: str,
                 conditioning: Conditioning, sample_shape: Shape,
                 text_encoder: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.spec = spec
        self.prediction_type = check_prediction_type(prediction_type)
        self.conditioning = conditioning
        self.sample_shape = tuple(sample_shape)

    @property
    def average(self) -> bool:
        """Whether the model predicts the average velocity u(x, t, r) (a MeanFlow model)."""
        return self.spec.reads_interval

    @property
    def conditional(self) -> bool:
        return self.conditioning.conditional

    @property
    def num_classes(self) -> int:
        """Real classes of a class-conditional model (0 otherwise)."""
        return getattr(self.conditioning, "num_classes", 0)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) or () in [0, 1]; c: (B, ...) conditions or None (null);
        r: (B,) or () ends of the intervals [t, r] of an average-velocity model (None: r = t)."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.conditional and c is None:
            c = self.conditioning.null(x.shape[0], x.device)
        elif not self.conditional:
            self.conditioning.check(c, x.shape[0])
        if isinstance(self.conditioning, TextConditioning):
            c = self.conditioning.embed(c, self.text_encoder)  # a TextEmbedding
        if self.average:
            r = t if r is None else (r.expand(x.shape[0]) if r.ndim == 0 else r)
            return self.spec.call(self.backbone, x, t, c, r)
        if r is not None:
            raise ValueError(
                "r (the end of an averaging interval) was given to a model of the instantaneous "
                "velocity; only models trained with loss.name=meanflow take it"
            )
        return self.spec.call(self.backbone, x, t, c)

    @property
    def reads_text(self) -> bool:
        return isinstance(self.conditioning, TextConditioning)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> this model's condition rows (B, F) on the CPU (text models only)."""
        if not self.reads_text:
            from fmgen.models.conditioning import ConditionError

            raise ConditionError(
                "prompts were given to a model trained without text (a class-label or "
                "unconditional model); sample it with --labels or --num-samples"
            )
        return self.conditioning.encode(prompts)


def build_conditioning(cfg: Config, num_classes: int,
                       frozen: FrozenTextEncoder | None = None) -> Conditioning:  # fmt: skip
    """Captions (``model.text_encoder`` set), class labels with the config's dropout, or none
    (``model.class_conditional=false``, or data without labels: ``num_classes`` 0).

    A frozen encoder is loaded from its folder (on the CPU) unless ``frozen`` gives it."""
    if cfg.model.text_encoder:
        return text_conditioning(cfg, frozen)
    if cfg.model.class_conditional and num_classes > 0:
        return ClassLabels(num_classes, cfg.model.p_uncond)
    return Unconditional()


def load_frozen_encoder(cfg: Config, device: str = "cpu") -> FrozenTextEncoder:
    return FrozenTextEncoder(cfg.model.text_encoder, max_length=cfg.text.max_length,
                             dtype=cfg.text.dtype, device=device)  # fmt: skip


def text_conditioning(cfg: Config, frozen: FrozenTextEncoder | None = None) -> TextConditioning:
    t = cfg.text
    if cfg.model.text_encoder == LEARNED:
        return TextConditioning({"kind": LEARNED}, max_length=t.max_length, token_dim=t.width,
                                pooled_dim=t.width, p_drop=cfg.model.p_uncond)  # fmt: skip
    enc = frozen or load_frozen_encoder(cfg)
    return TextConditioning(enc.record(), max_length=t.max_length, token_dim=enc.token_dim,
                            pooled_dim=enc.pooled_dim, p_drop=cfg.model.p_uncond, frozen=enc)  # fmt: skip


def model_spec(cfg: Config, conditioning: Conditioning) -> BackboneSpec:
    """model.type's registry entry; text conditioning takes its text-reading variant, and
    ``loss.name: meanflow`` the variant with a second time input."""
    spec = get_backbone(cfg.model.type)
    spec = text_backbone(spec) if isinstance(conditioning, TextConditioning) else spec
    return interval_backbone(spec) if cfg.loss.name == MEANFLOW else spec


def pixel_shape(cfg: Config) -> Shape:
    return (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)


def check_model_config(cfg: Config, autoencoder: Autoencoder | None = None) -> None:
    """The model options of a config: a registered ``model.type`` and its own checks; a text
    encoder folder that loads (checked without loading its weights)."""
    ae = autoencoder or build_autoencoder(cfg)
    spec = get_backbone(cfg.model.type)
    if cfg.model.text_encoder:
        spec = text_backbone(spec)
        if cfg.model.text_encoder != LEARNED:
            encoder_architecture(cfg.model.text_encoder)
    if cfg.loss.name == MEANFLOW:
        spec = interval_backbone(spec)
    spec.check(cfg, ae.latent_shape(pixel_shape(cfg)))


def build_model(
    cfg: Config, conditioning: Conditioning, autoencoder: Autoencoder | None = None
) -> FlowModel:
    """The config's backbone for samples in the autoencoder stage's space."""
    ae = autoencoder or build_autoencoder(cfg)
    spec = model_spec(cfg, conditioning)
    shape = ae.latent_shape(pixel_shape(cfg))
    spec.check(cfg, shape)
    t = cfg.text
    return FlowModel(spec.build(cfg, shape, conditioning), spec,
                     prediction_type=cfg.model.prediction_type, conditioning=conditioning,
                     sample_shape=shape,
                     text_encoder=learned_encoder_module(conditioning, t.width, t.depth, t.heads))  # fmt: skip


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: FlowModel) -> dict[str, Any]:
    """What an export records about the model besides its weights."""
    return {
        "backbone": {"type": model.spec.name, "class": model.spec.class_name},
        "prediction_type": model.prediction_type,
        "conditioning": model.conditioning.to_dict(),
        "sample_shape": list(model.sample_shape),
    }
