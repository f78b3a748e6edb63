"""Text-to-image end to end: tiny frozen CLIP and T5 encoders and the learned one train on
captioned digits, resume exactly, export, and sample from prompts through sample.py and
FlowPipeline with equal images; precomputed embeddings train the model that on-the-fly encoding
trains; bad input is one line with exit 2."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import DIGITS, run_main, tiny
from PIL import Image
from safetensors.torch import load_file
from test_clip_score import clip_folder  # noqa: F401  (a fixture: the tiny CLIP folder)
from text_fixtures import save_tiny_encoder

from fmgen.config import load_config
from fmgen.pipeline import FlowPipeline
from fmgen.train import train

PROMPTS = ["a handwritten three", "the digit 7, written by hand"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Digits at 8x8 with a caption per image (the digits template set)."""
    from fmgen.data import prepare

    out = tmp_path_factory.mktemp("digits8-text")
    prepare("digits", out, resolution=8, channels=1, caption_templates="digits")
    return out


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {k: save_tiny_encoder(root / k, k) for k in ("clip", "t5")}


def text_run(data, run_dir, steps, encoder, *extra, resume=None):
    cfg = load_config(DIGITS, tiny(data, run_dir, steps, f"model.text_encoder={encoder}",
                                   "data.caption_key=txt", "data.caption_templates=digits",
                                   "text.max_length=12", "train.deterministic=true",
                                   f"sample.prompts={PROMPTS}", *extra))  # fmt: skip
    return train(cfg, resume=resume)


def weights(ckpt):
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_frozen_text_model_trains_resumes_exactly_exports_and_samples_from_prompts(
    kind, captioned, encoders, tmp_path
):
    enc = encoders[kind]
    extra = ["text.precomputed=false"]  # encoded on the fly: no prepare --text-encoder needed
    full = text_run(captioned, tmp_path / "full", 4, enc, *extra)
    first = text_run(captioned, tmp_path / "half", 2, enc, *extra)
    second = text_run(captioned, tmp_path / "half", 4, enc, *extra, resume="auto")
    assert second.step == 4
    (w_full, e_full), (w_res, e_res) = weights(full.checkpoint), weights(second.checkpoint)
    assert w_full.keys() == w_res.keys() and not any("text" in k for k in w_full)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert all(torch.equal(e_full[k], e_res[k]) for k in e_full)
    assert any(not torch.equal(weights(first.checkpoint)[0][k], w_res[k]) for k in w_res)

    # sample.py from prompts: one grid row per prompt, and the sample files
    out = tmp_path / "samples"
    r = run_main("sample", "--checkpoint", second.export_dir, "--prompt", PROMPTS[0], "--prompt",
                 PROMPTS[1], "--num-per-prompt", 2, "--steps", 3, "--seed", 5, "--out-dir", out,
                 "--out", tmp_path / "grid.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    cli = np.stack([np.asarray(Image.open(f)) for f in files])
    pipe = FlowPipeline.from_pretrained(second.export_dir)
    images = pipe(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=3, seed=5).images
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), cli)
    other = pipe(prompt=PROMPTS[::-1], num_images_per_prompt=2, num_inference_steps=3, seed=5)
    assert not np.array_equal(np.stack([np.asarray(im) for im in other.images]), cli)


@pytest.mark.slow
def test_learned_text_model_resumes_exactly_and_the_pipeline_matches_sample_py(captioned,
                                                                            tmp_path):  # fmt: skip
    full = text_run(captioned, tmp_path / "full", 4, "learned")
    text_run(captioned, tmp_path / "half", 2, "learned")
    second = text_run(captioned, tmp_path / "half", 4, "learned", resume="auto")
    (w_full, _), (w_res, _) = weights(full.checkpoint), weights(second.checkpoint)
    assert any(k.startswith("text_encoder.") for k in w_full)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    out = tmp_path / "samples"
    r = run_main("sample", "--checkpoint", second.export_dir, "--prompt", PROMPTS[1],
                 "--num-per-prompt", 3, "--steps", 3, "--out-dir", out, "--negative-prompt",
                 "a handwritten one")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cli = np.stack([np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))])
    pipe = FlowPipeline.from_pretrained(second.export_dir)
    images = pipe(prompt=PROMPTS[1], num_images_per_prompt=3, num_inference_steps=3, seed=0,
                  negative_prompt="a handwritten one").images  # fmt: skip
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), cli)


def _losses(caplog) -> list[float]:
    return [float(m.group(1)) for r in caplog.records
            if (m := re.search(r"^step \d+/\d+ images \d+ loss ([0-9.]+)", r.getMessage()))]  # fmt: skip


@pytest.fixture(scope="module")
def clip_shards(captioned, encoders, tmp_path_factory):
    """The captioned digits with the tiny CLIP's embeddings precomputed (prepare --text-encoder)."""
    from fmgen.cli.prepare import main as prepare_main

    data = tmp_path_factory.mktemp("digits8-text-clip")
    rc = prepare_main(["--source", "shards", "--data-path", str(captioned), "--out", str(data),
                       "--text-encoder", str(encoders["clip"]), "--caption-key", "txt",
                       "--text-max-length", "12"])  # fmt: skip
    assert rc == 0
    return data


@pytest.mark.slow
def test_precomputed_embeddings_train_the_model_on_the_fly_encoding_trains(clip_shards, encoders,
                                                                          tmp_path, caplog):  # fmt: skip
    enc, data = encoders["clip"], clip_shards
    caplog.set_level("INFO", logger="fmgen.train")
    text_run(data, tmp_path / "pre", 6, enc, "data.source=shards", "data.caption_templates=")
    pre = _losses(caplog)
    caplog.clear()
    text_run(data, tmp_path / "fly", 6, enc, "data.source=shards", "data.caption_templates=",
             "text.precomputed=false")  # fmt: skip
    fly = _losses(caplog)
    assert len(pre) == len(fly) == 6
    # the rows agree to float16 rounding (the encoder sees batches of another size there)
    assert np.allclose(pre, fly, rtol=2e-3, atol=0), (pre, fly)


