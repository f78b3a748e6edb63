"""Text shards: every caption encoded once by a frozen text encoder (``prepare --text-encoder``).

A frozen encoder (T5-XXL: billions of parameters) run on every training batch costs more than
the backbone; its output for a caption never changes, so it is computed once here and stored
beside the image, and training reads it (``ShardLoader(text=True)``) instead of running it.

Inputs: fmgen's shards, pixel or latent ones (``--source shards --data-path DIR``: every member
is kept as it is); WebDataset shards of any origin (``--source webdataset``: fitted as the latent
stage fits them, written as PNG, ``cls``, ``json`` and the caption member); a source ``prepare``
reads (digits, folder, hf), first written as pixel shards into ``OUT/.pixels``. With an
autoencoder too, the latent stage (``fmgen.data.latents``) first writes latent shards into the
work folder ``OUT/.latents``, which this stage then reads; both work folders go at the end.

Output shard i holds the usable samples of input shard i plus ``KEY.text.npy``: the caption's
(member ``caption_key``) row ``TextConditioning.pack(encoder.encode([caption]))``, float16 (F,)
with F = L * (D + 1) + P (token states, mask as 0/1, pooled vector). A sample without a caption
gets the empty caption's row (counted, reported). The manifest's ``text`` section: the encoder's
record (path, hash, architecture, dtype), max_length, token_dim, pooled_dim, width, caption_key,
member, and the counts of uncaptioned and truncated captions.

Work, as in the latent stage: batches of ``batch_size`` captions on the device, in shard order;
process r of w encodes the shards i with i % w == r; a finished shard waits as ``.NAME.text``
beside its record ``.NAME.text.json`` (a rerun skips it); the main process renames every shard
into place and writes the manifest last. The same shards result from any number of processes.

Training checks the shards against its own encoder with ``check_text_embeddings``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fmgen.data.decode import (
    TEXT_DTYPE,
    TEXT_MEMBER,
    decode,
    label_and_caption,
    no_text_message,
)
from fmgen.data.encoding import (
    EncodeInput,
    ShardRead,
    check_encode_request,
    done_name,
    file_sha256,
    finished_record,
    finished_records,
    install_shards,
    npy_bytes,
    record_name,
    remove_work_files,
    shard_names,
    shards_input,
    stages,
    usable_samples,
    webdataset_input,
)
from fmgen.data.latents import PIXELS, best_device, pixel_work_shards, prepare_latents
from fmgen.data.locate import resolve_webdataset
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
from fmgen.data.sources import SOURCES
from fmgen.data.stream import shard_samples
from fmgen.data.urls import shard_name
from fmgen.models.autoencoder import KLAutoencoder
from fmgen.models.conditioning import TextConditioning
from fmgen.models.text import ENCODER_DTYPES, FrozenTextEncoder

log = logging.getLogger("fmgen.data")

STAGE = "text"  # the hidden names .NAME.text, .NAME.text.json
RECORD_FORMAT = "fmgen-text-shard-1"
LATENTS = ".latents"  # the work folder of the latent stage when both run in one command
LAYOUT = "tokens (L*D, row-major), mask (L, 1 = a real token), pooled (P); float16"


# --- the check training makes -----------------------------------------------------------------


def check_text_embeddings(
    text_info: dict[str, Any] | None, encoder_record: dict[str, Any], max_length: int, where: str
) -> None:
    """Raise a one-line DataError unless the shards in ``where`` hold text rows of the encoder
    ``encoder_record`` (``FrozenTextEncoder.record()``: its hash decides) at ``max_length``."""
    if text_info is None:
        raise DataError(no_text_message(where))
    enc = text_info.get("encoder") or {}
    have, want = str(enc.get("hash", "")), str(encoder_record.get("hash", ""))
    length = text_info.get("max_length")
    if have != want or length != max_length:
        what = (f"the text encoder {enc.get('path')!r} (hash {have[:12]})" if have != want
                else f"text.max_length={length}")  # fmt: skip
        raise DataError(
            f"the text embeddings in {where} were encoded by {enc.get('path')!r} (hash {have[:12]}) "
            f"at text.max_length={length}, but this run encodes with model.text_encoder="
            f"{encoder_record.get('path')!r} (hash {want[:12]}) at text.max_length={max_length} "
            f"(they differ in {what}); prepare again with --text-encoder "
            f"{encoder_record.get('path')} --text-max-length {max_length}, or set "
            f"text.precomputed=false"
        )


# --- the encoder and its rows -----------------------------------------------------------------


class CaptionEncoder:
    """A frozen text encoder and the packing of its output into float16 rows (B, F)."""

    def __init__(self, folder: str | Path, *, caption_key: str, max_length: int,
                 dtype: str = "float32", device: torch.device | str = "cpu"):  # fmt: skip
        path = Path(folder)
        if not path.is_dir():
            raise DataError(
                f"--text-encoder {str(folder)!r}: no such folder; give a local transformers text "
                f"encoder folder (config.json, model.safetensors and its tokenizer)"
            )
        if not (path / "config.json").is_file():
            raise DataError(
                f"--text-encoder {str(folder)!r} holds no config.json; point it at the encoder's own "
                f"folder (a diffusers pipeline keeps it in text_encoder/)"
            )
        if dtype not in ENCODER_DTYPES:
            raise DataError(f"--text-dtype {dtype!r} is not one of {', '.join(ENCODER_DTYPES)}")
        if max_length < 3:
            raise DataError(f"--text-max-length must be >= 3 (BOS, a token, EOS); got {max_length}")
        if not caption_key:
            raise DataError("--caption-key is empty; name the caption member (e.g. txt)")
        self.caption_key = caption_key
        self.frozen = FrozenTextEncoder(path.resolve(), max_length=max_length, dtype=dtype,
                                        device=device)  # fmt: skip
        f = self.frozen
        self.packing = TextConditioning(f.record(), max_length=max_length, token_dim=f.token_dim,
                                        pooled_dim=f.pooled_dim, frozen=f)  # fmt: skip

    @property
    def width(self) -> int:
        return self.packing.width

    def rows(self, captions: list[str]) -> tuple[np.ndarray, list[int]]:
        """Captions -> float16 rows (B, F) and the indices of the captions cut to max_length."""
        emb, truncated = self.frozen.encode(captions)
        return self.packing.pack(emb).numpy().astype(TEXT_DTYPE), truncated

    def section(self) -> dict[str, Any]:
        """The manifest's text section, the counts aside."""
        f = self.frozen
        return {"encoder": f.record(), "max_length": f.max_length, "token_dim": f.token_dim,
                "pooled_dim": f.pooled_dim, "width": self.width, "dtype": "float16",
                "layout": LAYOUT, "caption_key": self.caption_key, "member": TEXT_MEMBER}  # fmt: skip


