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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmgen.data.shards import DataError

INDEX_FORMAT = "fmgen-index-v1"
INDEX = "index.json"


@dataclass(frozen=True)
class IndexedShard:
    url: str  # as given to ``index`` (a local path or a URL)
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
    target, tmp = folder / INDEX, folder / f".{INDEX}.tmp"
    with open(tmp, "w") as f:
        json.dump(index.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target
