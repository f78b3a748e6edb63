"""Latent shards: images encoded by an AutoencoderKL, shard for shard (``prepare --autoencoder``).

Inputs: fmgen's pixel shards (``--source shards --data-path DIR``), WebDataset shards of any
origin (``--source webdataset --data-path ...``, fitted as ``data.fit`` fits them), or a source
``prepare`` reads (digits, folder, hf), first written as pixel shards into the hidden work
folder ``OUT/.pixels`` (removed at the end).

Output shard i holds the usable samples of input shard i: the image (the pixel shard's own
bytes; a PNG of the fitted image for WebDataset input), ``cls``, ``json``, and the float16
``KEY.latent.npy`` and ``KEY.latent_flip.npy``: the ``raw`` latents (``fmgen.models.autoencoder``)
of the image and of its mirror image, so flip augmentation stays exact in latent space. Every
other member of fmgen's pixel shards rides along (captions, text rows, with the manifest's text
section), and the caption member (``caption_key``) of WebDataset input.

Work: batches of ``batch_size`` images on the device; process r of w (``accelerate launch``)
encodes the shards i with i % w == r, so the shards do not depend on the process count. A
finished shard waits under a hidden name (``.NAME.latent``) beside a record of it
(``.NAME.latent.json``: sample and class counts, the sums giving the statistics, the file's
sha256); a rerun skips shards whose record matches (resumable). The main process then renames
every shard into place and writes the manifest, last, with the latent shape, the per-channel
mean and std of the stored latents and the autoencoder's path and hash. One shard's work, and
its record, is ``fmgen.data.encoding``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmgen.data.decode import (
    FLIPPED_MEMBER,
    LATENT_MEMBER,
    Decoding,
)
from fmgen.data.encoding import (
    EncodeInput,
    check_encode_request,
    encode_shard,
    finished_record,
    finished_records,
    install_shards,
    pixel_shards_input,
    remove_work_files,
    shard_job,
    shard_names,
    stages,
    webdataset_input,
)
from fmgen.data.shards import (
    MANIFEST,
    DataError,
    Manifest,
    ShardInfo,
    files_to_replace,
    read_manifest,
    write_durably,
    write_manifest,
)
from fmgen.data.sources import SOURCES, prepare
from fmgen.models.autoencoder import KLAutoencoder

log = logging.getLogger("fmgen.data")

PIXELS = ".pixels"  # the work folder of a prepare source's pixel shards
ENCODING = "raw = (latent_dist.mean - shift_factor) * scaling_factor; z = (raw - mean) / std"


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
    records, written = finished_records(out, names, lambda i: shard_job(inputs, i, ae), "latent")
    section = latent_section(ae, inputs.decoding, [r for _, r in written])
    install_shards(out, [name for name, _ in written], old, "latent")
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
                 source=inputs.source, root=out, latent=section, text=inputs.text)  # fmt: skip
    write_manifest(m, out)
    remove_work_files(out, names, inputs.prefix, "latent")
    shutil.rmtree(out / PIXELS, ignore_errors=True)
    return m


def pixel_work_shards(source: str, out: Path, options: dict[str, Any], progress: bool) -> Path:
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
    fit: str = "center-crop", caption_key: str = "", batch_size: int = 64,
    device: torch.device | str | None = None, rank: int = 0, world_size: int = 1, any_failed: Callable[[bool], bool] | None = None,
    overwrite: bool = False, progress: bool = True, **pixel_options: Any,
) -> Manifest:  # fmt: skip
    """Write latent shards of a source into ``out_dir``; returns the manifest (every process).

    Args:
        source: "shards" (fmgen's pixel shards in ``data_path``), "webdataset" (any shards
            ``data_path`` names, read with ``manifest``, ``num_classes``, ``image_key``,
            ``label_key``, ``fit`` and ``pixel_options``' resolution and channels; the
            ``caption_key`` member rides along), or a source
            of ``prepare`` (digits, folder, hf; ``pixel_options`` go to it).
        autoencoder: the AutoencoderKL folder (or stage).
        batch_size: images per encoder call; device: default the best one (CUDA if present).
        rank, world_size, any_failed: this process of several (``accelerate launch``);
            ``any_failed(flag)`` must return True on every process if any passed True (an
            all-reduce; it also serves as the barrier between the stages).
        overwrite: replace latent or pixel shards fmgen wrote into ``out_dir`` from this source.
    """
    out = Path(out_dir)
    ae = (
        autoencoder
        if isinstance(autoencoder, KLAutoencoder)
        else KLAutoencoder(autoencoder, what="--autoencoder")
    )
    check_encode_request(source, data_path, batch_size, pixel_options, SOURCES)
    device = torch.device(device) if device is not None else best_device()
    resolution, channels = pixel_options.get("resolution"), pixel_options.get("channels")
    if source != "shards":  # refused before any work (else when the input is known)
        size = resolution or ae.downsample
        ae.latent_shape((channels or (1 if source == "digits" else 3), size, size))

    stage = stages(rank, any_failed)  # work on the main process (or every one), failing together

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
                                    label_key=label_key, fit=fit, caption_key=caption_key)  # fmt: skip
        return pixel_shards_input(out / PIXELS, source=read_manifest(out / PIXELS).source)

    stage(check_out, everyone=False)
    if source in SOURCES:
        stage(lambda: pixel_work_shards(source, out, pixel_options, progress), everyone=False)
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
            if finished_record(out, shard_names(inputs)[i], shard_job(inputs, i, ae)) is None
        ]
        log.info("process %d of %d encodes %d of the %d shards", rank, world_size, len(mine),
                 len(inputs.shards))  # fmt: skip
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
