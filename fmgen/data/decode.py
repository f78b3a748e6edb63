"""One sample's tar members -> (image, label, caption): which members, and fitting the image.

Shards written by other tools differ from fmgen's in three ways, each an option here:

- the image member (``image_key``; default the first of jpg, jpeg, png, webp the sample has);
- the label (``label_key``, an integer as text such as WebDataset's ``cls``; empty: none, every
  sample is label 0 of one class, for unconditional training);
- the image size (``fit``): ``center-crop`` resizes the shorter side to the resolution (bicubic,
  antialiased) and crops the middle, as ``prepare`` does (``fmgen.data.images``: also upright
  by EXIF, 16-bit scaled, alpha composited on white); ``resize`` squeezes to R x R whatever
  the aspect; ``pad`` fits the longer side and pads with black; ``none`` keeps fmgen's strict
  check (a wrong size is an unusable sample).

A caption member (``caption_key``, e.g. img2dataset's ``txt``) rides along as text.

Latent shards (``prepare --autoencoder``; ``Decoding.latent`` set) hold each sample's latent
and its mirror image's latent as float16 ``.npy`` members; ``decode_latent`` takes the one the
flip augmentation asks for, since flipping a latent is not the latent of the flipped image.

Text shards (``prepare --text-encoder``; ``Decoding.text`` set) hold each caption's packed
frozen-encoder output (``fmgen.models.conditioning.TextConditioning.pack``) as the float16 row
``KEY.text.npy`` (shape (F,)); ``decode_text`` reads it beside the image or latent.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from fmgen.data.images import convert_mode, fit_image
from fmgen.data.shards import DataError

FITS = ("center-crop", "resize", "pad", "none")
LATENT_MEMBER, FLIPPED_MEMBER = (
    "latent.npy",
    "latent_flip.npy",
)  # KEY.latent.npy, KEY.latent_flip.npy
LATENT_DTYPE = np.float16
TEXT_MEMBER = "text.npy"  # KEY.text.npy: the caption's packed text row, float16 (F,)
TEXT_DTYPE = np.float16
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# naming the format skips PIL's probing of every other one; other keys probe
_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",), "webp": ("WEBP",)}
_RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Decoding:
    """How a lane turns members into training samples (picklable, sent to workers)."""

    resolution: int
    channels: int  # 1 (L) or 3 (RGB)
    num_classes: int
    image_key: str = ""  # "" = the first of IMAGE_KEYS present
    label_key: str = "cls"  # "" = no labels: every sample is class 0
    caption_key: str = ""  # "" = no captions
    fit: str = "center-crop"
    latent: tuple[int, ...] = ()  # (c, h, w) of latent shards' latents; () = decode the image
    text: int = 0  # F, the width of text shards' rows (.text.npy); 0 = read no text rows


class Unusable(Exception):
    """A sample to skip; ``kind`` groups the reasons so the final error can name the cause."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def hint(kind: str, d: Decoding) -> str:
    """What to change when most samples are unusable for reason ``kind``."""
    return {
        "size": f"the image sizes differ from data.resolution={d.resolution}; set data.fit "
        f"(center-crop, resize or pad) to fit them while loading",
        "no-image": "the samples have no image member of that name; set data.image_key",
        "label": f"the samples have no integer .{d.label_key} member; set data.label_key to "
        f"their label member, or data.label_key= (empty) to train unconditionally",
        "undecodable": "the image bytes cannot be decoded; the shards are damaged",
        "no-latent": "the samples have no latent members (not latent shards, or damaged ones); "
        "prepare them again with --autoencoder",
        "latent-shape": "the latents differ from the manifest's latent shape (float16); prepare "
        "the shards again",
        "no-text": f"the samples have no .{TEXT_MEMBER} member (damaged text shards); prepare them "
        f"again with --text-encoder PATH, or set text.precomputed=false",
        "text-shape": f"the .{TEXT_MEMBER} rows differ from the manifest's text width ({d.text}, "
        f"float16); prepare the shards again with --text-encoder PATH",
    }.get(kind, "the shards look corrupt")


def _image_member(members: dict[str, bytes], d: Decoding) -> tuple[str, bytes]:
    if d.image_key:
        if d.image_key in members:
            return d.image_key, members[d.image_key]
    else:
        for key in IMAGE_KEYS:
            if key in members:
                return key, members[key]
    wanted = f".{d.image_key}" if d.image_key else "image (." + ", .".join(IMAGE_KEYS) + ")"
    raise Unusable("no-image", f"no {wanted} member (has {sorted(members)})")


