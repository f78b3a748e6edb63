"""Latent space + DiT + pipeline, together: a ``model.type=dit`` run on latent shards trains,
resumes exactly, exports with its VAE, and ``sample.py``, FID and ``FlowPipeline`` all decode to
pixels through the export's own copy of that VAE. The VAE is the untrained tiny one of conftest
(a fixed decoder is all these checks need); test_latent_quality trains one for the judge."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, run_main, tiny_latent
from diffusers import AutoencoderKL
from PIL import Image
from test_pipeline import LABELS, sample_py_euler
from test_train import latest, weights

from fmgen.cli.evaluate import main as eval_main
from fmgen.config import load_config
from fmgen.data import read_manifest
from fmgen.eval import generate
from fmgen.eval.images import GRID_GAP
from fmgen.models import KLAutoencoder, build_conditioning, build_model, export_model, load_model
from fmgen.models.autoencoder import folder_hash
from fmgen.models.dit import DiT
from fmgen.pipeline import FlowPipeline

TINY_DIT = ROOT / "configs" / "tiny-dit.yaml"
SMALL = ["model.type=dit", "model.dit.depth=2", "model.dit.width=32", "model.dit.heads=2"]


def latent_dit(latent_shards, vae, run_dir, steps, *extra):
    return load_config(TINY_DIT, tiny_latent(latent_shards, vae, run_dir, steps, *SMALL, *extra))


def test_latent_dit_resumes_exactly_exports_samples_pixels_and_scores_fid(
    vae, latent_shards, tmp_path
):
    from fmgen.train import train

    full = train(latent_dit(latent_shards, vae, tmp_path / "full", 4))
    first = train(latent_dit(latent_shards, vae, tmp_path / "half", 2))
    w_mid, _ = weights(first.checkpoint)
    half = train(latent_dit(latent_shards, vae, tmp_path / "half", 4), resume="auto")
    assert half.step == 4
    (w_full, e_full), (w_res, e_res) = weights(latest(full.run_dir)), weights(latest(half.run_dir))
    assert w_full.keys() == w_res.keys() and any("transformer_blocks" in k for k in w_full)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert len(e_full) == len(e_res) and all(map(torch.equal, e_full, e_res))
    assert any(not torch.equal(w_mid[k], w_res[k]) for k in w_mid)  # the resumed half trained

    meta = json.loads((full.export_dir / "fmgen.json").read_text())
    assert meta["backbone"] == {"type": "dit", "class": "fmgen.models.dit.DiT"}
    assert meta["sample_shape"] == [4, 8, 8] and meta["resolution"] == 16
    assert meta["autoencoder"]["hash"] == folder_hash(vae) == folder_hash(full.export_dir / "autoencoder")  # fmt: skip
    loaded = load_model(full.export_dir)
    assert type(loaded.model.backbone) is DiT and loaded.model.backbone.config.in_channels == 4

    grid, out = tmp_path / "grid.png", tmp_path / "pngs"
    r = run_main("sample", "--checkpoint", full.export_dir, "--per-class", 1, "--steps", 2, "--out",
                 grid, "--out-dir", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    # pixels at the data resolution, not the 8x8 latents; the grid: a row of 16x16 cells
    # upscaled x4 per class (an 8x8 latent would be upscaled x8: 64 too, so the PNGs decide)
    assert len(pngs) == 10 and all(Image.open(p).size == (16, 16) for p in pngs)
    assert Image.open(grid).height == 10 * 64 + 9 * GRID_GAP

    record = tmp_path / "fid.json"
    assert eval_main(["--checkpoint", str(full.run_dir), "--num-samples", "130", "--steps", "2",
                      "--feature-network", "digits-classifier", "--out", str(record)]) == 0  # fmt: skip
    rec = json.loads(record.read_text())
    assert rec["autoencoder"]["kind"] == "autoencoder-kl"
    assert rec["autoencoder"]["hash"] == folder_hash(vae)
    assert rec["num_generated"] == 130 and math.isfinite(rec["fid"])


@pytest.fixture(scope="module")
def dit_export(vae, latent_shards, tmp_path_factory):
    """A latent DiT export whose weights are perturbed from the adaLN-Zero start (which
    predicts 0 everywhere), so its velocity field tells seeds, labels and steps apart."""
    run_dir = tmp_path_factory.mktemp("dit-pipe") / "run"
    cfg = latent_dit(latent_shards, vae, run_dir, 1)
    lat = read_manifest(latent_shards).latent
    stage = KLAutoencoder(vae).with_stats(lat["mean"], lat["std"])
    torch.manual_seed(0)
    model = build_model(cfg, build_conditioning(cfg, 10), stage)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = run_dir / "export"
    export_model(model, cfg, out, autoencoder=stage,
                 class_names=[f"digit {i}" for i in range(10)], step=0)  # fmt: skip
    return out


def test_pipeline_reproduces_sample_py_euler_samples_of_a_latent_dit(dit_export, vae, tmp_path):
    index = json.loads((dit_export / "model_index.json").read_text())
    assert index["backbone"] == ["fmgen.models.dit", "DiT"]
    assert index["autoencoder"] == ["diffusers", "AutoencoderKL"]
    pipe = FlowPipeline.from_pretrained(dit_export)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.backbone) is DiT and isinstance(pipe.autoencoder, AutoencoderKL)
    assert pipe._stage.hash == folder_hash(vae)
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 7, "sampler": "euler"}
    spec = pipe.sampling.replace(sampler="euler", steps=4, guidance=2.0)
    loaded = load_model(dit_export)  # what sample.py draws, decoded as sample.py decodes
    want = generate(loaded.model, loaded.path, spec, num=len(LABELS), cond=torch.tensor(LABELS),
                    seed=7, autoencoder=loaded.autoencoder)  # fmt: skip
    pt = pipe(class_labels=LABELS, output_type="pt", **kw).images
    assert pt.shape == want.shape == (4, 1, 16, 16) and pt.dtype == torch.float32
    diff = float((pt * 2 - 1 - want).abs().max())
    print(f"\npipeline vs generate: max difference {diff:.2e}")
    assert diff <= 1e-5, diff
    assert want.std() > 0.1 and not torch.allclose(want[0], want[1], atol=1e-2)  # not vacuous

    out = sample_py_euler(dit_export, tmp_path)
    images = pipe(class_labels=LABELS, **kw).images
    for i, (img, label) in enumerate(zip(images, LABELS, strict=True)):
        assert img.mode == "L" and img.size == (16, 16)
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(out / f"{i:06d}_class{label}.png")))  # fmt: skip
    # the pipeline from an fmgen-loaded model (a checkpoint's path) decodes the same way
    again = FlowPipeline.from_loaded(loaded)(class_labels=LABELS, output_type="pt", **kw).images
    assert float((again - pt).abs().max()) <= 1e-6
