"""``FlowModel``: a backbone with a declared prediction type, a conditioning and a sample shape.

The wrapper maps (x, t, c) with t in [0, 1] (0 = noise, 1 = data) to the declared target
(velocity, eps, score or x0). It knows its backbone only through the registry's
``BackboneSpec``, so generation, export and loading never read backbone-specific attributes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fmgen.config import Config
from fmgen.core.paths import check_prediction_type
from fmgen.models.autoencoder import Autoencoder, build_autoencoder
from fmgen.models.backbones import BackboneSpec, Shape, get_backbone
from fmgen.models.conditioning import ClassLabels, Conditioning, Unconditional


class FlowModel(nn.Module):
    """A network with a declared prediction type: ``forward(x, t, c) -> prediction``.

    Args:
        backbone: the network (a module of ``spec.module_class``).
        spec: its registry entry (how to call and save it).
        prediction_type: what the backbone's output means (velocity, eps, score or x0).
        conditioning: the condition of a sample and its null value.
        sample_shape: (C, H, W) of the samples in the model's space.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, *, prediction_type: str,
                 conditioning: Conditioning, sample_shape: Shape):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.prediction_type = check_prediction_type(prediction_type)
        self.conditioning = conditioning
        self.sample_shape = tuple(sample_shape)

    @property
    def conditional(self) -> bool:
        return self.conditioning.conditional

    @property
    def num_classes(self) -> int:
        """Real classes of a class-conditional model (0 otherwise)."""
        return getattr(self.conditioning, "num_classes", 0)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) or () in [0, 1]; c: (B, ...) conditions or None (null)."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.conditional and c is None:
            c = self.conditioning.null(x.shape[0], x.device)
        elif not self.conditional:
            self.conditioning.check(c, x.shape[0])
        return self.spec.call(self.backbone, x, t, c)


def build_conditioning(cfg: Config, num_classes: int) -> Conditioning:
    """Class labels with the config's dropout, or none (``model.class_conditional=false``, or
    data without labels: ``num_classes`` 0)."""
    if cfg.model.class_conditional and num_classes > 0:
        return ClassLabels(num_classes, cfg.model.p_uncond)
    return Unconditional()


def pixel_shape(cfg: Config) -> Shape:
    return (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)


def check_model_config(cfg: Config, autoencoder: Autoencoder | None = None) -> None:
    """The model options of a config: a registered ``model.type`` and its own checks."""
    ae = autoencoder or build_autoencoder(cfg)
    get_backbone(cfg.model.type).check(cfg, ae.latent_shape(pixel_shape(cfg)))


def build_model(
    cfg: Config, conditioning: Conditioning, autoencoder: Autoencoder | None = None
) -> FlowModel:
    """The config's backbone for samples in the autoencoder stage's space."""
    ae = autoencoder or build_autoencoder(cfg)
    spec = get_backbone(cfg.model.type)
    shape = ae.latent_shape(pixel_shape(cfg))
    spec.check(cfg, shape)
    return FlowModel(spec.build(cfg, shape, conditioning), spec,
                     prediction_type=cfg.model.prediction_type, conditioning=conditioning,
                     sample_shape=shape)  # fmt: skip


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
