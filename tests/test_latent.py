"""The latent stage: a real diffusers AutoencoderKL saved into tmp_path (nothing downloaded),
latent shards (the encoding of every image and of its mirror image, statistics, hash), resumable
and split encoding, training in latent space, exact resume, export, pixel-space sampling and
FID, and the refusal of shards another autoencoder made."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, make_vae, tiny_latent
from PIL import Image

import fmgen.data.latents as latents
from fmgen.config import load_config
from fmgen.data import ShardLoader, read_all, read_manifest
from fmgen.data.stream import shard_samples, to_float
from fmgen.models import AutoencoderError, KLAutoencoder, load_model
from fmgen.models.autoencoder import folder_hash


def stored(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    m = read_manifest(folder)
    return [s for path in m.shard_paths() for s in shard_samples(str(path))]


def npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def test_stored_latents_are_the_encodings_of_the_images_and_their_mirror_images(vae, latent_shards):
    m = read_manifest(latent_shards)
    samples = stored(latent_shards)
    assert m.num_samples == len(samples) == 1797 and m.resolution == 16 and m.channels == 1
    pngs = [np.asarray(Image.open(io.BytesIO(s["png"]))) for _, s in samples]
    images = torch.from_numpy(np.stack(pngs))[:, None]  # (N, 1, 16, 16) uint8
    z = torch.from_numpy(np.stack([npy(s["latent.npy"]) for _, s in samples]))
    z_flip = torch.from_numpy(np.stack([npy(s["latent_flip.npy"]) for _, s in samples]))
    assert z.dtype == torch.float16 and tuple(z.shape[1:]) == (4, 8, 8)
    ae = KLAutoencoder(vae)
    x = to_float(images)
    for want, got in ((ae.encode_raw(x), z), (ae.encode_raw(x.flip(-1)), z_flip)):
        # float16 keeps 11 significant bits: within half a unit in the last place, plus the
        # float32 rounding of another batch composition
        err = (got.float() - want).abs()
        assert (err <= want.abs() * 2**-11 + 1e-6).all(), float(err.max())
    # the mirror image's latent is not the mirrored latent: flipping in latent space is wrong
    assert (z_flip.float() - z.flip(-1).float()).abs().mean() > 0.1 * z.float().std()
    lat = m.latent
    assert lat["shape"] == [4, 8, 8] and lat["dtype"] == "float16"
    values = z.double().transpose(0, 1).reshape(4, -1)  # (c, N * h * w) of what is stored
    assert np.allclose(lat["mean"], values.mean(1).numpy(), rtol=0, atol=1e-12)
    assert np.allclose(lat["std"], values.std(1, unbiased=False).numpy(), rtol=1e-9, atol=1e-12)
    a = lat["autoencoder"]
    assert (
        a["hash"] == folder_hash(vae) and len(a["hash"]) == 16 and a["path"] == str(vae.resolve())
    )
    assert a["kind"] == "autoencoder-kl" and a["scaling_factor"] == ae.scaling_factor
    assert not (latent_shards / latents.PIXELS).exists() and not list(latent_shards.glob(".*"))


def test_loader_yields_normalized_latents_and_the_mirror_latent_when_flipping(latent_shards):
    m = read_manifest(latent_shards)
    mean = torch.tensor(m.latent["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(m.latent["std"]).view(1, -1, 1, 1)
    by_key = {k: s for k, s in stored(latent_shards)}
    loader = ShardLoader(latent_shards, 64, rank=0, world_size=1, resampled=False,
                         shuffle_buffer=0, hflip=True, return_keys=True)  # fmt: skip
    kinds = {"latent.npy": 0, "latent_flip.npy": 0}
    for x, y, keys in loader:
        for xi, yi, key in zip(x, y, keys, strict=True):
            s = by_key[key]
            assert int(yi) == int(s["cls"])
            match = [name for name in kinds
                     if torch.equal(xi, ((torch.from_numpy(npy(s[name])).float()[None] - mean) / std)[0])]  # fmt: skip
            assert len(match) == 1, key
            kinds[match[0]] += 1
    assert min(kinds.values()) > 0.4 * 1797, kinds  # p = 0.5 flips
    plain, mirrored = read_all(latent_shards)[0], read_all(latent_shards, mirror=True)[0]
    assert plain.shape == (1797, 4, 8, 8)
    # normalized: ~zero mean, unit variance per channel whatever the VAE's scale
    assert torch.allclose(
        plain.double().mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-6
    )
    assert torch.allclose(
        plain.double().std((0, 2, 3)), torch.ones(4, dtype=torch.float64), atol=1e-3
    )
    assert not torch.allclose(plain, mirrored)
    # in memory: a flipped sample is its mirror image's latent too
    from fmgen.data import open_train_data

    cfg = load_config(DIGITS, [f"data.path={latent_shards}", "data.source=shards", "data.resolution=16",
                               "data.in_memory=true", "data.hflip=true"]).data  # fmt: skip
    feed = open_train_data(cfg, batch_size=128, rank=0, world_size=1, seed=0, main=True,
                           barrier=lambda: None, autoencoder="unused")  # fmt: skip
    assert feed.latents == m.latent
    x = next(iter(feed))[0].flatten(1)
    is_plain = (x[:, None] == plain.flatten(1)[None]).all(-1).any(-1)
    is_mirror = (x[:, None] == mirrored.flatten(1)[None]).all(-1).any(-1)
    assert (is_plain ^ is_mirror).all() and 0 < int(is_mirror.sum()) < 128
    pixels = ShardLoader(latent_shards, 64, rank=0, world_size=1, resampled=False,
                         shuffle_buffer=0, latents=False)  # fmt: skip
    assert next(iter(pixels))[0].shape == (64, 1, 16, 16)  # what an FID reference reads


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_encoding_resumes_and_any_process_split_writes_the_same_shards(
    vae, latent_shards, tmp_path, monkeypatch
):
    pixels = tmp_path / "pixels"
    from fmgen.data import prepare

    prepare("digits", pixels, resolution=16, channels=1, samples_per_shard=500, progress=False)
    whole = tmp_path / "whole"
    common = dict(autoencoder=vae, data_path=str(pixels), batch_size=100, progress=False)
    latents.prepare_latents("shards", whole, **common)
    # the same images as the digits source, so the same latents as the fixture's shards
    assert {k: v for k, v in files(whole).items() if k != "manifest.json"} == {
        k: v for k, v in files(latent_shards).items() if k != "manifest.json"}  # fmt: skip

    calls: list[int] = []
    real_encode = latents.encode_shard

    def counting(inputs, i, *args, **kw):
        calls.append(i)
        return real_encode(inputs, i, *args, **kw)

    def killed(*args, **kw):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(latents, "encode_shard", counting)
    monkeypatch.setattr(latents, "finish", killed)
    # two processes (threads agreeing through a barrier, as the all-reduce does): rank 0 encodes
    # the even shards, rank 1 the odd ones; the main process dies before the manifest
    split = tmp_path / "split"
    errors = in_ranks(2, lambda rank, agree: latents.prepare_latents(
        "shards", split, rank=rank, world_size=2, any_failed=agree, **common))  # fmt: skip
    assert "killed" in str(errors[0]) and "another process failed" in str(errors[1])
    assert sorted(calls) == [0, 1, 2, 3] and not (split / "manifest.json").exists()
    # a rerun skips the finished shards; a damaged one is encoded again
    done = split / ".train-000002.tar.latent"
    done.write_bytes(done.read_bytes()[:-1024])
    monkeypatch.setattr(latents, "finish", real_finish)
    calls.clear()
    m = latents.prepare_latents("shards", split, **common)
    assert calls == [2]
    assert files(split) == files(whole) and m.num_samples == 1797
    assert m.source["kind"] == "shards" and m.source["of"]["kind"] == "digits"


real_finish = latents.finish


def in_ranks(world: int, fn) -> list[BaseException | None]:
    """``fn(rank, any_failed)`` in one thread per rank; any_failed agrees like an all-reduce."""
    import threading

    barrier, flags, errors = threading.Barrier(world), [False] * world, [None] * world

    def run(rank: int) -> None:
        def agree(flag: bool) -> bool:
            flags[rank] = flag
            barrier.wait()
            out = any(flags)
            barrier.wait()
            return out

        try:
            fn(rank, agree)
        except Exception as e:
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return errors


def train(overrides: list[str], resume: str | None = None):
    from fmgen.train import train as run

    return run(load_config(DIGITS, overrides), resume=resume)


def test_latent_run_resumes_exactly_exports_and_samples_and_scores_in_pixels(
    vae, latent_shards, tmp_path
):
    from safetensors.torch import load_file

    from fmgen.cli.evaluate import main as eval_main
    from fmgen.cli.sample import main as sample_main

    full = train(tiny_latent(latent_shards, vae, tmp_path / "full", 4))
    train(tiny_latent(latent_shards, vae, tmp_path / "half", 2))
    moved = tmp_path / "vae-copy"  # the VAE moved: the same hash, so the run resumes
    shutil.copytree(vae, moved)
    half = train(tiny_latent(latent_shards, moved, tmp_path / "half", 4), resume="auto")
    assert half.step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(full.checkpoint / name), load_file(half.checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((full.export_dir / "fmgen.json").read_text())
    want = read_manifest(latent_shards).latent
    assert meta["sample_shape"] == [4, 8, 8]
    assert meta["autoencoder"]["hash"] == want["autoencoder"]["hash"] == folder_hash(vae)
    assert meta["autoencoder"]["mean"] == want["mean"] and meta["autoencoder"]["std"] == want["std"]
    # the export carries the VAE, byte for byte: it samples with the original gone
    assert folder_hash(full.export_dir / "autoencoder") == folder_hash(vae)
    out = tmp_path / "samples"
    aside = vae.with_name("vae-moved-away")
    vae.rename(aside)  # the export alone decodes: its own copy of the VAE
    try:
        code = sample_main(["--checkpoint", str(full.export_dir), "--per-class", "1",
                            "--out-dir", str(out), "--out", str(tmp_path / "grid.png")])  # fmt: skip
    finally:
        aside.rename(vae)
    pngs = sorted(out.glob("*.png"))
    assert code == 0 and len(pngs) == 10 and all(Image.open(p).size == (16, 16) for p in pngs)
    # a checkpoint decodes with the statistics it recorded, like the export
    from_ckpt = load_model(full.checkpoint).autoencoder.to_dict()
    from_export = load_model(full.export_dir).autoencoder.to_dict()
    assert from_ckpt.pop("path") == str(vae.resolve())
    assert from_export.pop("path") == str((full.export_dir / "autoencoder").resolve())
    assert from_ckpt == from_export
    record = tmp_path / "fid.json"
    assert eval_main(["--checkpoint", str(full.run_dir), "--num-samples", "130", "--steps", "2",
                      "--feature-network", "digits-classifier", "--out", str(record)]) == 0  # fmt: skip
    rec = json.loads(record.read_text())
    assert rec["autoencoder"]["kind"] == "autoencoder-kl" and rec["autoencoder"][
        "hash"
    ] == folder_hash(vae)
    assert (
        rec["num_generated"] == 130 and rec["num_reference"] == 1797 and math.isfinite(rec["fid"])
    )


def test_shards_of_another_autoencoder_or_of_pixels_are_refused(
    vae, latent_shards, tmp_path, shards, capsys
):
    other = make_vae(tmp_path / "other", seed=1)
    with pytest.raises(AutoencoderError) as e:
        train(tiny_latent(latent_shards, other, tmp_path / "run", 1))
    msg = str(e.value)
    assert "\n" not in msg and folder_hash(vae) in msg and folder_hash(other) in msg, msg
    assert "--autoencoder" in msg
    from fmgen.cli.train import main as train_main

    argv = ["--config", str(DIGITS), *tiny_latent(latent_shards, other, tmp_path / "cli", 1)]
    assert train_main(argv) == 2  # the command line: one line, exit status 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and folder_hash(other) in err
    with pytest.raises(AutoencoderError, match="holds pixel images.*prepare --source shards"):
        train(tiny_latent(shards, vae, tmp_path / "run", 1, "data.resolution=8"))
    with pytest.raises(AutoencoderError, match="set model.autoencoder"):
        train(tiny_latent(latent_shards, vae, tmp_path / "run", 1, "model.autoencoder="))


def test_prepare_cli_names_what_a_latent_prepare_lacks(vae, shards, tmp_path, capsys):
    from fmgen.cli.prepare import main as prepare_main

    out = str(tmp_path / "p")
    for argv, needle in (
        (["--source", "webdataset", "--autoencoder", str(vae), "--out", out], "--data-path"),
        (["--source", "webdataset", "--data-path", str(shards), "--autoencoder", str(vae),
          "--out", out], "--resolution and --channels"),
        (["--source", "shards", "--data-path", str(shards), "--autoencoder", str(vae),
          "--batch-size", "0", "--out", out], "--batch-size"),
    ):  # fmt: skip
        assert prepare_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "p" / "manifest.json").exists()
    # a pixel prepare source encoded with an autoencoder of another channel count: refused early
    assert prepare_main(["--source", "digits", "--channels", "3", "--resolution", "16",
                         "--autoencoder", str(vae), "--out", out]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "takes 1" in err and "--channels" in err and not (tmp_path / "p" / ".pixels").exists()


def test_webdataset_shards_of_any_origin_encode_into_latent_shards(vae, tmp_path):
    from foreign import write_img2dataset, write_wds_jpegs

    from fmgen.cli.prepare import main as prepare_main

    write_wds_jpegs(tmp_path / "wds", n=200, per_shard=100)
    out = tmp_path / "lat"
    assert prepare_main(["--source", "webdataset", "--data-path", str(tmp_path / "wds"),
                         "--num-classes", "10", "--resolution", "16", "--channels", "1",
                         "--autoencoder", str(vae), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    m = read_manifest(out)
    assert m.num_samples == 200 and m.class_names == tuple(map(str, range(10)))
    assert m.source["kind"] == "webdataset" and m.latent["shape"] == [4, 8, 8]
    # the stored images are what data.source=webdataset loads (fitted), the latents their encoding
    wds = ShardLoader(str(tmp_path / "wds"), 200, webdataset=True, resolution=16, channels=1,
                      num_classes=10, rank=0, world_size=1, resampled=False, shuffle_buffer=0,
                      return_keys=True)  # fmt: skip
    x, y, keys = next(iter(wds))
    by_key = {k: s for k, s in stored(out)}
    png = torch.stack([to_float(torch.from_numpy(np.array(Image.open(io.BytesIO(by_key[k]["png"]))))[None])
                       for k in keys])  # fmt: skip
    assert torch.equal(png, x) and [int(by_key[k]["cls"]) for k in keys] == y.tolist()
    z = torch.from_numpy(np.stack([npy(by_key[k]["latent.npy"]) for k in keys])).float()
    want = KLAutoencoder(vae).encode_raw(x)
    assert ((z - want).abs() <= want.abs() * 2**-11 + 1e-6).all()
    # img2dataset's layout has no labels: one class
    write_img2dataset(tmp_path / "i2d", n=60, per_shard=30)
    m2 = latents.prepare_latents("webdataset", tmp_path / "lat2", autoencoder=vae,
                                 data_path=str(tmp_path / "i2d"), resolution=16, channels=1,
                                 progress=False)  # fmt: skip
    assert m2.num_samples == 60 and m2.class_names == ("all",) and m2.class_counts == (60,)


@pytest.mark.slow
def test_accelerate_launch_splits_the_encoding_and_writes_the_same_shards(
    vae, latent_shards, tmp_path
):
    import subprocess
    import sys

    from conftest import ROOT, free_port, subprocess_env

    from fmgen.data import prepare

    prepare("digits", tmp_path / "pixels", resolution=16, channels=1, samples_per_shard=500,
            progress=False)  # fmt: skip
    out = tmp_path / "two"
    # CPU processes form one group through --multi_gpu with ACCELERATE_USE_CPU (--cpu: one process)
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(free_port()), "-m", "fmgen.data", "prepare", "--source", "shards",
                        "--data-path", str(tmp_path / "pixels"), "--autoencoder", str(vae),
                        "--batch-size", "100", "--out", str(out), "--no-progress"],
                       cwd=ROOT, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 1797 samples") == 1  # the main process reports
    assert "process 0 of 2 encodes 2 of the 4 shards" in r.stderr
    assert {k: v for k, v in files(out).items() if k != "manifest.json"} == {
        k: v for k, v in files(latent_shards).items() if k != "manifest.json"}  # fmt: skip
    assert read_manifest(out).latent == read_manifest(latent_shards).latent
