"""FID with torchmetrics and precision/recall on the same features, against cached reference statistics.

Protocol choices (each one changes the number): images reach the metric as uint8, rounded (not truncated) from
[-1, 1]; statistics are kept in float64; with the Inception network the resize to 299 uses
``antialias=False`` (the published-FID convention). Reference statistics are computed once from
the WHOLE real set of the shards, streamed batch by batch, and cached (safetensors + JSON, keyed
by the data's manifest hash and the feature network's name and weights hash), with the first
``MAX_REFERENCE`` real features for precision/recall (``fmgen.eval.manifold``). The records of
each number are written by ``fmgen.eval.protocol``.

Inputs are checked, not scored blindly: more samples than feature dimensions on each side (else
the covariance is singular), generated images of the reference data's shape, and a feature
network trained on one data set (``digits-classifier``, a module's ``trained_on``) only for
that data set unless forced.

Feature networks (``fmgen.eval.features``): ``inception``, ``digits-classifier``,
``dinov2:FOLDER``, ``module:FILE.py:FACTORY``, ``torchscript:FILE.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fmgen.config import DataConfig
from fmgen.eval.features import (
    EvalError,
    FeatureSpec,
    cache_files,
    check_fid_count,
    check_trained_on,
    read_cache,
    write_cache,
)
from fmgen.eval.images import to_uint8
from fmgen.eval.manifold import MAX_REFERENCE, PR_K, PrecisionRecall, precision_recall

if TYPE_CHECKING:  # imported in make_metric: a training that never scores FID saves ~0.7 s
    from torchmetrics.image.fid import FrechetInceptionDistance

log = logging.getLogger("fmgen.eval")


def make_metric(spec: FeatureSpec, inception_weights: str = "") -> FrechetInceptionDistance:
    """A FID metric in float64 that keeps its real statistics across resets of the fake ones."""
    from torchmetrics.image.fid import FrechetInceptionDistance

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


@contextlib.contextmanager
def captured_features(
    metric: FrechetInceptionDistance, limit: int | None = None
) -> Iterator[list[Tensor]]:
    """The features the metric's network computes inside the block, the first ``limit`` rows
    (float32, CPU): the very features of FID, for precision/recall, from a forward hook."""
    bag: list[Tensor] = []

    def keep(_module: Any, _inputs: Any, out: Tensor) -> None:
        room = len(out) if limit is None else limit - sum(len(b) for b in bag)
        if room > 0:
            bag.append(out.detach().reshape(-1, out.shape[-1])[:room].float().cpu())  # (B, D)

    handle = metric.inception.register_forward_hook(keep)
    try:
        yield bag
    finally:
        handle.remove()


def _joined(bag: list[Tensor], dim: int) -> Tensor:
    return torch.cat(bag) if bag else torch.empty((0, dim))


_STATS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
# 3: the first MAX_REFERENCE real features beside the statistics, for precision/recall
# (2 was statistics alone, 1 a torch.save pickle, never read again)
REFERENCE_VERSION = 3


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
    feats, n = tensors.get("real_features"), int(tensors["real_features_num_samples"])
    if feats is None or feats.dtype != torch.float32 or feats.ndim != 2:
        return False
    if feats.shape != (min(n, MAX_REFERENCE), metric.real_features_sum.shape[0]):
        return False
    return _hash_stats(tensors) == meta.get("stats_hash")


def load_reference(
    metric: FrechetInceptionDistance, data_dir: Path | DataConfig, spec: FeatureSpec, *,
    batch: int = 500, cache_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``reference_features`` without the features: the description alone."""
    return reference_features(metric, data_dir, spec, batch=batch, cache_dir=cache_dir)[0]


