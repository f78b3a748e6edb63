"""One shard's encoding into a latent shard, and the record that makes a rerun skip it.

``EncodeInput`` describes the shards to encode (fmgen's pixel shards, or WebDataset shards of
any origin); ``encode_shard`` turns input shard i into output shard i under a hidden name
(``.NAME.latent``) beside its record (``.NAME.latent.json``); ``finished_record`` says whether a
shard was encoded before for the same job (input, decoding, autoencoder) and is intact. The set
of shards and the manifest are ``fmgen.data.latents``' work.

The text stage (``fmgen.data.text_embeddings``) shares the machinery under its own stage name
(``.NAME.text``): the inputs, the records, the agreement of the processes (``stages``) and the
final renames (``install_shards``, ``remove_work_files``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
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
    MANIFEST,
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
    latent: dict[str, Any] | None = None  # fmgen's latent shards as input: their latent section
    text: dict[str, Any] | None = None  # fmgen's text shards as input: their text section


def pixel_shards_input(folder: Path, source: dict[str, Any] | None = None) -> EncodeInput:
    """fmgen's pixel shards in ``folder``; ``source``: the manifest's (default: these shards)."""
    if read_manifest(folder).latent is not None:
        raise DataError(
            f"{folder} holds latent shards already; pass the pixel shards they were made from"
        )
    return shards_input(folder, source)


def shards_input(folder: Path, source: dict[str, Any] | None = None) -> EncodeInput:
    """fmgen's shards in ``folder``, pixel or latent ones (``latent``: their latent section)."""
    m = read_manifest(folder)
    decoding = Decoding(m.resolution, m.channels, m.num_classes, image_key=m.image_format,
                        fit="none")  # fmt: skip
    origin = source or {"kind": "shards", "path": str(Path(folder).resolve()), "of": m.source}
    return EncodeInput(tuple(str(p) for p in m.shard_paths()),
                       tuple(s.num_samples for s in m.shards), decoding, m.class_names,
                       m.image_format, m.jpeg_quality, True, origin, dict(m.split),
                       str(m.split.get("name", "train")), m.latent, m.text)  # fmt: skip


def webdataset_input(
    path: str | Sequence[str], *, resolution: int, channels: int, manifest: str | None = None,
    num_classes: int | None = None, image_key: str = "", label_key: str = "cls",
    fit: str = "center-crop", caption_key: str = "",
) -> EncodeInput:  # fmt: skip
    """WebDataset shards of any origin, decoded and fitted as ``data.source=webdataset`` reads
    (``caption_key``: the caption member, kept beside the image)."""
    loader = ShardLoader(path, 1, manifest=manifest, webdataset=True, rank=0, world_size=1,
                         resampled=False, shuffle_buffer=0, resolution=resolution,
                         channels=channels, num_classes=num_classes, image_key=image_key,
                         label_key=label_key, caption_key=caption_key, fit=fit)  # fmt: skip
    spec = loader._spec
    names = tuple(loader.class_names) or ("all",)  # no labels: one class, as hf without labels
    where = path if isinstance(path, str) else list(path)
    source = {"kind": "webdataset", "path": where, "fit": fit, "image_key": image_key,
              "label_key": spec.decoding.label_key}  # fmt: skip
    return EncodeInput(spec.shards, spec.shard_samples, spec.decoding, names, "png", None,
                       False, source, {"name": "train"}, "train")  # fmt: skip


def npy_bytes(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, latent, allow_pickle=False)
    return buf.getvalue()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_names(inputs: EncodeInput) -> list[str]:
    return [f"{inputs.prefix}-{i:06d}.tar" for i in range(len(inputs.shards))]


def done_name(name: str, stage: str = "latent") -> str:
    return f".{name}.{stage}"


def record_name(name: str, stage: str = "latent") -> str:
    return f".{name}.{stage}.json"


