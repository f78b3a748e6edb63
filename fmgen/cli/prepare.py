"""``python -m fmgen.data prepare`` / ``fmgen prepare``: write a data set as training shards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fmgen.base import FmgenError, setup_logging
from fmgen.cli import run_guarded
from fmgen.config import TextConfig
from fmgen.data import IMAGE_FORMATS, SOURCES
from fmgen.data.decode import FITS
from fmgen.data.sources import SPLITS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.data prepare",
        description="Write a data set as WebDataset tar shards (image, cls, json per sample) plus "
        "manifest.json, the input of training. No download for --source digits.",
        epilog="Example: python -m fmgen.data prepare --source hf --source-path "
        "/data/cifar10-hf --image-column img --label-column label --resolution 32 --channels 3 "
        "--out data/cifar10-32",
    )
    p.add_argument(
        "--source",
        choices=(*SOURCES, "shards", "webdataset"),
        default="digits",
        help="digits: scikit-learn's 1797 8x8 digits (bundled); folder: "
        "SOURCE_PATH/<class>/<image> folders; hf: a datasets save_to_disk folder or a data "
        "set name; with --autoencoder or --text-encoder also shards (fmgen's shards in "
        "--data-path: pixel ones, or latent ones for --text-encoder) and webdataset (any "
        "WebDataset shards --data-path names) (default: digits)",
    )
    p.add_argument(
        "--source-path", default=None, help="image folder, save_to_disk folder or data set name"
    )
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="output size R: shorter side resized (bicubic), center-cropped to RxR "
        "(default: 8 for digits, else the first image's shorter side)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="1 (grayscale, mode L) or 3 (RGB); default 1 for digits, else 3",
    )
    p.add_argument("--image-column", default="image", help="hf: the image column (default: image)")
    p.add_argument(
        "--label-column", default=None, help="hf: the label column (default: none, one class)"
    )
    p.add_argument(
        "--hf-split", default="train", help="hf: the data set's split to read (default: train)"
    )
    p.add_argument(
        "--format", choices=IMAGE_FORMATS, default="png", help="image encoding (default: png)"
    )
    p.add_argument("--jpeg-quality", type=int, default=95, help="for --format jpg (default: 95)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="default: 1000")
    p.add_argument("--max-shard-mb", type=float, default=1024.0, help="default: 1024")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="which part of a seeded train/test split to write (default: train)",
    )
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="fraction of the source held out as 'test' (default: 0, all is train)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: 0)")
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the order samples are written in, so every shard mixes classes; the same "
        "source and seeds give byte-identical shards (default: 0)",
    )
    p.add_argument(
        "--background",
        default="white",
        help="colour transparent pixels are composited over: a name or #rrggbb (default: white)",
    )
    p.add_argument(
        "--caption-templates",
        default="",
        help="digits: write each image's caption (.txt) from this template set of "
        "fmgen.data.captions, e.g. digits (default: none)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that decode, resize and encode images; the shards do not depend on it "
        "(default: 1)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image instead of skipping it with a warning",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards fmgen wrote in --out (kept until the new ones are complete)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    lat = p.add_argument_group(
        "latent shards (--autoencoder; under `accelerate launch` the processes split the shards)"
    )
    lat.add_argument(
        "--autoencoder",
        default=None,
        help="a local diffusers AutoencoderKL folder: write its latents of every image and of "
        "its mirror image (float16 .npy members) for model.autoencoder runs; resumable",
    )
    lat.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="the shards to encode: --source shards: a folder of fmgen's pixel shards; "
        "--source webdataset: a folder, brace pattern, URLs or an index folder",
    )
    lat.add_argument("--manifest", default=None, help="webdataset: an index or manifest")
    lat.add_argument("--image-key", default="", help="webdataset: the image member")
    lat.add_argument("--label-key", default="cls", help="webdataset: the label member")
    lat.add_argument("--num-classes", type=int, default=None, help="webdataset: label classes")
    lat.add_argument(
        "--fit", choices=FITS, default="center-crop", help="webdataset: images of another size"
    )
    lat.add_argument(
        "--batch-size", type=int, default=64, help="images (or captions) per encoder call"
    )
    lat.add_argument("--device", default=None, help="default: CUDA when present, else the CPU")
    txt = p.add_argument_group(
        "text embeddings (--text-encoder; with --autoencoder the latents first, then the text; "
        "under `accelerate launch` the processes split the shards)"
    )
    txt.add_argument(
        "--text-encoder",
        default=None,
        help="a local transformers text encoder folder (config.json, model.safetensors, "
        "tokenizer): write each caption's packed encoding (float16 KEY.text.npy) for "
        "text.precomputed runs; keeps every member of fmgen's shards; resumable",
    )
    txt.add_argument(
        "--caption-key", default="txt", help="the caption member (default: txt); a sample "
        "without one gets the empty caption",
    )  # fmt: skip
    txt.add_argument(
        "--text-max-length", type=int, default=TextConfig().max_length,
        help=f"tokens per caption, as text.max_length (default: {TextConfig().max_length})",
    )  # fmt: skip
    txt.add_argument(
        "--text-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="the encoder's compute dtype, as text.dtype (default: float32)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fmgen.data prepare ...`` (also ``fmgen prepare ...``); prints a summary: samples
    written, unreadable images skipped, per-class counts, classes left empty."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        argv = argv[1:]
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.data.sources import summary_lines

        if args.autoencoder or args.text_encoder:
            m = prepare_encoded_shards(args)
            if m is None:  # not the main process
                return 0
        elif args.source in SOURCES:
            m = prepare_pixel_shards(args)
        else:
            raise FmgenError(
                f"--source {args.source} encodes existing shards and needs --autoencoder PATH "
                f"(latent shards) or --text-encoder PATH (text embeddings); pixel shards train as "
                f"they are: data.source={args.source}"
            )
        print("\n".join(summary_lines(m) + text_lines(m)))
        return 0

    return run_guarded(go)


def _pixel_options(args: argparse.Namespace) -> dict:
    return dict(resolution=args.resolution, channels=args.channels, source_path=args.source_path,
                image_column=args.image_column, label_column=args.label_column,
                hf_split=args.hf_split, split=args.split, holdout_fraction=args.holdout_fraction,
                seed=args.seed, shuffle_seed=args.shuffle_seed, fmt=args.format,
                quality=args.jpeg_quality, background=args.background,
                samples_per_shard=args.samples_per_shard,
                max_shard_bytes=int(args.max_shard_mb * 2**20), workers=args.workers,
                strict=args.strict,
                **({"caption_templates": args.caption_templates} if args.caption_templates else {}))  # fmt: skip


def prepare_encoded_shards(args: argparse.Namespace):
    """Latent shards, text shards or both, split across the processes of ``accelerate launch``
    (or torchrun); the manifest on the main process (None on the others)."""
    import torch
    from accelerate import PartialState

    from fmgen.cli import device_from_arg
    from fmgen.data.latents import prepare_latents
    from fmgen.data.text_embeddings import prepare_text
    from fmgen.train.dist import any_rank

    if args.text_encoder:  # our own progress bar and warnings; an error stays one line
        from fmgen.models.text import quiet_transformers

        quiet_transformers()
    state = PartialState(cpu=not torch.cuda.is_available())
    device = device_from_arg(args.device) or state.device
    paths = args.data_path or []
    options = _pixel_options(args) if args.source in SOURCES else {
        "resolution": args.resolution, "channels": args.channels}  # fmt: skip
    common = dict(
        data_path=paths[0] if len(paths) == 1 else paths, manifest=args.manifest,
        num_classes=args.num_classes, image_key=args.image_key, label_key=args.label_key,
        fit=args.fit, batch_size=args.batch_size, device=device, rank=state.process_index,
        world_size=state.num_processes, any_failed=lambda failed: any_rank(failed, state.device),
        overwrite=args.overwrite, progress=not args.no_progress, **options,
    )  # fmt: skip
    if args.text_encoder:
        m = prepare_text(args.source, args.out, text_encoder=args.text_encoder,
                         caption_key=args.caption_key, max_length=args.text_max_length,
                         dtype=args.text_dtype, autoencoder=args.autoencoder, **common)  # fmt: skip
    else:
        m = prepare_latents(args.source, args.out, autoencoder=args.autoencoder,
                            caption_key=args.caption_key, **common)  # fmt: skip
    return m if state.is_main_process else None


def text_lines(m) -> list[str]:
    """The summary of a manifest's text section (none without one)."""
    t = m.text
    if t is None:
        return []
    e = t["encoder"]
    return [
        f"text: {t['captions']} caption(s) (.{t['caption_key']}) as float16 rows of width "
        f"{t['width']} (.{t['member']}) from {e['architecture']} {e['path']} (hash "
        f"{e['hash'][:12]}, {e['dtype']}), max_length {t['max_length']}; {t['uncaptioned']} "
        f"without a caption (the empty caption), {t['truncated']} truncated"
    ]


def prepare_pixel_shards(args: argparse.Namespace):
    from fmgen.data import prepare

    return prepare(args.source, args.out, **_pixel_options(args), overwrite=args.overwrite,
                   progress=not args.no_progress)  # fmt: skip
