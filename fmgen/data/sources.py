"""Data sets in, shards out: scikit-learn digits, image folders and ``datasets`` data sets.

``prepare`` (also ``python -m fmgen.data prepare ...``) reads a source, takes one part of a
deterministic train/test split, fits every image to the target size and writes shards with
``fmgen.data.shards.write_shards``.

Every image is read upright (EXIF), 16-bit images scaled and transparent ones composited over
a background colour, then fitted: see ``fmgen.data.images``.

scikit-learn's 8x8 digits (values 0..16, scaled to 0..255 with rounding) are upscaled with the
same bicubic filter. The held-out split is a seeded permutation of source indices: ``--split
test`` takes the first ``round(f * N)`` of it and ``--split train`` the rest, so the two are
disjoint and together the whole source. The samples of a split are written in a second seeded
order (``shuffle_seed``), so every shard holds a mix of classes rather than one class after
another; each sample keeps its source index as key and ``id``.

A file that cannot be read is skipped, named in a warning and counted in the manifest
(``split.unreadable``); ``strict=True`` (``--strict``) stops at it instead.

``caption_templates`` (digits only, e.g. "digits"): each sample also gets a caption, its
``KEY.txt`` member (UTF-8), drawn from the training templates of ``fmgen.data.captions`` by its
source index; the manifest's source record names the set (``source.captions``), so shards with
and without captions are told apart. Without it the shards are exactly as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fmgen.data.captions import caption, caption_record
from fmgen.data.images import EncodeSample, encoded, fit_image, open_loaded, parse_background
from fmgen.data.shards import DataError, Example, Manifest, Skipped, write_shards

log = logging.getLogger("fmgen.data")

SOURCES = ("digits", "folder", "hf")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LOGGED_UNREADABLE = 20  # unreadable files named one by one in the log; the rest are counted


def _digits_u8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    return images, d.target.astype(np.int64)


def digits_images(resolution: int = 8, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits exactly as ``prepare("digits", ...)`` stores them.

    Returns:
        images: uint8 (N, R, R) for channels 1 or (N, R, R, 3) for channels 3; N = 1797.
        labels: int64 (N,) in 0..9.
    """
    u8, labels = _digits_u8()
    images = np.stack([np.asarray(fit_image(Image.fromarray(a), resolution, channels)) for a in u8])
    return images, labels


# --------------------------------------------------------------------------------------------
# Sources: an indexable view of every data set the writer accepts
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A data set as the writer sees it: ``n`` samples, all labels up front, images on demand."""

    kind: str
    labels: np.ndarray  # (n,) int64
    class_names: list[str]
    image: Callable[[int], Image.Image]  # the i-th image, any size and mode; picklable
    origin: Callable[[int], str]  # a human-readable pointer to the i-th sample
    info: dict[str, Any]
    native_resolution: int | None = None

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _ArrayImages:
    images: np.ndarray  # (n, H, W) uint8

    def __call__(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


@dataclass(frozen=True)
class _FileImages:
    files: tuple[Path, ...]

    def __call__(self, i: int) -> Image.Image:
        return open_loaded(self.files[i])


@dataclass(frozen=True)
class _ColumnImages:
    column: Any  # a datasets.Dataset holding the image column alone
    name: str

    def __call__(self, i: int) -> Image.Image:
        v = self.column[i][self.name]
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict) and v.get("bytes") is not None:
            return open_loaded(io.BytesIO(v["bytes"]))
        if isinstance(v, dict) and v.get("path"):
            return open_loaded(v["path"])
        a = np.asarray(v)
        return Image.fromarray(a if a.dtype == np.uint16 and a.ndim == 2 else a.astype(np.uint8))


def digits_source() -> Source:
    u8, labels = _digits_u8()
    return Source(
        "digits",
        labels,
        [str(i) for i in range(10)],
        _ArrayImages(u8),
        lambda i: f"sklearn.datasets.load_digits[{i}]",
        {"kind": "digits"},
        8,
    )


def folder_source(path: str | Path) -> Source:
    """ImageFolder layout: ``path/<class>/**/<image>``; classes are the sorted sub-folder names.

    Files are listed (and labelled) up front by suffix; they are opened only when written.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass an existing --source-path")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        found = sorted(
            p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        files += found
        labels += [k] * len(found)
    if not files:
        raise DataError(
            f"no images in class sub-folders of {root}: expected {root}/<class name>/<image>.png "
            f"(suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    return Source(
        "folder",
        np.asarray(labels, dtype=np.int64),
        classes,
        _FileImages(tuple(files)),
        lambda i: str(files[i].relative_to(root)),
        {"kind": "folder", "path": str(root)},
    )


