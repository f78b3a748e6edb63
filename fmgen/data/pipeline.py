"""The training data stream: prepared shards, streamed per rank, or held in memory.

``open_train_data`` prepares the shards once (the digits default, or a folder / datasets source)
on the main process, then opens either
- the streaming ``ShardLoader`` (the scalable path: each rank reads its own shards), or
- ``InMemoryData`` (``data.in_memory: true``): every rank holds the whole (small) data set and
  takes its slice of one seeded GLOBAL permutation, so the images of a step do not depend on
  the number of processes; 1 and N processes then see the same global batches.

Latent shards (``prepare --autoencoder``) stream latents in the model's space; both feeds expose
the manifest's latent section (``latents``), from which the training builds its autoencoder stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmgen.config import ConfigError, DataConfig
from fmgen.data.decode import FITS
from fmgen.data.loader import ShardLoader
from fmgen.data.shards import DataError, read_manifest
from fmgen.data.sources import SOURCES, prepare
from fmgen.data.urls import SHARD_SUFFIXES

log = logging.getLogger("fmgen.data.pipeline")


DATA_SOURCES = (*SOURCES, "shards", "webdataset")
"""Values of ``data.source``: a source ``prepare`` reads, shards fmgen prepared already, or
WebDataset shards of any origin (``webdataset``: local or URLs, no manifest needed)."""


def check_data_config(cfg: DataConfig) -> None:
    """The data options that the config schema cannot check (their registry lives here)."""
    if cfg.source not in DATA_SOURCES:
        raise ConfigError(
            f"data.source: {cfg.source!r} is not valid; choose one of: "
            f"{', '.join(map(repr, DATA_SOURCES))}"
        )
    if cfg.fit not in FITS:
        raise ConfigError(f"data.fit: {cfg.fit!r} is not valid; choose one of: {', '.join(FITS)}")
    if cfg.source != "webdataset" and not isinstance(cfg.path, str):
        raise ConfigError(
            f"data.path: a list of shards needs data.source=webdataset; data.source="
            f"{cfg.source!r} takes one folder"
        )
    if cfg.caption_templates:
        from fmgen.data.captions import TEMPLATE_SETS

        if cfg.caption_templates not in TEMPLATE_SETS:
            raise ConfigError(
                f"data.caption_templates: {cfg.caption_templates!r} is not a template set; choose "
                f"one of: {', '.join(map(repr, TEMPLATE_SETS))} (or '' for the shards' own captions)"
            )
        if cfg.source not in ("digits", "shards"):
            raise ConfigError(
                f"data.caption_templates={cfg.caption_templates!r} captions the digits fmgen "
                f"prepares; data.source={cfg.source!r} brings its own captions (data.caption_key): "
                f"set data.caption_templates="
            )


def _foreign_shards(folder: Path) -> list[Path]:
    """Tar shards in ``folder`` that no fmgen manifest lists (there is none)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(SHARD_SUFFIXES))


def ensure_shards(cfg: DataConfig, autoencoder: str = "") -> Path:
    """Prepare the shards named by the config if their manifest is missing; return the folder.

    ``autoencoder`` (``model.autoencoder``): missing shards are prepared as latent shards.
    ``data.caption_templates``: shards must hold captions of that template set as it is now
    (the manifest's ``source.captions``); other shards are refused, never prepared over."""
    from fmgen.data.captions import same_captions

    folder = Path(cfg.path)
    if (folder / "manifest.json").is_file():
        record = read_manifest(folder).source
        kind = record.get("kind")
        if cfg.source in SOURCES and kind != cfg.source:  # digits, folder or hf asked for
            raise DataError(
                f"data.path={cfg.path!r} holds shards prepared from {kind!r}, not from "
                f"data.source={cfg.source!r}; set data.source=shards to train on them, or point "
                f"data.path at a new folder to prepare {cfg.source!r} into"
            )
        # a text model on captionless shards would train on empty captions: unconditional
        have = record.get("captions")
        if cfg.caption_templates and not same_captions(have, cfg.caption_templates):
            was = (f"with captions of other templates ({have.get('templates')!r}, hash "
                   f"{have.get('hash')})" if have else "without captions")  # fmt: skip
            raise DataError(
                f"data.path={cfg.path!r} holds shards prepared {was}, but "
                f"data.caption_templates={cfg.caption_templates!r} asks for captions of the "
                f"current {cfg.caption_templates!r} templates; point data.path at a new folder to "
                f"prepare them into"
            )
        return folder
    foreign = _foreign_shards(folder)
    if foreign:  # a user's shards: read them as they are, never prepare over them
        raise DataError(
            f"data.path={cfg.path!r} holds {len(foreign)} shard(s) that fmgen did not prepare "
            f"(e.g. {foreign[0].name}) and no fmgen manifest; to train on them set "
            f"data.source=webdataset (fmgen never modifies them), or point data.path at a new "
            f"folder to prepare data.source={cfg.source!r} into"
        )
    if cfg.source == "shards":
        raise DataError(
            f"data.path={cfg.path!r} holds no manifest.json; prepare shards first with "
            f"`python -m fmgen.data prepare --out {cfg.path} ...` or set data.source"
        )
    if cfg.source in ("folder", "hf") and not cfg.source_path:
        raise DataError(
            f"data.source={cfg.source!r} needs data.source_path (the folder or data set name)"
        )
    log.info("preparing %s shards in %s", cfg.source, folder)
    options = dict(resolution=cfg.resolution, channels=cfg.channels,
                   source_path=cfg.source_path or None, image_column=cfg.image_column,
                   label_column=cfg.label_column or None,
                   caption_templates=cfg.caption_templates)  # fmt: skip
    if autoencoder:
        from fmgen.data.latents import prepare_latents

        prepare_latents(cfg.source, folder, autoencoder=autoencoder, **options)
    else:
        prepare(cfg.source, folder, **options)
    return folder


