"""The shard format: WebDataset tar shards plus ``manifest.json``; writing and reading the manifest.

A prepared folder holds one split of one data set::

    OUT/train-000000.tar ... train-000017.tar   WebDataset shards (``webdataset.TarWriter``)
    OUT/manifest.json                           what the loader needs without opening a shard

Samples are in the order the writer was given (``prepare`` shuffles them, so shards mix
classes). Each sample is three tar members sharing a key (its index in the source, 8 digits):
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
     "split": {"name": "train", "holdout_fraction": 0.0, "seed": 0, "shuffle_seed": 0,
               "source_samples": 1797, "unreadable": 0},
     "source": {"kind": "digits", ...}}

Latent shards (``prepare --autoencoder``, ``fmgen.data.latents``) add two members per sample,
``KEY.latent.npy`` and ``KEY.latent_flip.npy`` (float16, the latents of the image and of its
mirror image), and a ``"latent"`` section to the manifest: the latent shape, the per-channel
mean and std of the stored latents, and the autoencoder's path, hash and factors. They keep
the image, so FID references and the pixel resolution read as from any shards.

Text shards (``prepare --text-encoder``, ``fmgen.data.text_embeddings``) add ``KEY.text.npy`` per
sample (float16 (F,): the caption's packed frozen-encoder output) and a ``"text"`` section: the
encoder's record (path, hash, architecture, dtype), max_length, token_dim, pooled_dim, width F,
caption_key, the member name and the counts of uncaptioned and truncated captions.

``fmgen.data.sources`` turns data sets into ``Example`` s (``prepare``); ``fmgen.data`` streams shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
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
    latent: dict[str, Any] | None = None  # latent shards: shape, mean, std, autoencoder
    text: dict[str, Any] | None = None  # text shards: encoder, max_length, width, member

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
            **({"latent": self.latent} if self.latent is not None else {}),
            **({"text": self.text} if self.text is not None else {}),
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
                latent=dict(d["latent"]) if d.get("latent") is not None else None,
                text=dict(d["text"]) if d.get("text") is not None else None,
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
    """One sample to write: an image already fitted to the target size and mode, as a PIL image
    or as its bytes in the shards' image format (``encode_image``; checked, not re-encoded)."""

    image: Image.Image | bytes
    label: int
    id: int
    origin: str = ""
    caption: str | None = None  # written as KEY.txt (UTF-8) when given


@dataclass(frozen=True)
class Skipped:
    """A sample the source could not give (an unreadable file): counted in the manifest."""

    id: int
    origin: str
    reason: str = ""


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("kind", "path"))


def files_to_replace(
    out: Path, overwrite: bool, source: dict[str, Any] | None = None
) -> list[Path]:
    """The files of an earlier ``write_shards`` into ``out``: its manifest and the shards it lists.

    fmgen never deletes or overwrites a file it did not write: a folder that holds anything but
    a manifest of fmgen's and its shards (fmgen's caches aside) is refused, and so are shards
    fmgen prepared from another source (``source``: its kind and path differ).
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
        if source is not None and not _same_source(m.source, source):
            was = " ".join(str(m.source.get(k, "")) for k in ("kind", "path")).strip()
            raise DataError(
                f"{out} holds shards fmgen prepared from another source ({was}); --overwrite "
                f"replaces only shards of the same source: choose another --out"
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


def temp_name(name: str) -> str:
    """Where shard ``name`` is written until the whole set is complete: hidden, not ``*.tar``."""
    return f".{name}.tmp"


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a crash after it cannot undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` completely or keeps what it held: a synced temporary, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ShardFile:
    """One shard being written under its temporary name; counts samples, bytes and labels."""

    def __init__(self, out: Path, name: str):
        import webdataset as wds

        self.name, self.temp = name, out / temp_name(name)
        self.file = open(self.temp, "wb")  # closed in finish or discard
        # webdataset's ShardWriter opens its files from a name pattern and closes them itself,
        # so it can neither write to a temporary name nor sync before a rename: one TarWriter
        # per shard on a file of ours does both. A fixed mtime makes the same source give
        # byte-identical shards.
        self.tar = wds.TarWriter(self.file, mtime=0)
        self.count, self.bytes, self.label_min, self.label_max = 0, 0, 1 << 62, -1

    def write(self, sample: dict[str, Any], label: int) -> None:
        self.bytes += self.tar.write(sample)  # payload bytes, as ShardWriter's maxsize counts
        self.count += 1
        self.label_min, self.label_max = min(self.label_min, label), max(self.label_max, label)

    def finish(self) -> ShardInfo:
        self.tar.close()  # the tar end blocks; the file stays open (it is ours)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return ShardInfo(self.name, self.count, self.label_min, self.label_max)

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # the error that brought us here may recur
            self.tar.close()  # else tarfile writes its end blocks into the closed file later
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _image_bytes(ex: Example, resolution: int, mode: str, image_format: str, quality: int) -> bytes:
    """The example's encoded image, after checking it is ``resolution`` x ``resolution`` ``mode``."""
    if isinstance(ex.image, bytes):
        try:
            with Image.open(io.BytesIO(ex.image)) as im:  # the header alone: no decoding
                size, got_mode, fmt = im.size, im.mode, im.format
        except OSError as e:
            raise DataError(
                f"sample {ex.id} ({ex.origin}): its image bytes do not open ({e})"
            ) from None
        if fmt != {"png": "PNG", "jpg": "JPEG"}[image_format]:
            raise DataError(
                f"sample {ex.id} ({ex.origin}) is {fmt}, expected {image_format}: encode it with "
                f"encode_image(img, {image_format!r})"
            )
    else:
        size, got_mode = ex.image.size, ex.image.mode
    if size != (resolution, resolution) or got_mode != mode:
        raise DataError(
            f"sample {ex.id} ({ex.origin}) is {size} {got_mode}, expected "
            f"({resolution}, {resolution}) {mode}; fit it with fit_image first"
        )
    if isinstance(ex.image, bytes):
        return ex.image
    return encode_image(ex.image, image_format, quality)