def hf_source(
    name_or_path: str,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    hf_split: str = "train",
) -> Source:
    """A Hugging Face ``datasets`` data set: a ``save_to_disk`` folder or a named data set.

    Labels come from ``label_column`` (a ClassLabel keeps its names; other values are mapped
    to 0..K-1 in sorted order, non-negative integers keep their value); without one, every
    sample gets class 0 ("all").
    """
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if hf_split not in ds:
                    raise DataError(
                        f"{path} holds splits {list(ds)}, not {hf_split!r}; pass --hf-split"
                    )
                ds = ds[hf_split]
        else:
            ds = datasets.load_dataset(name_or_path, split=hf_split)
    except DataError:
        raise
    except Exception as e:  # the hub client raises many types; the user needs the message
        raise DataError(
            f"could not load the data set {name_or_path!r} (split {hf_split!r}): "
            f"{type(e).__name__}: {e}"
        ) from e
    for col in (image_column, label_column):
        if col is not None and col not in ds.column_names:
            raise DataError(
                f"column {col!r} is not in the data set {name_or_path!r} (columns: "
                f"{ds.column_names}); pass --image-column / --label-column"
            )
    if label_column is None:
        labels, names = np.zeros(len(ds), dtype=np.int64), ["all"]
    else:
        feature = ds.features[label_column]
        raw = list(ds[label_column])
        if isinstance(feature, datasets.ClassLabel):
            labels, names = np.asarray(raw, dtype=np.int64), list(feature.names)
        elif all(isinstance(v, (int, np.integer)) for v in raw) and min(raw) >= 0:
            labels, names = np.asarray(raw, dtype=np.int64), [str(i) for i in range(max(raw) + 1)]
        else:
            values = sorted(set(raw), key=str)
            index = {v: k for k, v in enumerate(values)}
            labels, names = np.asarray([index[v] for v in raw], np.int64), [str(v) for v in values]
    column = ds.select_columns([image_column])
    info = {
        "kind": "hf",
        "path": name_or_path,
        "hf_split": hf_split,
        "image_column": image_column,
        "label_column": label_column,
    }
    return Source(
        "hf",
        labels,
        names,
        _ColumnImages(column, image_column),
        lambda i: f"{name_or_path}[{hf_split}][{i}]",
        info,
    )


def open_source(kind: str, source_path: str | Path | None = None, **hf_options: Any) -> Source:
    if kind == "digits":
        return digits_source()
    if kind not in SOURCES:
        raise DataError(f"source {kind!r} is not one of {SOURCES}")
    if not source_path:
        raise DataError(f"source {kind!r} needs a source path (--source-path)")
    if kind == "folder":
        return folder_source(source_path)
    return hf_source(str(source_path), **hf_options)


def encoder_from_json(job: str) -> EncodeSample:
    """A prepare worker's ``EncodeSample``: the source opened again from ``src.info`` (JSON)."""
    d = json.loads(job)
    s = d["source"]
    options = {k: s[k] for k in ("image_column", "label_column", "hf_split") if k in s}
    src = open_source(s["kind"], s.get("path"), **options)
    return EncodeSample(src.image, d["resolution"], d["channels"], tuple(d["background"]),
                        d["image_format"], d["jpeg_quality"])  # fmt: skip


def split_indices(n: int, split: str, holdout_fraction: float, seed: int) -> np.ndarray:
    """Sorted source indices of ``split``: "test" = the first round(f*n) of a seeded permutation."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {SPLITS}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    if split == "test" and holdout_fraction == 0.0:
        raise DataError("split 'test' needs a holdout fraction > 0 (e.g. --holdout-fraction 0.1)")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * holdout_fraction))
    return np.sort(perm[:k] if split == "test" else perm[k:])


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def write_order(indices: np.ndarray, shuffle_seed: int) -> np.ndarray:
    """The split's source indices in the order they are written: a seeded permutation."""
    # its own stream ([seed, 1]), so the order is not tied to the split's permutation (seed)
    return indices[np.random.default_rng([shuffle_seed, 1]).permutation(len(indices))]


