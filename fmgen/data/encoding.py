"""One shard's encoding into a latent shard, and the record that makes a rerun skip it.

``EncodeInput`` describes the shards to encode (fmgen's pixel shards, or WebDataset shards of
any origin); ``encode_shard`` turns input shard i into output shard i under a hidden name
(``.NAME.latent``) beside its record (``.NAME.latent.json``); ``finished_record`` says whether a
shard was encoded before for the same job (input, decoding, autoencoder) and is intact. The set
of shards and the manifest are ``fmgen.data.latents``' work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fmgen.data.decode import (
    FLIPPED_MEMBER,
    LATENT_DTYPE,
    LATENT_MEMBER,
    Decoding,
    Unusable,
    decode,
)
from fmgen.data.loader import ShardLoader
from fmgen.data.shards import (
    DataError,
    ShardFile,
    encode_image,
    fsync_dir,
    read_manifest,
    temp_name,
    write_durably,
)
from fmgen.data.stream import shard_samples, to_float
from fmgen.data.urls import shard_name
from fmgen.models.autoencoder import KLAutoencoder

log = logging.getLogger("fmgen.data")

RECORD_FORMAT = "fmgen-latent-shard-1"


@dataclass(frozen=True)
class EncodeInput:
    """The shards to encode and what the latent manifest says of their origin."""

    shards: tuple[str, ...]  # local paths or URLs
    counts: tuple[int | None, ...]  # samples per shard when known
    decoding: Decoding
    class_names: tuple[str, ...]
    image_format: str  # of the output's image member
    jpeg_quality: int | None
    copy_images: bool  # fmgen's pixel shards: the image bytes are copied as they are
    source: dict[str, Any]
    split: dict[str, Any]
    prefix: str  # output shards are PREFIX-NNNNNN.tar


def pixel_shards_input(folder: Path, source: dict[str, Any] | None = None) -> EncodeInput:
    """fmgen's pixel shards in ``folder``; ``source``: the manifest's (default: these shards)."""
    m = read_manifest(folder)
    if m.latent is not None:
        raise DataError(
            f"{folder} holds latent shards already; pass the pixel shards they were made from"
        )
    decoding = Decoding(m.resolution, m.channels, m.num_classes, image_key=m.image_format,
                        fit="none")  # fmt: skip
    origin = source or {"kind": "shards", "path": str(Path(folder).resolve()), "of": m.source}
    return EncodeInput(tuple(str(p) for p in m.shard_paths()),
                       tuple(s.num_samples for s in m.shards), decoding, m.class_names,
                       m.image_format, m.jpeg_quality, True, origin, dict(m.split),
                       str(m.split.get("name", "train")))  # fmt: skip


def webdataset_input(
    path: str | Sequence[str], *, resolution: int, channels: int, manifest: str | None = None,
    num_classes: int | None = None, image_key: str = "", label_key: str = "cls",
    fit: str = "center-crop",
) -> EncodeInput:  # fmt: skip
    """WebDataset shards of any origin, decoded and fitted as ``data.source=webdataset`` reads."""
    loader = ShardLoader(path, 1, manifest=manifest, webdataset=True, rank=0, world_size=1,
                         resampled=False, shuffle_buffer=0, resolution=resolution,
                         channels=channels, num_classes=num_classes, image_key=image_key,
                         label_key=label_key, fit=fit)  # fmt: skip
    spec = loader._spec
    names = tuple(loader.class_names) or ("all",)  # no labels: one class, as hf without labels
    where = path if isinstance(path, str) else list(path)
    source = {"kind": "webdataset", "path": where, "fit": fit, "image_key": image_key,
              "label_key": spec.decoding.label_key}  # fmt: skip
    return EncodeInput(spec.shards, spec.shard_samples, spec.decoding, names, "png", None,
                       False, source, {"name": "train"}, "train")  # fmt: skip


def _npy(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, latent, allow_pickle=False)
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_names(inputs: EncodeInput) -> list[str]:
    return [f"{inputs.prefix}-{i:06d}.tar" for i in range(len(inputs.shards))]


def done_name(name: str) -> str:
    return f".{name}.latent"


def record_name(name: str) -> str:
    return f".{name}.latent.json"


def shard_job(inputs: EncodeInput, i: int, ae: KLAutoencoder) -> dict[str, Any]:
    """What makes a finished shard reusable: the same input shard, decoding and autoencoder."""
    job = {"format": RECORD_FORMAT, "input": shard_name(inputs.shards[i]),
           "input_samples": inputs.counts[i], "decoding": dataclasses.asdict(inputs.decoding),
           "copy_images": inputs.copy_images, "autoencoder": ae.hash}  # fmt: skip
    return json.loads(json.dumps(job))  # as a record reads it back (tuples become lists)


def finished_record(out: Path, name: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a shard encoded before for the same job, if its file is intact."""
    try:
        record = json.loads((out / record_name(name)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job:
        return None
    if record["samples"] == 0:
        return record
    done = out / done_name(name)
    if not done.is_file() or done.stat().st_size != record["size"] or _sha256(done) != record["sha256"]:  # fmt: skip
        return None
    return record


def encode_shard(
    inputs: EncodeInput, i: int, out: Path, ae: KLAutoencoder, *, batch_size: int,
    device: torch.device | str, update: Callable[[int], Any] = lambda n: None,
) -> dict[str, Any]:  # fmt: skip
    """Encode input shard i into ``out/.NAME.latent`` and write its record; returns the record."""
    d, location, name = inputs.decoding, inputs.shards[i], shard_names(inputs)[i]
    channels = ae.latent_channels
    sums, squares = np.zeros(channels), np.zeros(channels)
    per_class = [0] * len(inputs.class_names)
    pending: list[tuple[str, dict[str, bytes], np.ndarray, int]] = []
    shard, skipped = ShardFile(out, name), 0

    def image_bytes(members: dict[str, bytes], arr: np.ndarray) -> bytes:
        if inputs.copy_images:
            return members[d.image_key]
        return encode_image(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), "png")

    def flush() -> None:
        pixels = torch.from_numpy(np.stack([p[2] for p in pending])).permute(0, 3, 1, 2)
        x = to_float(pixels.contiguous()).to(device)  # (B, C, H, W) in [-1, 1]
        raw = ae.encode_raw(x).cpu().numpy().astype(LATENT_DTYPE)  # (B, c, h, w)
        mirrored = ae.encode_raw(x.flip(-1)).cpu().numpy().astype(LATENT_DTYPE)
        for (key, members, arr, label), z, z_flip in zip(pending, raw, mirrored, strict=True):
            meta = members.get("json") if inputs.copy_images else None
            meta = meta or json.dumps({"id": key, "label": label, "class": inputs.class_names[label],
                                       "origin": f"{shard_name(location)}/{key}",
                                       "split": inputs.prefix}).encode()  # fmt: skip
            shard.write({"__key__": key, inputs.image_format: image_bytes(members, arr),
                         "cls": str(label).encode(), "json": meta, LATENT_MEMBER: _npy(z),
                         FLIPPED_MEMBER: _npy(z_flip)}, label)  # fmt: skip
            per_class[label] += 1
        stats = raw.astype(np.float64)  # the statistics of what is stored
        sums[:] += stats.sum(axis=(0, 2, 3))
        squares[:] += np.square(stats).sum(axis=(0, 2, 3))
        update(len(pending))
        pending.clear()

    try:
        try:
            for key, members in shard_samples(location):
                try:
                    arr, label, _ = decode(members, d, f"{key} of {location}")
                except Unusable as e:
                    skipped += 1
                    if skipped <= 10:
                        log.warning("skipping unusable sample %s of %s: %s", key, location, e)
                    continue
                pending.append((key, members, arr, label))
                if len(pending) == batch_size:
                    flush()
        except (tarfile.TarError, OSError, EOFError) as e:  # keep what was read, count the rest
            owed = inputs.counts[i]
            lost = max(1, owed - shard.count - len(pending) - skipped) if owed else 1
            log.warning("shard %s cannot be read to its end (%s): %d sample(s) lost", location, e, lost)  # fmt: skip
            skipped += lost
        if pending:
            flush()
        info = shard.finish()
    except BaseException:
        shard.discard()
        raise
    temp = out / temp_name(name)
    record: dict[str, Any] = {"job": shard_job(inputs, i, ae), "samples": info.num_samples,
                              "labels": [info.label_min, info.label_max], "per_class": per_class,
                              "skipped": skipped, "sum": sums.tolist(), "sum_squares": squares.tolist(),
                              "values_per_channel": info.num_samples * math.prod(raw_shape(ae, d))}  # fmt: skip
    if info.num_samples == 0:
        temp.unlink(missing_ok=True)
    else:
        record.update(size=temp.stat().st_size, sha256=_sha256(temp))
    # the record first: a shard under its done name always has one (a kill in between costs a redo)
    write_durably(out / record_name(name), json.dumps(record).encode())
    if info.num_samples:
        os.replace(temp, out / done_name(name))
        fsync_dir(out)
    return record


def raw_shape(ae: KLAutoencoder, d: Decoding) -> tuple[int, int]:
    """(h, w) of a latent of the decoding's images."""
    return ae.latent_shape((d.channels, d.resolution, d.resolution))[1:]
