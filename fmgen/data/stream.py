"""The worker side of ``fmgen.data.ShardLoader``: one lane's stream of batches.

A lane (one per DataLoader worker) reads tar shards with a fast tar parser, shuffles raw samples
in a buffer, decodes PNG/JPEG with PIL and yields batches tagged with the lane's position
(epoch, cursor) after them. Everything here is a pure function of ``LaneSpec``, the lane number
and the start position, which is what makes an exact restore possible.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fmgen.data.decode import (
    LATENT_DTYPE,
    TEXT_DTYPE,
    Decoding,
    Unusable,
    decode,
    decode_latent,
    decode_text,
    hint,
)
from fmgen.data.shards import DataError
from fmgen.data.urls import discard, open_shard, start_shard

log = logging.getLogger("fmgen.data")

_SHARDS, _BUFFER, _FLIPS, _ORDER = 1, 2, 3, 4  # seed stream tags


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float32 (B, C, H, W) in [-1, 1]: ``x / 127.5 - 1``."""
    return images.float().div_(127.5).sub_(1.0)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class LaneSpec:
    """Everything a lane needs; picklable (sent to DataLoader workers)."""

    shards: tuple[str, ...]  # local paths or URLs (fmgen.data.urls)
    shard_samples: tuple[
        int | None, ...
    ]  # samples per shard (manifest or index), to count lost ones
    decoding: Decoding
    batch_size: int
    rank: int
    world_size: int
    lanes: int
    seed: int
    resampled: bool
    shuffle_buffer: int
    hflip: bool
    drop_last: bool
    return_keys: bool
    lane_samples: int  # resampled mode: samples a lane reads per epoch
    corrupt_limit: int  # consecutive unusable samples before giving up
    empty_limit: int  # shards in a row that yield no sample (unreadable, failed downloads)
    mirror: bool = False  # every sample mirrored (the flipped half of an in-memory latent set)


@dataclass(frozen=True)
class LanePosition:
    """A lane's position: samples taken from its epoch's shuffle buffer (decoded or skipped)."""

    epoch: int = 0
    cursor: int = 0
    done: bool = False  # epoch mode: the lane has finished its epoch


class LaneItem(NamedTuple):
    kind: str  # "batch" | "end" (epoch mode: lane finished) | "error"
    # uint8 numpy, not float tensors: through the worker pipe a pickled uint8 array costs about
    # 0.5 ms per 128x3x32x32 batch, a float32 shared-memory tensor about 4 ms (measured);
    # ShardLoader scales it to [-1, 1] in the main process.
    images: np.ndarray | None  # (B, H, W, C) uint8; latent shards: (B, c, h, w) float16
    labels: np.ndarray | None  # (B,) int64
    keys: list[str] | None
    captions: list[str] | None
    texts: np.ndarray | None  # (B, F) float16 text rows of text shards (Decoding.text = F)
    lane: int
    position: LanePosition  # after this item
    skipped: int  # corrupt samples this lane skipped since the iterator started
    message: str = ""


class _Skips:
    def __init__(self, lane: int):
        self.lane, self.n = lane, 0

    def add(self, where: str, reason: str, count: int = 1) -> None:
        """``count`` samples lost at ``where`` (a whole truncated shard's rest counts them all)."""
        before, self.n = self.n, self.n + count
        if count > 1 or self.n <= 10 or self.n // 1000 > before // 1000:
            log.warning(
                "skipping %s at %s: %s (%d skipped in lane %d)",
                "a corrupt sample" if count == 1 else f"{count} samples",
                where,
                reason,
                self.n,
                self.lane,
            )