def _first_size(src: Source) -> tuple[int, int]:
    """The size of the first readable image (the default resolution is its shorter side)."""
    for i in range(src.n):
        try:
            return src.image(i).size
        except Exception:  # unreadable: prepare names it when it reaches it
            continue
    raise DataError(f"none of the {src.n} images of the source can be read (e.g. {src.origin(0)})")


def prepare(
    source: str,
    out_dir: str | Path,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    source_path: str | Path | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    hf_split: str = "train",
    split: str = "train",
    holdout_fraction: float = 0.0,
    seed: int = 0,
    shuffle_seed: int = 0,
    fmt: str = "png",
    quality: int = 95,
    background: str = "white",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    caption_templates: str = "",
    caption_seed: int = 0,
) -> Manifest:
    """Write one split of a source as WebDataset shards plus ``manifest.json`` in ``out_dir``.

    Args:
        source: "digits" (scikit-learn, bundled), "folder" (ImageFolder layout) or "hf"
            (a ``save_to_disk`` folder or a named ``datasets`` data set).
        resolution: output size R (images R x R); default: 8 for digits, else the shorter side
            of the first readable image.
        channels: 1 (mode L) or 3 (RGB); default 1 for digits, else 3.
        source_path: the image folder, ``save_to_disk`` folder or data set name.
        image_column, label_column, hf_split: for "hf" (``label_column`` None: one class).
        split, holdout_fraction, seed: which part of a deterministic train/test split to write
            (``holdout_fraction`` 0 writes everything as "train").
        shuffle_seed: seed of the order the split's samples are written in (across shards).
        fmt: image encoding, "png" or "jpg" (JPEG ``quality``, 1..95).
        background: the colour transparent pixels are composited over (a name or "#rrggbb").
        samples_per_shard, max_shard_bytes: a shard is closed at whichever comes first.
        workers: processes that decode, fit and encode; the shards are the same for any count.
        strict: stop at the first unreadable image (DataError naming it) instead of skipping.
        caption_templates: a template set of ``fmgen.data.captions`` ("" = no captions; digits
            only): every sample gets a ``.txt`` caption, chosen by (``caption_seed``, its index).

    Returns:
        The manifest that was written (``summary_lines`` turns it into a report).
    """
    from tqdm.auto import tqdm

    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must lie in 1..100 (95 is a good choice), got {quality}")
    if seed < 0 or shuffle_seed < 0:
        raise DataError(f"the split and shuffle seeds must be >= 0, got {seed} and {shuffle_seed}")
    if workers < 1:
        raise DataError(f"workers must be >= 1 (1 = this process alone), got {workers}")
    if caption_templates and source != "digits":
        raise DataError(
            f"caption templates ({caption_templates!r}) caption digits by their label; source "
            f"{source!r} needs captions of its own (leave the templates empty)"
        )
    captions = caption_record(caption_templates, caption_seed) if caption_templates else None
    bg = parse_background(background)
    src = open_source(
        source, source_path, image_column=image_column, label_column=label_column, hf_split=hf_split
    )
    if channels is None:
        channels = 1 if source == "digits" else 3
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if resolution is None:
        resolution = src.native_resolution or min(_first_size(src))
    if resolution < 1:
        raise DataError(f"resolution must be positive, got {resolution}")
    order = write_order(split_indices(src.n, split, holdout_fraction, seed), shuffle_seed)
    log.info(
        "preparing %d of %d %s samples (%s split) at %dx%dx%d in %s with %d worker(s)",
        len(order), src.n, source, split, resolution, resolution, channels, out_dir, workers,
    )  # fmt: skip
    encode = EncodeSample(src.image, resolution, channels, bg, fmt, quality)
    job = json.dumps({"source": src.info, "resolution": resolution, "channels": channels,
                      "background": list(bg), "image_format": fmt, "jpeg_quality": quality})  # fmt: skip

    def examples(results: Iterator[bytes | str]) -> Iterator[Example | Skipped]:
        skipped = 0
        bar = tqdm(
            zip(order.tolist(), results, strict=True),
            total=len(order),
            desc=f"prepare {source}",
            unit="img",
            disable=True if not progress else None,  # None: shown on a terminal only
        )
        for i, result in bar:
            if isinstance(result, str):
                if strict:
                    raise DataError(
                        f"cannot read image {src.origin(i)} ({result}); fix or remove it, or "
                        f"drop --strict to skip unreadable images"
                    )
                skipped += 1
                if skipped <= LOGGED_UNREADABLE:
                    log.warning("skipping unreadable image %s: %s", src.origin(i), result)
                yield Skipped(i, src.origin(i), result)
            else:
                label, origin = int(src.labels[i]), src.origin(i)
                if captions:
                    text = caption(caption_templates, label, i, caption_seed)
                    yield Example(result, label, i, origin, caption=text)
                else:  # no caption at all: the shards stay byte for byte as they were
                    yield Example(result, label, i, origin)
        if skipped:
            log.warning(
                "skipped %d unreadable image(s)%s",
                skipped,
                f" ({LOGGED_UNREADABLE} named above)" if skipped > LOGGED_UNREADABLE else "",
            )

    record = {**src.info, "background": "#{:02x}{:02x}{:02x}".format(*bg)}
    if captions:
        record["captions"] = captions
    split_info = {
        "name": split,
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "shuffle_seed": shuffle_seed,
        "source_samples": src.n,
    }
    # closing: an error in the writer stops the workers at once
    with contextlib.closing(
        encoded(encode, order.tolist(), workers, make=encoder_from_json, job=job)
    ) as results:
        m = write_shards(
            examples(results),
            out_dir,
            class_names=src.class_names,
            resolution=resolution,
            channels=channels,
            split=split_info,
            source=record,
            image_format=fmt,
            jpeg_quality=quality,
            samples_per_shard=samples_per_shard,
            max_shard_bytes=max_shard_bytes,
            prefix=split,
            overwrite=overwrite,
        )
    for name in empty_classes(m):
        log.warning("class %r has no readable images in the %s split", name, split)
    return m