# --- one shard --------------------------------------------------------------------------------


def text_job(inputs: EncodeInput, i: int, enc: CaptionEncoder) -> dict[str, Any]:
    """What makes a finished shard reusable: the same input shard, decoding and encoding."""
    f = enc.frozen
    job = {"format": RECORD_FORMAT, "input": shard_name(inputs.shards[i]),
           "input_samples": inputs.counts[i], "decoding": dataclasses.asdict(inputs.decoding),
           "copy": inputs.copy_images, "encoder": f.hash, "dtype": f.dtype_name,
           "max_length": f.max_length, "caption_key": enc.caption_key}  # fmt: skip
    return json.loads(json.dumps(job))  # as a record reads it back (tuples become lists)


def embed_shard(
    inputs: EncodeInput, i: int, out: Path, enc: CaptionEncoder, *, batch_size: int,
    update: Callable[[int], Any] = lambda n: None,
) -> dict[str, Any]:  # fmt: skip
    """Input shard i plus its text rows into ``out/.NAME.text``, and its record; returns it."""
    d, location, name = inputs.decoding, inputs.shards[i], shard_names(inputs)[i]
    key_of = enc.caption_key
    per_class = [0] * len(inputs.class_names)
    pending: list[tuple[dict[str, bytes], int, str]] = []  # (members to write, label, caption)
    shard, uncaptioned, truncated, example = ShardFile(out, name), 0, 0, ""

    def sample_of(key: str, members: dict[str, bytes]) -> tuple[dict[str, bytes], int, str]:
        where = f"{key} of {location}"
        if inputs.copy_images:  # fmgen's shards: every member as it is (an old text row aside)
            label, caption = label_and_caption(members, d, where)
            kept = {k: v for k, v in members.items() if k != TEXT_MEMBER}
            return {"__key__": key, **kept}, label, caption  # type: ignore[dict-item]
        arr, label, caption = decode(members, d, where)
        meta = {"id": key, "label": label, "class": inputs.class_names[label],
                "origin": f"{shard_name(location)}/{key}", "split": inputs.prefix}  # fmt: skip
        image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        sample = {"__key__": key, "png": encode_image(image, "png"), "cls": str(label).encode(),
                  "json": json.dumps(meta).encode()}  # fmt: skip
        if key_of in members:
            sample[key_of] = members[key_of]
        return sample, label, caption  # type: ignore[return-value]

    def flush() -> None:
        nonlocal truncated, example
        captions = [p[2] for p in pending]
        rows, cut = enc.rows(captions)  # (B, F) float16
        truncated += len(cut)
        example = example or (captions[cut[0]] if cut else "")
        for (sample, label, _), row in zip(pending, rows, strict=True):
            shard.write({**sample, TEXT_MEMBER: npy_bytes(row)}, label)
            per_class[label] += 1
        update(len(pending))
        pending.clear()

    read = ShardRead()
    try:
        for _, members, sample in usable_samples(location, inputs.counts[i], sample_of, read):
            pending.append(sample)
            uncaptioned += key_of not in members
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
    record: dict[str, Any] = {"job": text_job(inputs, i, enc), "samples": info.num_samples,
                              "labels": [info.label_min, info.label_max], "per_class": per_class,
                              "skipped": skipped, "uncaptioned": uncaptioned,
                              "truncated": truncated, "truncated_example": example}  # fmt: skip
    if info.num_samples == 0:
        temp.unlink(missing_ok=True)
    else:
        record.update(size=temp.stat().st_size, sha256=file_sha256(temp))
    # the record first: a shard under its done name always has one (a kill in between costs a redo)
    write_durably(out / record_name(name, STAGE), json.dumps(record).encode())
    if info.num_samples:
        os.replace(temp, out / done_name(name, STAGE))
        fsync_dir(out)
    return record


