"""``python -m fmgen.data prepare`` / ``fmgen prepare``: write a data set as training shards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fmgen.base import setup_logging
from fmgen.cli import run_guarded
from fmgen.data import IMAGE_FORMATS, SOURCES
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
        choices=SOURCES,
        default="digits",
        help="digits: scikit-learn's 1797 8x8 digits (bundled); folder: "
        "SOURCE_PATH/<class>/<image> folders; hf: a datasets save_to_disk folder or a data "
        "set name (default: digits)",
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
        from fmgen.data import prepare
        from fmgen.data.sources import summary_lines

        m = prepare(
            args.source,
            args.out,
            resolution=args.resolution,
            channels=args.channels,
            source_path=args.source_path,
            image_column=args.image_column,
            label_column=args.label_column,
            hf_split=args.hf_split,
            split=args.split,
            holdout_fraction=args.holdout_fraction,
            seed=args.seed,
            shuffle_seed=args.shuffle_seed,
            fmt=args.format,
            quality=args.jpeg_quality,
            background=args.background,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=int(args.max_shard_mb * 2**20),
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        print("\n".join(summary_lines(m)))
        return 0

    return run_guarded(go)
