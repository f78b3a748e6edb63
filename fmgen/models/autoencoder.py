"""The autoencoder stage: the space the model works in, and the way back to pixels.

Training data is (or is encoded into) the stage's space; generation decodes the solver's result
through ``decode``, so every picture and FID number is in pixels. ``IdentityAutoencoder`` is the
stage of pixel-space models; ``KLAutoencoder`` is a local diffusers ``AutoencoderKL`` folder
(``model.autoencoder: PATH``, e.g. a copy of an SD or FLUX VAE; nothing is downloaded).

A latent of images x, in the model's space (what the network sees and generates)::

    raw = (E(x).latent_dist.mean - shift_factor) * scaling_factor    # the VAE's own factors
    z   = (raw - mean_c) / std_c                                     # per channel c, data stats

``raw`` is what latent shards store (``fmgen.data.latents``); mean and std are measured on the
shards' latents, so the model sees ~unit-variance inputs whatever the VAE's scaling factor was
tuned for. ``decode`` inverts both lines, then runs the VAE's decoder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
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
    def export(self, folder: Path) -> None: ...


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

    def export(self, folder: Path) -> None:
        """Nothing to write: pixel space needs no weights."""


KL_KIND = "autoencoder-kl"
CONFIG_FILE = "config.json"
DECODE_BATCH = 64  # latents decoded per VAE call: a large VAE's activations bound the memory
# from_pretrained builds the model on the meta device by patching torch.nn process-wide
# (accelerate's init_empty_weights): two loads at once in one process corrupt each other
_LOADING = threading.Lock()


def _identifying_files(folder: Path) -> list[Path]:
    """The config and safetensors weights (and a sharded checkpoint's index) of a folder."""
    weights = sorted(p for p in folder.iterdir() if p.is_file() and
                     p.name.endswith((".safetensors", ".safetensors.index.json")))  # fmt: skip
    return [folder / CONFIG_FILE, *weights]


def folder_hash(folder: Path) -> str:
    """16 hex digits of a sha256 over the names and contents of the identifying files."""
    h = hashlib.sha256()
    for path in _identifying_files(folder):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read_kl_config(folder: Path, what: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise AutoencoderError(
            f"{what}={str(folder)!r}: no such folder; give a local diffusers AutoencoderKL folder "
            f"(save_pretrained layout: config.json + diffusion_pytorch_model.safetensors)"
        )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise AutoencoderError(
            f"{what}={str(folder)!r} holds no AutoencoderKL config ({CONFIG_FILE} "
            f"{'names ' + repr(found) if found else 'missing or unreadable'}); point it at the "
            f"VAE's own folder (a pipeline keeps it in vae/)"
        )
    if not any(p.name.endswith(".safetensors") for p in folder.iterdir()):
        raise AutoencoderError(
            f"{what}={str(folder)!r} has no .safetensors weights (fmgen loads no pickles); save "
            f"the VAE with save_pretrained(PATH, safe_serialization=True)"
        )
    return config


def normalize_latents(raw: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per channel ``(raw - mean) / std``: raw (B, c, h, w), mean and std (1, c, 1, 1)."""
    return (raw - mean) / std


class KLAutoencoder:
    """A diffusers ``AutoencoderKL`` folder as the stage, with the data's latent statistics.

    Built from the folder's config alone (shapes and checks cost no weights); the VAE is loaded
    on the first encode or decode and moved to the device of its input. ``mean`` and ``std``
    (per latent channel, of the ``raw`` latents) come from the latent shards' manifest; without
    them only ``encode_raw`` works (what ``prepare`` uses before the statistics exist).
    """

    kind = KL_KIND

    def __init__(self, folder: str | Path, *, mean: list[float] | None = None,
                 std: list[float] | None = None, what: str = "model.autoencoder"):  # fmt: skip
        self.folder = Path(folder).resolve()
        self.config = _read_kl_config(self.folder, what)
        self.what = what
        self.in_channels = int(self.config.get("in_channels", 3))
        self.latent_channels = int(self.config.get("latent_channels", 4))
        self.downsample = 2 ** (len(self.config.get("block_out_channels", [64])) - 1)
        self.scaling_factor = float(self.config.get("scaling_factor", 0.18215))
        self.shift_factor = float(self.config.get("shift_factor") or 0.0)
        self.mean, self.std = mean, std
        if (mean is None) != (std is None) or (
            mean is not None and not len(mean) == len(std or ()) == self.latent_channels
        ):
            raise AutoencoderError(
                f"latent statistics of {self.latent_channels} channels expected, got mean {mean} "
                f"and std {std}; prepare the latent shards again"
            )
        if std is not None and min(std) <= 0:
            raise AutoencoderError(f"latent std {std} must be > 0; prepare the shards again")
        self._hash: str | None = None
        self._vae: Any = None

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = folder_hash(self.folder)
        return self._hash

    def with_stats(self, mean: list[float], std: list[float]) -> KLAutoencoder:
        """This stage with the data's statistics (the loaded VAE and the hash are shared)."""
        out = KLAutoencoder(self.folder, mean=list(mean), std=list(std), what=self.what)
        out._hash, out._vae = self._hash, self._vae
        return out

    def latent_shape(self, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = pixel_shape
        if c != self.in_channels:
            raise AutoencoderError(
                f"the images have {c} channel(s) but the autoencoder {self.what}="
                f"{str(self.folder)!r} takes {self.in_channels}; set data.channels (prepare "
                f"--channels) to {self.in_channels}"
            )
        if h % self.downsample or w % self.downsample:
            raise AutoencoderError(
                f"the image size {h}x{w} is not divisible by the downsampling factor "
                f"{self.downsample} of the autoencoder {self.what}={str(self.folder)!r}; set "
                f"data.resolution (prepare --resolution) to a multiple of it"
            )
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    def vae(self, device: torch.device | str = "cpu") -> Any:
        """The diffusers AutoencoderKL, loaded once (safetensors only), on ``device``."""
        if self._vae is None:
            from diffusers import AutoencoderKL

            try:
                with _LOADING:
                    vae = AutoencoderKL.from_pretrained(self.folder, use_safetensors=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise AutoencoderError(
                    f"{self.what}={str(self.folder)!r} does not load as an AutoencoderKL "
                    f"({' '.join(str(e).split())[:300]})"
                ) from None
            self._vae = vae.eval().requires_grad_(False)
        if next(self._vae.parameters()).device != torch.device(device):
            self._vae.to(device)
        return self._vae

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise AutoencoderError(
                f"the autoencoder stage of {self.folder} has no latent statistics; they come "
                f"from latent shards (python -m fmgen.data prepare --autoencoder ...)"
            )
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_raw(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, c, h, w) float32 ``raw`` latents.

        The posterior's mean, not a sample: the shards are then a function of the images alone
        (byte-equal on a rerun, for any split into processes), and a trained KL-VAE's
        posterior std is small against the latents' spread, so sampling would add little.
        """
        vae = self.vae(images.device)
        mean = vae.encode(images.to(torch.float32)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def normalize(self, raw: Tensor) -> Tensor:
        """``raw`` latents (B, c, h, w) -> the model's space (``normalize_latents``)."""
        return normalize_latents(raw, *self._stats(raw))

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, c, h, w) latents in the model's space."""
        return self.normalize(self.encode_raw(images))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, c, h, w) latents in the model's space -> (B, C, H, W) float32 images (~[-1, 1])."""
        z = latents.to(torch.float32)
        mean, std = self._stats(z)
        raw = z * std + mean
        vae = self.vae(z.device)
        z_vae = raw / self.scaling_factor + self.shift_factor
        parts = [vae.decode(z_vae[i : i + DECODE_BATCH]).sample for i in range(0, len(z_vae), DECODE_BATCH)]  # fmt: skip
        return torch.cat(parts) if parts else torch.empty((0, self.in_channels, 0, 0))

    def identity(self) -> dict[str, Any]:
        """What names the VAE and its encoding (latent manifests record this)."""
        return {"kind": self.kind, "path": str(self.folder), "hash": self.hash,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latent_channels": self.latent_channels, "downsample": self.downsample}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(), "mean": self.mean, "std": self.std}

    def export(self, folder: Path) -> None:
        """Copy the VAE's config and weights into ``folder`` byte for byte, so the copy has the
        hash the shards and FID records name (a save_pretrained would write other bytes)."""
        folder.mkdir(parents=True, exist_ok=True)
        for path in _identifying_files(self.folder):
            shutil.copyfile(path, folder / path.name)


def build_autoencoder(cfg: Any) -> Autoencoder:
    """The stage a config names: identity, or ``model.autoencoder``'s VAE (without the data's
    statistics: ``autoencoder_for_data`` adds them, checking the shards were made by it)."""
    if not cfg.model.autoencoder:
        return IdentityAutoencoder()
    return KLAutoencoder(cfg.model.autoencoder)


def autoencoder_for_data(cfg: Any, latents: dict[str, Any] | None, where: str) -> Autoencoder:
    """The stage that trains on data whose manifest has the latent section ``latents`` (None:
    pixel data); refuses shards another autoencoder (or none) made, naming both hashes."""
    ae = build_autoencoder(cfg)
    made_by = (latents or {}).get("autoencoder", {})
    if not isinstance(ae, KLAutoencoder):
        if latents is None:
            return ae
        raise AutoencoderError(
            f"data.path={where!r} holds latents of the autoencoder {made_by.get('path')!r} (hash "
            f"{made_by.get('hash')}); set model.autoencoder to it, or point data.path at pixel shards"
        )
    if latents is None:
        source = "webdataset" if cfg.data.source == "webdataset" else "shards"
        raise AutoencoderError(
            f"model.autoencoder={cfg.model.autoencoder!r} trains on latent shards but data.path="
            f"{where!r} holds pixel images; encode them with `python -m fmgen.data prepare --source "
            f"{source} --data-path {where} --autoencoder {cfg.model.autoencoder} --out NEW` and set "
            f"data.source=shards data.path=NEW"
        )
    if made_by.get("hash") != ae.hash:
        raise AutoencoderError(
            f"data.path={where!r} holds latents of another autoencoder (hash {made_by.get('hash')}, "
            f"{made_by.get('path')}) than model.autoencoder={cfg.model.autoencoder!r} (hash "
            f"{ae.hash}); prepare the shards again with --autoencoder {cfg.model.autoencoder}, or "
            f"set model.autoencoder to the one that encoded them"
        )
    return ae.with_stats(latents["mean"], latents["std"])


def autoencoder_from_dict(d: dict[str, Any] | None, folder: Path | None = None) -> Autoencoder:
    """Rebuild a stage recorded with ``to_dict`` (exports, checkpoints; None: none recorded).

    ``folder``: a copy of the VAE (an export's autoencoder/), used instead of the recorded path.
    The VAE found must have the recorded hash: other weights would decode into other images.
    """
    if d is None or d.get("kind") == IdentityAutoencoder.kind:
        return IdentityAutoencoder()
    if d.get("kind") != KL_KIND:
        raise AutoencoderError(
            f"unknown autoencoder stage {d.get('kind')!r}; this fmgen knows: identity, {KL_KIND}"
        )
    where = folder if folder is not None and folder.is_dir() else Path(d["path"])
    ae = KLAutoencoder(where, mean=d.get("mean"), std=d.get("std"), what="the recorded autoencoder")
    if ae.hash != d.get("hash"):
        raise AutoencoderError(
            f"the autoencoder at {where} has hash {ae.hash}, but the model was trained with hash "
            f"{d.get('hash')}; restore the VAE it was trained with"
        )
    return ae
