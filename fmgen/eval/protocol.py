"""The protocol of a score: samples generated on any number of processes, scored, recorded.

``fid_of_model`` generates a model's samples (each process fixed blocks of the global sample
indices, so 1, 2 or 3 processes give the same images, and the same numbers, for any count),
``fid_of_folder`` reads a folder of images; both score FID and precision/recall on one network's
features (``fmgen.eval.fid``) and write a JSON record of every choice that changes the numbers.
Generated samples are decoded by the model's autoencoder stage first: FID sees pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmgen.config import Config, sampling_spec
from fmgen.core.sampling import SamplingSpec
from fmgen.eval.features import (
    CLI_FLAGS,
    FEATURE_DIMS,
    FEATURE_TRAINED_ON,
    EvalError,
    FeatureSpec,
    check_fid_count,
    check_trained_on,
    feature_spec,
    parse_feature_network,
)
from fmgen.eval.fid import Scores, check_image_shape, reference_shape, score_against_reference
from fmgen.eval.generate import NOISE_BLOCK, gather_blocks, generate, index_blocks
from fmgen.eval.images import load_image_folder, to_uint8
from fmgen.models.autoencoder import Autoencoder


def score_record(scores: Scores, spec: FeatureSpec, *, forced: bool) -> dict[str, Any]:
    """The numbers and the feature network's identity, the part every record shares."""
    pr = scores.pr
    return {
        "fid": scores.fid,
        "precision": pr.precision if pr else None,
        "recall": pr.recall if pr else None,
        "precision_recall": pr.to_dict() if pr else None,
        "feature_network": spec.name,
        "feature_network_path": spec.path or None,
        "feature_weights_hash": spec.weights_hash,
        "feature_network_trained_on": spec.trained_on,
        "feature_network_forced": forced,
        "resize": spec.resize,
    }