def reference_features(
    metric: FrechetInceptionDistance, data_dir: Path | DataConfig, spec: FeatureSpec, *,
    batch: int = 500, cache_dir: Path | None = None,
) -> tuple[dict[str, Any], Tensor]:  # fmt: skip
    """Fill the metric's real statistics from ALL real images of the shards, cached on disk.

    ``data_dir``: a shard folder prepared by fmgen, or a data config (any source, including
    WebDataset shards and URLs). The images are streamed one batch at a time (memory: one
    batch, whatever the data set's size). The cache (``ref-NAME-KEY.safetensors`` + ``.json``)
    lives in the folder's ``fid-cache`` (fmgen's shards), else the index folder's, else
    ``cache_dir``; shards fmgen did not write never get a file beside them. It is keyed by the
    reference's identity and the feature network; a cache file that is not valid is ignored
    with a warning and the statistics are computed again.

    Returns a description (the cache file, whether it was computed now, sample count, hash)
    and the first ``MAX_REFERENCE`` real features (float32, (n, D)) for precision/recall: in
    shard order, which fmgen's prepare shuffled, so they are a random subset of its data.
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
        features = cached[0]["real_features"]
    computed = cached is None
    if computed:
        with captured_features(metric, MAX_REFERENCE) as bag:
            for images in ref.batches():
                metric.update(prepare_images(images, spec), real=True)
        features = _joined(bag, metric.real_features_sum.shape[0])
        if stem is not None:
            write_cache(stem, {**{k: getattr(metric, k) for k in _STATS}, "real_features": features},
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
    }, features


@dataclass
class Scores:
    """FID, and precision/recall on the same features (None when not asked), with the reference."""

    fid: float
    pr: PrecisionRecall | None
    reference: dict[str, Any]


def score_against_reference(
    fake: Tensor, *, data_dir: Path | DataConfig, spec: FeatureSpec, inception_weights: str = "",
    batch: int = 500, count_fix: str = "use --num-samples N with N > {dim}",
    cache_dir: Path | None = None, pr_k: int = PR_K, force: bool = False,
    device: str | torch.device | None = None,
) -> Scores:  # fmt: skip
    """FID of images (N, C, H, W) against the cached statistics of all real images, and the
    precision/recall (k = ``pr_k``; 0: none) of their features against the first
    ``MAX_REFERENCE`` real ones (distances on ``device``, default the CPU).

    Raises EvalError when the images' shape differs from the reference data's, N (or the
    reference count) does not exceed the feature dimension (``count_fix`` is the advice then),
    or the network was trained on another data set and ``force`` is not given.
    """
    from fmgen.data.reference import data_set_name

    check_image_shape(tuple(fake.shape[1:]), data_dir,
                      fix="generate images at the data's resolution and channels, or pass the "
                          "shard folder they were trained on")  # fmt: skip
    where = data_dir.path if isinstance(data_dir, DataConfig) else data_dir
    check_trained_on(spec.name, spec.trained_on, data_set_name(data_dir), where=str(where),
                     force=force)  # fmt: skip
    check_fid_count(len(fake), spec.dim, spec.name, fix=count_fix)
    metric = make_metric(spec, inception_weights)
    ref, real = reference_features(metric, data_dir, spec, batch=batch, cache_dir=cache_dir)
    check_fid_count(ref["num_reference"], spec.dim, spec.name, what=f"reference images in {ref['data']}",
                    fix="use a larger data set or a feature network with fewer dimensions")  # fmt: skip
    with captured_features(metric) as bag:
        _update(metric, fake, spec, real=False, batch=batch)
    pr = precision_recall(real, _joined(bag, spec.dim), k=pr_k, device=device) if pr_k else None
    return Scores(float(metric.compute()), pr, ref)


def fid_against_reference(fake: Tensor, **kwargs: Any) -> tuple[float, dict[str, Any]]:
    """FID alone of ``score_against_reference`` (same arguments): the number and the reference."""
    scores = score_against_reference(fake, **{"pr_k": 0, **kwargs})
    return scores.fid, scores.reference


def fids_against(
    real: Tensor, fakes: dict[str, Tensor], spec: FeatureSpec, inception_weights: str = ""
) -> dict[str, float]:
    """FID of each fake set against one real set (no cache), the real features computed once."""
    return {name: fid for name, (fid, _) in scores_against(real, fakes, spec, inception_weights).items()}


def scores_against(
    real: Tensor, fakes: dict[str, Tensor], spec: FeatureSpec, inception_weights: str = "",
    *, pr_k: int = 0,
) -> dict[str, tuple[float, PrecisionRecall | None]]:  # fmt: skip
    """FID, and with ``pr_k`` > 0 the precision/recall on the very same features, of each fake
    set against one real set (no cache); every image's features are computed once."""
    sets = {"real images": real, **{f"{name} images": fake for name, fake in fakes.items()}}
    for what, images in sets.items():
        check_fid_count(len(images), spec.dim, spec.name, what=what,
                        fix="compare more than {dim} images on each side")  # fmt: skip
    metric = make_metric(spec, inception_weights)
    with captured_features(metric, limit=None if pr_k else 0) as bag:
        _update(metric, real, spec, real=True)
    real_features = _joined(bag, spec.dim)
    out = {}
    for name, fake in fakes.items():
        metric.reset()  # clears the fake statistics only (reset_real_features=False)
        with captured_features(metric, limit=None if pr_k else 0) as bag:
            _update(metric, fake, spec, real=False)
        pr = precision_recall(real_features, _joined(bag, spec.dim), k=pr_k) if pr_k else None
        out[name] = (float(metric.compute()), pr)
    return out


def fid_between(
    real: Tensor, fake: Tensor, spec: FeatureSpec, inception_weights: str = ""
) -> float:
    """FID between two image sets (no cache): e.g. a held-out split against the training split."""
    return fids_against(real, {"fake": fake}, spec, inception_weights)["fake"]