def write_shards(
    examples: Iterable[Example | Skipped],
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
    max_unreadable_listed: int = 10,
) -> Manifest:
    """Write ``examples`` as WebDataset shards ``OUT/{prefix}-NNNNNN.tar`` and the manifest.

    Samples are written in the order given. Each shard is written under a hidden temporary name
    (``.{prefix}-NNNNNN.tar.tmp``), synced, and renamed only once every shard is complete; the
    manifest comes last (atomically). So an interrupted or failed write leaves no file that
    looks like a shard, and an earlier set replaced with ``overwrite`` stays whole until then
    (the disk holds both for a while). ``Skipped`` entries are counted in the manifest
    (``split.unreadable``; the origins of the first ``max_unreadable_listed`` by id in
    ``split.unreadable_examples``).
    """
    out = Path(out_dir)
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise DataError("samples per shard and max shard size must be positive")
    out.mkdir(parents=True, exist_ok=True)
    old = files_to_replace(out, overwrite, source)  # refused now, before any work
    stale = re.compile(rf"\.{re.escape(prefix)}-\d{{6}}\.tar\.tmp")
    for p in out.iterdir():  # left by an interrupted write: fmgen's by their name
        if stale.fullmatch(p.name):
            p.unlink()
    mode = "L" if channels == 1 else "RGB"
    per_class = [0] * len(class_names)
    split_name = (split or {}).get("name", prefix)
    unreadable: list[tuple[int, str]] = []  # (id, origin)
    done: list[ShardInfo] = []
    shard: ShardFile | None = None
    try:
        for ex in examples:
            if isinstance(ex, Skipped):
                unreadable.append((ex.id, ex.origin))
                continue
            if not 0 <= ex.label < len(class_names):
                raise DataError(
                    f"sample {ex.id} ({ex.origin}) has label {ex.label}, outside "
                    f"0..{len(class_names) - 1}"
                )
            data = _image_bytes(ex, resolution, mode, image_format, jpeg_quality)
            meta = {
                "id": ex.id,
                "label": ex.label,
                "class": class_names[ex.label],
                "origin": ex.origin,
                "split": split_name,
            }
            sample = {
                "__key__": f"{ex.id:08d}",
                image_format: data,
                "cls": str(ex.label).encode(),
                "json": json.dumps(meta).encode(),
            }
            if ex.caption is not None:
                sample["txt"] = ex.caption.encode("utf-8")
            if shard is None or shard.count >= samples_per_shard or shard.bytes >= max_shard_bytes:
                if shard is not None:
                    done.append(shard.finish())
                shard = ShardFile(out, f"{prefix}-{len(done):06d}.tar")
            shard.write(sample, ex.label)
            per_class[ex.label] += 1
        if shard is not None:
            done.append(shard.finish())
            shard = None
    except BaseException:  # an error or an interrupt: no temporary file stays behind
        if shard is not None:
            shard.discard()
        for s in done:
            (out / temp_name(s.name)).unlink(missing_ok=True)
        raise
    if not done:
        raise DataError(f"no samples to write to {out}: the source (or its split) is empty")
    # the old manifest goes first, so no manifest ever lists a mix of old and new shards
    new = {s.name for s in done}
    for p in old:
        if p.name == MANIFEST:
            p.unlink(missing_ok=True)
    for s in done:
        os.replace(out / temp_name(s.name), out / s.name)
    for p in old:
        if p.name != MANIFEST and p.name not in new:
            p.unlink(missing_ok=True)
    fsync_dir(out)
    first, last = (n[len(prefix) + 1 : -len(".tar")] for n in (done[0].name, done[-1].name))
    split_info = dict(split or {"name": prefix})
    split_info["unreadable"] = len(unreadable)
    if unreadable:
        split_info["unreadable_examples"] = [
            o for _, o in sorted(unreadable)[:max_unreadable_listed]
        ]
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in done),
        class_names=tuple(class_names),
        class_counts=tuple(per_class),
        resolution=resolution,
        channels=channels,
        image_format=image_format,
        jpeg_quality=jpeg_quality if image_format == "jpg" else None,
        shards=tuple(done),
        pattern=f"{prefix}-{{{first}..{last}}}.tar",
        split=split_info,
        source=source or {},
        root=out,
    )
    write_manifest(manifest, out)
    return manifest


def write_manifest(manifest: Manifest, out: Path) -> None:
    """``out/manifest.json``, atomically: the last file of a prepared folder."""
    write_durably(out / MANIFEST, _manifest_text(manifest.to_json()).encode())