def empty_classes(m: Manifest) -> list[str]:
    return [name for name, n in zip(m.class_names, m.class_counts, strict=True) if n == 0]


def summary_lines(m: Manifest, max_classes: int = 20) -> list[str]:
    """What ``prepare`` wrote, for people: samples, shards, skipped files, per-class counts."""
    lines = [
        f"wrote {m.num_samples} samples ({m.num_classes} classes, "
        f"{m.resolution}x{m.resolution}x{m.channels} {m.image_format}, "
        f"{m.split.get('name')} split) to {m.root}: {m.pattern} ({len(m.shards)} shards) "
        f"+ manifest.json"
    ]
    if m.latent is not None:
        a = m.latent["autoencoder"]
        lines.append(
            f"latents: {'x'.join(map(str, m.latent['shape']))} float16 (and of the mirror images) "
            f"from the autoencoder {a['path']} (hash {a['hash']}); per-channel mean "
            f"{[round(v, 4) for v in m.latent['mean']]}, std {[round(v, 4) for v in m.latent['std']]}"
        )
    unreadable = int(m.split.get("unreadable", 0))
    if unreadable:
        shown = list(m.split.get("unreadable_examples", []))[:5]
        more = f", ... ({unreadable - len(shown)} more)" if unreadable > len(shown) else ""
        lines.append(f"skipped {unreadable} unreadable image(s): {', '.join(shown)}{more}")
    counts = list(zip(m.class_names, m.class_counts, strict=True))
    if len(counts) <= max_classes:
        lines.append("per class: " + ", ".join(f"{name}: {n}" for name, n in counts))
    else:
        lo, hi = min(counts, key=lambda c: c[1]), max(counts, key=lambda c: c[1])
        lines.append(
            f"per class: {lo[1]} ({lo[0]}) to {hi[1]} ({hi[0]}); every count is in manifest.json"
        )
    empty = empty_classes(m)
    if empty:
        lines.append(
            f"warning: {len(empty)} class(es) without readable images: {', '.join(empty[:10])}"
            f"{', ...' if len(empty) > 10 else ''}"
        )
    return lines