# --- the whole set ----------------------------------------------------------------------------


def finish(out: Path, inputs: EncodeInput, enc: CaptionEncoder, old: list[Path]) -> Manifest:
    """Rename every shard into place and write the manifest (main process, last)."""
    names = shard_names(inputs)
    records, written = finished_records(out, names, lambda i: text_job(inputs, i, enc), STAGE)
    total = sum(r["samples"] for _, r in written)
    uncaptioned = sum(r["uncaptioned"] for r in records)
    if uncaptioned >= total:
        raise DataError(no_captions_message(enc.caption_key, f"the {total} usable samples"))
    truncated = sum(r["truncated"] for r in records)
    section = {**enc.section(), "captions": total - uncaptioned, "uncaptioned": uncaptioned,
               "truncated": truncated}  # fmt: skip
    install_shards(out, [n for n, _ in written], old, STAGE)
    shards = tuple(ShardInfo(n, r["samples"], *r["labels"]) for n, r in written)
    per_class = np.sum([r["per_class"] for _, r in written], axis=0).tolist()
    split = {**inputs.split, "unreadable": int(inputs.split.get("unreadable", 0))
             + sum(r["skipped"] for r in records)}  # fmt: skip
    first, last = (n[len(inputs.prefix) + 1 : -len(".tar")] for n in (shards[0].name, shards[-1].name))  # fmt: skip
    m = Manifest(num_samples=total, class_names=inputs.class_names,
                 class_counts=tuple(per_class), resolution=inputs.decoding.resolution,
                 channels=inputs.decoding.channels, image_format=inputs.image_format,
                 jpeg_quality=inputs.jpeg_quality, shards=shards,
                 pattern=f"{inputs.prefix}-{{{first}..{last}}}.tar", split=split,
                 source=inputs.source, root=out, latent=inputs.latent, text=section)  # fmt: skip
    write_manifest(m, out)
    remove_work_files(out, names, inputs.prefix, STAGE)
    for work in (LATENTS, PIXELS):
        shutil.rmtree(out / work, ignore_errors=True)
    if truncated:  # as fmgen.models.text.warn_truncated words it
        example = next(r["truncated_example"] for r in records if r["truncated"])
        log.warning(
            "%d caption(s) longer than text.max_length=%d tokens were truncated (e.g. %r); raise "
            "text.max_length (--text-max-length) to keep them whole",
            truncated, enc.frozen.max_length, example[:60],
        )  # fmt: skip
    if uncaptioned:
        log.warning("%d of %d sample(s) have no .%s member: they got the empty caption's row",
                    uncaptioned, total, enc.caption_key)  # fmt: skip
    return m


