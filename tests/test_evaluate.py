"""FID with a small feature network: ~0 for identical sets, large for noise, cached reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, subprocess_env

import fmgen.eval.fid as ev
from fmgen.eval.digits import real_digits, split_indices, train_digits_classifier


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return ev.feature_spec(
        "digits-classifier", resolution=8, channels=1, cache_dir=tmp_path_factory.mktemp("clf")
    )


def test_classifier_is_accurate_on_held_out_digits(tmp_path):
    clf = train_digits_classifier(8, 1, cache_dir=tmp_path)
    assert clf.heldout_accuracy >= 0.95
    again = train_digits_classifier(8, 1, cache_dir=tmp_path)  # from the cache
    assert again.weights_hash == clf.weights_hash


def test_fid_real_vs_itself_is_zero_and_vs_noise_is_large(spec):
    x, _ = real_digits(8)
    tr, te = split_indices(len(x))
    assert abs(ev.fid_between(x[tr], x[tr], spec)) < 1e-6
    floor = ev.fid_between(x[tr], x[te], spec)
    noise = torch.rand_like(x[te]) * 2 - 1
    assert ev.fid_between(x[tr], noise, spec) > 20 * max(floor, 1e-3)


def test_reference_statistics_are_cached_and_reused(shards, spec):
    cache_dir = shards / "fid-cache"
    m1 = ev.make_metric(spec)
    first = ev.load_reference(m1, shards, spec)
    mtime = (shards / "fid-cache").stat().st_mtime_ns if cache_dir.exists() else None
    m2 = ev.make_metric(spec)
    second = ev.load_reference(m2, shards, spec)
    assert second["computed"] is False and second["stats_hash"] == first["stats_hash"]
    assert first["num_reference"] == 1797  # the whole real set, never one batch
    assert (shards / "fid-cache").stat().st_mtime_ns == mtime
    assert torch.equal(m1.real_features_cov_sum, m2.real_features_cov_sum)


def test_inception_weights_path_reaches_torchmetrics(monkeypatch, tmp_path):
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def set_dtype(self, dtype):
            seen["dtype"] = dtype

    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not real weights")
    monkeypatch.setattr(ev, "FrechetInceptionDistance", Recorder)
    spec = ev.feature_spec("inception", resolution=32, channels=3, inception_weights=str(weights))
    ev.make_metric(spec, str(weights))
    assert seen["feature_extractor_weights_path"] == str(weights)
    assert (
        seen["antialias"] is False and seen["normalize"] is False and seen["dtype"] == torch.float64
    )
    assert spec.weights_hash.startswith("file:")


def test_evaluate_cli_scores_a_checkpoint_with_a_protocol_record(tiny_run, tmp_path):
    out = tmp_path / "fid.json"
    r = subprocess.run([sys.executable, "-m", "fmgen.evaluate", "--checkpoint", str(tiny_run.run_dir),
                        "--num-samples", "40", "--feature-network", "digits-classifier", "--out", str(out)],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["num_generated"] == 40 and rec["num_reference"] == 1797 and rec["fid"] > 0
    for key in ("feature_network", "feature_weights_hash", "resize", "sampling", "nfe", "guidance",
                "autoencoder", "weights", "seed", "checkpoint_step", "reference"):  # fmt: skip
        assert key in rec, key
    # the tiny run samples with Heun, 2 steps ending at t = 1: 2 * 2 - 1 field evaluations,
    # whatever the guidance (one batched network call per evaluation)
    assert rec["sampling"]["sampler"] == "heun" and rec["sampling"]["steps"] == 2
    assert rec["nfe"] == rec["sampling"]["nfe"] == 3 and rec["guidance"] == 2.0
    assert rec["weights"] == "ema" and rec["reference"]["stats_hash"]
