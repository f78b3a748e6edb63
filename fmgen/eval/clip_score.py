"""Prompt following as CLIP score, read from a local CLIP folder, equal to torchmetrics' ``CLIPScore``.

A CLIP folder is what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write
(safetensors weights, config.json, the image processor's and the tokenizer's files); nothing is
downloaded and no pickle is read. The number is torchmetrics' (``torchmetrics.multimodal.CLIPScore``
1.9, whose steps are copied here, not called, so that it needs no torchmetrics and no hub name):

- images: a list of (3, H, W) uint8 CPU tensors goes to the folder's ``CLIPProcessor`` (which
  resizes, center-crops, rescales by 1/255 and normalizes with the CLIP mean and std; its
  backend, PIL or torchvision, is whatever transformers picks for that processor, as for
  torchmetrics). Gray (1, H, W) images are repeated to 3 channels first: the processor's
  ``do_convert_rgb`` gives torchmetrics the same pixels from a 1-channel image.
- texts: tokenized per batch with ``padding=True`` and no truncation; a batch longer than the
  text model's ``max_position_embeddings`` is cut to it, as torchmetrics does. A prompt cut that
  way has lost its end-of-text token, so CLIP pools it at another position (torchmetrics' quirk,
  kept for equal numbers): records count such prompts (``prompts_truncated``).
- per sample: ``100 * cos(image_embedding, text_embedding)`` in float32, which may be negative;
  the score is ``max(mean, 0)`` (the mean is clamped, not each sample).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fmgen.eval.features import EvalError
from fmgen.models.text import folder_hash  # the hash text-encoder records use too

log = logging.getLogger("fmgen.eval")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FOLDER_FIX = "give a folder written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"


@dataclass
class ClipScorer:
    """A CLIP model and its processor, read from ``folder``, identified by ``folder_hash``."""

    model: nn.Module  # a transformers CLIPModel, in eval mode, on ``device``
    processor: Any  # a transformers CLIPProcessor (image processor + tokenizer)
    folder: str
    folder_hash: str  # "sha256:" + folder_hash(folder)
    device: torch.device
    max_text_tokens: int  # the text model's max_position_embeddings: longer batches are cut

    @property
    def image_processor(self) -> str:
        """The image processor's class (its backend changes the resize, hence the number)."""
        return type(self.processor.image_processor).__name__


def _check_folder(folder: Path) -> None:
    """EvalError unless ``folder`` holds a CLIP config and safetensors weights."""
    if not folder.is_dir():
        raise EvalError(
            f"CLIP folder {folder} does not exist; {FOLDER_FIX} (nothing is downloaded)"
        )
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clip":
        what = "holds no config.json"
        if config.is_file():
            what = f"has a config.json of model_type {model_type!r}, not 'clip'"
        raise EvalError(f"CLIP folder {folder} {what}; {FOLDER_FIX}")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        what = (
            f"holds only pickled weights ({', '.join(pickles)})" if pickles else "holds no weights"
        )
        raise EvalError(f"CLIP folder {folder} {what}; pickles are never loaded: save it again "
                        f"with save_pretrained(folder, safe_serialization=True) (model.safetensors)")  # fmt: skip


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """A ``ClipScorer`` from a local CLIP folder (local files only, safetensors only)."""
    folder = Path(folder)
    _check_folder(folder)
    try:
        from transformers import CLIPModel, CLIPProcessor  # only here: needed for CLIP score alone
    except ImportError:
        raise EvalError("CLIP score needs transformers: pip install transformers") from None
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"CLIP folder {folder} could not be loaded as a CLIPModel and "
                        f"CLIPProcessor: {first}; {FOLDER_FIX}") from None  # fmt: skip
    device = torch.device(device)
    return ClipScorer(
        model=model.eval().to(device),
        processor=processor,
        folder=str(folder),
        folder_hash=f"sha256:{folder_hash(folder)}",
        device=device,
        max_text_tokens=int(model.config.text_config.max_position_embeddings),
    )


def _pooled(out: Any) -> Tensor:
    """transformers < 5 returns the projected embeddings, 5 a BaseModelOutputWithPooling."""
    return out if isinstance(out, Tensor) else out.pooler_output


@dataclass
class _Run:
    scores: Tensor  # (N,) float32, 100 * cosine
    input_size: tuple[int, int]  # (H, W) of the pixels CLIP saw
    truncated: int  # prompts longer than the text model: cut, as torchmetrics cuts them


