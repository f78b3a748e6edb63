"""Drawing images from a trained FlowModel: any sampler, any prediction type, guidance.

The network's output is converted to a velocity through the path (``samplers.velocity_field``),
classifier-free guidance combines the conditional and null-label fields, and the chosen solver
integrates from N(0, I) at ``t_start`` to data at t = 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from fmgen import samplers
from fmgen.errors import FmgenError
from fmgen.models import FlowModel
from fmgen.paths import GaussianPath


def model_field(
    model: FlowModel, path: GaussianPath, labels: Tensor | None, guidance: float
) -> samplers.Field:
    """The velocity field u(x, t) of the model for fixed labels, with guidance if conditional."""
    if labels is None or not model.conditional:
        return samplers.velocity_field(lambda x, t: model(x, t, None), path, model.prediction_type)
    # guidance is affine, and so are the conversions: guiding the raw prediction equals
    # guiding the velocity it converts into
    net = samplers.cfg_net(model, labels, model.null_label, guidance)
    return samplers.velocity_field(net, path, model.prediction_type)


@torch.no_grad()
def generate(
    model: FlowModel,
    path: GaussianPath,
    *,
    num: int,
    labels: Tensor | None = None,
    sampler: str = "heun",
    steps: int = 20,
    guidance: float = 1.0,
    sde_sigma: float = 0.5,
    t_start: float = 0.0,
    time_grid: str = "uniform",
    seed: int = 0,
    start: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Images (num, C, H, W) in [-1, 1] for global sample indices start..start+num-1.

    ``labels`` (num,) for a conditional model (the null label gives unconditional samples).
    ``time_grid`` is the spacing of ``samplers.time_grid``: "uniform" in t or "edm".
    Every random number of sample i (initial noise, SDE increments) depends on (seed, i) only,
    so splitting the indices across processes reproduces the images of one process.
    """
    cfg = model.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if labels is not None and labels.shape != (num,):
        raise SampleError(f"labels must have shape (num,) = ({num},); got {tuple(labels.shape)}")
    if labels is not None and model.conditional:
        bad = labels[(labels < 0) | (labels > model.num_classes)]
        if bad.numel():
            raise SampleError(
                f"label {int(bad[0])} is outside the model's classes 0..{model.num_classes - 1} "
                f"({model.num_classes} = the null label)"
            )
    dtype = next(model.parameters()).dtype
    solve = samplers.get_sampler(sampler)
    out = []
    bar = tqdm(total=num, disable=not progress, desc="sample", unit="img")
    i = 0
    while i < num:
        block = (start + i) // NOISE_BLOCK
        n = min(num - i, (block + 1) * NOISE_BLOCK - (start + i))  # stay inside one noise block
        x = block_noise(seed, start + i, n, shape).to(device=device, dtype=dtype)
        y = labels[i : i + n].to(device) if labels is not None else None
        field = model_field(model, path, y, guidance)
        ts = samplers.time_grid(
            steps, t_start=t_start, spacing=time_grid, path=path, device=x.device, dtype=x.dtype
        )
        kwargs = {}
        if sampler == "sde":
            # one generator per block, offset by the position inside it
            sde_gen = torch.Generator(device=x.device).manual_seed(
                seed * 1_000_003 + block + 7919 * ((start + i) % NOISE_BLOCK)
            )
            kwargs = {
                "path": path,
                "sigma": samplers.beta_sigma(path, sde_sigma),
                "generator": sde_gen,
            }
        out.append(solve(field, x, ts, **kwargs).float().cpu())
        i += n
        bar.update(n)
    bar.close()
    return torch.cat(out).clamp(-1, 1) if out else torch.empty((0, *shape))


class SampleError(FmgenError, ValueError):
    """Bad sampling arguments (labels, steps, guidance); the message names the fix."""


NOISE_BLOCK = 256


def block_noise(seed: int, start: int, count: int, shape: tuple[int, ...]) -> Tensor:
    """Initial noise of samples start..start+count-1, (count, *shape), drawn on the CPU.

    Sample i's noise depends only on (seed, i): blocks of NOISE_BLOCK samples each have their own
    generator, so any split of the indices across processes or batches gives the same images.
    """
    out = []
    first, last = start // NOISE_BLOCK, (start + count - 1) // NOISE_BLOCK
    for b in range(first, last + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        block = torch.randn((NOISE_BLOCK, *shape), generator=gen)
        lo = max(start, b * NOISE_BLOCK) - b * NOISE_BLOCK
        hi = min(start + count, (b + 1) * NOISE_BLOCK) - b * NOISE_BLOCK
        out.append(block[lo:hi])
    return torch.cat(out) if out else torch.empty((0, *shape))


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounded (not truncated), shape kept."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(
    images: Tensor, out: Path, *, nrow: int, row_labels: list[str] | None = None, scale: int = 0
) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as a grid PNG with ``nrow`` images per row.

    Rows are labelled on the left when ``row_labels`` is given (one label per row). Small
    images are upscaled (nearest) so the grid is legible.
    """
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    pad = rows * nrow - n
    u8 = to_uint8(images)
    if pad:
        u8 = torch.cat([u8, torch.zeros((pad, c, h, w), dtype=torch.uint8)])
    grid = rearrange(u8, "(r k) c h w -> (r h) (k w) c", k=nrow).numpy()  # (rows*H, nrow*W, C)
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode=mode)
    scale = scale or max(1, 64 // h)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels is not None:
        margin = 8 * max(len(s) for s in row_labels) + 8
        canvas = Image.new(
            mode, (img.width + margin, img.height), color=255 if c == 1 else (255,) * 3
        )
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = h * scale
        for r, label in enumerate(row_labels[:rows]):
            draw.text((2, r * row_h + row_h // 2 - 5), label, fill=0 if c == 1 else (0, 0, 0))
        img = canvas
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def images_to_numpy(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return rearrange(to_uint8(images), "n c h w -> n h w c").numpy()


def parse_labels(text: str, num_classes: int) -> Tensor:
    """``"3,3,7"`` -> tensor([3, 3, 7]), each checked against the model's classes."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SampleError(
            f"--labels {text!r}: expected comma-separated class indices like 3,3,7"
        ) from None
    for v in values:
        if not 0 <= v < num_classes:
            raise SampleError(f"--labels: class {v} is outside 0..{num_classes - 1}")
    if not values:
        raise SampleError("--labels is empty; give class indices like 3,3,7")
    return torch.tensor(values)


