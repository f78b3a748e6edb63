"""Which shards a loader reads and how many samples each holds: fmgen's manifest, an index, or
nothing (WebDataset shards as they are, counts unknown)."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

from fmgen.data.index import ShardIndex, is_index, read_index
from fmgen.data.shards import MANIFEST, DataError, Manifest, read_manifest
from fmgen.data.stream import shard_samples
from fmgen.data.urls import expand_shards, shard_name


def resolve_shards(source: str | Path, manifest: str | Path | None) -> tuple[Manifest, list[Path]]:
    """The manifest and the shard files selected by a folder or a brace pattern, all checked."""
    text = str(source).strip()
    if not text:
        raise DataError(
            "the shard source is empty: pass a folder holding manifest.json (e.g. data/digits-16) "
            "or a brace pattern such as data/digits-16/train-{000000..000001}.tar"
        )
    if Path(text).is_dir() or (text.endswith(".json") and Path(text).is_file()):
        m = read_manifest(manifest if manifest is not None else text)
        root = m.root or Path(text)
        selected = list(m.shards)
        if not selected:
            raise DataError(f"{root / MANIFEST} lists no shards; prepare the shards again")
    else:
        import braceexpand

        urls = [u for u in braceexpand.braceexpand(text) if u.strip()]
        if not urls:
            raise DataError(f"the shard pattern {text!r} expands to no file names; fix the pattern")
        if manifest is None and not Path(urls[0]).parent.joinpath(MANIFEST).is_file():
            raise DataError(
                f"{text!r} is neither a folder holding {MANIFEST} nor a pattern of shards beside "
                f"one; pass the prepared folder, or the manifest with manifest=..."
            )
        m = read_manifest(manifest if manifest is not None else Path(urls[0]).parent)
        root = m.root or Path(".")
        by_name = {s.name: s for s in m.shards}
        selected = []
        for u in dict.fromkeys(urls):
            if Path(u).name not in by_name:
                raise DataError(
                    f"shard {u} of the pattern {text!r} is not listed in {root / MANIFEST}; "
                    f"use one of {m.pattern!r} or prepare the shards again"
                )
            selected.append(by_name[Path(u).name])
    paths = [root / s.name for s in selected]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) listed in {root / MANIFEST} are missing, e.g. {missing[0]}; "
            f"prepare the shards again (`python -m fmgen.data prepare ... --out {root} "
            f"--overwrite`)"
        )
    # a zero-byte file is a failed copy or a full disk, never a shard: stop before training
    empty = [
        str(p)
        for p, s in zip(paths, selected, strict=True)
        if s.num_samples and not p.stat().st_size
    ]
    if empty:
        raise DataError(
            f"{len(empty)} shard(s) listed in {root / MANIFEST} are empty (0 bytes), e.g. "
            f"{empty[0]}; copy them again or prepare the shards again"
        )
    for s in selected:
        if s.label_min < 0 or s.label_max >= m.num_classes:
            bad = s.label_min if s.label_min < 0 else s.label_max
            raise DataError(
                f"shard {s.name} holds label {bad}, outside the manifest's {m.num_classes} classes "
                f"(0..{m.num_classes - 1}); fix classes.names in {root / MANIFEST} or prepare the "
                f"shards again"
            )
    return m, paths


NOMINAL_SHARD_SAMPLES = 1000
"""Samples per shard assumed for the epoch length of a resampled stream over shards whose counts
are unknown (no index): an epoch only sets when the shuffle seeds change, so any value works."""


def _counts_by_location(locations: list[str], table: dict[str, int]) -> list[int | None]:
    """Counts of ``locations`` from a table keyed by location or by shard file name."""
    by_name = {shard_name(k): v for k, v in table.items()}
    return [table.get(u, by_name.get(shard_name(u))) for u in locations]


def resolve_webdataset(
    source: str | Path | Sequence[str], manifest: str | Path | None
) -> tuple[list[str], list[int | None], Manifest | ShardIndex | None]:
    """Shard locations, their sample counts (None: unknown) and the manifest or index used."""
    text = source if isinstance(source, (list, tuple)) else str(source)
    info: Manifest | ShardIndex | None = None
    if manifest is None and isinstance(text, str) and is_index(text):
        info = read_index(text)
        locations = [s.url for s in info.shards]
    elif manifest is None and isinstance(text, str) and (Path(text) / MANIFEST).is_file():
        info = read_manifest(text)  # fmgen's own shards, read as WebDataset
        locations = [str(p) for p in info.shard_paths()]
    else:
        locations = expand_shards(text)
        if manifest is not None:
            info = read_index(manifest) if is_index(manifest) else read_manifest(manifest)
    if isinstance(info, ShardIndex):
        table = {s.url: s.num_samples for s in info.shards}
    elif info is not None:
        table = {s.name: s.num_samples for s in info.shards}
    else:
        table = {}
    return locations, _counts_by_location(locations, table), info


def first_sample(location: str) -> dict[str, bytes]:
    """The members of the first sample of a shard (reads no further); DataError if unreadable."""
    try:
        for _, members in shard_samples(location):
            return members
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the shard {location}: {type(e).__name__}: {e}") from None
    raise DataError(f"the shard {location} holds no sample; check data.path")