def fit(im: Image.Image, d: Decoding) -> Image.Image:
    """``im`` in mode L or RGB fitted to resolution x resolution as ``d.fit`` says."""
    r = d.resolution
    w, h = im.size
    if (w, h) == (r, r) or d.fit == "none":
        return im
    if d.fit == "resize":
        return im.resize((r, r), _RESAMPLE)
    if d.fit == "pad":
        s = r / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new(im.mode, (r, r), 0)
        canvas.paste(im.resize((nw, nh), _RESAMPLE), ((r - nw) // 2, (r - nh) // 2))
        return canvas
    return fit_image(im, r, d.channels)  # center-crop, as prepare fits


def decode(members: dict[str, bytes], d: Decoding, where: str) -> tuple[np.ndarray, int, str]:
    """-> uint8 (R, R, C) image, label, caption; ``Unusable`` for a sample to skip.

    Raises:
        DataError: a label outside 0..num_classes-1 (the shards and the class count disagree:
            not a sample to skip).
    """
    key, data = _image_member(members, d)
    r, mode = d.resolution, "L" if d.channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(key)) as im:
            if d.fit != "none" and min(im.size) >= 2 * r:
                im.draft(mode, (r, r))  # JPEG: decode at 1/2..1/8 scale, still >= R x R
            if key != "png":  # photos carry an EXIF orientation; fmgen's PNGs are upright
                im = ImageOps.exif_transpose(im)
            # 16-bit scaled, alpha composited on white, as prepare reads images
            im = im if im.mode == mode else convert_mode(im, d.channels)
            arr = np.asarray(fit(im, d))
    except Exception as e:  # PIL raises many types for bad bytes
        raise Unusable("undecodable", f"undecodable .{key}: {type(e).__name__}: {e}") from None
    if arr.shape[:2] != (r, r):
        raise Unusable("size", f"image is {arr.shape[1]}x{arr.shape[0]}, not {r}x{r}")
    label, caption = label_and_caption(members, d, where)
    return arr.reshape(r, r, d.channels), label, caption


def decode_latent(
    members: dict[str, bytes], d: Decoding, where: str, flip: bool
) -> tuple[np.ndarray, int, str]:
    """-> float16 (c, h, w) latent (of the mirrored image when ``flip``), label, caption."""
    name = FLIPPED_MEMBER if flip else LATENT_MEMBER
    arr = _npy_member(members, name, d.latent, LATENT_DTYPE, "latent")
    label, caption = label_and_caption(members, d, where)
    return arr, label, caption


def decode_text(members: dict[str, bytes], d: Decoding) -> np.ndarray:
    """-> the sample's float16 (F,) text row (``d.text`` = F); ``Unusable`` for a sample to skip."""
    return _npy_member(members, TEXT_MEMBER, (d.text,), TEXT_DTYPE, "text")


def _npy_member(members: dict[str, bytes], name: str, shape: tuple[int, ...], dtype: type,
                kind: str) -> np.ndarray:  # fmt: skip
    """A ``.npy`` member of this shape and dtype; ``Unusable`` kinds ``no-KIND`` (missing),
    ``undecodable`` and ``KIND-shape``."""
    if name not in members:
        raise Unusable(f"no-{kind}", f"no .{name} member (has {sorted(members)})")
    try:  # allow_pickle=False: a .npy member holding objects is refused, never unpickled
        arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise Unusable("undecodable", f"unreadable .{name}: {e}") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise Unusable(f"{kind}-shape", f".{name} is {arr.dtype} {arr.shape}, not float16 {shape}")
    return arr


def no_text_message(where: str) -> str:
    """What to do with shards that hold no text embeddings (their manifest has no text section)."""
    return (
        f"{where} holds no text embeddings (no text section in its manifest.json); prepare with "
        f"--text-encoder PATH (`python -m fmgen.data prepare --source shards --data-path {where} "
        f"--text-encoder PATH --out NEW`), or set text.precomputed=false"
    )


def label_and_caption(members: dict[str, bytes], d: Decoding, where: str) -> tuple[int, str]:
    label = 0
    if d.label_key:
        try:
            label = int(members[d.label_key])
        except (KeyError, ValueError):
            raise Unusable("label", f"missing or non-integer .{d.label_key} member") from None
        if not 0 <= label < d.num_classes:
            raise DataError(
                f"sample {where} has label {label}, outside the {d.num_classes} classes "
                f"(0..{d.num_classes - 1}); set data.num_classes, or fix the manifest's classes"
            )
    caption = ""
    if d.caption_key and d.caption_key in members:
        caption = members[d.caption_key].decode("utf-8", "replace")
    return label, caption
