"""Images read as a viewer shows them, fitted to the shard size, encoded, on N processes.

Every image ``prepare`` writes goes through ``EncodeSample``:

- upright: an EXIF Orientation tag (phone photos) is applied (``PIL.ImageOps.exif_transpose``);
- 16-bit (modes I;16, I;16B, I;16L, I;16N and I, e.g. a 16-bit PNG) scaled to 8 bits as
  round(v * 255 / 65535) (PIL's own convert would clip everything above 255 to white); mode I
  values outside 0..65535 are clipped first. Float mode F is read as 0..255 (PIL's convention:
  a float image carries no range of its own), rounded and clipped;
- alpha (RGBA, LA, PA, P or RGB with a transparent colour) composited over a background colour
  (default white) as round((c * a + bg * (255 - a)) / 255), not dropped;
- then mode L (channels 1) or RGB (3), the shorter side resized to the resolution with PIL's
  bicubic filter (antialiased when shrinking) and center-cropped (``fit_image``);
- encoded as PNG or JPEG (``fmgen.data.shards.encode_image``).

A file that cannot be decoded gives the reason as a string instead of bytes, so the caller can
skip it or stop.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageOps

from fmgen.data.shards import DataError, encode_image

RESAMPLE = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def parse_background(colour: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name ("white") or "#rrggbb" (``PIL.ImageColor``)."""
    try:
        rgb = ImageColor.getrgb(colour)
    except (ValueError, AttributeError):
        raise DataError(
            f"background {colour!r} is not a colour; use a name (white, black, gray) or #rrggbb"
        ) from None
    return (rgb[0], rgb[1], rgb[2])


def convert_mode(
    img: Image.Image, channels: int, background: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Mode L (channels 1) or RGB (3): 16-bit scaled, alpha composited (module docstring)."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        v = np.asarray(img, dtype=np.float64)  # (H, W)
        if img.mode != "F":
            v = np.clip(v, 0, 65535) / 257.0  # 65535 / 255 = 257
        img = Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8))  # mode L
    elif img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)  # (H, W, 4)
        a = rgba[..., 3:]
        bg = np.asarray(background, dtype=np.uint32)
        rgb = (rgba[..., :3] * a + bg * (255 - a) + 127) // 255  # rounded: the +127
        img = Image.fromarray(rgb.astype(np.uint8))  # mode RGB
    if img.mode != mode:
        img = img.convert(mode)
    return img


def fit_image(
    img: Image.Image, resolution: int, channels: int, background: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Mode L (channels 1) or RGB (3) (``convert_mode``); shorter side resized to ``resolution``
    (bicubic), then center-cropped to ``resolution`` x ``resolution``."""
    img = convert_mode(img, channels, background)
    w, h = img.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), RESAMPLE)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


@dataclass(frozen=True)
class EncodeSample:
    """Source index -> the shard bytes of its image, or why it cannot be read (a ``str``).

    Upright (EXIF), converted, fitted and encoded: the whole per-sample work, in one picklable
    object, so worker processes run exactly what one process runs.
    """

    image: Callable[[int], Image.Image]  # the source's reader (picklable)
    resolution: int
    channels: int
    background: tuple[int, int, int]
    image_format: str
    jpeg_quality: int

    def __call__(self, i: int) -> bytes | str:
        try:
            img = ImageOps.exif_transpose(self.image(i))
            img = fit_image(img, self.resolution, self.channels, self.background)
        except Exception as e:  # PIL raises many types on a bad file (OSError, SyntaxError,
            # struct.error, zlib.error, DecompressionBombError, ...): each one means "unreadable"
            return " ".join(f"{type(e).__name__}: {e}".split())  # one line
        return encode_image(img, self.image_format, self.jpeg_quality)


_worker_encode: EncodeSample | None = None


def _init_worker(make: Callable[[str], EncodeSample], job: str) -> None:
    global _worker_encode
    _worker_encode = make(job)  # the source opened again from its JSON description


def _encode_in_worker(indices: list[int]) -> list[bytes | str]:
    assert _worker_encode is not None
    return [_worker_encode(i) for i in indices]


def encoded(
    encode: EncodeSample, order: Sequence[int], workers: int, *,
    make: Callable[[str], EncodeSample] | None = None, job: str = "",
) -> Iterator[bytes | str]:  # fmt: skip
    """``encode(i)`` for every ``i`` of ``order``, in order, on ``workers`` processes (1: this
    one). The same code runs everywhere, so the bytes do not depend on the count: each worker
    builds its own ``encode`` as ``make(job)``, from a JSON description of the source."""
    if workers == 1:
        return (encode(i) for i in order)
    # multiprocessing's own test: a spawned child re-imports the parent's main module; a script
    # that calls prepare unguarded would start prepare again in every worker
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise DataError(
            "prepare(workers > 1) was started while a worker process imported the main "
            "script: call it under `if __name__ == '__main__':` (the spawn start method "
            "re-imports the script in every worker)"
        )
    if make is None:
        raise ValueError("encoded(workers > 1) needs make and job: how workers open the source")
    return _pooled(make, job, order, workers)


def _pooled(
    make: Callable[[str], EncodeSample], job: str, order: Sequence[int], workers: int
) -> Iterator[bytes | str]:
    chunk = max(1, min(64, len(order) // (8 * workers)))
    # Each worker opens the source again from its short JSON description (a file list or an
    # array sent through the worker's start-up pipe could hang the parent: it writes that pipe
    # while still holding its read end, so a child that dies before reading it all never
    # returns). spawn, not fork: the parent may hold threads (torch, pyarrow, tqdm) that a fork
    # would copy mid-lock. An executor, not a multiprocessing Pool: a worker that dies fails
    # the run instead of hanging it.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(make, job),
    )
    pending: deque[Future[list[bytes | str]]] = deque()
    try:
        for k in range(0, len(order), chunk):
            pending.append(pool.submit(_encode_in_worker, list(order[k : k + chunk])))
            if len(pending) > 2 * workers:  # a bounded queue: results wait for the writer
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except (BrokenProcessPool, BrokenPipeError):  # a worker died, or died while starting
        raise DataError(
            "a prepare worker process died (out of memory? killed? in a script: is prepare "
            "called under `if __name__ == '__main__':`?); run with workers=1 to see the error"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def open_loaded(fp: Any) -> Image.Image:
    """``Image.open`` with the pixels read and the file closed (decoding errors raised here)."""
    with Image.open(fp) as im:
        im.load()
        return im
