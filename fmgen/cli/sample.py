"""``sample.py`` / ``fmgen sample``: image grids and sample files from a checkpoint or export."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmgen.base import FmgenError, setup_logging
from fmgen.cli import (
    add_sampling_args,
    device_from_arg,
    non_negative,
    run_guarded,
    spec_from_args,
    writable_dir,
)


def parser() -> argparse.ArgumentParser:
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
    add_sampling_args(p)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--labels", help="comma-separated class indices, e.g. 3,3,7")
    who.add_argument("--per-class", type=int, help="N samples of every class (grid rows = classes)")
    who.add_argument("--num-samples", type=int, help="N unconditional samples")
    who.add_argument("--prompt", action="append", default=None,
                     help='text models: a prompt (repeatable: --prompt "a red car" --prompt "a cat")')  # fmt: skip
    who.add_argument("--prompts-file", help="text models: a UTF-8 file, one prompt per line")
    p.add_argument("--num-per-prompt", type=int, default=None,
                   help="text models: samples per prompt (grid rows = prompts; default sample.per_class)")  # fmt: skip
    p.add_argument("--negative-prompt", default=None,
                   help="text models: guidance steers away from this prompt instead of the empty one "
                   "(default: the config's sample.negative_prompt)")  # fmt: skip
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


def sample_command(args: Any) -> str:
    """Load, split the sample indices across processes, write the outputs; the summary lines."""
    import torch
    from accelerate import PartialState

    from fmgen.config import sampling_spec
    from fmgen.eval import draw_samples, sample_request
    from fmgen.eval.sampling import read_prompts_file
    from fmgen.models import load_model

    if args.grid_max <= 0:
        raise FmgenError(f"--grid-max must be > 0; got {args.grid_max}")
    non_negative(args.seed, "--seed")
    device = device_from_arg(args.device)
    if args.out:
        writable_dir(Path(args.out).parent, "--out")
    if args.out_dir:
        writable_dir(Path(args.out_dir), "--out-dir")
    # CPU mode without CUDA, or torchrun's processes would each sample everything alone
    state = PartialState(cpu=not torch.cuda.is_available())
    device = device or state.device
    loaded = load_model(args.checkpoint, weights=args.weights, device=device)
    spec = spec_from_args(sampling_spec(loaded.config), args)
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else args.prompt
    request = sample_request(loaded, labels=args.labels, num_samples=args.num_samples,
                             per_class=args.per_class, prompts=prompts,
                             num_per_prompt=args.num_per_prompt,
                             negative_prompt=args.negative_prompt)  # fmt: skip
    lines = draw_samples(loaded, spec, request, state=state, device=device, seed=args.seed,
                         precision=args.precision, grid=Path(args.out) if args.out else None,
                         grid_max=args.grid_max, out_dir=Path(args.out_dir) if args.out_dir else None,
                         fmt=args.format)  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        out = sample_command(args)
        if out:
            print(out)
        return 0

    return run_guarded(go)