_BLOCK = 512
_ZEROS = bytes(_BLOCK)


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a tar stream, in order.

    Uncompressed ustar/pax/GNU tars (what ShardWriter writes) are parsed here, about ten times
    faster per member than ``tarfile``; compressed ones go through ``tarfile``. A truncated or
    corrupt stream raises ``tarfile.ReadError`` after the members read so far.
    """
    magic = f.peek(6)[:6]  # type: ignore[attr-defined]
    if magic[:3] in (b"\x1f\x8b\x08", b"BZh") or magic == b"\xfd7zXZ\x00":  # gzip, bzip2, xz
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # streaming: do not keep every header
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()  # type: ignore[union-attr]
        return
    pax: dict[str, str] = {}
    long_name = ""
    while True:
        hdr = f.read(_BLOCK)
        if len(hdr) < _BLOCK or hdr == _ZEROS:
            if hdr and hdr != _ZEROS:
                raise tarfile.ReadError("truncated tar header")
            return
        try:
            checksum = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
            size = int(pax.get("size") or int(hdr[124:136].strip(b"\0 ") or b"0", 8))
        except ValueError:
            raise tarfile.ReadError("corrupt tar header") from None
        if checksum != sum(hdr) - sum(hdr[148:156]) + 256:
            raise tarfile.ReadError("bad tar header checksum")
        data = f.read(size)
        pad = -size % _BLOCK
        if len(data) < size or len(f.read(pad)) < pad:
            raise tarfile.ReadError("unexpected end of data")
        kind = hdr[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header of the next member: "LEN key=value\n" records
            for rec in data.decode("utf-8", "replace").splitlines():
                k, _, v = rec.partition(" ")[2].partition("=")
                pax[k] = v
        elif kind in (b"0", b"\0", b"7"):
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if hdr[257:263] == b"ustar\0" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            yield pax.get("path") or long_name or name, data
            pax, long_name = {}, ""
        elif kind != b"g":  # directories, links, ...: not samples
            pax, long_name = {}, ""


def shard_samples(location: str, started: Any = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of one shard's samples, in order (WebDataset's grouping:
    consecutive members sharing the name up to the first dot of the file name).

    Raises ``tarfile.TarError`` / ``OSError`` when the shard cannot be read to its end, after
    the complete samples before; the sample being read then is lost. ``started``: see
    ``fmgen.data.urls.start_shard``.
    """
    key, members = "", {}
    with open_shard(location, started) as f:
        for name, data in tar_members(f):
            folder, _, file = name.rpartition("/")
            base, dot, ext = file.partition(".")
            if not dot:
                continue
            base = f"{folder}/{base}" if folder else base
            if base != key:
                if members:
                    yield key, members
                key, members = base, {}
            members[ext.lower()] = data
    if members:
        yield key, members


def _tar_samples(
    paths: Iterator[str], on_error: Callable[[str, str, int], None], limit: int,
    expected: dict[str, int | None],
) -> Iterator[tuple[str, dict[str, bytes], str]]:  # fmt: skip
    """(key, {extension: bytes}, shard) of every sample of the shards ``paths``.

    A shard that cannot be read to its end (truncated, corrupt, gone, a failed download)
    reports the samples it still owed by the manifest's count (``expected``; unknown: one) as
    lost, naming the shard.
    """
    empty = 0
    ahead = iter(paths)
    path = next(ahead, None)
    started = start_shard(path) if path is not None else None
    try:
        while path is not None:
            # the next remote shard starts downloading while this one is parsed
            following = next(ahead, None)
            handle, started = started, start_shard(following) if following is not None else None
            n = yield from _shard_of(path, handle, on_error, expected)
            empty = 0 if n else empty + 1
            if empty > limit:
                raise DataError(
                    f"{empty} shards in a row yielded no sample (last: {path}); the shards look "
                    f"corrupt or cannot be read: check data.path"
                )
            path = following
    finally:
        discard(started)  # a stream stopped early (a resampled epoch's end) leaves one started


def _shard_of(
    path: str, handle: Any, on_error: Callable[[str, str, int], None],
    expected: dict[str, int | None],
) -> Generator[tuple[str, dict[str, bytes], str], None, int]:  # fmt: skip
    """The samples of one shard for ``_tar_samples``; returns how many were read."""
    n, key, read_to_end = 0, "", True
    try:
        for key, members in shard_samples(path, handle):
            n += 1
            yield key, members, path
    except (tarfile.TarError, OSError, EOFError) as e:
        owed = expected.get(path)
        on_error(f"shard {path} (after key {key!r})", f"unreadable tar: {type(e).__name__}: {e}",
                 max(1, owed - n) if owed is not None else 1)  # fmt: skip
        read_to_end = False
    owed = expected.get(path)
    if read_to_end and owed is not None and n < owed:  # cut at a member boundary
        on_error(f"shard {path}", f"it ended after {n} of its {owed} samples", owed - n)
    return n


