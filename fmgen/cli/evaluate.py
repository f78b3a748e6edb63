"""``python -m fmgen.evaluate`` / ``fmgen eval``: FID and precision/recall of a checkpoint's
samples or of an image folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fmgen.base import FmgenError, setup_logging
from fmgen.cli import add_sampling_args, device_from_arg, non_negative, run_guarded, spec_from_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.evaluate",
        description="FID and precision/recall of a checkpoint's samples, or of a folder of images, "
        "against cached statistics of all real images of a shard folder. Writes a JSON protocol "
        "record beside the numbers.",
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
    p.add_argument(
        "--feature-network",
        default=None,
        help="inception, digits-classifier, dinov2:FOLDER (a local transformers Dinov2Model), "
        "module:FILE.py:FACTORY (FACTORY() returns a torch module of images in [-1, 1] to (B, D) "
        "features) or torchscript:FILE.pt (default: the checkpoint config's "
        "eval.feature_network; inception for --images)",
    )
    p.add_argument(
        "--feature-network-path",
        default=None,
        help="the FOLDER or FILE of dinov2, module or torchscript, when not in the name",
    )
    p.add_argument(
        "--force-feature-network",
        action="store_true",
        help="score even with a network trained on another data set than the reference data",
    )
    p.add_argument(
        "--precision-recall-k",
        type=int,
        default=None,
        help="k of the k-NN precision/recall (default: eval.precision_recall_k, 3; 0 = none)",
    )
    p.add_argument(
        "--inception-weights", default="", help="local Inception weights file (offline clusters)"
    )
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--prompts-file", default=None,
                   help="text models: prompts, one per line; sample i gets prompt i mod their count "
                   "(default: the null caption, unconditional samples)")  # fmt: skip
    p.add_argument("--clip", default=None,
                   help="a local CLIP folder (CLIPModel + CLIPProcessor save_pretrained): adds the "
                   "samples' CLIP score (torchmetrics' CLIPScore) to the record; needs --prompts-file")  # fmt: skip
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
        from fmgen.eval.features import CLI_FLAGS, parse_feature_network
        from fmgen.eval.protocol import fid_of_folder, fid_of_model

        out = Path(args.out) if args.out else None
        non_negative(args.seed, "--seed")
        if args.precision_recall_k is not None:
            non_negative(args.precision_recall_k, "--precision-recall-k")
        device = device_from_arg(args.device)
        if args.feature_network or args.feature_network_path:  # a bad name fails before loading
            parse_feature_network(args.feature_network or "inception",
                                  args.feature_network_path or "", flags=CLI_FLAGS)  # fmt: skip
        if args.images:
            if not args.data:
                raise FmgenError("--images needs --data (the shard folder of the real images)")
            k = 3 if args.precision_recall_k is None else args.precision_recall_k
            record = fid_of_folder(Path(args.images), data_dir=Path(args.data), out=out,
                                   feature_network=args.feature_network or "inception",
                                   feature_network_path=args.feature_network_path or "",
                                   inception_weights=args.inception_weights, pr_k=k,
                                   force=args.force_feature_network, device=device)  # fmt: skip
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
                cfg.eval.feature_network_path = ""  # the saved path belongs to the saved name
            if args.feature_network_path:
                cfg.eval.feature_network_path = args.feature_network_path
            if args.force_feature_network:
                cfg.eval.force_feature_network = True
            if args.precision_recall_k is not None:
                cfg.eval.precision_recall_k = args.precision_recall_k
            if args.inception_weights:
                cfg.eval.inception_weights = args.inception_weights
            spec = spec_from_args(sampling_spec(cfg), args)
            kind = parse_feature_network(cfg.eval.feature_network, cfg.eval.feature_network_path,
                                         flags=CLI_FLAGS).kind  # fmt: skip
            default_out = Path(loaded.source) / f"fid-{kind}.json"
            from fmgen.eval.sampling import read_prompts_file

            prompts = read_prompts_file(args.prompts_file) if args.prompts_file else None
            record = fid_of_model(loaded.model, loaded.path, cfg, step=loaded.step, weights=loaded.weights,
                                  spec=spec, autoencoder=loaded.autoencoder, accelerator=acc,
                                  num_samples=args.num_samples, out=out or default_out, seed=args.seed,
                                  prompts=prompts, clip=args.clip or "")  # fmt: skip
            if not acc.is_main_process:
                return 0
            if "clip_score" in record:
                print(f"CLIP score {record['clip_score']['clip_score']:.4f} ({args.clip})")
        pr = (f", precision {record['precision']:.4f}, recall {record['recall']:.4f} "
              f"(k={record['precision_recall']['k']})" if record["precision"] is not None else "")  # fmt: skip
        print(f"FID {record['fid']:.4f}{pr} ({record['num_generated']} generated vs {record['num_reference']} "
              f"reference, {record['feature_network']} features); record: {record['record']}")  # fmt: skip
        return 0

    return run_guarded(go)
