"""FID with a small feature network: ~0 for identical sets, large for noise, cached reference
(streamed, safetensors + JSON, never a pickle), refused inputs."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_main, subprocess_env
from PIL import Image

import fmgen.data
import fmgen.data.pipeline
import fmgen.eval.fid as ev
import fmgen.eval.protocol as protocol
from fmgen.eval.digits import (
    SHARED_CACHE_ENV,
    classifier_cache,
    real_digits,
    split_indices,
    train_digits_classifier,
)
from fmgen.eval.features import EvalError, feature_spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return feature_spec(
        "digits-classifier", resolution=8, channels=1, cache_dir=tmp_path_factory.mktemp("clf")
    )


def test_classifier_is_accurate_on_held_out_digits(tmp_path):
    clf = train_digits_classifier(8, 1, cache_dir=tmp_path)
    assert clf.heldout_accuracy >= 0.95
    again = train_digits_classifier(8, 1, cache_dir=tmp_path)  # from the cache
    assert again.weights_hash == clf.weights_hash


def test_a_shared_classifier_folder_serves_every_run(tmp_path, monkeypatch):
    """FMGEN_DIGITS_CLASSIFIER_CACHE: the classifier is trained once, into that folder, and every
    later run loads it from there, whatever its own cache folder; unset, each run keeps its own."""
    shared = tmp_path / "shared"
    monkeypatch.setenv(SHARED_CACHE_ENV, str(shared))
    first = feature_spec("digits-classifier", resolution=8, channels=1, cache_dir=tmp_path / "a")
    files = sorted(shared.iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"] and not (tmp_path / "a").exists()
    written = [f.stat().st_mtime_ns for f in files]
    second = feature_spec("digits-classifier", resolution=8, channels=1, cache_dir=tmp_path / "b")
    assert second.weights_hash == first.weights_hash and not (tmp_path / "b").exists()
    assert [f.stat().st_mtime_ns for f in files] == written  # loaded, not trained again
    monkeypatch.delenv(SHARED_CACHE_ENV)
    assert classifier_cache(tmp_path / "c") == tmp_path / "c"


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
    import torchmetrics.image.fid  # make_metric imports the metric from here when it makes one

    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", Recorder)
    spec = feature_spec("inception", resolution=32, channels=3, inception_weights=str(weights))
    ev.make_metric(spec, str(weights))
    assert seen["feature_extractor_weights_path"] == str(weights)
    assert (
        seen["antialias"] is False and seen["normalize"] is False and seen["dtype"] == torch.float64
    )
    assert spec.weights_hash.startswith("file:")


def test_evaluate_cli_scores_a_checkpoint_with_a_protocol_record(tiny_run, tmp_path):
    out = tmp_path / "fid.json"
    r = subprocess.run([sys.executable, "-m", "fmgen.evaluate", "--checkpoint", str(tiny_run.run_dir),
                        "--num-samples", "130", "--feature-network", "digits-classifier", "--out", str(out)],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["num_generated"] == 130 and rec["num_reference"] == 1797 and rec["fid"] > 0
    for key in ("feature_network", "feature_weights_hash", "resize", "sampling", "nfe", "guidance",
                "autoencoder", "weights", "seed", "checkpoint_step", "reference"):  # fmt: skip
        assert key in rec, key
    # the tiny run samples with Heun, 2 steps ending at t = 1: 2 * 2 - 1 field evaluations,
    # whatever the guidance (one batched network call per evaluation)
    assert rec["sampling"]["sampler"] == "heun" and rec["sampling"]["steps"] == 2
    assert rec["nfe"] == rec["sampling"]["nfe"] == 3 and rec["guidance"] == 2.0
    assert rec["weights"] == "ema" and rec["reference"]["stats_hash"]


# --- caches: never a pickle ------------------------------------------------------------------------


class Armed:
    """Unpickling this creates ``path``: a stand-in for code run by a malicious cache file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def armed_payloads(marker, tmp_path) -> list[bytes]:
    """A plain pickle and a torch.save zip, each proven to create its marker when loaded."""
    probe = tmp_path / "probe"
    plain = pickle.dumps({"state": Armed(probe)})
    pickle.loads(plain)  # the payload is live: loading it does run code
    assert probe.exists()
    probe.unlink()
    torch.save({"state": Armed(probe)}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)
    assert probe.exists()
    probe.unlink()
    plain = pickle.dumps({"state": Armed(marker)})
    torch.save({"state": Armed(marker)}, tmp_path / "armed.pt")
    return [plain, (tmp_path / "armed.pt").read_bytes()]


def test_classifier_cache_is_safetensors_and_json_and_a_pickle_is_never_loaded(tmp_path, caplog):
    cache = tmp_path / "cache"
    clf = train_digits_classifier(8, 1, epochs=1, cache_dir=cache)  # 1 epoch: the cache is tested
    files = sorted(p.name for p in cache.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "safetensors"], files
    assert json.loads((cache / files[0]).read_text())["heldout_accuracy"] == clf.heldout_accuracy
    valid = {name: (cache / name).read_bytes() for name in files}
    marker = tmp_path / "marker"
    plain, zipped = armed_payloads(marker, tmp_path)
    # each cache file in turn replaced by a pickle (plain / torch.save zip), or garbage; the old
    # .pt name holds a pickle too
    for name, payload in [(files[0], plain), (files[1], zipped), (files[1], b"\x00junk" * 9)]:
        for n, data in valid.items():
            (cache / n).write_bytes(data)
        (cache / name).write_bytes(payload)
        (cache / f"{name.rsplit('.', 1)[0]}.pt").write_bytes(plain)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fmgen.eval"):
            again = train_digits_classifier(8, 1, epochs=1, cache_dir=cache)
        assert not marker.exists()
        assert "ignoring the cache" in caplog.text  # recomputed, with a warning
        assert again.weights_hash == clf.weights_hash
        assert again.heldout_accuracy == clf.heldout_accuracy
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fmgen.eval"):  # rewritten: valid again
        assert (
            train_digits_classifier(8, 1, epochs=1, cache_dir=cache).weights_hash
            == clf.weights_hash
        )
    assert "ignoring" not in caplog.text and not marker.exists()