def _shuffled(items: Iterator[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """A shuffle buffer of ``size`` items, drained at the end (``size`` <= 1: the input order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


def _epoch_samples(
    spec: LaneSpec, lane: int, epoch: int, skip: int, skips: _Skips
) -> Iterator[tuple[int, str, dict[str, bytes], str, bool]]:
    """(cursor, key, members, shard, flip) of lane ``lane``'s epoch ``epoch`` after ``skip``
    samples, which are read but neither decoded nor yielded."""
    n_shards = len(spec.shards)
    if spec.resampled:
        pick = random.Random(_seed(spec.seed, epoch, spec.rank, lane, _SHARDS))
        paths: Iterator[str] = (spec.shards[pick.randrange(n_shards)] for _ in itertools.count())
    else:
        order = list(range(n_shards))
        if spec.shuffle_buffer > 0:  # the same permutation on every rank: a partition
            random.Random(_seed(spec.seed, epoch, _ORDER)).shuffle(order)
        paths = iter(
            [spec.shards[i] for i in order[spec.rank :: spec.world_size][lane :: spec.lanes]]
        )
    cursor = 0

    def on_error(where: str, reason: str, count: int) -> None:
        if cursor >= skip:  # errors before the restored position were counted by the saved run
            skips.add(where, reason, count)

    raw = _tar_samples(paths, on_error, spec.empty_limit,
                       dict(zip(spec.shards, spec.shard_samples, strict=True)))  # fmt: skip
    if spec.resampled:  # a fixed-size epoch whose shuffle buffer drains: nothing read is wasted
        raw = itertools.islice(raw, spec.lane_samples)
    flips = random.Random(_seed(spec.seed, epoch, spec.rank, lane, _FLIPS))
    buffer = random.Random(_seed(spec.seed, epoch, spec.rank, lane, _BUFFER))
    for key, members, path in _shuffled(raw, buffer, spec.shuffle_buffer):
        flip = spec.mirror or (spec.hflip and flips.random() < 0.5)
        cursor += 1
        if cursor > skip:
            yield cursor, key, members, path, flip


def _lane_batches(
    spec: LaneSpec, lane: int, start: LanePosition, skips: _Skips
) -> Iterator[LaneItem]:
    """A lane's batches from ``start``: forever (resampled; batches may span epochs) or to the
    end of the epoch, then an "end" item."""
    d = spec.decoding
    B, r, c = spec.batch_size, d.resolution, d.channels
    if d.latent:
        images = np.empty((B, *d.latent), LATENT_DTYPE)
    else:
        images = np.empty((B, r, r, c), np.uint8)
    labels = np.empty(B, np.int64)
    texts = np.empty((B, d.text), TEXT_DTYPE) if d.text else None
    keys: list[str] = []
    captions: list[str] = []
    n = bad = used = 0
    reasons: collections.Counter[str] = collections.Counter()
    epoch, cursor = start.epoch, start.cursor

    def item(n: int, position: LanePosition) -> LaneItem:
        return LaneItem(
            "batch",
            images[:n].copy(),
            labels[:n].copy(),
            list(keys) if spec.return_keys else None,
            list(captions) if d.caption_key else None,
            texts[:n].copy() if texts is not None else None,
            lane,
            position,
            skips.n,
        )

    for epoch in itertools.count(start.epoch) if spec.resampled else [start.epoch]:
        skip = start.cursor if epoch == start.epoch else 0
        for cursor, key, members, path, flip in _epoch_samples(spec, lane, epoch, skip, skips):
            try:
                if d.latent:  # the mirror image's own latent: a flipped latent is not one
                    arr, labels[n], caption = decode_latent(members, d, f"{key} of {path}", flip)
                else:
                    arr, labels[n], caption = decode(members, d, f"{key} of {path}")
                    arr = arr[:, ::-1] if flip else arr
                row = decode_text(members, d) if texts is not None else None
            except Unusable as e:
                skips.add(f"{key} of {path}", str(e))
                bad += 1
                reasons[e.kind] += 1
                unusable = sum(reasons.values())
                # in a row, or most of what was read: never train on the few that decode
                if bad > spec.corrupt_limit or (unusable > 256 and unusable > used):
                    kind = reasons.most_common(1)[0][0]
                    raise DataError(
                        f"{unusable} of {unusable + used} samples read could not be used (last: "
                        f"{key} of {path}: {e}); {hint(kind, d)}"
                    ) from None
                continue
            bad, used = 0, used + 1
            images[n] = arr
            if texts is not None:
                texts[n] = row
            if spec.return_keys:
                keys.append(key)
            if d.caption_key:
                captions.append(caption)
            n += 1
            if n == B:
                end = spec.resampled and cursor == spec.lane_samples
                yield item(n, LanePosition(epoch + 1, 0) if end else LanePosition(epoch, cursor))
                images, labels, n = np.empty_like(images), np.empty_like(labels), 0
                texts = np.empty_like(texts) if texts is not None else None
                keys.clear()
                captions.clear()
    if n and not spec.drop_last:
        yield item(n, LanePosition(epoch, cursor))
    end = LanePosition(epoch, cursor, True)
    yield LaneItem("end", None, None, None, None, None, lane, end, skips.n)


def lane_items(spec: LaneSpec, lane: int, start: LanePosition) -> Iterator[LaneItem]:
    skips = _Skips(lane)
    try:
        if spec.resampled or not start.done:
            yield from _lane_batches(spec, lane, start, skips)
    except DataError as e:  # re-raised by the main process with its own message, no worker trace
        yield LaneItem("error", None, None, None, None, None, lane, start, skips.n, str(e))


class LaneDataset(torch.utils.data.IterableDataset):
    """Worker i of the DataLoader plays lane (i + rotation) % L, from the saved lane positions."""

    def __init__(self, spec: LaneSpec, start: tuple[LanePosition, ...], rotation: int):
        self.spec, self.start, self.rotation = spec, start, rotation

    def __iter__(self) -> Iterator[LaneItem]:
        info = torch.utils.data.get_worker_info()
        lane = ((info.id if info is not None else 0) + self.rotation) % self.spec.lanes
        return lane_items(self.spec, lane, self.start[lane])


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample Python; intra-op threads only contend


def identity(x: Any) -> Any:
    return x
