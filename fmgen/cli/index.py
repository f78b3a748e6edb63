"""``python -m fmgen.data index``: index WebDataset shards that fmgen did not write."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fmgen.base import setup_logging
from fmgen.cli import run_guarded


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.data index",
        description="Read WebDataset tar shards written by other tools (ShardWriter, "
        "img2dataset, ...) and write index.json: samples per shard, classes, image sizes. "
        "The shards are only read; index.json in --out is the one file written.",
        epilog="Examples: python -m fmgen.data index /data/laion-part --caption-key txt "
        "--out data/laion-index;  python -m fmgen.data index "
        "'https://host/shards/train-{000000..000099}.tar' --out data/train-index --workers 8;  "
        "python -m fmgen.data index 'pipe:aws s3 cp s3://bucket/train-{0000..0099}.tar -' "
        "--out data/s3-index",
    )
    p.add_argument(
        "shards",
        nargs="+",
        help="a shard folder, a brace pattern (/data/train-{000000..000999}.tar), URLs "
        "(http://, https://, pipe:CMD, file:) or several of them",
    )
    p.add_argument("--out", required=True, help="the folder of index.json (created if missing)")
    p.add_argument(
        "--image-key",
        default="",
        help="the image member (default: the first of jpg, jpeg, png, webp a sample has)",
    )
    p.add_argument(
        "--label-key",
        default="cls",
        help="the integer class member (default: cls; none found = no labels); '' for none",
    )
    p.add_argument(
        "--caption-key", default="", help="a caption member to check for, e.g. txt (default: none)"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="processes reading shards at once (default: 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fmgen.data index SHARDS... --out DIR``; prints a summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "index":
        argv = argv[1:]
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.data.index import INDEX, index_shards

        ix = index_shards(
            args.shards,
            args.out,
            image_key=args.image_key,
            label_key=args.label_key,
            caption_key=args.caption_key,
            workers=args.workers,
            progress=not args.no_progress,
        )
        sizes = sorted(ix.image_sizes.items(), key=lambda kv: -kv[1])[:3]
        if ix.num_classes is None:
            classes = "no labels"
        else:
            classes = (
                f"{ix.num_classes} classes (.{ix.label_key}, {min(ix.class_counts)}.."
                f"{max(ix.class_counts)} samples each)"
            )
        print(f"indexed {len(ix.shards)} shards, {ix.num_samples} samples -> {ix.root / INDEX}")
        print(f"classes: {classes}")
        print("image sizes: " + (", ".join(f"{k} ({v})" for k, v in sizes) or "none"))
        print(f"unreadable shards: {len(ix.unreadable)}")
        return 0

    return run_guarded(go)
