"""k-NN precision and recall (Kynkaanniemi et al. 2019) on point sets with known answers."""

from __future__ import annotations

import pytest
import torch

from fmgen.eval.features import EvalError
from fmgen.eval.manifold import knn_radii, precision_recall


def brute_force(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """The paper's definition with one loop per point: the k-th nearest other point's distance."""

    def radii(x):
        return [sorted(float((x[i] - x[j]).norm()) for j in range(len(x)) if j != i)[k - 1]
                for i in range(len(x))]  # fmt: skip

    def inside(points, centers, r):
        hits = [any(float((p - c).norm()) <= rc for c, rc in zip(centers, r, strict=True))
                for p in points]  # fmt: skip
        return sum(hits) / len(points)

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_identical_sets_have_precision_and_recall_one():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pr = precision_recall(x, x.clone())
    assert (pr.precision, pr.recall, pr.k) == (1.0, 1.0, 3)


def test_far_disjoint_clusters_have_precision_and_recall_zero():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(30, 3, generator=g, dtype=torch.float64) + 100
    pr = precision_recall(real, fake)
    assert (pr.precision, pr.recall, pr.num_real, pr.num_fake) == (0.0, 0.0, 40, 30)


def test_a_small_case_computed_by_hand():
    """k = 1 on a line. Real 0, 1, 2, 3, 10: radii 1, 1, 1, 1, 7. Generated -1, 0.5, 2.9, 5, 40,
    41: radii 1.5, 2.4, 2.1, 2.1, 1, 1. Precision: -1 (on 0's boundary: inside), 0.5, 2.9 and
    5 (within 7 of 10) are inside, 40 and 41 are not: 4/6. Recall: 0, 1, 2, 3 are within a
    generated ball, 10 is not (5 away from 5, whose radius is 2.1): 4/5."""
    real = torch.tensor([0.0, 1, 2, 3, 10], dtype=torch.float64)[:, None]
    fake = torch.tensor([-1.0, 0.5, 2.9, 5, 40, 41], dtype=torch.float64)[:, None]
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 1.0, 7.0]
    pr = precision_recall(real, fake, k=1)
    assert pr.precision == 4 / 6 and pr.recall == 4 / 5


def test_blocks_of_rows_change_nothing_and_match_the_definition():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(70, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 4, generator=g, dtype=torch.float64) * 0.6 + 0.8
    whole = precision_recall(real, fake, k=3)
    rows = precision_recall(real, fake, k=3, max_bytes=1)  # one row per block
    assert (whole.precision, whole.recall) == (rows.precision, rows.recall)
    assert (whole.precision, whole.recall) == brute_force(real, fake, 3)
    assert 0 < whole.precision < 1 and 0 < whole.recall < 1  # a case that can tell


def test_too_few_points_or_mismatched_features_are_refused():
    x = torch.randn(3, 2)
    with pytest.raises(EvalError, match="k=3 .*more than k"):
        precision_recall(x, torch.randn(10, 2))
    with pytest.raises(EvalError, match=r"\(10, 2\) and \(10, 3\)"):
        precision_recall(torch.randn(10, 2), torch.randn(10, 3))


def test_captured_features_keep_every_batch_without_a_limit():
    """FID updates in batches of 500: with no limit every batch's features are kept (once only
    the first batch's were, so precision/recall of > 500 images saw 500 of them)."""
    import torch

    from fmgen.eval.digits import digits_spec, train_digits_classifier
    from fmgen.eval.fid import _joined, _update, captured_features, make_metric
    from fmgen.eval.images import to_uint8

    spec = digits_spec(train_digits_classifier(8, 1), 1)
    metric = make_metric(spec)
    x = torch.rand(1200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with captured_features(metric) as bag:
        _update(metric, x, spec, real=False)
    with captured_features(metric, limit=700) as capped:
        _update(metric, x, spec, real=False)
    got, first = _joined(bag, spec.dim), _joined(capped, spec.dim)
    assert got.shape == (1200, 128) and first.shape == (700, 128)
    assert torch.equal(got[:700], first)
    # the features of these images, in order (float32 of one batch against batches of 500)
    torch.testing.assert_close(got, spec.feature(to_uint8(x)).float(), rtol=1e-5, atol=1e-6)
