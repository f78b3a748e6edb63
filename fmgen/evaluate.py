"""FID with torchmetrics, and the protocol record that makes every number reproducible.

Protocol choices (see PITFALLS): images reach the metric as uint8, rounded (not truncated) from
[-1, 1]; statistics are kept in float64; with the Inception network the resize to 299 uses
``antialias=False`` (the published-FID convention). Reference statistics are computed once from
the WHOLE real set of the shards and cached in a file keyed by the data (manifest hash) and the
feature network (name + weights hash). Every FID is written with a JSON record of its protocol.

Feature networks: ``inception`` (torchmetrics' InceptionV3; needs the ``fid`` extra, i.e.
torch-fidelity, and its weights: ``--inception-weights PATH`` for offline clusters) or
``digits-classifier`` (the small CNN of ``fmgen.quality``; tests and the digits preset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from fmgen.errors import FmgenError
from fmgen.generate import generate, to_uint8

log = logging.getLogger("fmgen.evaluate")

FEATURE_NETWORKS = ("inception", "digits-classifier")


class EvalError(FmgenError):
    """A bad evaluation request; the message names the fix."""


@dataclass
class FeatureSpec:
    """What turns images into features: the module (or Inception's feature size) and its identity."""

    name: str
    feature: int | nn.Module
    weights_hash: str
    resize: str
    channels: int  # channels the network expects (gray images are repeated for Inception)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def feature_spec(
    name: str,
    *,
    resolution: int,
    channels: int,
    inception_weights: str = "",
    cache_dir: Path | None = None,
) -> FeatureSpec:
    """Build the feature network named in the config."""
    if name == "digits-classifier":
        from fmgen.quality import train_digits_classifier

        return digits_spec(
            train_digits_classifier(resolution, channels, cache_dir=cache_dir), channels
        )
    if name == "inception":
        weights = (
            f"file:{_file_hash(Path(inception_weights))}"
            if inception_weights
            else "torch-fidelity default (pt_inception-2015-12-05)"
        )
        return FeatureSpec(name, 2048, weights, "bilinear to 299x299, antialias=False", 3)
    raise EvalError(f"unknown feature network {name!r}; valid: {', '.join(FEATURE_NETWORKS)}")


