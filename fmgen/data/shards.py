"""The shard format: WebDataset tar shards plus ``manifest.json``; writing and reading the manifest.

A prepared folder holds one split of one data set::

    OUT/train-000000.tar ... train-000017.tar   WebDataset shards (``webdataset.ShardWriter``)
    OUT/manifest.json                           what the loader needs without opening a shard

Each sample is three tar members sharing a key (the sample's index in the source, 8 digits):
``KEY.png`` (or ``KEY.jpg``) the image, already ``resolution`` x ``resolution`` in mode L or RGB;
``KEY.cls`` the class index as ASCII text; ``KEY.json`` metadata
``{"id", "label", "class", "origin", "split"}``.

``manifest.json`` (format ``fmgen-shards-v1``)::

    {"format": "fmgen-shards-v1", "num_samples": 1797,
     "classes": {"count": 10, "names": ["0", ...], "samples": [178, ...]},
     "resolution": 16, "channels": 1,
     "image": {"format": "png", "jpeg_quality": null, "resample": "bicubic"},
     "pattern": "train-{000000..000001}.tar",
     "shards": [{"name": "train-000000.tar", "samples": 1000, "labels": [0, 9]}, ...],
     "split": {"name": "train", "holdout_fraction": 0.0, "seed": 0, "source_samples": 1797},
     "source": {"kind": "digits", ...}}

``fmgen.data.sources`` turns data sets into ``Example`` s (``prepare``); ``fmgen.data`` streams shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fmgen.base import FmgenError

log = logging.getLogger("fmgen.data")

FORMAT = "fmgen-shards-v1"
MANIFEST = "manifest.json"
IMAGE_FORMATS = ("png", "jpg")


class DataError(FmgenError, ValueError):
    """Bad or missing data (source, shards, manifest, labels); the message says what to fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name (relative to the manifest), sample count and label range."""

    name: str
    num_samples: int
    label_min: int
    label_max: int


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about a prepared folder (see the module docstring)."""

    num_samples: int
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]
    resolution: int
    channels: int
    image_format: str  # "png" | "jpg"
    shards: tuple[ShardInfo, ...]
    pattern: str
    split: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    jpeg_quality: int | None = None
    root: Path | None = None  # the folder the manifest was read from / written to

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def format(self) -> str:
        """The image encoding, "png" or "jpg" (same as ``image_format``)."""
        return self.image_format

    def shard_paths(self) -> list[Path]:
        root = self.root if self.root is not None else Path(".")
        return [root / s.name for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "classes": {
                "count": self.num_classes,
                "names": list(self.class_names),
                "samples": list(self.class_counts),
            },
            "resolution": self.resolution,
            "channels": self.channels,
            "image": {
                "format": self.image_format,
                "jpeg_quality": self.jpeg_quality,
                "resample": "bicubic",
            },
            "pattern": self.pattern,
            "shards": [
                {"name": s.name, "samples": s.num_samples, "labels": [s.label_min, s.label_max]}
                for s in self.shards
            ],
            "split": self.split,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path | None = None) -> Manifest:
        where = root / MANIFEST if root is not None else "the manifest"
        if d.get("format") != FORMAT:
            raise DataError(
                f"{where} has format {d.get('format')!r}, expected {FORMAT!r}; prepare the "
                f"shards again with `python -m fmgen.data prepare`"
            )
        try:
            classes = d["classes"]
            shards = tuple(
                ShardInfo(
                    str(s["name"]), int(s["samples"]), int(s["labels"][0]), int(s["labels"][1])
                )
                for s in d["shards"]
            )
            names = tuple(str(n) for n in classes["names"])
            m = cls(
                num_samples=int(d["num_samples"]),
                class_names=names,
                class_counts=tuple(int(c) for c in classes.get("samples", [0] * len(names))),
                resolution=int(d["resolution"]),
                channels=int(d["channels"]),
                image_format=str(d["image"]["format"]),
                jpeg_quality=d["image"].get("jpeg_quality"),
                shards=shards,
                pattern=str(d.get("pattern", "")),
                split=dict(d.get("split", {})),
                source=dict(d.get("source", {})),
                root=root,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(
                f"{where} is malformed ({type(e).__name__}: {e}); prepare the shards again"
            ) from e
        if int(classes.get("count", m.num_classes)) != m.num_classes:
            raise DataError(
                f"{where}: classes.count={classes['count']} but {m.num_classes} class names are "
                f"listed; fix the manifest or prepare the shards again"
            )
        return m


def _manifest_text(d: dict[str, Any]) -> str:
    """JSON with one line per top-level key and per shard: short, readable, diffable."""
    lines = []
    for k, v in d.items():
        if k == "shards":
            rows = ",\n".join(f"  {json.dumps(s)}" for s in v)
            lines.append(f' "shards": [\n{rows}\n ]')
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def read_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.json`` from a prepared folder (or the path of the JSON file itself)."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"no manifest at {file}: prepare shards there first, e.g. "
            f"`python -m fmgen.data prepare --source digits --out {path}`"
        )
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{file} is not valid JSON ({e}); prepare the shards again") from e
    return Manifest.from_json(d, root=file.parent)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def encode_image(img: Image.Image, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """PNG (lossless) or JPEG bytes of a PIL image."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    elif image_format == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise DataError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    return buf.getvalue()


@dataclass(frozen=True)
class Example:
    """One sample to write: an image already fitted to the target size and mode."""

    image: Image.Image
    label: int
    id: int
    origin: str = ""


def _files_to_replace(out: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier ``write_shards`` into ``out``: its manifest and the shards it lists.

    fmgen never deletes or overwrites a file it did not write: a folder that holds anything but
    a manifest of fmgen's and its shards (fmgen's caches aside) is refused.
    """
    manifest = out / MANIFEST
    listed: list[Path] = []
    if manifest.exists():
        try:
            m = read_manifest(out)
        except DataError:
            raise DataError(
                f"{manifest} was not written by fmgen (or is damaged); fmgen does not overwrite "
                f"it: choose an empty or new --out"
            ) from None
        if not overwrite:
            raise DataError(
                f"{out} already holds prepared shards ({MANIFEST}); pass overwrite=True "
                f"(--overwrite) or choose another --out"
            )
        listed = [manifest, *(out / s.name for s in m.shards)]
    ours = {p.name for p in listed} | {"fid-cache"}
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")
    )
    if foreign:
        raise DataError(
            f"{out} holds {len(foreign)} file(s) fmgen did not write (e.g. {foreign[0]}); fmgen "
            f"never overwrites or deletes them: choose an empty or new --out, or point data.path "
            f"at a folder of its own"
        )
    return listed


