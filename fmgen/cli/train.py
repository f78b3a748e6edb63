"""``train.py`` / ``fmgen train``: train a model from a config preset and dotted overrides."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from fmgen.base import setup_logging
from fmgen.cli import run_guarded


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a flow-matching / diffusion image generator. Run as `python train.py` "
        "or `accelerate launch train.py` (multi-GPU, multi-node).",
        epilog="Overrides are dotted keys, e.g. train.batch_size=256 loss.name=dsm "
        "path.name=vp-cosine. train.batch_size is the GLOBAL batch.",
    )
    p.add_argument(
        "--config", help="YAML preset, e.g. configs/digits.yaml (default: built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest checkpoint of train.run_dir if any), or a checkpoint / run folder",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.config import load_config, to_yaml
        from fmgen.train import check_config, train

        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        result = train(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        if result.stopped_by_signal:
            print(f"stopped by signal at step {result.step}; resume with --resume auto "
                  f"(checkpoint: {result.checkpoint})")  # fmt: skip
            return 0
        print(f"{result.summary()}; checkpoint {result.checkpoint}")
        print(f"exported model: {result.export_dir}")
        print(f"sample grid: {result.grid}")
        for line in result.report_lines:
            print(line)
        return 0

    return run_guarded(go)