class InMemoryData:
    """All samples in memory; step k of epoch e uses global batch k of a (seed, e) permutation.

    Args:
        images: (N, C, H, W) float32 in [-1, 1] (or latents); labels: (N,) int64.
        batch_size: per-process batch; the global batch is batch_size x world_size.
        mirrored: the samples of mirror images, for flips (latents: the mirror image's latent,
            which is not the flipped latent); None: ``images`` flipped.
        latents: the manifest's latent section of latent shards (None: images).
        captions: every sample's caption (None: yield none); texts: their precomputed text rows
            (N, F) float32 (None: yield none), ``text_info`` the manifest's text section.

    Yields:
        ``(x, y[, captions][, rows])``, as ``StreamData``.
    """

    def __init__(self, images: Tensor, labels: Tensor, class_names: list[str], *, batch_size: int,
                 rank: int, world_size: int, seed: int, hflip: bool, mirrored: Tensor | None = None,
                 latents: dict[str, Any] | None = None, captions: list[str] | None = None,
                 texts: Tensor | None = None, text_info: dict[str, Any] | None = None):  # fmt: skip
        self.images, self.labels, self.class_names = images, labels, class_names
        self.mirrored, self.latents = mirrored, latents
        self.captions, self.texts, self.text_info = captions, texts, text_info
        self.num_classes = len(class_names)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.hflip = seed, hflip
        self.global_batch = batch_size * world_size
        if self.global_batch > len(images):
            raise DataError(
                f"the global micro-batch {self.global_batch} exceeds the {len(images)} samples held in "
                f"memory; lower train.batch_size or raise train.grad_accum"
            )
        self.epoch, self.batch_in_epoch = 0, 0
        self.skipped = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(sd["epoch"]), int(sd["batch_in_epoch"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        per_epoch = len(self.images) // self.global_batch
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(len(self.images), generator=gen)
            flips = torch.rand(len(self.images), generator=gen) < 0.5
            while self.batch_in_epoch < per_epoch:
                start = self.batch_in_epoch * self.global_batch + self.rank * self.batch_size
                idx = perm[start : start + self.batch_size]
                x = self.images[idx]
                if self.hflip:
                    m = self.mirrored[idx] if self.mirrored is not None else x.flip(-1)
                    x = torch.where(flips[idx, None, None, None], m, x)
                self.batch_in_epoch += 1
                extra: list[Any] = []
                if self.captions is not None:
                    extra.append([self.captions[i] for i in idx.tolist()])
                if self.texts is not None:
                    extra.append(self.texts[idx])  # (b, F)
                yield x, self.labels[idx], *extra
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


class StreamData:
    """The streaming ShardLoader made infinite, with the interface the loop uses."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        self.num_classes, self.class_names = loader.num_classes, loader.class_names

    @property
    def skipped(self) -> int:
        return self.loader.skipped

    @property
    def latents(self) -> dict[str, Any] | None:
        return self.loader.latents

    @property
    def text_info(self) -> dict[str, Any] | None:
        """The manifest's text section (``prepare --text-encoder``), else None."""
        return self.loader.text_info

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loader.load_state_dict(sd)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:  # resampled streams never end; an epoch-mode stream restarts
            yield from self.loader


def shard_loader(cfg: DataConfig, batch_size: int, **options: Any) -> ShardLoader:
    """A ShardLoader of the config's shards: fmgen's (with their manifest) or any WebDataset's."""
    if cfg.source == "webdataset":
        return ShardLoader(cfg.path, batch_size, manifest=cfg.manifest or None, webdataset=True,
                           resolution=cfg.resolution, channels=cfg.channels,
                           num_classes=cfg.num_classes or None, image_key=cfg.image_key,
                           label_key=cfg.label_key, caption_key=cfg.caption_key, fit=cfg.fit,
                           **options)  # fmt: skip
    return ShardLoader(Path(cfg.path), batch_size, caption_key=cfg.caption_key, **options)


def read_all(source: Path | DataConfig, *, mirror: bool = False) -> tuple[Tensor, Tensor]:
    """Every sample of a shard folder (or the config's shards), in shard order:
    (N, C, H, W) in [-1, 1] (latent shards: latents in the model's space), (N,).
    ``mirror``: of the mirror images."""
    # rank 0 of 1 explicitly: the default would take this process's share of a process group
    options = dict(rank=0, world_size=1, resampled=False, shuffle_buffer=0, seed=0, mirror=mirror)
    if isinstance(source, DataConfig):
        loader = shard_loader(replace(source, caption_key=""), 1024, **options)
    else:
        loader = ShardLoader(source, batch_size=1024, **options)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def open_train_data(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, main: bool,
    barrier: Callable[[], None], autoencoder: str = "", text: bool = False,
) -> InMemoryData | StreamData:  # fmt: skip
    """The training stream of one rank; the main process prepares missing shards first (latent
    shards when ``autoencoder``, the config's ``model.autoencoder``, is given).

    ``text``: also yield each sample's precomputed text row (B, F) last, after the captions
    (shards written by ``prepare --text-encoder``; ``.text_info`` is their manifest's section,
    which the caller checks against its encoder with ``check_text_embeddings``)."""
    if cfg.source != "webdataset":
        if main:
            ensure_shards(cfg, autoencoder)
        barrier()
        folder = Path(cfg.path)
        manifest = read_manifest(folder)
        for key in ("resolution", "channels"):
            if getattr(manifest, key) != getattr(cfg, key):
                raise DataError(
                    f"data.{key}={getattr(cfg, key)} but the shards in {folder} have {key} "
                    f"{getattr(manifest, key)}; set data.{key}={getattr(manifest, key)}, prepare "
                    f"new shards in another data.path, or read them with data.source=webdataset "
                    f"and data.fit"
                )
    loader = shard_loader(
        cfg,
        batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        seed=seed,
        resampled=True,
        shuffle_buffer=cfg.shuffle_buffer,
        hflip=cfg.hflip,
        drop_last=True,  # every step sees the same global batch size
        text=text,
    )
    if cfg.in_memory and text:
        # one pass with the rows (and captions), so they line up with the samples held
        whole = shard_loader(cfg, 1024, rank=0, world_size=1, resampled=False, shuffle_buffer=0,
                             seed=0, text=True)  # fmt: skip
        parts = list(zip(*whole, strict=True))
        captions = [c for part in parts[2] for c in part] if cfg.caption_key else None
        images, labels, texts = torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[-1])
        mirrored = None
        if cfg.hflip and loader.latents:
            flipped = shard_loader(replace(cfg, caption_key=""), 1024, rank=0, world_size=1,
                                   resampled=False, shuffle_buffer=0, seed=0, text=True, mirror=True)  # fmt: skip
            mirrored = torch.cat([x for x, *_ in flipped])
        return InMemoryData(images, labels, loader.class_names, batch_size=batch_size, rank=rank,
                            world_size=world_size, seed=seed, hflip=cfg.hflip, mirrored=mirrored,
                            latents=loader.latents, captions=captions, texts=texts,
                            text_info=loader.text_info)  # fmt: skip
    if cfg.in_memory:
        images, labels = read_all(cfg)
        mirrored = read_all(cfg, mirror=True)[0] if cfg.hflip and loader.latents else None
        return InMemoryData(images, labels, loader.class_names, batch_size=batch_size, rank=rank,
                            world_size=world_size, seed=seed, hflip=cfg.hflip, mirrored=mirrored,
                            latents=loader.latents, text_info=loader.text_info)  # fmt: skip
    return StreamData(loader)
