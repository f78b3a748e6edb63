"""FID with torchmetrics, and the protocol record that makes every number reproducible.

Protocol choices (each one changes the number): images reach the metric as uint8, rounded (not truncated) from
[-1, 1]; statistics are kept in float64; with the Inception network the resize to 299 uses
``antialias=False`` (the published-FID convention). Reference statistics are computed once from
the WHOLE real set of the shards, streamed batch by batch, and cached (safetensors + JSON, keyed
by the data's manifest hash and the feature network's name and weights hash). Every FID is
written with a JSON record of its protocol.

Inputs are checked, not scored blindly: more samples than feature dimensions on each side (else
the covariance is singular), generated images of the reference data's shape, a count > 0.
Under several processes each one generates fixed blocks of the global sample indices, so 1, 2
or 3 processes give the same images, and the same FID, for any count.

Feature networks: ``inception`` (torchmetrics' InceptionV3; needs the ``fid`` extra, i.e.
torch-fidelity, and its weights: ``--inception-weights PATH`` for offline clusters) or
``digits-classifier`` (the small CNN of ``fmgen.eval.digits``; tests and the digits preset).
Generated samples are decoded by the model's autoencoder stage first: FID sees pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from fmgen.config import Config, DataConfig, sampling_spec
from fmgen.core.sampling import SamplingSpec
from fmgen.eval.features import (
    FEATURE_DIMS,
    EvalError,
    FeatureSpec,
    cache_files,
    check_fid_count,
    feature_spec,
    read_cache,
    write_cache,
)
from fmgen.eval.generate import NOISE_BLOCK, generate, index_blocks
from fmgen.eval.images import load_image_folder, to_uint8
from fmgen.models.autoencoder import Autoencoder

log = logging.getLogger("fmgen.eval")


def make_metric(spec: FeatureSpec, inception_weights: str = "") -> FrechetInceptionDistance:
    """A FID metric in float64 that keeps its real statistics across resets of the fake ones."""
    # sync_on_compute=False: the main process scores the gathered images alone; torchmetrics'
    # default all-gathers the states inside compute(), a collective the other ranks never join
    kwargs: dict[str, Any] = {"reset_real_features": False, "normalize": False,
                              "sync_on_compute": False}  # fmt: skip
    if spec.name == "inception":
        kwargs["antialias"] = False
        if inception_weights:
            kwargs["feature_extractor_weights_path"] = inception_weights
    try:
        metric = FrechetInceptionDistance(feature=spec.feature, **kwargs)
    except ModuleNotFoundError as e:
        raise EvalError(
            f"the Inception feature network needs torch-fidelity: `pip install -e '.[fid]'` on a "
            f"machine with torchvision, or use eval.feature_network=digits-classifier ({e})"
        ) from None
    metric.set_dtype(torch.float64)
    return metric


def prepare_images(images: Tensor, spec: FeatureSpec) -> Tensor:
    """(N, C, H, W) in [-1, 1] or uint8 -> uint8 with the channels the feature network expects."""
    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    if u8.shape[1] == 1 and spec.channels == 3:
        u8 = u8.repeat(1, 3, 1, 1)
    return u8


def _update(
    metric: FrechetInceptionDistance,
    images: Tensor,
    spec: FeatureSpec,
    *,
    real: bool,
    batch: int = 500,
) -> None:
    for i in range(0, len(images), batch):
        metric.update(prepare_images(images[i : i + batch], spec), real=real)


_STATS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
REFERENCE_VERSION = 2  # 2: safetensors + JSON (1 was a torch.save pickle, never read again)


def _hash_stats(stats: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in _STATS:
        h.update(stats[k].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stats_hash(metric: FrechetInceptionDistance) -> str:
    return _hash_stats({k: getattr(metric, k) for k in _STATS})


def reference_shape(data_dir: Path | DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the real images: of a shard folder (from its manifest) or a data config."""
    if isinstance(data_dir, DataConfig) and data_dir.source == "webdataset":
        return (data_dir.channels, data_dir.resolution, data_dir.resolution)  # fitted on load
    from fmgen.data import read_manifest

    m = read_manifest(data_dir.path if isinstance(data_dir, DataConfig) else data_dir)
    return (m.channels, m.resolution, m.resolution)


def check_image_shape(shape: tuple[int, ...], data_dir: Path | DataConfig, *, fix: str) -> None:
    """Generated images (C, H, W) must have the reference images' shape: else FID compares
    resized or channel-repeated images with real ones and means nothing."""
    ref = reference_shape(data_dir)
    if tuple(shape) != ref:
        show = lambda s: "x".join(map(str, s))  # noqa: E731
        where = data_dir.path if isinstance(data_dir, DataConfig) else data_dir
        raise EvalError(
            f"the images are {show(shape)} (C x H x W) but the reference data {where} is "
            f"{show(ref)}; {fix}"
        )


def _cached_stats_valid(
    tensors: dict[str, Tensor], meta: dict[str, Any], metric: FrechetInceptionDistance
) -> bool:
    """The cached tensors are the metric's states (names, shapes, dtypes) with the recorded hash."""
    for k in _STATS:
        want, got = getattr(metric, k), tensors.get(k)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            return False
    return _hash_stats(tensors) == meta.get("stats_hash")


