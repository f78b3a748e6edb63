"""Command-line entry points: ``train.py``, ``sample.py`` and the ``fmgen`` command.

Errors a user can fix (bad config, missing data, incompatible checkpoint) print one clear line
and exit with status 2; they never show a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence


def setup_logging() -> None:
    # Only the main process talks; other ranks log warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "wandb", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(fn: Callable[[], int]) -> int:
    from fmgen.errors import FmgenError

    try:
        return fn()
    except FmgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_parser() -> argparse.ArgumentParser:
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


def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from fmgen.train import train

        result = train(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            if result.stopped_by_signal:
                print(f"stopped by signal at step {result.step}; resume with --resume auto "
                      f"(checkpoint: {result.checkpoint})")  # fmt: skip
            else:
                print(
                    f"done: {result.step} steps, {result.images} images; checkpoint {result.checkpoint}"
                )
                print(f"exported model: {result.export_dir}")
                print(f"sample grid: {result.grid}")
                if result.quality is not None:
                    q = result.quality
                    print(
                        f"quality: classifier held-out accuracy {q['classifier_heldout_accuracy']:.3f}, "
                        f"guided accuracy {q['guided_accuracy']:.3f}, unconditional max class fraction "
                        f"{q['unconditional_max_fraction']:.3f}, classes covered "
                        f"{q['unconditional_classes_covered']}: {'PASS' if q['passed'] else 'FAIL'}"
                    )
                    print(
                        f"FID (digits-classifier features, {q['fid_samples']} images each, vs the train "
                        f"split): unconditional samples {q['fid_unconditional_vs_train']:.2f}, guided "
                        f"samples {q['fid_guided_vs_train']:.2f}; floor (held-out real split) "
                        f"{q['fid_heldout_vs_train']:.2f}"
                    )
        return 0

    return run_guarded(go)


def main(argv: Sequence[str] | None = None) -> int:
    """``fmgen train|sample|eval|prepare ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    from fmgen.evaluate import main as eval_main

    commands = {"train": train_main, "sample": sample_main, "eval": eval_main}
    try:
        from fmgen.data import main as prepare_main

        commands["prepare"] = prepare_main
    except ImportError:  # pragma: no cover
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(
            f"usage: fmgen {{{','.join(commands)}}} [options]   (fmgen COMMAND --help for details)"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Draw images from a training checkpoint, a run folder or an exported model. "
        "Under `accelerate launch` the samples are split across processes (same images as one process).",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or exported model folder"
    )
    p.add_argument(
        "--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or online weights"
    )
    p.add_argument(
        "--sampler",
        choices=("euler", "heun", "rk4", "sde"),
        default=None,
        help="default: the config's",
    )
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the config's)")
    p.add_argument(
        "--sde-sigma", type=float, default=None, help="SDE noise scale: sigma_t = s * beta_t"
    )
    p.add_argument("--t-start", type=float, default=None, help="first time of the grid (default 0)")
    p.add_argument(
        "--time-grid",
        choices=("uniform", "edm"),
        default=None,
        help="time steps uniform in t, or EDM (Karras) spacing in sigma = beta / alpha "
        "(default: the config's)",
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)"
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument("--labels", help="comma-separated class indices, e.g. 3,3,7")
    who.add_argument("--per-class", type=int, help="N samples of every class (grid rows = classes)")
    who.add_argument("--num-samples", type=int, help="N unconditional samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: the accelerator's)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--out", default=None, help="grid PNG path (default: <checkpoint>/samples/grid.png)"
    )
    p.add_argument("--out-dir", default=None, help="also write every sample here")
    p.add_argument(
        "--format", choices=("png", "npz"), default="png", help="format of --out-dir samples"
    )
    p.add_argument("--grid-max", type=int, default=400, help="at most this many images in the grid")
    return p


def sample_main(argv: Sequence[str] | None = None) -> int:
    args = sample_parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.generate import sample_command

        out = sample_command(args)
        if out:
            print(out)
        return 0

    return run_guarded(go)