def no_captions_message(caption_key: str, where: str) -> str:
    return (
        f"--caption-key {caption_key}: {where} hold no .{caption_key} member, so there are no "
        f"captions to encode; name the caption member with --caption-key (e.g. txt), or give "
        f"captioned shards"
    )


def _check_captions(location: str, caption_key: str) -> None:
    """Refuse, before any encoding, a first shard none of whose samples has a caption."""
    seen: set[str] = set()
    n = 0
    try:
        for _, members in shard_samples(location):
            if caption_key in members:
                return
            n += 1
            seen.update(members)
    except (tarfile.TarError, OSError, EOFError):
        return  # the encoding reports an unreadable shard; the manifest check still holds
    if n:
        where = f"the {n} sample(s) of the first shard {shard_name(location)} (members: {', '.join(sorted(seen))})"  # fmt: skip
        raise DataError(no_captions_message(caption_key, where))


def prepare_text(
    source: str, out_dir: str | Path, *, text_encoder: str | Path | CaptionEncoder,
    caption_key: str = "txt", max_length: int = 32, dtype: str = "float32",
    autoencoder: str | Path | None = None, data_path: str | Sequence[str] | None = None,
    manifest: str | None = None, num_classes: int | None = None, image_key: str = "",
    label_key: str = "cls", fit: str = "center-crop", batch_size: int = 64,
    device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
    any_failed: Callable[[bool], bool] | None = None, overwrite: bool = False,
    progress: bool = True, **pixel_options: Any,
) -> Manifest:  # fmt: skip
    """Write text shards of a source into ``out_dir``; returns the manifest (every process).

    Args:
        source: "shards" (fmgen's pixel or latent shards in ``data_path``), "webdataset" (any
            shards ``data_path`` names, read with ``manifest``, ``num_classes``, ``image_key``,
            ``label_key``, ``fit`` and ``pixel_options``' resolution and channels), or a source
            of ``prepare`` (digits, folder, hf; ``pixel_options`` go to it).
        text_encoder: a local transformers text encoder folder (or a loaded CaptionEncoder);
            ``caption_key``, ``max_length``, ``dtype``: its caption member, tokens per caption
            and compute dtype.
        autoencoder: also encode the images (the latent stage first, into ``OUT/.latents``).
        batch_size: captions (and images) per encoder call; device: default the best one.
        rank, world_size, any_failed: this process of several, as in ``prepare_latents``.
        overwrite: replace shards fmgen wrote into ``out_dir`` from this source.
    """
    out = Path(out_dir)
    check_encode_request(source, data_path, batch_size, pixel_options, SOURCES)
    resolution, channels = pixel_options.get("resolution"), pixel_options.get("channels")
    device = torch.device(device) if device is not None else best_device()
    stage = stages(rank, any_failed)  # work on the main process (or every one), failing together
    enc: CaptionEncoder = stage(lambda: text_encoder if isinstance(text_encoder, CaptionEncoder)
                                else CaptionEncoder(text_encoder, caption_key=caption_key,
                                                    max_length=max_length, dtype=dtype,
                                                    device=device), everyone=True)  # fmt: skip
    ae = stage(lambda: KLAutoencoder(autoencoder, what="--autoencoder") if autoencoder else None,
               everyone=True)  # fmt: skip

    def check_out() -> None:
        out.mkdir(parents=True, exist_ok=True)
        files_to_replace(out, overwrite)  # refused before any work

    stage(check_out, everyone=False)
    # the shards this stage (or the latent one) reads, and the origin their manifest names
    base, base_source = Path(str(data_path)), None
    if source in SOURCES:
        stage(lambda: pixel_work_shards(source, out, pixel_options, progress), everyone=False)
        base, base_source = out / PIXELS, read_manifest(out / PIXELS).source

    def check_captions() -> None:
        if source == "webdataset":
            first = resolve_webdataset(data_path, manifest)[0][0]  # type: ignore[arg-type]
        else:
            first = str(read_manifest(base).shard_paths()[0])
        try:
            _check_captions(first, enc.caption_key)
        except DataError:
            if source in SOURCES:  # nothing to resume: the pixel shards are of no use
                shutil.rmtree(out / PIXELS, ignore_errors=True)
            raise

    stage(check_captions, everyone=False)
    if ae is not None:
        _latent_stage(source, out, base, ae, stage, data_path=data_path, manifest=manifest,
                      num_classes=num_classes, image_key=image_key, label_key=label_key, fit=fit,
                      caption_key=enc.caption_key, batch_size=batch_size, device=device,
                      rank=rank, world_size=world_size, any_failed=any_failed,
                      progress=progress, resolution=resolution, channels=channels)  # fmt: skip
        base_source = base_source or read_manifest(out / LATENTS).source

    def input_of() -> EncodeInput:
        if ae is not None:
            return shards_input(out / LATENTS, source=base_source)
        if source == "webdataset":
            res, ch = int(resolution or 0), int(channels or 0)
            return webdataset_input(data_path, resolution=res, channels=ch, manifest=manifest,  # type: ignore[arg-type]
                                    num_classes=num_classes, image_key=image_key,
                                    label_key=label_key, fit=fit, caption_key=enc.caption_key)  # fmt: skip
        return shards_input(base, source=base_source)

    inputs: EncodeInput = stage(input_of, everyone=True)
    inputs = dataclasses.replace(
        inputs, decoding=dataclasses.replace(inputs.decoding, caption_key=enc.caption_key)
    )
    old: list[Path] = stage(lambda: files_to_replace(out, overwrite, inputs.source), everyone=False)

    def embed_mine() -> None:
        from tqdm.auto import tqdm

        mine = [i for i in range(len(inputs.shards)) if i % world_size == rank]
        names = shard_names(inputs)
        todo = [i for i in mine
                if finished_record(out, names[i], text_job(inputs, i, enc), STAGE) is None]  # fmt: skip
        log.info("process %d of %d embeds the captions of %d of the %d shards", rank, world_size,
                 len(mine), len(inputs.shards))  # fmt: skip
        if len(todo) < len(mine):
            log.info("%d of %d shard(s) were embedded before: skipped", len(mine) - len(todo), len(mine))  # fmt: skip
        counts = [inputs.counts[i] for i in todo]
        total = sum(c or 0 for c in counts) if all(c is not None for c in counts) else None
        with tqdm(total=total, desc="text", unit="caption",
                  disable=rank != 0 or not progress or None) as bar:  # fmt: skip
            for i in todo:
                embed_shard(inputs, i, out, enc, batch_size=batch_size, update=bar.update)

    stage(embed_mine, everyone=True)
    stage(lambda: finish(out, inputs, enc, old), everyone=False)
    return read_manifest(out)


