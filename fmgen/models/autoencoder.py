"""The autoencoder stage: the space the model works in, and the way back to pixels.

Training data is (or is encoded into) the stage's space; generation decodes the solver's result
through ``decode``, so every picture and FID number is in pixels. ``IdentityAutoencoder`` is the
stage of pixel-space models; a latent model puts a VAE here.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from fmgen.base import FmgenError


class AutoencoderError(FmgenError, ValueError):
    """An autoencoder stage that cannot be built or loaded; the message names the fix."""


class Autoencoder(Protocol):
    """What every stage provides (a latent stage also holds the VAE's weights)."""

    kind: str
    hash: str  # identifies the weights: latent shards and FID records name it

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]: ...
    def encode(self, images: Tensor) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...
    def to_dict(self) -> dict[str, Any]: ...


class IdentityAutoencoder:
    """Pixels in, pixels out: the stage of a pixel-space model."""

    kind = "identity"
    hash = "identity"

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the model's samples for images of ``pixel_shape``."""
        return tuple(pixel_shape)  # type: ignore[return-value]

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> the model's space."""
        return images

    def decode(self, latents: Tensor) -> Tensor:
        """The model's samples -> (B, C, H, W) images in [-1, 1]."""
        return latents

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hash": self.hash}


def build_autoencoder(cfg: Any) -> Autoencoder:
    """The stage of a config; pixel space (identity) is the only one so far."""
    return IdentityAutoencoder()


def autoencoder_from_dict(d: dict[str, Any] | None) -> Autoencoder:
    """Rebuild a stage recorded with ``to_dict`` (exports; None: an export without one)."""
    if d is None or d.get("kind") == IdentityAutoencoder.kind:
        return IdentityAutoencoder()
    raise AutoencoderError(f"unknown autoencoder stage {d!r}; this fmgen knows: identity")
