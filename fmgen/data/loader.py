"""Training data: a streaming loader over WebDataset shards whose position can be saved exactly.

Shards and their manifest (format: ``fmgen.data.shards``) are written by ``prepare``
(``fmgen.data.sources``; run as ``python -m fmgen.data prepare ...``); with ``webdataset=True``
any WebDataset shards are read, local or remote (``fmgen.data.urls``), with or without an index.
``ShardLoader`` reads them on each rank; its workers run ``fmgen.data.stream``:

* The stream of one rank is split into L = max(1, num_workers) *lanes*, one per DataLoader
  worker. A lane's stream is a sequence of epochs; epoch e of lane l on rank r draws its shard
  order, shuffle buffer and flips from seeds derived from (seed, e, r, l), so it is a pure
  function of those numbers.
* Epoch mode (``resampled=False``): the shard list, permuted by (seed, e), is split explicitly,
  ``shards[rank::world_size][lane::L]`` (WebDataset's split_by_node then split_by_worker, with
  the rank given instead of read from torch.distributed): every sample is read once per epoch.
  Ranks may get different numbers of batches, so this is for one-pass reading (evaluation,
  ``read_all``), not for DDP training.
* Resampled mode (the default, for step-based training): each lane draws shards with
  replacement, forever, in epochs of a fixed number of samples (its shuffle buffer drains at
  the end of each, so nothing read is wasted); batches may span epochs. No rank ever runs dry,
  so no collective waits on an exhausted rank.
* Position: per lane (epoch, cursor), the cursor counting samples taken from the shuffle buffer
  (decoded or skipped as corrupt), plus the lane that delivers next. The DataLoader hands out
  worker results round-robin, so after restoring, worker i plays lane (i + next) % L and the
  sequence of batches continues exactly. Restoring re-reads the epoch's tar members up to the
  cursor without decoding them. Positions count batches returned to the caller, never batches
  a worker prefetched: each batch carries its lane's position.
* Corrupt samples (undecodable image, missing member, wrong size, truncated tar) are skipped
  with a logged warning; the count travels with the batches, so ``loader.skipped`` is exact
  in the main process also with workers. A label outside the manifest's classes is an error.

Do not pass a ShardLoader through ``accelerator.prepare``: it already splits by rank, and
batches are moved to the device by the training loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmgen.data.decode import FITS, Decoding, no_text_message
from fmgen.data.index import ShardIndex
from fmgen.data.locate import (
    NOMINAL_SHARD_SAMPLES,
    first_sample,
    resolve_shards,
    resolve_webdataset,
)
from fmgen.data.shards import DataError, Manifest
from fmgen.data.stream import (
    LaneDataset,
    LaneItem,
    LanePosition,
    LaneSpec,
    identity,
    lane_items,
    to_float,
    worker_init,
)
from fmgen.data.urls import shard_name

log = logging.getLogger("fmgen.data")

STATE_VERSION = 1


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardLoader:
    """Batches of (images, labels[, keys]) from prepared shards, for one rank.

    Args:
        source: a folder holding ``manifest.json`` (or that file's path), or a brace pattern
            of some of its shards (``data/d/train-{000000..000003}.tar``; the manifest beside
            them, or ``manifest``).
        batch_size: per-process batch size B.
        rank, world_size: this process and the number of processes (default: from
            torch.distributed if initialized, else 0 and 1). Splitting is explicit: no
            ``accelerator.prepare``.
        num_workers: DataLoader worker processes (0: decode in this process).
        seed: the stream is a function of (seed, epoch, rank, lane) only.
        resampled: True: shards drawn with replacement, an endless stream of equal epochs
            (training). False: each epoch reads every selected shard once, split across ranks
            and workers; iteration ends with the epoch, the next iteration starts the next one.
        shuffle_buffer: samples held for shuffling; 0 disables shuffling (epoch mode then reads
            the shards in manifest order, samples in file order).
        hflip: random horizontal flip, p = 0.5.
        drop_last: epoch mode: drop each lane's final short batch (resampled batches are full).
        return_keys: also yield the sample keys (``list[str]``, the 8-digit source ids).
        epoch_batches: resampled mode: batches this rank yields per epoch (rounded up to a
            multiple of max(1, num_workers)); default: one pass's worth,
            ``num_samples // (world_size * batch_size)``. Ignored in epoch mode.
        prefetch_factor: batches each worker prepares ahead.
        webdataset: read shards that fmgen did not write (``source``: a folder, brace pattern,
            URLs or a list, see ``fmgen.data.urls``; or an index folder). No manifest needed;
            ``manifest`` may name an index (``python -m fmgen.data index``) or a manifest for
            sample counts and classes. Needs ``resolution`` and ``channels``.
        num_classes: classes of the labels when no index or manifest says.
        image_key, label_key, caption_key, fit: see ``fmgen.data.decode`` (label_key "":
            no labels; fmgen's own shards always load with fit "none").
        latents: latent shards (``prepare --autoencoder``) yield their latents; False: their
            images (an FID reference reads the pixels of latent shards).
        mirror: every sample mirrored (the image flipped, or the mirror image's latent).
        text: also yield each sample's precomputed text row (shards written by ``prepare
            --text-encoder``; their manifest's text section is ``text_info``).

    Yields:
        images (B, C, H, W) float32 in [-1, 1] (``x / 127.5 - 1`` of the stored uint8), or of
        latent shards the latents (B, c, h, w) in the model's space (normalized per channel
        with the manifest's statistics), labels (B,) int64, with ``return_keys`` the keys,
        with ``caption_key`` the captions, with ``text`` the text rows (B, F) float32 (the
        float16 ``TextConditioning.pack`` rows as stored): ``(x, y[, keys][, captions][, rows])``.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str],
        batch_size: int,
        *,
        manifest: str | Path | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        hflip: bool = False,
        drop_last: bool = False,
        return_keys: bool = False,
        prefetch_factor: int = 2,
        epoch_batches: int | None = None,
        webdataset: bool = False,
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        image_key: str = "",
        label_key: str = "cls",
        caption_key: str = "",
        fit: str = "center-crop",
        latents: bool = True,
        mirror: bool = False,
        text: bool = False,
    ):
        r0, w0 = _default_rank_world()
        rank = r0 if rank is None else rank
        world_size = w0 if world_size is None else world_size
        for name, v, lo in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("prefetch_factor", prefetch_factor, 1),
        ):
            if not isinstance(v, int) or v < lo:
                raise DataError(f"ShardLoader: {name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise DataError(
                f"ShardLoader: rank {rank} is outside 0..{world_size - 1} (world_size {world_size})"
            )
        if fit not in FITS:
            raise DataError(f"fit {fit!r} is not one of {', '.join(FITS)} (data.fit)")
        self.manifest: Manifest | None = None
        self.index: ShardIndex | None = None
        self._latent_stats: tuple[Tensor, Tensor] | None = None
        if webdataset:
            locations, counts, info = resolve_webdataset(source, manifest)
            decoding, names = self._webdataset_decoding(
                locations[0], info, resolution, channels, num_classes, image_key, label_key,
                caption_key, fit,
            )  # fmt: skip
        else:
            self.manifest, paths = resolve_shards(source, manifest)
            locations, counts = [str(p) for p in paths], self._counts(paths)
            m = self.manifest
            names = list(m.class_names)
            latent = m.latent if latents else None
            decoding = Decoding(m.resolution, m.channels, m.num_classes, image_key=m.image_format,
                                caption_key=caption_key, fit="none",
                                latent=tuple(latent["shape"]) if latent else ())  # fmt: skip
            if latent:  # yielded in the model's space: (raw - mean) / std per channel
                self._latent_stats = (torch.tensor(latent["mean"]).view(1, -1, 1, 1),
                                      torch.tensor(latent["std"]).view(1, -1, 1, 1))  # fmt: skip
        if text:
            info = self.text_info
            if info is None:
                where = self.manifest.root if self.manifest and self.manifest.root else source
                raise DataError(no_text_message(str(where)))
            decoding = replace(decoding, text=int(info["width"]))
        self._class_names = names
        lanes = max(1, num_workers)
        streams = world_size * lanes
        if not resampled and len(locations) < streams:
            known = sum(c or 0 for c in counts)
            raise DataError(
                f"epoch mode (resampled=False) needs at least world_size x num_workers = "
                f"{world_size} x {lanes} = {streams} shards, one per stream, but {source} has "
                f"{len(locations)}; empty streams would leave ranks waiting for each other. Use "
                f"resampled=True (training), fewer workers, or prepare more shards "
                f"(--samples-per-shard {max(1, known // streams)} or less)"
            )
        self.counts_known = all(c is not None for c in counts)
        self.num_samples = sum(c or 0 for c in counts) if self.counts_known else None
        if epoch_batches is not None and (not isinstance(epoch_batches, int) or epoch_batches < 1):
            raise DataError(
                f"ShardLoader: epoch_batches must be None or an integer >= 1, got {epoch_batches!r}"
            )
        nominal = self.num_samples or NOMINAL_SHARD_SAMPLES * len(locations)
        per_rank = epoch_batches or max(1, nominal // (world_size * batch_size))
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self._spec = LaneSpec(
            shards=tuple(locations),
            shard_samples=tuple(counts),
            decoding=decoding,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            lanes=lanes,
            seed=seed,
            resampled=resampled,
            shuffle_buffer=shuffle_buffer,
            hflip=hflip,
            drop_last=drop_last,
            return_keys=return_keys,
            mirror=mirror,
            lane_samples=math.ceil(per_rank / lanes) * batch_size,
            corrupt_limit=max(1000, 2 * nominal),
            empty_limit=max(20, 2 * len(locations)),
        )
        self._skipped_base = 0
        self._start_epoch(0)

    def _webdataset_decoding(
        self, first: str, info: Manifest | ShardIndex | None, resolution: int | None,
        channels: int | None, num_classes: int | None, image_key: str, label_key: str,
        caption_key: str, fit: str,
    ) -> tuple[Decoding, list[str]]:  # fmt: skip
        """The decoding of shards fmgen did not write, and the class names (empty: no labels).

        Classes come from ``num_classes``, else the index or manifest; with neither, a first
        sample without the default ``cls`` member means no labels (unconditional).
        """
        if resolution is None or channels is None:
            raise DataError(
                "reading WebDataset shards needs the resolution and channels to load at"
            )
        if isinstance(info, ShardIndex):
            self.index = info
            image_key = image_key or info.image_key
            known = info.num_classes if label_key == info.label_key else None
        elif info is not None:
            self.manifest = info
            known = info.num_classes if label_key == "cls" else None
        else:
            known = None
        names: list[str] = []
        if label_key:
            count = num_classes or known
            if count is None:
                members = first_sample(first)  # also reaches a URL source once, at start-up
                if label_key == "cls" and "cls" not in members:
                    log.info("the shards have no .cls member: training without labels")
                    label_key = ""
                else:
                    raise DataError(
                        f"labels from .{label_key} need the number of classes: set "
                        f"data.num_classes, index the shards (`python -m fmgen.data index ...`), or "
                        f"set data.label_key= (empty) to train without labels"
                    )
            else:
                names = (list(info.class_names) if isinstance(info, Manifest) and not num_classes
                         else [str(i) for i in range(count)])  # fmt: skip
        else:
            first_sample(first)
        decoding = Decoding(resolution, channels, max(1, len(names)), image_key=image_key,
                            label_key=label_key, caption_key=caption_key, fit=fit)  # fmt: skip
        return decoding, names

    def _counts(self, paths: Sequence[Path]) -> list[int]:
        assert self.manifest is not None
        by_name = {s.name: s.num_samples for s in self.manifest.shards}
        return [by_name[p.name] for p in paths]

    # --- read-only views ---
    @property
    def num_classes(self) -> int:
        """Classes of the labels; 0 when the shards have none (every label is 0)."""
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def latents(self) -> dict[str, Any] | None:
        """The manifest's latent section when the loader yields latents (else None)."""
        return self.manifest.latent if self._latent_stats is not None and self.manifest else None

    @property
    def text_info(self) -> dict[str, Any] | None:
        """The manifest's text section (shards written by ``prepare --text-encoder``), else None;
        the rows are yielded only with ``text=True``."""
        return self.manifest.text if self.manifest is not None else None

    @property
    def batches_per_epoch(self) -> int | None:
        """Resampled mode: batches this rank yields per epoch (epoch mode: None, data-dependent)."""
        return (
            self._spec.lane_samples // self._spec.batch_size * self._spec.lanes
            if self._spec.resampled
            else None
        )

    @property
    def epoch(self) -> int:
        return min(lane.epoch for lane in self._lanes)

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far (all workers, restored runs included)."""
        return self._skipped_base + sum(self._skipped_live)

    # --- position ---
    def _start_epoch(self, epoch: int) -> None:
        self._lanes = [LanePosition(epoch) for _ in range(self._spec.lanes)]
        self._next_lane = 0
        self._skipped_live = [0] * self._spec.lanes

    def _fingerprint(self) -> dict[str, Any]:
        s = self._spec
        keys = (
            "batch_size",
            "rank",
            "world_size",
            "lanes",
            "seed",
            "resampled",
            "shuffle_buffer",
            "hflip",
            "drop_last",
            "lane_samples",
            "mirror",
        )
        return {
            "shards": [shard_name(p) for p in s.shards],  # a moved folder or new host still resumes
            "num_samples": self.num_samples,
            **{k: getattr(s, k) for k in keys},
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches returned so far (plain Python values)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "lanes": [[x.epoch, x.cursor, x.done] for x in self._lanes],
            "next_lane": self._next_lane,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batches equal those the saved run would have yielded.

        If the stream settings changed (workers, batch size, seed, shards, ...), exact
        continuation is impossible: a warning is logged and the stream starts the epoch after
        the saved one, so it still does not replay what was seen.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data position version {state.get('version')!r} is not {STATE_VERSION}; it was "
                f"written by another fmgen version"
            )
        lanes = [LanePosition(int(e), int(c), bool(d)) for e, c, d in state["lanes"]]
        now, saved = self._fingerprint(), state.get("fingerprint", {})
        self._skipped_base = int(state.get("skipped", 0))
        if saved != now:
            changed = sorted(k for k in now if saved.get(k) != now[k])
            epoch = max(x.epoch for x in lanes) + 1
            log.warning(
                "the data position was saved with different %s; starting epoch %d instead of "
                "continuing exactly",
                ", ".join(changed),
                epoch,
            )
            self._start_epoch(epoch)
            return
        self._lanes, self._next_lane = lanes, int(state["next_lane"])
        self._skipped_live = [0] * self._spec.lanes

    # --- iteration ---
    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        yield from self._stream()
        if not self._spec.resampled:
            self._start_epoch(self.epoch + 1)

    def _inputs(self, images: Any) -> Tensor:
        """A lane's uint8 (B, H, W, C) images -> (B, C, H, W) in [-1, 1]; its float16 latents
        (B, c, h, w) -> float32 in the model's space."""
        if self._latent_stats is not None:
            # imported here: fmgen.models brings diffusers (~3 s), which image shards never need
            from fmgen.models.autoencoder import normalize_latents

            mean, std = self._latent_stats
            return normalize_latents(torch.from_numpy(images).float(), mean, std)
        return to_float(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())

    def _stream(self) -> Iterator[tuple[Tensor, ...]]:
        spec, lanes = self._spec, self._spec.lanes
        start = tuple(self._lanes)
        if self.num_workers == 0:
            items: Iterator[LaneItem] = lane_items(spec, 0, start[0])
        else:
            loader = torch.utils.data.DataLoader(
                LaneDataset(spec, start, self._next_lane),
                batch_size=None,  # lanes batch themselves
                num_workers=self.num_workers,
                collate_fn=identity,
                worker_init_fn=worker_init,
                prefetch_factor=self.prefetch_factor,
            )
            items = iter(loader)
        try:
            for it in items:
                if it.kind == "error":
                    raise DataError(it.message)
                self._lanes[it.lane] = it.position
                self._skipped_live[it.lane] = it.skipped
                self._next_lane = (it.lane + 1) % lanes
                if it.kind == "batch":
                    x, y = self._inputs(it.images), torch.from_numpy(it.labels)  # type: ignore[arg-type]
                    extra = ([it.keys] if spec.return_keys else []) + (
                        [it.captions] if spec.decoding.caption_key else []
                    )
                    if spec.decoding.text:  # float16 as stored, exact in float32: (B, F)
                        extra.append(torch.from_numpy(it.texts).float())  # type: ignore[arg-type]
                    yield (x, y, *extra)
        finally:
            self._skipped_base += sum(self._skipped_live)
            self._skipped_live = [0] * lanes
            shutdown = getattr(items, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
