"""Feature networks for FID: a registry of builders, each giving a ``FeatureSpec``.

``inception`` is torchmetrics' InceptionV3 (the ``fid`` extra: torch-fidelity, and its weights,
``--inception-weights PATH`` offline); other networks register themselves here
(``digits-classifier`` in ``fmgen.eval.digits``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fmgen.base import FmgenError, file_hash

log = logging.getLogger("fmgen.eval")


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

    @property
    def dim(self) -> int:
        """The feature dimension: FID needs more samples than this on each side."""
        return self.feature if isinstance(self.feature, int) else int(self.feature.num_features)


FeatureBuilder = Callable[..., FeatureSpec]
"""builder(*, resolution, channels, inception_weights, cache_dir) -> FeatureSpec."""

FEATURE_NETWORKS: dict[str, FeatureBuilder] = {}
FEATURE_DIMS: dict[str, int] = {}  # known without building the network (checks before sampling)


def register_feature_network(name: str, builder: FeatureBuilder, *, dim: int | None = None) -> None:
    FEATURE_NETWORKS[name] = builder
    if dim is not None:
        FEATURE_DIMS[name] = dim


def check_fid_count(num: int, dim: int, network: str, *, what: str = "generated samples",
                    fix: str = "use --num-samples N with N > {dim}") -> None:  # fmt: skip
    """Refuse FID from ``num`` <= ``dim`` samples: their covariance is singular, the number noise."""
    if num <= dim:
        raise EvalError(
            f"FID of {num} {what} with the {dim}-d {network} features is meaningless (the "
            f"covariance of n samples is singular for n <= {dim}); {fix.format(dim=dim)}"
        )


def feature_spec(
    name: str,
    *,
    resolution: int,
    channels: int,
    inception_weights: str = "",
    cache_dir: Path | None = None,
) -> FeatureSpec:
    """Build the feature network registered under ``name``."""
    if name not in FEATURE_NETWORKS:
        raise EvalError(f"unknown feature network {name!r}; valid: {', '.join(FEATURE_NETWORKS)}")
    return FEATURE_NETWORKS[name](resolution=resolution, channels=channels,
                                  inception_weights=inception_weights, cache_dir=cache_dir)  # fmt: skip


def inception_spec(*, inception_weights: str = "", **_: object) -> FeatureSpec:
    weights = (
        f"file:{file_hash(Path(inception_weights))}"
        if inception_weights
        else "torch-fidelity default (pt_inception-2015-12-05)"
    )
    return FeatureSpec("inception", 2048, weights, "bilinear to 299x299, antialias=False", 3)


register_feature_network("inception", inception_spec, dim=2048)


# --- caches: tensors in safetensors, the rest in JSON, never a pickle ----------------------------

CACHE_FORMAT = "fmgen-cache-v1"


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        tmp.unlink(missing_ok=True)


def cache_files(stem: Path) -> tuple[Path, Path]:
    """The tensor file and the JSON record of the cache ``stem`` (a path without extension)."""
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


def write_cache(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """``stem.safetensors`` (tensors) and ``stem.json`` (``meta`` + the tensor file's hash).

    The JSON file is written last and names the hash of the tensor file it belongs to, so a
    pair left mixed by an interrupted rewrite is detected on reading. A cache that cannot be
    written (full disk, read-only folder) is a warning: the numbers are still right.
    """
    tensor_file, meta_file = cache_files(stem)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _replace_atomically(tensor_file, lambda p: save_file(flat, str(p)))
        record = {"format": CACHE_FORMAT, **meta, "tensors_sha256": file_hash(tensor_file)}
        _replace_atomically(meta_file, lambda p: p.write_text(json.dumps(record, indent=2)))
    except (OSError, RuntimeError, SafetensorError) as e:
        log.warning("could not write the cache %s (disk full? read-only?): %s", stem.parent, e)


def read_cache(
    stem: Path, expect: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors and JSON record written by ``write_cache``, or None to recompute.

    None, silently, when no cache exists; None with a logged warning when a file is not what
    ``write_cache`` wrote (an old pickle, garbage, a foreign or half-replaced pair) or its
    record disagrees with ``expect``. Nothing here can run code from a file: JSON is parsed
    as text and safetensors holds raw tensor bytes.
    """
    tensor_file, meta_file = cache_files(stem)
    if not tensor_file.exists() and not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{meta_file.name} is not an {CACHE_FORMAT} record")
        for k, v in expect.items():
            if meta.get(k) != v:
                raise ValueError(f"{meta_file.name} has {k}={meta.get(k)!r}, expected {v!r}")
        if meta.get("tensors_sha256") != file_hash(tensor_file):
            raise ValueError(f"{tensor_file.name} is not the file its record names")
        tensors = load_file(str(tensor_file))
    except (OSError, ValueError, SafetensorError) as e:  # UnicodeDecodeError is a ValueError
        log.warning("ignoring the cache %s (%s); recomputing it", stem, e)
        return None
    return tensors, meta
