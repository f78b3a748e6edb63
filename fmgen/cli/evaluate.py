"""``python -m fmgen.evaluate`` / ``fmgen eval``: FID of a checkpoint's samples or of an image folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fmgen.base import FmgenError, setup_logging
from fmgen.cli import add_sampling_args, device_from_arg, non_negative, run_guarded, spec_from_args
from fmgen.eval import FEATURE_NETWORKS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.evaluate",
        description="FID of a checkpoint's samples, or of a folder of images, against cached statistics "
        "of all real images of a shard folder. Writes a JSON protocol record beside the number.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder, checkpoint folder or exported model")
    src.add_argument("--images", help="folder of PNG/JPEG files or with samples.npz")
    p.add_argument(
        "--data",
        help="shard folder of the real images (default: the checkpoint config's data.path)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="generated samples (default: eval.fid_num_samples)",
    )
    p.add_argument("--feature-network", choices=tuple(FEATURE_NETWORKS), default=None)
    p.add_argument(
        "--inception-weights", default="", help="local Inception weights file (offline clusters)"
    )
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--out", default=None, help="record path (default: beside the checkpoint / images)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.eval.fid import fid_of_folder, fid_of_model

        out = Path(args.out) if args.out else None
        non_negative(args.seed, "--seed")
        device = device_from_arg(args.device)
        if args.images:
            if not args.data:
                raise FmgenError("--images needs --data (the shard folder of the real images)")
            record = fid_of_folder(Path(args.images), data_dir=Path(args.data), out=out,
                                   feature_network=args.feature_network or "inception",
                                   inception_weights=args.inception_weights)  # fmt: skip
        else:
            import torch
            from accelerate import Accelerator

            from fmgen.config import sampling_spec
            from fmgen.models import load_model

            acc = Accelerator(cpu=not torch.cuda.is_available())  # joins torchrun's CPU processes
            loaded = load_model(args.checkpoint, weights=args.weights, device=device or acc.device)
            cfg = loaded.config
            if args.data:
                cfg.data.path = args.data
            if args.feature_network:
                cfg.eval.feature_network = args.feature_network
            if args.inception_weights:
                cfg.eval.inception_weights = args.inception_weights
            spec = spec_from_args(sampling_spec(cfg), args)
            default_out = Path(loaded.source) / f"fid-{cfg.eval.feature_network}.json"
            record = fid_of_model(loaded.model, loaded.path, cfg, step=loaded.step, weights=loaded.weights,
                                  spec=spec, autoencoder=loaded.autoencoder, accelerator=acc,
                                  num_samples=args.num_samples, out=out or default_out, seed=args.seed)  # fmt: skip
            if not acc.is_main_process:
                return 0
        print(f"FID {record['fid']:.4f} ({record['num_generated']} generated vs {record['num_reference']} reference, "
              f"{record['feature_network']} features); record: {record['record']}")  # fmt: skip
        return 0

    return run_guarded(go)