def load_reference(
    metric: FrechetInceptionDistance, data_dir: Path | DataConfig, spec: FeatureSpec, *,
    batch: int = 500, cache_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fill the metric's real statistics from ALL real images of the shards, cached on disk.

    ``data_dir``: a shard folder prepared by fmgen, or a data config (any source, including
    WebDataset shards and URLs). The images are streamed one batch at a time (memory: one
    batch, whatever the data set's size). The cache (``ref-NAME-KEY.safetensors`` + ``.json``)
    lives in the folder's ``fid-cache`` (fmgen's shards), else the index folder's, else
    ``cache_dir``; shards fmgen did not write never get a file beside them. It is keyed by the
    reference's identity and the feature network; a cache file that is not valid is ignored
    with a warning and the statistics are computed again.

    Returns a description: the cache file, whether it was computed now, sample count, hash.
    """
    from fmgen.data.reference import reference_images

    ref = reference_images(data_dir, batch=batch, cache_dir=cache_dir)
    key = hashlib.sha256(
        f"{ref.key}|{spec.name}|{spec.weights_hash}|{spec.resize}".encode()
    ).hexdigest()[:16]
    stem = ref.cache_dir / f"ref-{spec.name}-{key}" if ref.cache_dir is not None else None
    expect = {"kind": "fid-reference", "version": REFERENCE_VERSION, "key": key}
    cached = read_cache(stem, expect) if stem is not None else None
    if cached is not None and not _cached_stats_valid(*cached, metric):
        log.warning("ignoring the cache %s (its tensors are not %s statistics); recomputing",
                    stem, spec.name)  # fmt: skip
        cached = None
    if cached is not None:
        for k in _STATS:
            setattr(metric, k, cached[0][k].to(getattr(metric, k).device))
    computed = cached is None
    if computed:
        for images in ref.batches():
            metric.update(prepare_images(images, spec), real=True)
        if stem is not None:
            write_cache(stem, {k: getattr(metric, k) for k in _STATS},
                        {**expect, "manifest_hash": ref.key, "feature_network": spec.name,
                         "feature_weights_hash": spec.weights_hash, "resize": spec.resize,
                         "num_reference": int(metric.real_features_num_samples),
                         "stats_hash": stats_hash(metric)})  # fmt: skip
    return {
        "data": ref.name,
        "num_classes": ref.num_classes,
        "manifest_hash": ref.key,
        "num_reference": int(metric.real_features_num_samples),
        "stats_hash": stats_hash(metric),
        "cache": str(cache_files(stem)[0]) if stem is not None else None,
        "computed": computed,
    }


def fid_against_reference(
    fake: Tensor,
    *,
    data_dir: Path | DataConfig,
    spec: FeatureSpec,
    inception_weights: str = "",
    batch: int = 500,
    count_fix: str = "use --num-samples N with N > {dim}",
    cache_dir: Path | None = None,
) -> tuple[float, dict[str, Any]]:
    """FID of images (N, C, H, W) against the cached statistics of all real images.

    Raises EvalError when the images' shape differs from the reference data's or N (or the
    reference count) does not exceed the feature dimension; ``count_fix`` is the advice then.
    """
    check_image_shape(tuple(fake.shape[1:]), data_dir,
                      fix="generate images at the data's resolution and channels, or pass the "
                          "shard folder they were trained on")  # fmt: skip
    check_fid_count(len(fake), spec.dim, spec.name, fix=count_fix)
    metric = make_metric(spec, inception_weights)
    ref = load_reference(metric, data_dir, spec, batch=batch, cache_dir=cache_dir)
    check_fid_count(ref["num_reference"], spec.dim, spec.name, what=f"reference images in {ref['data']}",
                    fix="use a larger data set or a feature network with fewer dimensions")  # fmt: skip
    _update(metric, fake, spec, real=False, batch=batch)
    return float(metric.compute()), ref


def fids_against(
    real: Tensor, fakes: dict[str, Tensor], spec: FeatureSpec, inception_weights: str = ""
) -> dict[str, float]:
    """FID of each fake set against one real set (no cache), the real features computed once."""
    sets = {"real images": real, **{f"{name} images": fake for name, fake in fakes.items()}}
    for what, images in sets.items():
        check_fid_count(len(images), spec.dim, spec.name, what=what,
                        fix="compare more than {dim} images on each side")  # fmt: skip
    metric = make_metric(spec, inception_weights)
    _update(metric, real, spec, real=True)
    out = {}
    for name, fake in fakes.items():
        metric.reset()  # clears the fake statistics only (reset_real_features=False)
        _update(metric, fake, spec, real=False)
        out[name] = float(metric.compute())
    return out


def fid_between(
    real: Tensor, fake: Tensor, spec: FeatureSpec, inception_weights: str = ""
) -> float:
    """FID between two image sets (no cache): e.g. a held-out split against the training split."""
    return fids_against(real, {"fake": fake}, spec, inception_weights)["fake"]


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
    """Every process's uint8 images (its ``rank_blocks`` in order) -> all num images, in index order.

    Gathers need the same tensor size on every rank (gloo fails with "Received data size
    doesn't match" otherwise), so each rank pads its share to the largest share, and the
    padding is dropped after the gather. The shares are known to every rank: nothing else is
    exchanged.
    """
    world = accelerator.num_processes
    # padded by hand: every rank knows every share without asking, where Accelerate's
    # pad_across_processes spends a collective to learn the sizes, and gather_for_metrics only
    # trims the remainder of a prepared DataLoader
    shares = [[i for r in rank_blocks(num, rank, world) for i in r] for rank in range(world)]
    width = max(len(s) for s in shares)
    padded = torch.zeros((width, *shape), dtype=torch.uint8)  # (width, C, H, W)
    padded[: len(local)] = local
    everything = accelerator.gather(padded.to(accelerator.device)).cpu()  # (world * width, ...)
    out = torch.empty((num, *shape), dtype=torch.uint8)
    for rank, share in enumerate(shares):
        first = rank * width
        out[torch.tensor(share, dtype=torch.long)] = everything[first : first + len(share)]
    return out


def check_fid_request(num: int, cfg: Config) -> None:
    """What can be refused before sampling, on every process alike (so none waits on another)."""
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise EvalError(f"the FID sample count must be > 0; got {num!r} (--num-samples N, "
                        f"eval.fid_num_samples)")  # fmt: skip
    name = cfg.eval.feature_network
    if name in FEATURE_DIMS:
        check_fid_count(num, FEATURE_DIMS[name], name)
    check_image_shape((cfg.data.channels, cfg.data.resolution, cfg.data.resolution), cfg.data,
                      fix="score against the shard folder of the model's data (--data)")  # fmt: skip


def fid_of_model(
    model: Any, path: Any, cfg: Config, *, step: int, weights: str,
    spec: SamplingSpec | None = None, autoencoder: Autoencoder | None = None,
    accelerator: Any = None, num_samples: int | None = None, out: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Generate samples (split across processes when ``accelerator`` is given), score, record.

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
        features = feature_spec(cfg.eval.feature_network, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                inception_weights=cfg.eval.inception_weights, cache_dir=Path(cfg.train.run_dir) / "cache")  # fmt: skip
        fid, ref = fid_against_reference(
            u8,
            data_dir=cfg.data,
            spec=features,
            inception_weights=cfg.eval.inception_weights,
            cache_dir=Path(cfg.train.run_dir) / "cache",  # used for shards fmgen did not write
        )
        record = {
            "fid": fid,
            "num_generated": int(len(u8)),
            "num_reference": ref["num_reference"],
            "reference": {k: ref[k] for k in ("data", "manifest_hash", "stats_hash", "cache")},
            "feature_network": features.name,
            "feature_weights_hash": features.weights_hash,
            "resize": features.resize,
            "image_format": "uint8, rounded from [-1, 1]",
            "autoencoder": (
                autoencoder.to_dict() if autoencoder is not None else {"kind": "identity"}
            ),
            "sampling": spec.to_dict(),
            "nfe": spec.nfe,
            "guidance": spec.guidance if conditional else None,
            "conditions": "balanced (sample i: class i mod num_classes)" if conditional else "none",
            "weights": weights,
            "seed": seed,
            # the generated uint8 images themselves: equal hashes, equal images (any split)
            "images_sha256": hashlib.sha256(u8.contiguous().numpy().tobytes()).hexdigest()[:16],
            "generation_block": fid_block_size(n),
            "processes": world,
            "checkpoint_step": step,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        out = out or Path(cfg.train.run_dir) / "eval" / f"fid-step{step:07d}.json"
        write_record(record, out)
        record["record"] = str(out)
    return record


def fid_of_folder(
    folder: Path, *, data_dir: Path, feature_network: str, inception_weights: str = "",
    out: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FID of the images of a folder (PNG/JPEG files or samples.npz) against a shard folder."""
    images = load_image_folder(folder)
    c, r, _ = reference_shape(data_dir)
    # before building the feature network (which may train the digits classifier)
    check_image_shape(tuple(images.shape[1:]), data_dir,
                      fix=f"sample {c}x{r}x{r} images, or pass the shard folder of the images' data")  # fmt: skip
    fix = "sample more images into the folder (sample.py --num-samples N with N > {dim})"
    if feature_network in FEATURE_DIMS:
        check_fid_count(len(images), FEATURE_DIMS[feature_network], feature_network, fix=fix)
    spec = feature_spec(feature_network, resolution=r, channels=c,
                        inception_weights=inception_weights, cache_dir=data_dir / "fid-cache")  # fmt: skip
    fid, ref = fid_against_reference(images, data_dir=data_dir, spec=spec,
                                     inception_weights=inception_weights, count_fix=fix)  # fmt: skip
    record = {"fid": fid, "images": str(folder), "num_generated": len(images),
              "num_reference": ref["num_reference"], "reference": ref, "feature_network": spec.name,
              "feature_weights_hash": spec.weights_hash, "resize": spec.resize}  # fmt: skip
    out = write_record(record, out or folder / "fid.json")
    record["record"] = str(out)
    return record
