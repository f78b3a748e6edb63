"""Precision and recall of generated images by k-NN manifolds (Kynkaanniemi et al. 2019).

The real features' manifold is the union of balls around each real feature, of radius its
distance to its k-th nearest real neighbour (k = 3 by default, as the paper); precision is the
fraction of generated features inside it, recall the fraction of real features inside the
generated features' manifold, built alike. Distances are float64 and a point on a ball's
boundary is inside (the paper's ``<=``).

Written here with ``torch.cdist``: torchmetrics has precision and recall only for classifiers,
not these manifold ones. The distances are computed a block of rows at a time: the full matrix of
50,000 x 50,000 features would be 20 GB in float64, a block is ``max_bytes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fmgen.eval.features import EvalError

PR_K = 3
MAX_REFERENCE = 50_000  # real features kept for precision/recall: the paper's 50k


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    num_real: int
    num_fake: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": "k-NN manifolds (Kynkaanniemi et al. 2019), float64"}


def _rows(n: int, m: int, max_bytes: int) -> int:
    """Rows of an (rows, m) float64 block within ``max_bytes``."""
    return max(1, min(n, max_bytes // (8 * max(m, 1))))


def knn_radii(x: Tensor, k: int, *, max_bytes: int = 1 << 28) -> Tensor:
    """(N,) distance of each row of x (N, D) to its k-th nearest other row."""
    x = x.double()
    step = _rows(len(x), len(x), max_bytes)
    # the k+1 smallest distances include the row's own zero: the (k+1)-th is the k-th neighbour
    return torch.cat([torch.cdist(x[i : i + step], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), step)])  # fmt: skip


def inside_fraction(
    points: Tensor, centers: Tensor, radii: Tensor, *, max_bytes: int = 1 << 28
) -> float:
    """The fraction of ``points`` (N, D) within ``radii`` (M,) of at least one of ``centers`` (M, D)."""
    points, centers, radii = points.double(), centers.double(), radii.double()
    step = _rows(len(points), len(centers), max_bytes)
    inside = sum(int((torch.cdist(points[i : i + step], centers) <= radii).any(dim=1).sum())
                 for i in range(0, len(points), step))  # fmt: skip
    return inside / len(points)


def precision_recall(
    real: Tensor, fake: Tensor, *, k: int = PR_K, max_bytes: int = 1 << 28,
    device: str | torch.device | None = None,
) -> PrecisionRecall:  # fmt: skip
    """Precision and recall of ``fake`` (M, D) features against ``real`` (N, D) features.

    Raises EvalError when a side has no more than k points (no k-th neighbour) or the feature
    sizes differ.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise EvalError(f"precision/recall needs (N, D) and (M, D) features; got "
                        f"{tuple(real.shape)} and {tuple(fake.shape)}")  # fmt: skip
    if k < 1 or min(len(real), len(fake)) <= k:
        raise EvalError(f"precision/recall with k={k} needs k >= 1 and more than k real and "
                        f"generated samples; got {len(real)} and {len(fake)}")  # fmt: skip
    real, fake = real.to(device or real.device), fake.to(device or real.device)
    precision = inside_fraction(
        fake, real, knn_radii(real, k, max_bytes=max_bytes), max_bytes=max_bytes
    )
    recall = inside_fraction(
        real, fake, knn_radii(fake, k, max_bytes=max_bytes), max_bytes=max_bytes
    )
    return PrecisionRecall(precision, recall, k, len(real), len(fake))