def save_samples(
    images: Tensor, labels: Tensor | None, out_dir: Path, *, start: int, fmt: str
) -> None:
    """One PNG per sample (``000012_class3.png``) or an ``.npz`` part, indices from ``start``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = images_to_numpy(images)  # (N, H, W, C) uint8
    if fmt == "npz":
        lab = labels.numpy() if labels is not None else np.full(len(arr), -1)
        np.savez(
            out_dir / f".part-{start:09d}.npz",
            images=arr,
            labels=lab,
            index=np.arange(start, start + len(arr)),
        )
        return
    for k, a in enumerate(arr):
        name = (
            f"{start + k:06d}" + (f"_class{int(labels[k])}" if labels is not None else "") + ".png"
        )
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out_dir / name)


def merge_npz_parts(out_dir: Path) -> Path:
    """Join the per-process ``.npz`` parts, in sample order, into ``samples.npz``."""
    parts = sorted(out_dir.glob(".part-*.npz"))
    loaded = [np.load(p) for p in parts]
    out = out_dir / "samples.npz"
    np.savez(
        out,
        images=np.concatenate([d["images"] for d in loaded]),
        labels=np.concatenate([d["labels"] for d in loaded]),
    )
    for p in parts:
        p.unlink()
    return out


def sample_command(args: Any) -> str:
    """The work of ``sample.py``: load, split the sample indices across processes, write outputs."""
    import contextlib

    from accelerate import PartialState

    from fmgen.checkpoint import load_model

    # CPU mode without CUDA, or torchrun's processes would each sample everything alone
    state = PartialState(cpu=not torch.cuda.is_available())
    device = torch.device(args.device) if args.device else state.device
    loaded = load_model(args.checkpoint, weights=args.weights, device=device)
    model, cfg = loaded.model, loaded.config.sample
    sampler = args.sampler or cfg.sampler
    steps = cfg.steps if args.steps is None else args.steps  # 0 is an error, not 'default'
    guidance = cfg.guidance if args.guidance is None else args.guidance
    if steps <= 0 or guidance < 0:
        raise SampleError(f"--steps must be > 0 and --guidance >= 0; got {steps} and {guidance}")
    per_class = None
    if args.labels:
        if not model.conditional:
            raise SampleError("--labels given, but this model is unconditional; use --num-samples")
        labels = parse_labels(args.labels, model.num_classes)
    elif args.num_samples:
        labels = torch.full((args.num_samples,), model.null_label) if model.conditional else None
        num = args.num_samples
    else:
        per_class = args.per_class or cfg.per_class
        if model.conditional:
            labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        else:
            labels, num = None, per_class * per_class
    num = len(labels) if labels is not None else num
    autocast = contextlib.nullcontext()
    if args.precision != "fp32":
        dt = torch.bfloat16 if args.precision == "bf16" else torch.float16
        autocast = torch.autocast(device_type=device.type, dtype=dt)
    common = dict(sampler=sampler, steps=steps, guidance=guidance, t_start=args.t_start or cfg.t_start,
                  time_grid=args.time_grid or cfg.time_grid,
                  sde_sigma=cfg.sde_sigma if args.sde_sigma is None else args.sde_sigma, seed=args.seed,
                  device=device)  # fmt: skip
    out_dir = Path(args.out_dir) if args.out_dir else None
    blocks = range(state.process_index, math.ceil(num / NOISE_BLOCK), state.num_processes)
    first: Tensor | None = None
    with autocast:
        for b in tqdm(blocks, disable=not state.is_main_process or len(blocks) < 2, desc="blocks"):
            s = b * NOISE_BLOCK
            n = min(NOISE_BLOCK, num - s)
            y = labels[s : s + n] if labels is not None else None
            images = generate(
                model,
                path=loaded.path,
                num=n,
                labels=y,
                start=s,
                progress=state.is_main_process,
                **common,
            )
            if out_dir is not None:
                save_samples(images, y, out_dir, start=s, fmt=args.format)
            if b == 0:
                first = images
    grid_path = Path(args.out) if args.out else Path(loaded.source) / "samples" / "grid.png"
    state.wait_for_everyone()
    if not state.is_main_process:
        return ""
    lines = []
    if first is not None:
        k = min(len(first), args.grid_max)
        nrow = per_class or max(1, math.isqrt(k))
        rows = None
        if per_class and labels is not None:
            rows = [
                loaded.class_names[int(labels[r * per_class])]
                for r in range(math.ceil(k / per_class))
            ]
        save_grid(first[:k], grid_path, nrow=nrow, row_labels=rows)
        lines.append(
            f"grid: {grid_path} ({k} images, {sampler}, {steps} {common['time_grid']} steps, guidance {guidance}, {loaded.weights} weights, step {loaded.step})"
        )
    if out_dir is not None:
        if args.format == "npz":
            lines.append(f"samples: {merge_npz_parts(out_dir)} ({num} images)")
        else:
            lines.append(f"samples: {out_dir} ({num} PNG files)")
    return "\n".join(lines)