def write_record(record: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return out


def fid_block_size(num: int) -> int:
    """Samples per generation call when ``num`` samples are scored: a function of num alone.

    A network's rounding depends on its batch (``fmgen.eval.generate``), so the blocks must
    not depend on the process count for the images to be bit-equal under any split. At least 16
    blocks when num allows it (enough to keep 16 processes busy), at most one noise block each.
    """
    return max(1, min(NOISE_BLOCK, math.ceil(num / 16)))


def rank_blocks(num: int, rank: int, world: int) -> list[range]:
    """The blocks of global sample indices 0..num-1 that process ``rank`` of ``world`` draws:
    blocks of ``fid_block_size(num)`` consecutive indices, dealt out round-robin."""
    return index_blocks(num, rank, world, fid_block_size(num))


def gather_samples(accelerator: Any, local: Tensor, num: int, shape: tuple[int, ...]) -> Tensor:
    """Every process's uint8 images (its ``rank_blocks`` in order) -> all num images, in index
    order (``gather_blocks``)."""
    return gather_blocks(local, num, shape, world=accelerator.num_processes,
                         size=fid_block_size(num), device=accelerator.device)  # fmt: skip


def check_fid_request(num: int, cfg: Config) -> None:
    """What can be refused before sampling, on every process alike (so none waits on another)."""
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise EvalError(f"the FID sample count must be > 0; got {num!r} (--num-samples N, "
                        f"eval.fid_num_samples)")  # fmt: skip
    from fmgen.data.reference import data_set_name

    e = cfg.eval
    kind = parse_feature_network(e.feature_network, e.feature_network_path).kind
    if kind in FEATURE_DIMS:
        check_fid_count(num, FEATURE_DIMS[kind], kind)
    check_image_shape((cfg.data.channels, cfg.data.resolution, cfg.data.resolution), cfg.data,
                      fix="score against the shard folder of the model's data (--data)")  # fmt: skip
    check_trained_on(kind, FEATURE_TRAINED_ON.get(kind), data_set_name(cfg.data),
                     where=str(cfg.data.path), force=e.force_feature_network)  # fmt: skip


def fid_of_model(
    model: Any, path: Any, cfg: Config, *, step: int, weights: str,
    spec: SamplingSpec | None = None, autoencoder: Autoencoder | None = None,
    accelerator: Any = None, num_samples: int | None = None, out: Path | None = None,
    seed: int = 0, prompts: list[str] | None = None, clip: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Generate samples (split across processes when ``accelerator`` is given), score, record.

    Text models take ``prompts`` (sample i gets prompt i mod len(prompts); none: the null
    caption, unconditional samples); ``clip`` (a local CLIP folder) adds their CLIP score to the
    record (``fmgen.eval.clip_score``: torchmetrics' number) beside FID.

    ``spec`` defaults to the config's sampling options, ``num_samples`` to
    ``eval.fid_num_samples``. Each rank generates its blocks of the global sample indices
    (``rank_blocks``: the same images as one process, bit for bit); the uint8 images are
    gathered in index order and the main process computes FID and writes the record (the
    other ranks return {}).
    """
    spec = spec or sampling_spec(cfg)
    n = cfg.eval.fid_num_samples if num_samples is None else num_samples
    check_fid_request(n, cfg)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    conditional = model.conditional
    labels = model.conditioning.balanced(n)
    sample_prompts: list[str] | None = None
    if prompts:
        if not getattr(model, "reads_text", False):
            raise EvalError("prompts were given, but this model was trained without text; drop --prompts-file")  # fmt: skip
        sample_prompts = [prompts[i % len(prompts)] for i in range(n)]
        labels = model.encode_prompts(list(prompts))[torch.arange(n) % len(prompts)]
    elif clip:
        raise EvalError("a CLIP score needs the prompts of the samples: give --prompts-file")
    t0 = time.perf_counter()
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    parts = [torch.empty((0, *shape), dtype=torch.uint8)]
    for block in rank_blocks(n, rank, world):
        s, k = block.start, len(block)
        images = generate(
            model, path, spec, num=k, cond=labels[s : s + k] if labels is not None else None,
            start=s, seed=seed, device=device, autoencoder=autoencoder,
        )  # fmt: skip
        if tuple(images.shape[1:]) != shape:  # e.g. an autoencoder decoding to another size
            raise EvalError(f"the model generates {tuple(images.shape[1:])} images but its data "
                            f"config says {shape} (data.channels, data.resolution)")  # fmt: skip
        parts.append(to_uint8(images))
    u8 = torch.cat(parts)
    if accelerator is not None and world > 1:
        u8 = gather_samples(accelerator, u8, n, shape)
    record: dict[str, Any] = {}
    if rank == 0:
        e, cache = cfg.eval, Path(cfg.train.run_dir) / "cache"
        features = feature_spec(e.feature_network, resolution=cfg.data.resolution,
                                channels=cfg.data.channels, inception_weights=e.inception_weights,
                                cache_dir=cache, path=e.feature_network_path, device=device)  # fmt: skip
        scores = score_against_reference(
            u8, data_dir=cfg.data, spec=features, inception_weights=e.inception_weights,
            cache_dir=cache,  # used for shards fmgen did not write
            pr_k=e.precision_recall_k, force=e.force_feature_network, device=device,
        )  # fmt: skip
        ref = scores.reference
        record = {
            **score_record(scores, features, forced=e.force_feature_network),
            "num_generated": int(len(u8)),
            "num_reference": ref["num_reference"],
            "reference": {k: ref[k] for k in ("data", "manifest_hash", "stats_hash", "cache")},
            "image_format": "uint8, rounded from [-1, 1]",
            "autoencoder": (
                autoencoder.to_dict() if autoencoder is not None else {"kind": "identity"}
            ),
            "sampling": spec.to_dict(),
            "nfe": spec.nfe,
            "guidance": spec.guidance if conditional else None,
            "conditions": (f"prompts (sample i: prompt i mod {len(prompts)})" if sample_prompts
                           else "balanced (sample i: class i mod num_classes)" if conditional
                           else "none"),  # fmt: skip
            "weights": weights,
            "seed": seed,
            # the generated uint8 images themselves: equal hashes, equal images (any split)
            "images_sha256": hashlib.sha256(u8.contiguous().numpy().tobytes()).hexdigest()[:16],
            "generation_block": fid_block_size(n),
            "processes": world,
            "checkpoint_step": step,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if sample_prompts is not None:
            record["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        if clip:
            from fmgen.eval.clip_score import clip_record, load_clip

            record["clip_score"] = clip_record(load_clip(clip, device), u8, sample_prompts,
                                               sampling=spec.to_dict())  # fmt: skip
        out = out or Path(cfg.train.run_dir) / "eval" / f"fid-step{step:07d}.json"
        write_record(record, out)
        record["record"] = str(out)
    return record


def fid_of_folder(
    folder: Path, *, data_dir: Path, feature_network: str, inception_weights: str = "",
    out: Path | None = None, feature_network_path: str = "", force: bool = False,
    pr_k: int = 3, device: str | torch.device | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FID and precision/recall of the images of a folder (PNG/JPEG files or samples.npz)
    against a shard folder; the names of the options in messages are the command line's."""
    from fmgen.data.reference import data_set_name

    choice = parse_feature_network(feature_network, feature_network_path, flags=CLI_FLAGS)
    images = load_image_folder(folder)
    c, r, _ = reference_shape(data_dir)
    # before building the feature network (which may train the digits classifier)
    check_image_shape(tuple(images.shape[1:]), data_dir,
                      fix=f"sample {c}x{r}x{r} images, or pass the shard folder of the images' data")  # fmt: skip
    check_trained_on(choice.kind, FEATURE_TRAINED_ON.get(choice.kind), data_set_name(data_dir),
                     where=str(data_dir), force=force)  # fmt: skip
    fix = "sample more images into the folder (sample.py --num-samples N with N > {dim})"
    if choice.kind in FEATURE_DIMS:
        check_fid_count(len(images), FEATURE_DIMS[choice.kind], choice.kind, fix=fix)
    spec = feature_spec(choice.kind, resolution=r, channels=c, inception_weights=inception_weights,
                        cache_dir=data_dir / "fid-cache", path=choice.path, device=device,
                        flags=CLI_FLAGS)  # fmt: skip
    scores = score_against_reference(images, data_dir=data_dir, spec=spec, inception_weights=inception_weights,
                                     count_fix=fix, pr_k=pr_k, force=force, device=device)  # fmt: skip
    record = {**score_record(scores, spec, forced=force), "images": str(folder),
              "num_generated": len(images), "num_reference": scores.reference["num_reference"],
              "reference": scores.reference}  # fmt: skip
    out = write_record(record, out or folder / "fid.json")
    record["record"] = str(out)
    return record
