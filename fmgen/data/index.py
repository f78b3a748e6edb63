"""The index of shards fmgen did not write: ``index.json``, made by ``python -m fmgen.data index``.

An index records what the loader cannot know without reading every shard: samples per shard,
the classes of the label member, the image sizes seen. The shards are only read (not a byte of
them changes); the index lives in a folder of its own::

    {"format": "fmgen-index-v1", "num_samples": 120000,
     "keys": {"image": "jpg", "label": "cls", "caption": "txt"},
     "classes": {"count": 10, "samples": [12000, ...]},     (null without a label member)
     "image_sizes": {"256x256": 100000, "512x384": 20000},  (the 50 most common, width x height)
     "shards": [{"url": "/data/train-000000.tar", "samples": 1000, "labels": [0, 9],
                 "bytes": 123456789}, ...],
     "unreadable": [{"url": ..., "error": ...}]}

Training (``data.source: webdataset`` with ``data.manifest`` naming the index, or ``data.path``
the index folder) takes sample counts and classes from it; FID's reference statistics too.

``index_shards`` makes one. A shard that cannot be read to its end (truncated, corrupt, a failed
download) is left out of ``shards`` and listed under ``unreadable`` with the error and the
number of complete samples before it, so ``num_samples`` counts only samples a reader gets from
whole shards.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from fmgen.data.decode import _PIL_FORMATS, IMAGE_KEYS
from fmgen.data.shards import DataError
from fmgen.data.stream import shard_samples, tar_members
from fmgen.data.urls import expand_shards, is_url, open_shard

log = logging.getLogger("fmgen.data")

INDEX_FORMAT = "fmgen-index-v1"
INDEX = "index.json"
MAX_SIZES = 50  # image sizes kept in the index: the most common
MAX_CLASSES = 1_000_000  # a larger "label" is an id or a hash, not a class index


@dataclass(frozen=True)
class IndexedShard:
    url: str  # a local path (absolute) or a URL as given to ``index``
    num_samples: int
    label_min: int | None = None
    label_max: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class ShardIndex:
    shards: tuple[IndexedShard, ...]
    image_key: str
    label_key: str
    caption_key: str = ""
    num_classes: int | None = None  # None: no label member
    class_counts: tuple[int, ...] = ()
    image_sizes: dict[str, int] = field(default_factory=dict)
    unreadable: tuple[dict[str, str], ...] = ()
    root: Path | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "num_samples": self.num_samples,
            "keys": {"image": self.image_key, "label": self.label_key, "caption": self.caption_key},
            "classes": None
            if self.num_classes is None
            else {"count": self.num_classes, "samples": list(self.class_counts)},
            "image_sizes": self.image_sizes,
            "shards": [
                {
                    "url": s.url,
                    "samples": s.num_samples,
                    "labels": None if s.label_min is None else [s.label_min, s.label_max],
                    "bytes": s.bytes,
                }
                for s in self.shards
            ],  # fmt: skip
            "unreadable": list(self.unreadable),
        }


def is_index(path: str | Path) -> bool:
    """A folder holding ``index.json``, or such a file."""
    p = Path(path)
    return (p / INDEX).is_file() or (p.name == INDEX and p.is_file())


def read_index(path: str | Path) -> ShardIndex:
    """Read ``index.json`` from its folder (or the file's path)."""
    p = Path(path)
    file = p / INDEX if p.is_dir() else p
    if not file.is_file():
        raise DataError(
            f"no shard index at {file}: make one with `python -m fmgen.data index SHARDS --out {p}`"
        )
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{file} is not valid JSON ({e}); index the shards again") from e
    if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
        raise DataError(
            f"{file} is not an fmgen shard index ({INDEX_FORMAT}); index the shards again"
        )
    try:
        classes = d.get("classes")
        return ShardIndex(
            shards=tuple(
                IndexedShard(
                    str(s["url"]),
                    int(s["samples"]),
                    *(s["labels"] if s.get("labels") else (None, None)),
                    s.get("bytes"),
                )
                for s in d["shards"]
            ),  # fmt: skip
            image_key=str(d["keys"]["image"]),
            label_key=str(d["keys"]["label"]),
            caption_key=str(d["keys"].get("caption", "")),
            num_classes=None if classes is None else int(classes["count"]),
            class_counts=() if classes is None else tuple(int(c) for c in classes["samples"]),
            image_sizes={str(k): int(v) for k, v in d.get("image_sizes", {}).items()},
            unreadable=tuple(d.get("unreadable", [])),
            root=file.parent,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{file} is malformed ({type(e).__name__}: {e}); index the shards again"
        ) from e


def write_index(index: ShardIndex, out: str | Path) -> Path:
    """Write ``out/index.json`` atomically (a temporary name, then a rename); returns its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / INDEX
    # a name of its own (mkstemp), so no file that is already there is ever overwritten
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(index.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the index from others sharing the data
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# --- making an index -----------------------------------------------------------------------------


@dataclass
class _Scan:
    """What one shard holds: a worker's answer (picklable)."""

    url: str
    samples: int = 0
    bytes: int | None = None
    labels: collections.Counter[int] = field(default_factory=collections.Counter)
    unlabeled: int = 0
    unlabeled_key: str = ""  # the first sample without an integer label member
    image_keys: collections.Counter[str] = field(default_factory=collections.Counter)
    no_image: int = 0
    no_image_key: str = ""
    bad_image: int = 0
    bad_image_key: str = ""
    sizes: collections.Counter[str] = field(default_factory=collections.Counter)  # "WxH" -> n
    captions: int = 0
    members: set[str] = field(default_factory=set)  # extensions seen, for error messages
    error: str = ""
    unterminated: bool = False  # an uncompressed tar without its end-of-archive blocks


_END = bytes(1024)  # a tar ends with two zero blocks (then zero padding to its record size)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: they detect a cut themselves


def _unterminated(head: bytes, tail: bytes) -> bool:
    """An uncompressed tar whose last bytes are not its end-of-archive blocks: the tar reader
    stops cleanly at a cut between members, and only this tells such a shard from a whole one."""
    return not head.startswith(_COMPRESSED) and tail[-len(_END) :] != _END


class _Counting:
    """A read-only stream that counts the bytes read through it and keeps its first and last
    bytes (``peek`` passes through)."""

    def __init__(self, f: BinaryIO):
        self._f, self.n, self.head, self.tail = f, 0, b"", b""

    def peek(self, n: int = 0) -> bytes:
        return self._f.peek(n)  # type: ignore[attr-defined]

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self.n < 8:
            self.head = (self.head + data)[:8]
        self.n += len(data)
        self.tail = (self.tail + data if len(data) < len(_END) else data)[-len(_END) :]
        return data


def _counted_samples(url: str, scan: _Scan) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``shard_samples`` of a URL, counting the bytes read into ``scan.bytes``.

    The grouping is ``shard_samples``'s (the tests pin that a URL's index equals the local
    file's); the rest of the stream after the tar's end is read too, so the count is the
    shard's size and a ``pipe:`` command is never cut short.
    """
    key, group = "", {}
    with open_shard(url) as f:
        counted = _Counting(f)
        for name, data in tar_members(counted):  # type: ignore[arg-type]
            folder, _, file = name.rpartition("/")
            base, dot, ext = file.partition(".")
            if not dot:
                continue
            base = f"{folder}/{base}" if folder else base
            if base != key:
                if group:
                    yield key, group
                key, group = base, {}
            group[ext.lower()] = data
        if group:
            yield key, group
        while counted.read(1 << 20):  # end-of-archive blocks and record padding
            pass
    scan.bytes = counted.n
    scan.unterminated = _unterminated(counted.head, counted.tail)


def _local_end(scan: _Scan) -> None:
    """``scan.bytes`` and ``scan.unterminated`` of a local file (two short reads)."""
    path = re.sub(r"^file:(//)?", "", scan.url)
    with open(path, "rb") as f:
        head = f.read(8)
        scan.bytes = f.seek(0, os.SEEK_END)
        f.seek(max(0, scan.bytes - len(_END)))
        scan.unterminated = _unterminated(head, f.read())


def _scan_shard(job: tuple[str, str, str, str]) -> _Scan:
    """Read one shard (a local path or a URL) to its end; an unreadable one sets ``error``."""
    url, image_key, label_key, caption_key = job
    scan = _Scan(url)
    local = not is_url(url) or url.startswith("file:")
    samples = shard_samples(url) if local else _counted_samples(url, scan)
    try:
        for key, members in samples:
            scan.samples += 1
            _add_sample(scan, key, members, image_key, label_key, caption_key)
        if local:
            _local_end(scan)
    except (tarfile.TarError, OSError, EOFError) as e:  # what shard_samples raises for a bad shard
        scan.error = f"{type(e).__name__}: {e} (after {scan.samples} complete samples)"
    return scan


def _add_sample(
    scan: _Scan, key: str, members: dict[str, bytes], image_key: str, label_key: str,
    caption_key: str,
) -> None:  # fmt: skip
    if len(scan.members) < 64:
        scan.members.update(members)
    ik = (
        (image_key if image_key in members else None)
        if image_key
        else next((k for k in IMAGE_KEYS if k in members), None)
    )
    if ik is None:
        scan.no_image += 1
        scan.no_image_key = scan.no_image_key or key
    else:
        scan.image_keys[ik] += 1
        # Image.open parses the header only: the size without decoding the pixels. The format
        # hint is the loader's, so an image it cannot open (a PNG named .jpg) is counted here.
        try:
            with Image.open(io.BytesIO(members[ik]), formats=_PIL_FORMATS.get(ik)) as im:
                w, h = im.size
            scan.sizes[f"{w}x{h}"] += 1
        except Exception:  # PIL raises many types for bad bytes
            scan.bad_image += 1
            scan.bad_image_key = scan.bad_image_key or key
    if label_key:
        try:
            scan.labels[int(members[label_key])] += 1  # an integer as text, as decode reads it
        except (KeyError, ValueError):
            scan.unlabeled += 1
            scan.unlabeled_key = scan.unlabeled_key or key
    if caption_key and caption_key in members:
        scan.captions += 1


def _check_out(out: Path) -> None:
    """Fail before any work if ``out`` cannot take an index, or holds an ``index.json`` that is
    not fmgen's (never overwritten)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for {INDEX}")
    target = out / INDEX
    if target.exists() or target.is_symlink():
        try:
            ours = target.is_file() and json.loads(target.read_text()).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(
                f"{target} exists and is not an fmgen shard index ({INDEX_FORMAT}); it is left "
                f"alone: choose another --out"
            )
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise DataError(f"--out {out}: {parent} is not writable; choose a writable folder")


def _merged(
    scans: list[_Scan], image_key: str, label_key: str, caption_key: str, root: Path
) -> ShardIndex:
    """The index of the readable shards; a DataError when the keys do not fit the shards."""
    good = [s for s in scans if not s.error]
    bad = [s for s in scans if s.error]
    if not good:
        raise DataError(
            f"none of the {len(scans)} shards could be read (first: {bad[0].url}: "
            f"{bad[0].error}); check that they are tar shards"
        )
    seen = ", ".join(f".{m}" for m in sorted(set().union(*(s.members for s in good)))) or "none"
    total = sum(s.samples for s in good)
    if not total:
        raise DataError(
            f"the {len(good)} readable shards hold no samples (members are grouped by the name "
            f"before the first dot: KEY.jpg, KEY.cls); check the shards"
        )
    if not sum(sum(s.image_keys.values()) for s in good):
        wanted = f".{image_key}" if image_key else "image (." + ", .".join(IMAGE_KEYS) + ")"
        raise DataError(
            f"no sample has a {wanted} member (members seen: {seen}); pass --image-key with "
            f"the image member"
        )
    first = next((s for s in good if s.no_image), None)
    if first is not None:
        log.warning("%d samples have no image member (e.g. %s of %s); the loader skips them",
                    sum(s.no_image for s in good), first.no_image_key, first.url)  # fmt: skip
    first = next((s for s in good if s.bad_image), None)
    if first is not None:
        log.warning("%d images have a header PIL cannot read (e.g. %s of %s); the loader skips "
                    "them", sum(s.bad_image for s in good), first.bad_image_key, first.url)  # fmt: skip
    if caption_key and not sum(s.captions for s in good):
        raise DataError(
            f"no sample has a .{caption_key} member (members seen: {seen}); pass --caption-key "
            f"with the caption member, or leave it out"
        )
    labeled = sum(sum(s.labels.values()) for s in good)
    unlabeled = sum(s.unlabeled for s in good)
    if label_key and labeled and unlabeled:
        s = next(s for s in good if s.unlabeled)
        raise DataError(
            f"sample {s.unlabeled_key} of {s.url} has no integer .{label_key} member, but "
            f"{labeled} other samples have one ({unlabeled} of {labeled + unlabeled} lack it); "
            f"fix the shards, or pass --label-key '' to index without labels"
        )
    if label_key and not labeled:
        if label_key != "cls":
            raise DataError(
                f"no sample has an integer .{label_key} member (members seen: {seen}); pass "
                f"--label-key with the label member, or --label-key '' for no labels"
            )
        log.info("no sample has a .cls label member: indexed without labels (unconditional)")
    counts: collections.Counter[int] = collections.Counter()
    for s in good:
        counts.update(s.labels)
    num_classes, class_counts = None, ()
    if counts:
        low, high = min(counts), max(counts)
        if low < 0 or high >= MAX_CLASSES:
            s = next(s for s in good if low in s.labels or high in s.labels)
            raise DataError(
                f"{s.url} holds .{label_key} {low if low < 0 else high}: class labels are "
                f"0..N-1 (N < {MAX_CLASSES}); pass --label-key with the class member, or "
                f"--label-key '' for no labels"
            )
        num_classes = high + 1
        class_counts = tuple(counts.get(c, 0) for c in range(num_classes))
    sizes: collections.Counter[str] = collections.Counter()
    used: collections.Counter[str] = collections.Counter()
    for s in good:
        sizes.update(s.sizes)
        used.update(s.image_keys)
    return ShardIndex(
        shards=tuple(
            IndexedShard(
                s.url,
                s.samples,
                min(s.labels) if s.labels else None,
                max(s.labels) if s.labels else None,
                s.bytes,
            )
            for s in good
        ),
        # the one image member every sample used is as good as "the first present", and says more
        image_key=image_key or (next(iter(used)) if len(used) == 1 else ""),
        label_key=label_key if num_classes is not None else "",
        caption_key=caption_key,
        num_classes=num_classes,
        class_counts=class_counts,
        image_sizes=dict(sizes.most_common(MAX_SIZES)),
        unreadable=tuple({"url": s.url, "error": s.error} for s in bad),
        root=root,
    )


def index_shards(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | Path,
    *,
    image_key: str = "",
    label_key: str = "cls",
    caption_key: str = "",
    workers: int = 1,
    progress: bool = True,
) -> ShardIndex:
    """Read every shard ``spec`` names and write ``out/index.json``; returns the index.

    Args:
        spec: shards as ``fmgen.data.urls.expand_shards`` takes them: a folder, a brace
            pattern, URLs (``pipe:``, ``http(s)://``, ``file:``) or a list of them.
        out: the folder of ``index.json`` (created if missing). It may be the shard folder:
            the index is the one file written; no shard or file beside one is touched.
        image_key: the image member ("" = the first of jpg, jpeg, png, webp present).
        label_key: the integer class member ("cls"; "" = no labels). With the default "cls"
            and no sample holding one, the index has no classes (unconditional).
        caption_key: a caption member to check for ("" = none).
        workers: processes reading shards at once (results keep the shards' order).

    Raises:
        DataError: no shards, every shard unreadable, keys that match no sample, samples with
            and without labels, an ``index.json`` in ``out`` that is not an fmgen index.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise DataError(f"--workers must be >= 1; got {workers}")
    out = Path(out)
    _check_out(out)
    # absolute local paths: the index is read from other working directories (jobs, FID)
    # (abspath, not resolve: a symlinked mount keeps the name every node knows it by)
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    urls = [
        u if is_url(u) else os.path.abspath(u) for u in expand_shards([os.fspath(x) for x in items])
    ]
    jobs = [(u, image_key, label_key, caption_key) for u in urls]
    scans: list[_Scan] = []
    samples = 0
    with tqdm(total=len(jobs), desc="index", unit="shard", disable=not progress) as bar:
        if workers == 1 or len(jobs) == 1:
            results: Iterator[_Scan] = map(_scan_shard, jobs)
            pool = None
        else:
            import multiprocessing

            pool = multiprocessing.get_context().Pool(min(workers, len(jobs)))
            results = pool.imap(_scan_shard, jobs, chunksize=1)
        try:
            for scan in results:
                if scan.error:
                    log.warning("shard %s is unreadable, left out of the index: %s", scan.url,
                                scan.error)  # fmt: skip
                elif scan.unterminated:
                    log.warning("shard %s ends without the tar end-of-archive blocks: it may "
                                "have been cut short (indexed with the %d samples it holds); "
                                "copy it again if so", scan.url, scan.samples)  # fmt: skip
                scans.append(scan)
                samples += 0 if scan.error else scan.samples
                bar.update(1)
                bar.set_postfix(samples=samples)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    index = _merged(scans, image_key, label_key, caption_key, out)
    _check_out(out)  # again: the scan may have taken hours
    write_index(index, out)
    log.info("indexed %d samples in %d shards (%d unreadable) -> %s", index.num_samples,
             len(index.shards), len(index.unreadable), out / INDEX)  # fmt: skip
    return index
