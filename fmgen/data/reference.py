"""The real images an FID compares with, from any shard source, streamed one batch at a time.

fmgen's prepared folders are identified by their manifest's hash and keep their statistics
cache beside it (``fid-cache/``, a folder fmgen owns). WebDataset shards of other origins are
identified by a hash of the shard list, their sample counts and the decoding (keys, fit,
resolution, channels), and never get a file written beside them: their cache goes where the
index folder when an index is used (shared by every run), else where the caller says (the
run folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from fmgen.base import file_hash
from fmgen.config import DataConfig
from fmgen.data.loader import ShardLoader
from fmgen.data.pipeline import shard_loader
from fmgen.data.shards import MANIFEST, read_manifest
from fmgen.data.urls import shard_name


@dataclass(frozen=True)
class ReferenceImages:
    """Where the real images are, what they look like, and what identifies them."""

    name: str  # for messages and records: the folder, pattern or URLs as given
    shape: tuple[int, int, int]  # (C, H, W) of every image, as loaded
    key: str  # content identity: the manifest's sha256, or a hash of shards + decoding
    cache_dir: Path | None  # where FID statistics may be cached (None: nowhere)
    num_classes: int
    _loader: ShardLoader

    def batches(self) -> Iterator[Tensor]:
        """Every image once, in shard order: (B, C, H, W) float32 in [-1, 1]."""
        for images, *_ in self._loader:
            yield images


def reference_images(
    data: Path | DataConfig, *, batch: int = 500, cache_dir: Path | None = None
) -> ReferenceImages:
    """The reference of a shard folder prepared by fmgen, or of a data config (any source)."""
    # rank 0 of 1 explicitly, shards in order, no shuffling: the same statistics on any machine
    one_pass = dict(rank=0, world_size=1, resampled=False, shuffle_buffer=0, seed=0)
    if isinstance(data, DataConfig) and data.source == "webdataset":
        loader = shard_loader(dataclasses.replace(data, caption_key=""), batch, **one_pass)
        spec = loader._spec
        identity = {
            "shards": [shard_name(s) for s in spec.shards],
            "samples": list(spec.shard_samples),
            "decoding": dataclasses.asdict(spec.decoding),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        if loader.index is not None and loader.index.root is not None:
            cache_dir = loader.index.root / "fid-cache"  # fmgen wrote it; shared by every run
        d = spec.decoding
        name = (
            data.path if isinstance(data.path, str) else f"{data.path[0]} (+{len(data.path) - 1})"
        )
        return ReferenceImages(str(name), (d.channels, d.resolution, d.resolution), key,
                               cache_dir, loader.num_classes, loader)  # fmt: skip
    folder = Path(data.path) if isinstance(data, DataConfig) else Path(data)
    m = read_manifest(folder)
    loader = ShardLoader(
        folder, batch_size=batch, latents=False, **one_pass
    )  # latent shards: pixels
    return ReferenceImages(str(folder), (m.channels, m.resolution, m.resolution),
                           file_hash(folder / MANIFEST), folder / "fid-cache", m.num_classes,
                           loader)  # fmt: skip


def data_set_name(data: Path | DataConfig) -> str | None:
    """Which data set the images of a shard folder or data config are, for feature networks
    trained on one: ``digits`` (fmgen's prepare of scikit-learn's digits: the manifest's source
    kind), the name or path given to an ``hf`` source, ``folder:PATH`` for an image folder; None
    when nothing says (WebDataset shards fmgen did not prepare).

    A data config whose shards are not prepared yet is named from its ``data.source``.
    """
    if isinstance(data, DataConfig):
        if data.source == "webdataset":
            return None
        if not (Path(data.path) / MANIFEST).is_file():
            return _source_name({"kind": data.source, "path": data.source_path})
        data = Path(data.path)
    return _source_name(read_manifest(data).source)


def _source_name(source: dict[str, object]) -> str | None:
    kind, path = source.get("kind"), source.get("path")
    if kind == "digits":
        return "digits"
    if kind == "hf" and path:
        return str(path)
    if kind == "folder" and path:
        return f"folder:{path}"
    return None