def train_py(*args):
    """train.py --config configs/digits.yaml ARGS, in this process (conftest.run_main)."""
    return run_main("train", "--config", DIGITS, *args)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_shards_of_another_encoder_are_refused(clip_shards, encoders, tmp_path):
    common = [f"data.path={clip_shards}", "data.source=shards", "data.caption_key=txt",
              "text.max_length=12", f"train.run_dir={tmp_path / 'run'}", "logging.wandb=false",
              "data.resolution=8", "model.unet.block_out_channels=[8,16]", "eval.report="]  # fmt: skip
    msg = one_line_error(train_py(*common, f"model.text_encoder={encoders['t5']}"))
    assert "--text-encoder" in msg and "text.precomputed=false" in msg
    msg = one_line_error(train_py(*common, f"model.text_encoder={encoders['clip']}",
                                  "text.max_length=16"))  # fmt: skip
    assert "max_length" in msg
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_bad_text_inputs_are_one_line_errors(captioned, encoders, tmp_path, tiny_run):
    msg = one_line_error(train_py("--dry-run", f"model.text_encoder={tmp_path / 'nothing'}",
                                  "data.caption_key=txt"))  # fmt: skip
    assert "no such folder" in msg and "model.text_encoder" in msg
    # a prompt for a class model
    class_model = ["--checkpoint", tiny_run.export_dir]
    msg = one_line_error(run_main("sample", *class_model, "--prompt", "a seven"))
    assert "--prompt" in msg and "without text" in msg
    msg = one_line_error(run_main("sample", *class_model, "--num-per-prompt", 2))
    assert "--num-per-prompt" in msg and "without text" in msg
    # labels for a text model, and an over-long prompt (a warning naming text.max_length)
    run = text_run(captioned, tmp_path / "t", 1, "learned")
    msg = one_line_error(run_main("sample", "--checkpoint", run.export_dir, "--labels", "3,7"))
    assert "reads text" in msg and "--prompt" in msg
    r = run_main("sample", "--checkpoint", run.export_dir, "--prompt", "x" * 40,
                 "--num-per-prompt", 1, "--steps", 1, "--out", tmp_path / "g.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "text.max_length=12" in r.stderr


@pytest.mark.slow
def test_evaluate_scores_prompted_samples_with_fid_and_clip_score(captioned, clip_folder,  # noqa: F811
                                                                 tmp_path):  # fmt: skip
    import json

    from fmgen.eval.clip_score import load_clip

    run = text_run(captioned, tmp_path / "run", 2, "learned")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# digits\na handwritten three\n\nthe number 7\n")
    out = tmp_path / "fid.json"
    r = run_main("evaluate", "--checkpoint", run.run_dir, "--feature-network", "digits-classifier",
                 "--num-samples", 130, "--steps", 2, "--prompts-file", prompts, "--clip",
                 clip_folder, "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["conditions"] == "prompts (sample i: prompt i mod 2)"
    clip = record["clip_score"]
    assert clip["num_samples"] == 130 and clip["num_prompts"] == 2
    assert clip["images_sha256"] == record["images_sha256"]  # CLIP scored the FID's images
    assert clip["clip_folder_hash"] == load_clip(clip_folder).folder_hash
    assert 0.0 <= clip["clip_score"] <= 100.0 and record["fid"] > 0
    assert f"CLIP score {clip['clip_score']:.4f}" in r.stdout
    # without prompts a CLIP score means nothing: refused in one line
    r = run_main("evaluate", "--checkpoint", run.run_dir, "--num-samples", 130, "--clip",
                 clip_folder)  # fmt: skip
    assert "--prompts-file" in one_line_error(r)


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "path", "loss", "prediction"),
                         [("unet", "vp-cosine", "dsm", "eps"), ("dit", "linear", "cfm", "x0")])  # fmt: skip
def test_text_models_train_in_latent_space_with_any_path_loss_and_prediction(
    backbone, path, loss, prediction, vae, tmp_path
):
    """Latent shards of the captioned digits keep their captions; a text model trains on them
    (any backbone, path, loss and prediction type), exports with both stages, samples."""
    from conftest import tiny_latent

    from fmgen.data.latents import prepare_latents
    from fmgen.models import load_model

    data = tmp_path / "latent-text"
    prepare_latents("digits", data, autoencoder=vae, resolution=16, channels=1,
                    caption_templates="digits", caption_key="txt", samples_per_shard=500,
                    batch_size=200, progress=False)  # fmt: skip
    cfg = load_config(DIGITS, [*tiny_latent(data, vae, tmp_path / "run", 3),
                               "model.text_encoder=learned", "data.caption_key=txt",
                               f"model.type={backbone}", "model.dit.depth=2", "model.dit.width=32",
                               "model.dit.heads=2", f"path.name={path}", f"loss.name={loss}",
                               f"model.prediction_type={prediction}", f"sample.prompts={PROMPTS}"])  # fmt: skip
    result = train(cfg)
    loaded = load_model(result.export_dir)
    assert loaded.model.reads_text and loaded.autoencoder.kind != "identity"
    out = tmp_path / "grid.png"
    r = run_main("sample", "--checkpoint", result.export_dir, "--prompt", PROMPTS[0],
                 "--num-per-prompt", 2, "--steps", 2, "--out", out, "--sampler",
                 "dpm++2m")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[1] > 16  # one row of decoded 16x16 pixels, upscaled