def write_shards(
    examples: Iterable[Example],
    out_dir: str | Path,
    *,
    class_names: list[str],
    resolution: int,
    channels: int,
    split: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    image_format: str = "png",
    jpeg_quality: int = 95,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    prefix: str = "train",
    overwrite: bool = False,
) -> Manifest:
    """Write ``examples`` as WebDataset shards ``OUT/{prefix}-NNNNNN.tar`` and the manifest.

    The manifest is written last (atomically), so a folder without one is never mistaken for a
    complete data set.
    """
    import webdataset as wds

    out = Path(out_dir)
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise DataError("samples per shard and max shard size must be positive")
    out.mkdir(parents=True, exist_ok=True)
    for p in _files_to_replace(out, overwrite):  # only what an fmgen manifest lists
        p.unlink(missing_ok=True)
    mode = "L" if channels == 1 else "RGB"
    counts: dict[str, list[int]] = {}  # shard name -> [samples, label min, label max]
    per_class = [0] * len(class_names)
    split_name = (split or {}).get("name", prefix)
    # A fixed mtime makes the same source give byte-identical shards.
    with wds.ShardWriter(
        str(out / f"{prefix}-%06d.tar"),
        maxcount=samples_per_shard,
        maxsize=max_shard_bytes,
        verbose=0,
        mtime=0,
    ) as writer:
        for ex in examples:
            if ex.image.size != (resolution, resolution) or ex.image.mode != mode:
                raise DataError(
                    f"sample {ex.id} ({ex.origin}) is {ex.image.size} {ex.image.mode}, expected "
                    f"({resolution}, {resolution}) {mode}; fit it with fit_image first"
                )
            if not 0 <= ex.label < len(class_names):
                raise DataError(
                    f"sample {ex.id} ({ex.origin}) has label {ex.label}, outside "
                    f"0..{len(class_names) - 1}"
                )
            meta = {
                "id": ex.id,
                "label": ex.label,
                "class": class_names[ex.label],
                "origin": ex.origin,
                "split": split_name,
            }
            writer.write(
                {
                    "__key__": f"{ex.id:08d}",
                    image_format: encode_image(ex.image, image_format, jpeg_quality),
                    "cls": str(ex.label).encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
            name = Path(writer.fname).name  # after write: the shard this sample went to
            c = counts.setdefault(name, [0, ex.label, ex.label])
            c[0], c[1], c[2] = c[0] + 1, min(c[1], ex.label), max(c[2], ex.label)
            per_class[ex.label] += 1
    for p in out.glob(f"{prefix}-*.tar"):
        if p.name not in counts:  # ShardWriter opens its first file before any sample arrives
            p.unlink()
    if not counts:
        raise DataError(f"no samples to write to {out}: the source (or its split) is empty")
    names = sorted(counts)
    first, last = (n[len(prefix) + 1 : -len(".tar")] for n in (names[0], names[-1]))
    shards = tuple(ShardInfo(n, *counts[n]) for n in names)
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        class_names=tuple(class_names),
        class_counts=tuple(per_class),
        resolution=resolution,
        channels=channels,
        image_format=image_format,
        jpeg_quality=jpeg_quality if image_format == "jpg" else None,
        shards=shards,
        pattern=f"{prefix}-{{{first}..{last}}}.tar",
        split=split or {"name": prefix},
        source=source or {},
        root=out,
    )
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(_manifest_text(manifest.to_json()))
    os.replace(tmp, out / MANIFEST)
    return manifest
