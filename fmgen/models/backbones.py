"""The backbone registry: every network fmgen can train, built and saved through one interface.

A backbone is a diffusers ``ModelMixin`` (so ``save_pretrained`` / ``from_pretrained`` give the
export format) registered with a ``BackboneSpec``: how to build it from the config for a sample
shape and a conditioning, how fmgen's call ``(x, t in [0, 1], condition)`` maps onto its
``forward``, and the checks of its own options. The wrapper, generation, export and loading use
only this interface, so a new backbone is one ``register_backbone`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from fmgen.config import Config, ConfigError
from fmgen.models.conditioning import Conditioning

Shape = tuple[int, int, int]  # (C, H, W) of the model's samples


def _call_directly(module: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    return module(x, t, cond)


def _no_checks(cfg: Config, shape: Shape) -> None:
    return None


@dataclass(frozen=True)
class BackboneSpec:
    """How fmgen builds, calls and checks one kind of backbone.

    Attributes:
        name: the value of ``model.type``.
        module_class: the diffusers ``ModelMixin`` subclass that ``build`` returns; export
            writes it with ``save_pretrained`` and loading reads it with ``from_pretrained``.
        build: ``build(cfg, shape, conditioning) -> module`` for samples of ``shape`` (C, H, W).
        call: ``call(module, x, t, cond) -> prediction`` with x (B, C, H, W), t (B,) in [0, 1]
            (0 = noise) and cond the conditioning's model input (or None); returns (B, C, H, W).
        check: ``check(cfg, shape)`` raises ConfigError naming a bad option of this backbone.
        text_variant: the registry name of this backbone's text-reading variant, which text
            conditioning builds instead ("" = none); its ``call`` gets a ``TextEmbedding``.
        reads_text: this backbone is a text-reading variant.
        interval_variant: the registry name of this backbone's variant with a second time input,
            which models of the average velocity (``loss.name: meanflow``) build ("" = none).
        reads_interval: this backbone is such a variant: ``call(module, x, t, cond, r)`` with r
            (B,) the end of the interval [t, r] (``fmgen.models.average``).
    """

    name: str
    module_class: type
    build: Callable[[Config, Shape, Conditioning], nn.Module]
    call: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor] = _call_directly
    check: Callable[[Config, Shape], None] = _no_checks
    text_variant: str = ""
    reads_text: bool = False
    interval_variant: str = ""
    reads_interval: bool = False

    @property
    def class_name(self) -> str:
        return f"{self.module_class.__module__}.{self.module_class.__qualname__}"


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, *, replace: bool = False) -> BackboneSpec:
    """Make ``model.type: spec.name`` available (``replace`` to re-register a name)."""
    if spec.name in BACKBONES and not replace:
        raise ValueError(f"a backbone named {spec.name!r} is registered already")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """The spec of ``model.type``; an unknown name lists the registered ones."""
    if name not in BACKBONES:
        raise ConfigError(
            f"model.type: {name!r} is not a registered backbone; choose one of: "
            f"{', '.join(map(repr, BACKBONES))} (or import the module that registers it)"
        )
    return BACKBONES[name]


def text_backbone(spec: BackboneSpec) -> BackboneSpec:
    """The text-reading variant of ``spec`` (itself if it reads text)."""
    return _variant(spec, "text", "a text-reading variant; with model.text_encoder set")


def interval_backbone(spec: BackboneSpec) -> BackboneSpec:
    """The variant of ``spec`` with a second time input (itself if it has one)."""
    return _variant(spec, "interval", "a variant with a second time input, which loss.name=meanflow needs;")


def _variant(spec: BackboneSpec, kind: str, what: str) -> BackboneSpec:
    """``spec``'s ``{kind}_variant`` (``spec`` itself if it ``reads_{kind}``)."""
    if getattr(spec, f"reads_{kind}"):
        return spec
    name = getattr(spec, f"{kind}_variant")
    if not name:
        offers = [n for n, s in BACKBONES.items() if getattr(s, f"{kind}_variant") and not s.reads_text]
        raise ConfigError(f"model.type {spec.name!r} has no {what} choose one of: "
                          f"{', '.join(map(repr, offers))}")  # fmt: skip
    return get_backbone(name)