def shard_job(inputs: EncodeInput, i: int, ae: KLAutoencoder) -> dict[str, Any]:
    """What makes a finished shard reusable: the same input shard, decoding and autoencoder."""
    job = {"format": RECORD_FORMAT, "input": shard_name(inputs.shards[i]),
           "input_samples": inputs.counts[i], "decoding": dataclasses.asdict(inputs.decoding),
           "copy_images": inputs.copy_images, "autoencoder": ae.hash}  # fmt: skip
    return json.loads(json.dumps(job))  # as a record reads it back (tuples become lists)


def finished_record(
    out: Path, name: str, job: dict[str, Any], stage: str = "latent"
) -> dict[str, Any] | None:
    """The record of a shard encoded before for the same job, if its file is intact."""
    try:
        record = json.loads((out / record_name(name, stage)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job:
        return None
    if record["samples"] == 0:
        return record
    done = out / done_name(name, stage)
    if not done.is_file() or done.stat().st_size != record["size"] or file_sha256(done) != record["sha256"]:  # fmt: skip
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
    shard = ShardFile(out, name)

    def kept(members: dict[str, bytes]) -> dict[str, bytes]:
        """What rides along: every member of fmgen's shards (captions, text rows), the caption
        member of others'."""
        if inputs.copy_images:
            return members
        return {d.caption_key: members[d.caption_key]} if d.caption_key in members else {}

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
            shard.write({**kept(members), "__key__": key,
                         inputs.image_format: image_bytes(members, arr), "cls": str(label).encode(),
                         "json": meta, LATENT_MEMBER: npy_bytes(z), FLIPPED_MEMBER: npy_bytes(z_flip)},
                        label)  # fmt: skip
            per_class[label] += 1
        stats = raw.astype(np.float64)  # the statistics of what is stored
        sums[:] += stats.sum(axis=(0, 2, 3))
        squares[:] += np.square(stats).sum(axis=(0, 2, 3))
        update(len(pending))
        pending.clear()

    read = ShardRead()
    try:
        parse = lambda key, members: decode(members, d, f"{key} of {location}")  # noqa: E731
        for key, members, (arr, label, _) in usable_samples(location, inputs.counts[i], parse, read):
            pending.append((key, members, arr, label))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        info = shard.finish()
    except BaseException:
        shard.discard()
        raise
    skipped = read.skipped
    temp = out / temp_name(name)
    record: dict[str, Any] = {"job": shard_job(inputs, i, ae), "samples": info.num_samples,
                              "labels": [info.label_min, info.label_max], "per_class": per_class,
                              "skipped": skipped, "sum": sums.tolist(), "sum_squares": squares.tolist(),
                              "values_per_channel": info.num_samples * math.prod(raw_shape(ae, d))}  # fmt: skip
    if info.num_samples == 0:
        temp.unlink(missing_ok=True)
    else:
        record.update(size=temp.stat().st_size, sha256=file_sha256(temp))
    # the record first: a shard under its done name always has one (a kill in between costs a redo)
    write_durably(out / record_name(name), json.dumps(record).encode())
    if info.num_samples:
        os.replace(temp, out / done_name(name))
        fsync_dir(out)
    return record


def check_encode_request(source: str, data_path: Any, batch_size: int,
                         pixel_options: dict[str, Any], sources: Sequence[str]) -> None:  # fmt: skip
    """The arguments both encoding stages (latents, text rows) take, checked alike."""
    if batch_size < 1:
        raise DataError(f"the encoding batch size must be >= 1, got {batch_size} (--batch-size)")
    if source not in (*sources, "shards", "webdataset"):
        raise DataError(f"source {source!r} is not one of {(*sources, 'shards', 'webdataset')}")
    if source in ("shards", "webdataset") and not data_path:
        raise DataError(f"--source {source} needs --data-path (the shards to encode)")
    if source == "webdataset" and not (pixel_options.get("resolution") and pixel_options.get("channels")):
        raise DataError(
            "--source webdataset needs --resolution and --channels (the size the images are "
            "fitted to)"
        )


@dataclass
class ShardRead:
    """What ``usable_samples`` passed over in one shard: unusable samples and a lost rest."""

    skipped: int = 0


def usable_samples(
    location: str, owed: int | None, parse: Callable[[str, dict[str, bytes]], Any], read: ShardRead
) -> Iterator[tuple[str, dict[str, bytes], Any]]:
    """(key, members, parse(key, members)) of a shard's usable samples, in order.

    A sample ``parse`` finds ``Unusable`` is skipped (the first 10 named in warnings); a shard
    that breaks off keeps what was read, and the rest it owes (``owed``: its sample count, if
    known) counts as skipped too. Both stages (latents, text rows) read their input shards so.
    """
    used = 0
    try:
        for key, members in shard_samples(location):
            try:
                parsed = parse(key, members)
            except Unusable as e:
                read.skipped += 1
                if read.skipped <= 10:
                    log.warning("skipping unusable sample %s of %s: %s", key, location, e)
                continue
            used += 1
            yield key, members, parsed
    except (tarfile.TarError, OSError, EOFError) as e:  # keep what was read, count the rest
        lost = max(1, owed - used - read.skipped) if owed else 1
        log.warning("shard %s cannot be read to its end (%s): %d sample(s) lost", location, e, lost)  # fmt: skip
        read.skipped += lost


def finished_records(out: Path, names: Sequence[str], job: Callable[[int], dict[str, Any]],
                     stage: str) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:  # fmt: skip
    """Every shard's finished record (all, and (name, record) of those with samples); a missing
    one, or a set with no sample at all, is a DataError."""
    records = []
    for i, name in enumerate(names):
        record = finished_record(out, name, job(i), stage)
        if record is None:
            raise DataError(f"shard {name} of {out} was not encoded (another process failed?); run prepare again: it resumes")  # fmt: skip
        records.append(record)
    written = [(n, r) for n, r in zip(names, records, strict=True) if r["samples"]]
    if not written:
        raise DataError(f"no usable samples in {len(names)} input shard(s): nothing to write to {out}")  # fmt: skip
    return records, written


def raw_shape(ae: KLAutoencoder, d: Decoding) -> tuple[int, int]:
    """(h, w) of a latent of the decoding's images."""
    return ae.latent_shape((d.channels, d.resolution, d.resolution))[1:]


# --- shared by the stages: agreement of the processes, the final renames -----------------------


def stages(rank: int, any_failed: Callable[[bool], bool] | None) -> Callable[..., Any]:
    """``stage(work, everyone)``: ``work()`` on the main process (or on every one) and its result;
    if it fails on one process, every process raises (``any_failed`` is the all-reduce that also
    serves as the barrier between the stages; None: one process)."""
    agree = any_failed or (lambda failed: failed)

    def stage(work: Callable[[], Any], everyone: bool) -> Any:
        result, error = None, None
        if everyone or rank == 0:
            try:
                result = work()
            except Exception as e:  # re-raised below, after the other processes know
                error = e
        if agree(error is not None):
            raise error if error is not None else DataError("another process failed; see its error")
        return result

    return stage


def install_shards(out: Path, written: Sequence[str], old: Sequence[Path], stage: str) -> None:
    """Rename the finished shards ``written`` (``.NAME.STAGE``) into place, replacing ``old``."""
    for p in old:  # the old manifest goes first: no manifest ever lists a mix of shards
        if p.name == MANIFEST:
            p.unlink(missing_ok=True)
    for name in written:
        os.replace(out / done_name(name, stage), out / name)
    new = set(written)
    for p in old:
        if p.name != MANIFEST and p.name not in new:
            p.unlink(missing_ok=True)
    fsync_dir(out)


def remove_work_files(out: Path, names: Sequence[str], prefix: str, stage: str) -> None:
    """The records and leftovers of a stage, once its manifest is written."""
    for name in names:
        (out / record_name(name, stage)).unlink(missing_ok=True)
    stale = re.compile(rf"\.{re.escape(prefix)}-\d{{6}}\.tar\.(tmp|{stage})")
    for p in out.iterdir():
        if stale.fullmatch(p.name):
            p.unlink()