def digits_spec(clf: Any, channels: int) -> FeatureSpec:
    """The FID feature spec of a trained digits classifier (``quality.TrainedClassifier``)."""
    from fmgen.quality import FeatureNet

    return FeatureSpec(
        "digits-classifier",
        FeatureNet(clf.model),
        clf.weights_hash,
        "none (native resolution)",
        channels,
    )


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
    from fmgen.data import read_manifest
    from fmgen.train_data import read_all

    manifest_hash = _file_hash(data_dir / "manifest.json")
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
    model: Any, path: Any, cfg: Any, *, accelerator: Any = None, step: int, weights: str,
    num_samples: int | None = None, out: Path | None = None, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Generate samples (split across processes when ``accelerator`` is given), score, record.

    Each rank generates its share of the sample indices (same images as one process); the
    uint8 images are gathered and the main process computes FID and writes the record.
    """
    n = num_samples or cfg.eval.fid_num_samples
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    conditional = model.conditional
    labels = torch.arange(n) % model.num_classes if conditional else None  # classes balanced
    share = np.array_split(np.arange(n), world)[rank]
    s, k = int(share[0]) if len(share) else 0, len(share)
    t0 = time.perf_counter()
    images = generate(
        model, path, num=k, labels=labels[s : s + k] if labels is not None else None, start=s,
        sampler=cfg.sample.sampler, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
        sde_sigma=cfg.sample.sde_sigma, t_start=cfg.sample.t_start, time_grid=cfg.sample.time_grid,
        seed=seed, device=device,
    )  # fmt: skip
    u8 = to_uint8(images)
    if accelerator is not None and world > 1:
        u8 = accelerator.gather_for_metrics(u8.to(device)).cpu()
    record: dict[str, Any] = {}
    if rank == 0:
        spec = feature_spec(cfg.eval.feature_network, resolution=cfg.data.resolution, channels=cfg.data.channels,
                            inception_weights=cfg.eval.inception_weights, cache_dir=Path(cfg.train.run_dir) / "cache")  # fmt: skip
        fid, ref = fid_against_reference(
            u8,
            data_dir=Path(cfg.data.path),
            spec=spec,
            inception_weights=cfg.eval.inception_weights,
        )
        record = {
            "fid": fid,
            "num_generated": int(len(u8)),
            "num_reference": ref["num_reference"],
            "reference": {k: ref[k] for k in ("data", "manifest_hash", "stats_hash", "cache")},
            "feature_network": spec.name,
            "feature_weights_hash": spec.weights_hash,
            "resize": spec.resize,
            "image_format": "uint8, rounded from [-1, 1]",
            "sampler": cfg.sample.sampler,
            "steps": cfg.sample.steps,
            "nfe": _nfe(cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance, conditional),
            "guidance": cfg.sample.guidance if conditional else None,
            "labels": "balanced classes (i mod num_classes)" if conditional else "unconditional",
            "weights": weights,
            "seed": seed,
            "checkpoint_step": step,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        out = out or Path(cfg.train.run_dir) / "eval" / f"fid-step{step:07d}.json"
        write_record(record, out)
        record["record"] = str(out)
    return record


def _nfe(sampler: str, steps: int, guidance: float, conditional: bool) -> int:
    from fmgen import samplers

    per_eval = 2 if conditional and guidance not in (0.0, 1.0) else 1
    return samplers.nfe(sampler, steps) * per_eval


def load_image_folder(folder: Path) -> Tensor:
    """PNG/JPEG files or a samples.npz of a folder -> uint8 (N, C, H, W)."""
    from PIL import Image

    npz = folder / "samples.npz"
    if npz.is_file():
        arr = np.load(npz)["images"]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise EvalError(f"{folder} holds no .png/.jpg images and no samples.npz")
        arr = np.stack([np.asarray(Image.open(p)) for p in files])
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.evaluate",
        description="FID of a checkpoint's samples, or of a folder of images, against cached statistics "
        "of all real images of a shard folder. Writes a JSON protocol record beside the number.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder, checkpoint folder or exported model")
    src.add_argument("--images", help="folder of PNG/JPEG files or with samples.npz")
    p.add_argument(
        "--data",
        help="shard folder of the real images (default: the checkpoint config's data.path)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="generated samples (default: eval.fid_num_samples)",
    )
    p.add_argument("--feature-network", choices=FEATURE_NETWORKS, default=None)
    p.add_argument(
        "--inception-weights", default="", help="local Inception weights file (offline clusters)"
    )
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--sampler", choices=("euler", "heun", "rk4", "sde"), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--out", default=None, help="record path (default: beside the checkpoint / images)"
    )
    args = p.parse_args(argv)
    from fmgen.cli import run_guarded, setup_logging

    setup_logging()

    def go() -> int:
        if args.images:
            if not args.data:
                raise EvalError("--images needs --data (the shard folder of the real images)")
            folder = Path(args.images)
            images = load_image_folder(folder)
            from fmgen.data import read_manifest

            m = read_manifest(Path(args.data))
            spec = feature_spec(args.feature_network or "inception", resolution=m.resolution, channels=m.channels,
                                inception_weights=args.inception_weights, cache_dir=Path(args.data) / "fid-cache")  # fmt: skip
            fid, ref = fid_against_reference(
                images,
                data_dir=Path(args.data),
                spec=spec,
                inception_weights=args.inception_weights,
            )
            record = {"fid": fid, "images": str(folder), "num_generated": len(images), "num_reference": ref["num_reference"],
                      "reference": ref, "feature_network": spec.name, "feature_weights_hash": spec.weights_hash,
                      "resize": spec.resize}  # fmt: skip
            out = write_record(record, Path(args.out) if args.out else folder / "fid.json")
        else:
            from accelerate import Accelerator

            from fmgen.checkpoint import load_model

            acc = Accelerator(cpu=not torch.cuda.is_available())  # joins torchrun's CPU processes
            loaded = load_model(
                args.checkpoint, weights=args.weights, device=args.device or acc.device
            )
            cfg = loaded.config
            if args.data:
                cfg.data.path = args.data
            if args.feature_network:
                cfg.eval.feature_network = args.feature_network
            if args.inception_weights:
                cfg.eval.inception_weights = args.inception_weights
            for key in ("sampler", "steps", "guidance"):
                if getattr(args, key) is not None:
                    setattr(cfg.sample, key, getattr(args, key))
            default_out = Path(loaded.source) / f"fid-{cfg.eval.feature_network}.json"
            record = fid_of_model(loaded.model, loaded.path, cfg, accelerator=acc, step=loaded.step, weights=loaded.weights,
                                  num_samples=args.num_samples, out=Path(args.out) if args.out else default_out, seed=args.seed)  # fmt: skip
            if not acc.is_main_process:
                return 0
            out = Path(record["record"])
        print(f"FID {record['fid']:.4f} ({record['num_generated']} generated vs {record['num_reference']} reference, "
              f"{record['feature_network']} features); record: {out}")  # fmt: skip
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
