"""FID with torchmetrics, and the protocol record that makes every number reproducible.

Protocol choices (each one changes the number): images reach the metric as uint8, rounded (not truncated) from
[-1, 1]; statistics are kept in float64; with the Inception network the resize to 299 uses
``antialias=False`` (the published-FID convention). Reference statistics are computed once from
the WHOLE real set of the shards and cached in a file keyed by the data (manifest hash) and the
feature network (name + weights hash). Every FID is written with a JSON record of its protocol.

Feature networks: ``inception`` (torchmetrics' InceptionV3; needs the ``fid`` extra, i.e.
torch-fidelity, and its weights: ``--inception-weights PATH`` for offline clusters) or
``digits-classifier`` (the small CNN of ``fmgen.eval.digits``; tests and the digits preset).
Generated samples are decoded by the model's autoencoder stage first: FID sees pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from fmgen.config import Config, sampling_spec
from fmgen.core.sampling import SamplingSpec
from fmgen.eval.features import EvalError, FeatureSpec, feature_spec, file_hash
from fmgen.eval.generate import generate
from fmgen.eval.images import load_image_folder, to_uint8
from fmgen.models.autoencoder import Autoencoder

log = logging.getLogger("fmgen.eval")


def make_metric(spec: FeatureSpec, inception_weights: str = "") -> FrechetInceptionDistance:
    """A FID metric in float64 that keeps its real statistics across resets of the fake ones."""
    kwargs: dict[str, Any] = {"reset_real_features": False, "normalize": False}
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


def stats_hash(metric: FrechetInceptionDistance) -> str:
    h = hashlib.sha256()
    for k in _STATS:
        h.update(getattr(metric, k).detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_reference(
    metric: FrechetInceptionDistance, data_dir: Path, spec: FeatureSpec, *, batch: int = 500
) -> dict[str, Any]:
    """Fill the metric's real statistics from ALL real images of the shards, cached on disk.

    Returns a description: the cache file, whether it was computed now, sample count, hash.
    """
    from fmgen.data import read_all, read_manifest

    manifest_hash = file_hash(data_dir / "manifest.json")
    key = hashlib.sha256(
        f"{manifest_hash}|{spec.name}|{spec.weights_hash}|{spec.resize}".encode()
    ).hexdigest()[:16]
    cache = data_dir / "fid-cache" / f"ref-{spec.name}-{key}.pt"
    computed = False
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        for k in _STATS:
            setattr(metric, k, saved[k].to(getattr(metric, k).device))
    else:
        images, _ = read_all(data_dir)
        _update(metric, images, spec, real=True, batch=batch)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({k: getattr(metric, k).detach().cpu() for k in _STATS}, tmp)
        tmp.replace(cache)
        computed = True
    return {
        "data": str(data_dir),
        "num_classes": read_manifest(data_dir).num_classes,
        "manifest_hash": manifest_hash,
        "num_reference": int(metric.real_features_num_samples),
        "stats_hash": stats_hash(metric),
        "cache": str(cache),
        "computed": computed,
    }


def fid_against_reference(
    fake: Tensor,
    *,
    data_dir: Path,
    spec: FeatureSpec,
    inception_weights: str = "",
    batch: int = 500,
) -> tuple[float, dict[str, Any]]:
    """FID of images (N, C, H, W) against the cached statistics of all real images."""
    metric = make_metric(spec, inception_weights)
    ref = load_reference(metric, data_dir, spec, batch=batch)
    _update(metric, fake, spec, real=False, batch=batch)
    return float(metric.compute()), ref


def fids_against(
    real: Tensor, fakes: dict[str, Tensor], spec: FeatureSpec, inception_weights: str = ""
) -> dict[str, float]:
    """FID of each fake set against one real set (no cache), the real features computed once."""
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


def fid_of_model(
    model: Any, path: Any, cfg: Config, *, step: int, weights: str,
    spec: SamplingSpec | None = None, autoencoder: Autoencoder | None = None,
    accelerator: Any = None, num_samples: int | None = None, out: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Generate samples (split across processes when ``accelerator`` is given), score, record.

    ``spec`` defaults to the config's sampling options. Each rank generates its share of the
    sample indices (same images as one process); the uint8 images are gathered and the main
    process computes FID and writes the record.
    """
    spec = spec or sampling_spec(cfg)
    n = num_samples or cfg.eval.fid_num_samples
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    conditional = model.conditional
    labels = model.conditioning.balanced(n)
    share = np.array_split(np.arange(n), world)[rank]
    s, k = int(share[0]) if len(share) else 0, len(share)
    t0 = time.perf_counter()
    images = generate(
        model, path, spec, num=k, cond=labels[s : s + k] if labels is not None else None,
        start=s, seed=seed, device=device, autoencoder=autoencoder,
    )  # fmt: skip
    u8 = to_uint8(images)
    if accelerator is not None and world > 1:
        u8 = accelerator.gather_for_metrics(u8.to(device)).cpu()
    record: dict[str, Any] = {}
    if rank == 0:
        features = feature_spec(cfg.eval.feature_network, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                inception_weights=cfg.eval.inception_weights, cache_dir=Path(cfg.train.run_dir) / "cache")  # fmt: skip
        fid, ref = fid_against_reference(
            u8,
            data_dir=Path(cfg.data.path),
            spec=features,
            inception_weights=cfg.eval.inception_weights,
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
    from fmgen.data import read_manifest

    images = load_image_folder(folder)
    m = read_manifest(data_dir)
    spec = feature_spec(feature_network, resolution=m.resolution, channels=m.channels,
                        inception_weights=inception_weights, cache_dir=data_dir / "fid-cache")  # fmt: skip
    fid, ref = fid_against_reference(images, data_dir=data_dir, spec=spec,
                                     inception_weights=inception_weights)  # fmt: skip
    record = {"fid": fid, "images": str(folder), "num_generated": len(images),
              "num_reference": ref["num_reference"], "reference": ref, "feature_network": spec.name,
              "feature_weights_hash": spec.weights_hash, "resize": spec.resize}  # fmt: skip
    out = write_record(record, out or folder / "fid.json")
    record["record"] = str(out)
    return record
