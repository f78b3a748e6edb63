"""Images on disk and on screen: uint8 conversion, grids, per-sample files, image folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch import Tensor

from fmgen.base import FmgenError


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounded (not truncated), shape kept."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


GRID_GAP = 2  # pixels between cells (at the grid's scale): else strokes run into the next cell
GRID_GAP_VALUE = 128  # mid gray: apart from black backgrounds and white strokes alike


def save_grid(
    images: Tensor, out: Path, *, nrow: int, row_labels: list[str] | None = None, scale: int = 0,
    gap: int = GRID_GAP,
) -> Path:  # fmt: skip
    """Save (N, C, H, W) images (in [-1, 1], or uint8) as a grid PNG with ``nrow`` images per row.

    Every image is a cell; cells are ``gap`` pixels apart (mid gray), empty cells of the last
    row are black. Rows are labelled on the left when ``row_labels`` is given (one label per
    row). Small images are upscaled (nearest) so the grid is legible: ``scale`` (default: to
    about 64 pixels).
    """
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    scale = scale or max(1, 64 // h)
    cells = u8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest upscale
    ch, cw = h * scale, w * scale
    grid = torch.full((c, rows * (ch + gap) - gap, nrow * (cw + gap) - gap), GRID_GAP_VALUE,
                      dtype=torch.uint8)  # fmt: skip
    for i in range(rows * nrow):
        r, k = divmod(i, nrow)
        y, x = r * (ch + gap), k * (cw + gap)
        grid[:, y : y + ch, x : x + cw] = cells[i] if i < n else 0
    arr = rearrange(grid, "c h w -> h w c").numpy()  # (rows*(H+gap)-gap, nrow*(W+gap)-gap, C)
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode=mode)
    if row_labels is not None:
        margin = 8 * max(len(s) for s in row_labels) + 8
        canvas = Image.new(
            mode, (img.width + margin, img.height), color=255 if c == 1 else (255,) * 3
        )
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        for r, label in enumerate(row_labels[:rows]):
            y = r * (ch + gap) + ch // 2 - 5
            draw.text((2, y), label, fill=0 if c == 1 else (0, 0, 0))
        img = canvas
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def images_to_numpy(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return rearrange(to_uint8(images), "n c h w -> n h w c").numpy()


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


def load_image_folder(folder: Path) -> Tensor:
    """PNG/JPEG files or a samples.npz of a folder -> uint8 (N, C, H, W)."""
    if not folder.is_dir():
        raise FmgenError(f"{folder} is not a folder; pass the folder of the samples (--images)")
    npz = folder / "samples.npz"
    if npz.is_file():
        arr = np.load(npz)["images"]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FmgenError(f"{folder} holds no .png/.jpg images and no samples.npz")
        arr = np.stack([np.asarray(Image.open(p)) for p in files])
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