def _check_inputs(images: Tensor, prompts: list[str], batch_size: int) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise EvalError(f"CLIP score takes uint8 images (N, C, H, W); got {what} "
                        f"(fmgen.eval.images.to_uint8 turns [-1, 1] images into uint8)")  # fmt: skip
    if images.shape[1] not in (1, 3):
        raise EvalError(f"CLIP score takes 1- or 3-channel images; got {images.shape[1]} channels")
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) for p in prompts):
        raise EvalError("CLIP score takes the prompts as a list of strings, one per image")
    if len(prompts) != len(images) or len(images) == 0:
        raise EvalError(f"CLIP score needs one prompt per image and at least one image; got "
                        f"{len(images)} images and {len(prompts)} prompts")  # fmt: skip
    if batch_size < 1:
        raise EvalError(f"the CLIP batch size must be >= 1; got {batch_size}")


def _run(scorer: ClipScorer, images: Tensor, prompts: list[str], batch_size: int) -> _Run:
    _check_inputs(images, prompts, batch_size)
    model, processor, device = scorer.model, scorer.processor, scorer.device
    parts, size, truncated = [], (0, 0), 0
    for s in range(0, len(images), batch_size):
        u8 = images[s : s + batch_size].cpu()  # the processor works on CPU, as in torchmetrics
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)  # what the processor's convert-to-RGB does
        texts = list(prompts[s : s + batch_size])
        pixels = processor(images=list(u8), return_tensors="pt", padding=True)["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (B, T)
        if ids.shape[-1] > scorer.max_text_tokens:  # torchmetrics cuts the batch, not each prompt
            truncated += int((mask.sum(-1) > scorer.max_text_tokens).sum())
            ids, mask = ids[..., : scorer.max_text_tokens], mask[..., : scorer.max_text_tokens]
        with torch.inference_mode():
            img = _pooled(model.get_image_features(pixels.to(device)))  # (B, projection_dim)
            txt = _pooled(model.get_text_features(ids.to(device), mask.to(device)))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        parts.append((100 * (img * txt).sum(dim=-1)).float().cpu())  # (B,)
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    if truncated:
        log.warning("%d of %d prompts are longer than CLIP's %d tokens and were cut (their "
                    "end-of-text token is lost), as torchmetrics cuts them", truncated,
                    len(prompts), scorer.max_text_tokens)  # fmt: skip
    return _Run(torch.cat(parts), size, truncated)


def clip_scores(
    scorer: ClipScorer, images: Tensor, prompts: list[str], *, batch_size: int = 64
) -> Tensor:
    """Per-sample ``100 * cos(CLIP image, CLIP text)``, (N,) float32 on CPU, not clamped.

    images: (N, C, H, W) uint8, C in (1, 3); prompts: N strings, prompt i for image i.
    """
    return _run(scorer, images, prompts, batch_size).scores


def _reduce(scores: Tensor) -> float:
    """torchmetrics' CLIPScore.compute: the mean, clamped at 0 (in float64 here)."""
    return max(float(scores.double().mean()), 0.0)


def clip_score(
    scorer: ClipScorer, images: Tensor, prompts: list[str], *, batch_size: int = 64
) -> float:
    """The CLIP score in [0, 100] of images (N, C, H, W) uint8 for their N prompts: the value
    of torchmetrics' ``CLIPScore`` on the same model and processor."""
    return _reduce(clip_scores(scorer, images, prompts, batch_size=batch_size))


def clip_record(
    scorer: ClipScorer, images: Tensor, prompts: list[str], *,
    sampling: dict[str, Any] | str | None, batch_size: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Score images (N, C, H, W) uint8 for their prompts; a JSON-able record of the number and
    of every choice that changes it. ``sampling``: the caller's description of how the images
    were generated (e.g. ``SamplingSpec.to_dict()``), recorded as given."""
    run = _run(scorer, images, prompts, batch_size)
    return {
        "clip_score": _reduce(run.scores),
        "clip_score_std": float(run.scores.double().std()) if len(run.scores) > 1 else 0.0,
        "num_samples": len(run.scores),
        "num_prompts": len(set(prompts)),
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16],
        "prompts_truncated": run.truncated,
        "clip_folder": scorer.folder,
        "clip_folder_hash": scorer.folder_hash,
        "clip_image_size": list(run.input_size),
        "clip_max_text_tokens": scorer.max_text_tokens,
        "image_processor": scorer.image_processor,
        "image_format": f"uint8, {images.shape[1]} channel(s)"
        + (" repeated to RGB" if images.shape[1] == 1 else ""),
        "images_sha256": hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()[
            :16
        ],
        "reduction": "max(mean(100 * cos), 0)",
        "torchmetrics-compatible": True,
        "sampling": sampling,
        "batch_size": batch_size,
    }
