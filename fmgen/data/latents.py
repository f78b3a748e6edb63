"""Latent shards: images encoded by an AutoencoderKL, shard for shard (``prepare --autoencoder``).

Inputs: fmgen's pixel shards (``--source shards --data-path DIR``), WebDataset shards of any
origin (``--source webdataset --data-path ...``, fitted as ``data.fit`` fits them), or a source
``prepare`` reads (digits, folder, hf), first written as pixel shards into the hidden work
folder ``OUT/.pixels`` (removed at the end).

Output shard i holds the usable samples of input shard i: the image (the pixel shard's own
bytes; a PNG of the fitted image for WebDataset input), ``cls``, ``json``, and the float16
``KEY.latent.npy`` and ``KEY.latent_flip.npy``: the ``raw`` latents (``fmgen.models.autoencoder``)
of the image and of its mirror image, so flip augmentation stays exact in latent space.

Work: batches of ``batch_size`` images on the device; process r of w (``accelerate launch``)
encodes the shards i with i % w == r, so the shards do not depend on the process count. A
finished shard waits under a hidden name (``.NAME.latent``) beside a record of it
(``.NAME.latent.json``: sample and class counts, the sums giving the statistics, the file's
sha256); a rerun skips shards whose record matches (resumable). The main process then renames
every shard into place and writes the manifest, last, with the latent shape, the per-channel
mean and std of the stored latents and the autoencoder's path and hash.
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
import shutil
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
    MANIFEST,
    DataError,
    Manifest,
    ShardFile,
    ShardInfo,
    encode_image,
    files_to_replace,
    fsync_dir,
    read_manifest,
    temp_name,
    write_durably,
    write_manifest,
)
from fmgen.data.sources import SOURCES, prepare
from fmgen.data.stream import shard_samples, to_float
from fmgen.data.urls import shard_name
from fmgen.models.autoencoder import KLAutoencoder

log = logging.getLogger("fmgen.data")

PIXELS = ".pixels"  # the work folder of a prepare source's pixel shards
RECORD_FORMAT = "fmgen-latent-shard-1"
ENCODING = "raw = (latent_dist.mean - shift_factor) * scaling_factor; z = (raw - mean) / std"


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


# --- one shard ---------------------------------------------------------------------------------


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


def _done_name(name: str) -> str:
    return f".{name}.latent"


def _record_name(name: str) -> str:
    return f".{name}.latent.json"


def _job(inputs: EncodeInput, i: int, ae: KLAutoencoder) -> dict[str, Any]:
    """What makes a finished shard reusable: the same input shard, decoding and autoencoder."""
    job = {"format": RECORD_FORMAT, "input": shard_name(inputs.shards[i]),
           "input_samples": inputs.counts[i], "decoding": dataclasses.asdict(inputs.decoding),
           "copy_images": inputs.copy_images, "autoencoder": ae.hash}  # fmt: skip
    return json.loads(json.dumps(job))  # as a record reads it back (tuples become lists)


def finished_record(out: Path, name: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a shard encoded before for the same job, if its file is intact."""
    try:
        record = json.loads((out / _record_name(name)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job:
        return None
    if record["samples"] == 0:
        return record
    done = out / _done_name(name)
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
    record: dict[str, Any] = {"job": _job(inputs, i, ae), "samples": info.num_samples,
                              "labels": [info.label_min, info.label_max], "per_class": per_class,
                              "skipped": skipped, "sum": sums.tolist(), "sum_squares": squares.tolist(),
                              "values_per_channel": info.num_samples * math.prod(raw_shape(ae, d))}  # fmt: skip
    if info.num_samples == 0:
        temp.unlink(missing_ok=True)
    else:
        record.update(size=temp.stat().st_size, sha256=_sha256(temp))
    # the record first: a shard under its done name always has one (a kill in between costs a redo)
    write_durably(out / _record_name(name), json.dumps(record).encode())
    if info.num_samples:
        os.replace(temp, out / _done_name(name))
        fsync_dir(out)
    return record


def raw_shape(ae: KLAutoencoder, d: Decoding) -> tuple[int, int]:
    """(h, w) of a latent of the decoding's images."""
    return ae.latent_shape((d.channels, d.resolution, d.resolution))[1:]


# --- the whole set -----------------------------------------------------------------------------


def latent_section(ae: KLAutoencoder, d: Decoding, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's latent section: shape, per-channel statistics, members, the autoencoder."""
    n = sum(r["values_per_channel"] for r in records)
    sums = np.sum([r["sum"] for r in records], axis=0)
    squares = np.sum([r["sum_squares"] for r in records], axis=0)
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    if not (std > 0).all():
        raise DataError(f"a latent channel is constant (std {std.tolist()}); the autoencoder or the images are degenerate")  # fmt: skip
    return {"shape": list(ae.latent_shape((d.channels, d.resolution, d.resolution))),
            "dtype": "float16", "members": {"latent": LATENT_MEMBER, "flipped": FLIPPED_MEMBER},
            "mean": mean.tolist(), "std": std.tolist(),
            "statistics": "per channel, over every stored latent (not the mirrored ones)",
            "encoding": ENCODING, "autoencoder": ae.identity()}  # fmt: skip


def finish(out: Path, inputs: EncodeInput, ae: KLAutoencoder, old: list[Path]) -> Manifest:
    """Rename every encoded shard into place and write the manifest (main process, last)."""
    names = shard_names(inputs)
    records = []
    for i, name in enumerate(names):
        record = finished_record(out, name, _job(inputs, i, ae))
        if record is None:
            raise DataError(f"shard {name} of {out} was not encoded (another process failed?); run prepare again: it resumes")  # fmt: skip
        records.append(record)
    written = [(n, r) for n, r in zip(names, records, strict=True) if r["samples"]]
    if not written:
        raise DataError(f"no usable samples in {len(names)} input shard(s): nothing to write to {out}")  # fmt: skip
    section = latent_section(ae, inputs.decoding, [r for _, r in written])
    for p in old:  # the old manifest goes first: no manifest ever lists a mix of shards
        if p.name == MANIFEST:
            p.unlink(missing_ok=True)
    for name, _ in written:
        os.replace(out / _done_name(name), out / name)
    new = {name for name, _ in written}
    for p in old:
        if p.name != MANIFEST and p.name not in new:
            p.unlink(missing_ok=True)
    fsync_dir(out)
    shards = tuple(ShardInfo(name, r["samples"], *r["labels"]) for name, r in written)
    per_class = np.sum([r["per_class"] for _, r in written], axis=0).tolist()
    split = {**inputs.split, "unreadable": int(inputs.split.get("unreadable", 0))
             + sum(r["skipped"] for r in records)}  # fmt: skip
    first, last = (
        n[len(inputs.prefix) + 1 : -len(".tar")] for n in (shards[0].name, shards[-1].name)
    )
    m = Manifest(num_samples=sum(s.num_samples for s in shards), class_names=inputs.class_names,
                 class_counts=tuple(per_class), resolution=inputs.decoding.resolution,
                 channels=inputs.decoding.channels, image_format=inputs.image_format,
                 jpeg_quality=inputs.jpeg_quality, shards=shards,
                 pattern=f"{inputs.prefix}-{{{first}..{last}}}.tar", split=split,
                 source=inputs.source, root=out, latent=section)  # fmt: skip
    write_manifest(m, out)
    for name in names:
        (out / _record_name(name)).unlink(missing_ok=True)
    stale = re.compile(rf"\.{re.escape(inputs.prefix)}-\d{{6}}\.tar\.(tmp|latent)")
    for p in out.iterdir():
        if stale.fullmatch(p.name):
            p.unlink()
    shutil.rmtree(out / PIXELS, ignore_errors=True)
    return m


def _pixels(source: str, out: Path, options: dict[str, Any], progress: bool) -> Path:
    """Pixel shards of a prepare source in ``OUT/.pixels``, reused when the same were asked for."""
    folder, request = (
        out / PIXELS,
        json.dumps({"source": source, **options}, sort_keys=True, default=str),
    )
    marker = folder / ".request.json"
    if (folder / MANIFEST).is_file() and marker.is_file() and marker.read_text() == request:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    prepare(source, folder, progress=progress, **options)
    write_durably(marker, request.encode())
    return folder


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_latents(
    source: str, out_dir: str | Path, *, autoencoder: str | Path | KLAutoencoder,
    data_path: str | Sequence[str] | None = None, manifest: str | None = None,
    num_classes: int | None = None, image_key: str = "", label_key: str = "cls",
    fit: str = "center-crop", batch_size: int = 64, device: torch.device | str | None = None,
    rank: int = 0, world_size: int = 1, any_failed: Callable[[bool], bool] | None = None,
    overwrite: bool = False, progress: bool = True, **pixel_options: Any,
) -> Manifest:  # fmt: skip
    """Write latent shards of a source into ``out_dir``; returns the manifest (every process).

    Args:
        source: "shards" (fmgen's pixel shards in ``data_path``), "webdataset" (any shards
            ``data_path`` names, read with ``manifest``, ``num_classes``, ``image_key``,
            ``label_key``, ``fit`` and ``pixel_options``' resolution and channels), or a source
            of ``prepare`` (digits, folder, hf; ``pixel_options`` go to it).
        autoencoder: the AutoencoderKL folder (or stage).
        batch_size: images per encoder call; device: default the best one (CUDA if present).
        rank, world_size, any_failed: this process of several (``accelerate launch``);
            ``any_failed(flag)`` must return True on every process if any passed True (an
            all-reduce; it also serves as the barrier between the stages).
        overwrite: replace latent or pixel shards fmgen wrote into ``out_dir`` from this source.
    """
    out = Path(out_dir)
    agree = any_failed or (lambda failed: failed)
    ae = (
        autoencoder
        if isinstance(autoencoder, KLAutoencoder)
        else KLAutoencoder(autoencoder, what="--autoencoder")
    )
    if batch_size < 1:
        raise DataError(f"the encoding batch size must be >= 1, got {batch_size} (--batch-size)")
    if source not in (*SOURCES, "shards", "webdataset"):
        raise DataError(f"source {source!r} is not one of {(*SOURCES, 'shards', 'webdataset')}")
    if source in ("shards", "webdataset") and not data_path:
        raise DataError(f"--source {source} needs --data-path (the shards to encode)")
    device = torch.device(device) if device is not None else best_device()
    resolution, channels = pixel_options.get("resolution"), pixel_options.get("channels")
    if source == "webdataset" and not (resolution and channels):
        raise DataError(
            "--source webdataset needs --resolution and --channels (the size the images are "
            "fitted to)"
        )
    if source != "shards":  # refused before any work (else when the input is known)
        size = resolution or ae.downsample
        ae.latent_shape((channels or (1 if source == "digits" else 3), size, size))

    def stage(work: Callable[[], Any], everyone: bool) -> Any:
        """``work`` on the main process (or every one); all fail together if one fails."""
        result, error = None, None
        if everyone or rank == 0:
            try:
                result = work()
            except Exception as e:  # re-raised below, after the other processes know
                error = e
        if agree(error is not None):
            raise error if error is not None else DataError("another process failed; see its error")
        return result

    def check_out() -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        return files_to_replace(out, overwrite)  # refused before any work

    def input_of() -> EncodeInput:
        if source == "shards":
            return pixel_shards_input(Path(str(data_path)))
        if source == "webdataset":
            res, ch = int(resolution or 0), int(channels or 0)
            return webdataset_input(data_path, resolution=res, channels=ch, manifest=manifest,  # type: ignore[arg-type]
                                    num_classes=num_classes, image_key=image_key,
                                    label_key=label_key, fit=fit)  # fmt: skip
        return pixel_shards_input(out / PIXELS, source=read_manifest(out / PIXELS).source)

    stage(check_out, everyone=False)
    if source in SOURCES:
        stage(lambda: _pixels(source, out, pixel_options, progress), everyone=False)
    inputs: EncodeInput = stage(input_of, everyone=True)
    ae.latent_shape(
        (inputs.decoding.channels, inputs.decoding.resolution, inputs.decoding.resolution)
    )
    old: list[Path] = stage(lambda: files_to_replace(out, overwrite, inputs.source), everyone=False)

    def encode_mine() -> None:
        from tqdm.auto import tqdm

        mine = [i for i in range(len(inputs.shards)) if i % world_size == rank]
        todo = [
            i
            for i in mine
            if finished_record(out, shard_names(inputs)[i], _job(inputs, i, ae)) is None
        ]
        if len(todo) < len(mine):
            log.info(
                "%d of %d shard(s) were encoded before: skipped", len(mine) - len(todo), len(mine)
            )
        counts = [inputs.counts[i] for i in todo]
        total = sum(c or 0 for c in counts) if all(c is not None for c in counts) else None
        with tqdm(
            total=total, desc="encode", unit="img", disable=rank != 0 or not progress or None
        ) as bar:
            for i in todo:
                encode_shard(
                    inputs, i, out, ae, batch_size=batch_size, device=device, update=bar.update
                )

    stage(encode_mine, everyone=True)
    stage(lambda: finish(out, inputs, ae, old), everyone=False)
    return read_manifest(out)
