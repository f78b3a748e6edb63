"""Training throughput: the whole pipeline against a bare PyTorch loop, in one run.

The pipeline is `fmgen.train.train` as a user runs it: the streaming shard loader, EMA, the
noise of the global batch, logging (W&B offline) and the non-finite guard. The bare loop trains
the same FlowModel with the same batch on an in-memory tensor with AdamW and the plain CFM
loss, nothing else. Both report steady-state images/s (start-up excluded). Target: ratio >= 0.95.

    python bench/train_step.py                     # digits preset on this machine
    python bench/train_step.py --preset cifar10    # on a CUDA machine: bf16, images/s, peak memory
    python bench/train_step.py --preset cifar10 train.compile=true   # any config override
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def synthetic_shards(out: Path, resolution: int, channels: int, n: int) -> Path:
    """Random images as an image folder turned into shards (throughput only, no download)."""
    from PIL import Image

    from fmgen.data import prepare

    src = out / "images"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (resolution, resolution, channels), dtype=np.uint8)
        Image.fromarray(a[..., 0] if channels == 1 else a).save(d / f"{i:06d}.png")
    prepare(
        "folder", out / "shards", resolution=resolution, channels=channels, source_path=str(src)
    )
    return out / "shards"


def bare_loop(
    cfg, images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int, device: torch.device
) -> float:
    """The same model and batch, trained with nothing but AdamW and the CFM loss."""
    from fmgen.models import ClassLabels, build_model

    torch.manual_seed(0)
    model = build_model(cfg, ClassLabels(10)).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=cfg.optim.fused or None)
    images, labels = images.to(device), labels.to(device)
    b = cfg.train.batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    t0 = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (b,), device=device)
        z, y = images[idx].contiguous(memory_format=memory_format), labels[idx]
        t = torch.rand(b, device=device)
        eps = torch.randn_like(z)
        x = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * eps
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = (net(x, t, y).float() - (z - eps)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=("digits", "cifar10"), default="digits")
    p.add_argument(
        "--steps", type=int, default=60, help="measured steps of each loop (after warm-up)"
    )
    p.add_argument("--batch", type=int, default=None, help="override train.batch_size")
    p.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for both loops, e.g. train.compile=true train.mixed_precision=fp16",
    )
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from fmgen.config import load_config
    from fmgen.data.pipeline import read_all
    from fmgen.train import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        over = [f"train.run_dir={tmp / 'run'}", "eval.report=", "logging.wandb=true",
                "logging.mode=offline", "train.log_every_steps=10"]  # fmt: skip
        if args.preset == "cifar10":
            shards = synthetic_shards(tmp / "data", 32, 3, 4096)
            over += [
                f"data.path={shards}",
                "eval.fid_every_images=0",
                "train.sample_every_images=0",
            ]
        else:
            over += [f"data.path={tmp / 'digits'}"]
        if args.batch:
            over.append(f"train.batch_size={args.batch}")
        if args.workers is not None:
            over.append(f"data.num_workers={args.workers}")
        cfg = load_config(ROOT / "configs" / f"{args.preset}.yaml", [*over, *args.overrides])
        warm = 5
        total = args.steps + warm
        cfg.train.total_images = total * cfg.train.batch_size
        cfg.train.checkpoint_every_images = 10**12  # only the final checkpoint
        cfg.sample.per_class = 1
        cfg.sample.steps = 2
        result = train(cfg)
        images, labels = read_all(Path(cfg.data.path))
        bare = bare_loop(cfg, images, labels, args.steps, warm, device)
    pipe = result.images_per_s
    print(f"\npreset {args.preset}, device {device}, global batch {cfg.train.batch_size}, "
          f"precision {cfg.train.mixed_precision}, compile {cfg.train.compile}, channels_last {cfg.train.channels_last}, "
          f"{args.steps} measured steps, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'loop':<32}{'images/s':>12}")
    print(f"{'bare PyTorch (in-memory data)':<32}{bare:>12.1f}")
    print(f"{'fmgen pipeline (loader+EMA+log)':<32}{pipe:>12.1f}")
    print(f"ratio pipeline / bare: {pipe / bare:.3f} (target >= 0.95)")
    if device.type == "cuda":
        print(f"peak GPU memory (pipeline): {result.peak_memory_gb:.2f} GiB")
    if not math.isfinite(pipe):
        raise SystemExit("the pipeline reported no steady-state throughput; raise --steps")


if __name__ == "__main__":
    main()
