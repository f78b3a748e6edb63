"""Where shards come from: local files, folders, brace patterns and URLs.

``data.path`` of a ``webdataset`` source names shards as WebDataset users write them:

- a local folder (its ``*.tar``, ``*.tar.gz`` and ``*.tgz`` files, sorted; other files such as
  img2dataset's parquet and ``_stats.json`` are ignored);
- a brace pattern, local or remote: ``/data/train-{000000..000999}.tar``,
  ``https://host/shards/train-{0000..0099}.tar``;
- a list of either;
- URLs of any scheme WebDataset's opener knows: ``pipe:CMD`` (the command writes the shard to
  stdout: ``pipe:aws s3 cp s3://bucket/train-000000.tar -``, ``pipe:gcloud storage cat gs://...``),
  ``file:PATH``, ``http://``, ``https://`` (through curl), and WebDataset's others.

Remote streams are opened with ``webdataset.gopen`` (so ``GOPEN_REWRITE``, ``GOPEN_VERBOSE`` and
the AIS settings work as WebDataset documents); local files with a large read buffer. The bytes
are parsed by fmgen's tar reader (``fmgen.data.stream.tar_members``).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fmgen.data.shards import DataError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")  # two letters at least: not a drive letter
_READ_BUFFER = 1 << 20


def is_url(location: str) -> bool:
    """``pipe:...``, ``http://...``, ``file:...`` and other schemes (a local path has none)."""
    return bool(_SCHEME.match(location))


def shard_name(location: str) -> str:
    """The last path component of a shard location (``pipe:`` commands: the last word)."""
    text = location[5:].split()[-1] if location.startswith("pipe:") else location
    return text.rstrip("/").rsplit("/", 1)[-1]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard locations ``spec`` names, in order, each once; local files checked.

    Raises:
        DataError: nothing named, a folder with no shards, missing or zero-byte local files.
    """
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    found: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if not is_url(text) and Path(text).is_dir():
            files = sorted(
                str(p)
                for p in Path(text).iterdir()
                if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES)
            )
            if not files:
                raise DataError(
                    f"the folder {text} holds no shards (*.tar, *.tar.gz, *.tgz); name a shard "
                    f"folder, a brace pattern or URLs (data.path, or index's arguments)"
                )
            found += files
        else:
            found += [u.strip() for u in braceexpand.braceexpand(text) if u.strip()]
    if not found:
        raise DataError(
            f"data.path={spec!r} names no shards: give a folder, a brace pattern such as "
            f"/data/train-{{000000..000099}}.tar, URLs (http://, https://, pipe:CMD, file:) or a "
            f"list of them"
        )
    locations = list(dict.fromkeys(found))
    _check_schemes(locations)
    local = [u for u in locations if not is_url(u) or u.startswith("file:")]
    paths = [Path(re.sub(r"^file:(//)?", "", u)) for u in local]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(locations)} shards do not exist, e.g. {missing[0]}; fix "
            f"the shard locations (data.path, or index's arguments)"
        )
    empty = [str(p) for p in paths if not p.stat().st_size]
    if empty:
        raise DataError(
            f"{len(empty)} shard(s) are empty (0 bytes), e.g. {empty[0]}: a failed copy or a "
            f"full disk; copy them again"
        )
    return locations


def _check_schemes(locations: list[str]) -> None:
    """Every URL's scheme is one ``webdataset.gopen`` opens; object stores go through pipe:."""
    import sys

    import webdataset  # noqa: F401  (fills webdataset.gopen's scheme table)

    known = {"file", "pipe", *sys.modules["webdataset.gopen"].gopen_schemes}
    for u in locations:
        m = _SCHEME.match(u)
        if m and m.group(1).lower() not in known:
            command = {"s3": f"pipe:aws s3 cp {u} -", "az": f"pipe:azcopy cp {u} /dev/stdout"}.get(
                m.group(1).lower(), f"pipe:YOUR-CLI-CAT {u}")  # fmt: skip
            raise DataError(
                f"{u}: webdataset.gopen cannot open {m.group(1)}: URLs; stream each shard "
                f"through a command that writes it to stdout, e.g. {command!r}, or use http(s)://"
            )


class _Peekable(io.RawIOBase):
    """A read-only raw stream over any object with ``read(n)``, for ``io.BufferedReader``."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def start_shard(location: str) -> Any:
    """Start reading a remote shard now (``pipe:`` and curl commands connect and fill their
    pipe while the previous shard is parsed); None for local files, which need no head start.
    Pass the result to ``open_shard``, or to ``discard`` if it is not needed after all."""
    if not is_url(location) or location.startswith("file:"):
        return None
    from webdataset import gopen

    try:
        return gopen(location, "rb", bufsize=_READ_BUFFER)
    except Exception as e:  # the opener's own errors: an unreadable shard, reported as such
        return _Failed(f"{type(e).__name__}: {e}")


class _Failed:
    """A shard whose opening failed; reading it raises the reason as ``OSError``."""

    def __init__(self, reason: str):
        self.reason = reason

    def close(self) -> None:
        pass


def discard(handle: Any) -> None:
    """Close a started shard that will not be read (its command's exit status is ignored)."""
    if handle is not None:
        with contextlib.suppress(Exception):
            handle.close()


@contextlib.contextmanager
def open_shard(location: str, started: Any = None) -> Iterator[BinaryIO]:
    """A buffered binary stream (with ``peek``) of one shard; closed, and checked, on exit.

    ``started``: the handle ``start_shard(location)`` returned. A ``pipe:`` or curl command
    that fails raises ``OSError`` naming its exit status when the stream closes, so a shard cut
    short by a failed download is never mistaken for a short one.
    """
    if not is_url(location) or (location.startswith("file:") and started is None):
        path = re.sub(r"^file:(//)?", "", location)
        with open(path, "rb", buffering=_READ_BUFFER) as f:
            yield f
        return
    handle = started if started is not None else start_shard(location)
    if isinstance(handle, _Failed):
        raise OSError(f"opening {location} failed: {handle.reason}")
    # A Pipe (pipe:, http(s) through curl) polls its process on every read(); its buffered
    # stdout is read directly instead, and the exit status is checked once, on close.
    stream = getattr(handle, "stream", handle)
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(_Peekable(stream), _READ_BUFFER)
    try:
        yield stream  # type: ignore[misc]
    except BaseException:
        with contextlib.suppress(OSError):  # the reader's own error is the one to report
            handle.close()
        raise
    try:
        handle.close()
    except OSError as e:  # Pipe: "(args): exit N (read) ..."
        status = re.search(r"exit (-?\d+)", str(e))
        raise OSError(
            f"reading {location} failed (exit status {status.group(1) if status else '?'})"
        ) from None