def test_reference_cache_is_safetensors_and_json_and_a_pickle_is_never_loaded(
    shards, spec, tmp_path, caplog
):
    data = tmp_path / "data"
    shutil.copytree(shards, data, ignore=shutil.ignore_patterns("fid-cache"))
    first = ev.load_reference(ev.make_metric(spec), data, spec)
    assert first["computed"] and first["cache"].endswith(".safetensors")
    cache_dir = data / "fid-cache"
    files = sorted(p.name for p in cache_dir.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "safetensors"], files
    marker = tmp_path / "marker"
    for payload in armed_payloads(marker, tmp_path):
        for name in files:
            stem = name.rsplit(".", 1)[0]
            (cache_dir / name).write_bytes(payload)
            (cache_dir / f"{stem}.pt").write_bytes(payload)  # the old cache name
            caplog.clear()
            metric = ev.make_metric(spec)
            with caplog.at_level(logging.WARNING, logger="fmgen.eval"):
                again = ev.load_reference(metric, data, spec)
            assert not marker.exists()
            assert again["computed"] and "ignoring the cache" in caplog.text
            assert again["stats_hash"] == first["stats_hash"] and again["num_reference"] == 1797
            assert ev.load_reference(ev.make_metric(spec), data, spec)["computed"] is False


def test_reference_statistics_stream_the_shards_batch_by_batch(shards, spec, tmp_path, monkeypatch):
    """No read_all: the metric sees batches of at most `batch` images, 1797 in all, and the
    statistics equal those of all images at once (same order and batches)."""
    data = tmp_path / "data"
    shutil.copytree(shards, data, ignore=shutil.ignore_patterns("fid-cache"))
    images, _ = fmgen.data.read_all(data)

    def refuse(*_, **__):
        raise AssertionError("load_reference must stream, not read the whole set")

    monkeypatch.setattr(fmgen.data, "read_all", refuse)
    monkeypatch.setattr(fmgen.data.pipeline, "read_all", refuse)
    metric, seen = ev.make_metric(spec), []
    update = metric.update
    monkeypatch.setattr(metric, "update", lambda x, real: (seen.append(len(x)), update(x, real)))
    ref = ev.load_reference(metric, data, spec, batch=200)
    assert max(seen) == 200 and sum(seen) == 1797 == ref["num_reference"]
    whole = ev.make_metric(spec)
    ev._update(whole, images, spec, real=True, batch=200)
    for k in ev._STATS:
        assert torch.equal(getattr(metric, k), getattr(whole, k)), k


# --- refused inputs ---------------------------------------------------------------------------------


def test_fid_refuses_fewer_samples_than_feature_dimensions(shards, spec):
    x, _ = real_digits(8)
    with pytest.raises(
        EvalError, match=r"100 generated samples .*128-d .*--num-samples N with N > 128"
    ):
        ev.fid_against_reference(x[:100], data_dir=shards, spec=spec)
    with pytest.raises(EvalError, match="128"):
        ev.fid_between(x[:128], x[200:400], spec)  # 128 = dim is still singular
    fid, _ = ev.fid_against_reference(x[:129], data_dir=shards, spec=spec)  # 129 > 128 is scored
    assert fid > 0


def test_fid_refuses_images_of_another_shape_than_the_data(shards, spec, tmp_path):
    big = torch.zeros(200, 1, 32, 32)
    with pytest.raises(EvalError, match=r"1x32x32 .* 1x8x8"):
        ev.fid_against_reference(big, data_dir=shards, spec=spec)
    with pytest.raises(EvalError, match=r"3x8x8 .* 1x8x8"):
        ev.fid_against_reference(torch.zeros(200, 3, 8, 8), data_dir=shards, spec=spec)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(EvalError, match=r"1x32x32 .* 1x8x8"):
        protocol.fid_of_folder(folder, data_dir=shards, feature_network="digits-classifier")


def test_evaluate_cli_refuses_too_few_and_no_samples(tiny_run):
    r = run_main("evaluate", "--checkpoint", tiny_run.run_dir, "--num-samples", 100,
                 "--feature-network", "digits-classifier")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "100 generated samples" in r.stderr and "128-d" in r.stderr, r.stderr
    assert "--num-samples N with N > 128" in r.stderr, r.stderr
    from fmgen.models import load_model

    loaded = load_model(tiny_run.run_dir)
    for num in (0, -5):  # refused before any sampling
        with pytest.raises(EvalError, match=rf"must be > 0; got {num}"):
            protocol.fid_of_model(loaded.model, loaded.path, loaded.config, step=0, weights="ema",
                            num_samples=num)  # fmt: skip