def _latent_stage(
    source: str, out: Path, base: Path, ae: KLAutoencoder, stage: Callable[..., Any], *,
    data_path: str | Sequence[str] | None, progress: bool, **options: Any,
) -> None:  # fmt: skip
    """Latent shards of ``base`` (or of the WebDataset shards) in ``OUT/.latents``, reused when a
    finished set was made for the same request (a text stage that failed after it)."""
    folder, marker = out / LATENTS, out / LATENTS / ".request.json"
    where = data_path if source == "webdataset" else str(base)
    picked = {k: options[k] for k in ("manifest", "num_classes", "image_key", "label_key", "fit",
                                      "caption_key", "resolution", "channels")}  # fmt: skip
    request = json.dumps({"source": source, "path": where, "autoencoder": ae.hash, **picked},
                         sort_keys=True, default=str)  # fmt: skip

    def reusable() -> bool:
        return (folder / MANIFEST).is_file() and marker.is_file() and marker.read_text() == request

    if stage(reusable, everyone=True):
        return
    stage(lambda: (folder / MANIFEST).is_file() and shutil.rmtree(folder), everyone=False)
    kind = "webdataset" if source == "webdataset" else "shards"
    res, ch = options.pop("resolution"), options.pop("channels")
    prepare_latents(kind, folder, autoencoder=ae, data_path=where, progress=progress,
                    **options, **({"resolution": res, "channels": ch} if kind == "webdataset" else {}))  # fmt: skip
    stage(lambda: write_durably(marker, request.encode()), everyone=False)
