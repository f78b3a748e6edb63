"""Feature networks for FID: a registry of builders, each giving a ``FeatureSpec``.

``inception`` is torchmetrics' InceptionV3 (the ``fid`` extra: torch-fidelity, and its weights,
``--inception-weights PATH`` offline); other networks register themselves here
(``digits-classifier`` in ``fmgen.eval.digits``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fmgen.base import FmgenError


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


FeatureBuilder = Callable[..., FeatureSpec]
"""builder(*, resolution, channels, inception_weights, cache_dir) -> FeatureSpec."""

FEATURE_NETWORKS: dict[str, FeatureBuilder] = {}


def register_feature_network(name: str, builder: FeatureBuilder) -> None:
    FEATURE_NETWORKS[name] = builder


def file_hash(path: Path) -> str:
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


register_feature_network("inception", inception_spec)
