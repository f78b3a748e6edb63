"""MeanFlow in the model, training and sampling layers: backbones with a second time input
(U-Net and DiT, class, text and unconditional), forward-mode AD through them, the loss in the
training loop (exact resume, DDP, bf16, the compile check), exports, sample.py, FlowPipeline.

The math (the identity, the target, the sampler on the oracle) is tests/test_meanflow_math.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    BATCH,
    DIGITS,
    ROOT,
    TINY,
    free_port,
    run_main,
    subprocess_env,
    tiny,
    train_tiny,
)
from test_train import assert_ranks_agree, latest, weights

from fmgen.config import ConfigError, load_config, make_path, sampling_spec
from fmgen.core import SamplingSpec
from fmgen.eval import generate
from fmgen.eval.generate import SampleError
from fmgen.models import (
    IdentityAutoencoder,
    build_conditioning,
    build_model,
    export_model,
    load_model,
)
from fmgen.models.average import forward_ad_ready
from fmgen.models.interval import IntervalEmbedding

MEANFLOW = ["loss.name=meanflow"]
SMALL_DIT = ["model.type=dit", "model.dit.depth=2", "model.dit.width=32", "model.dit.heads=2"]
TEXT = ["model.text_encoder=learned", "data.caption_key=txt", "text.max_length=12"]
KINDS = {
    "unet-class": [],
    "unet-unconditional": ["model.class_conditional=false"],
    "unet-text": TEXT,
    "dit-class": SMALL_DIT,
    "dit-unconditional": [*SMALL_DIT, "model.class_conditional=false"],
    "dit-text": [*SMALL_DIT, *TEXT],
}
SPECS = {"unet-class": "unet-meanflow", "unet-unconditional": "unet-meanflow",
         "unet-text": "unet-text-meanflow", "dit-class": "dit-meanflow",
         "dit-unconditional": "dit-meanflow", "dit-text": "dit-text-meanflow"}  # fmt: skip


def build(kind: str, tmp_path, seed: int = 0):
    cfg = load_config(DIGITS, [*TINY, *MEANFLOW, f"train.run_dir={tmp_path}", *KINDS[kind]])
    torch.manual_seed(seed)
    return cfg, build_model(cfg, build_conditioning(cfg, 10)).eval()


def conditions(model, n: int):
    if model.reads_text:
        return model.encode_prompts(["two", "seven", "", "one"][:n])
    return torch.arange(n) % 10 if model.conditional else None


def wake(model, seed: int = 5) -> None:
    """Random values for the parameters that start at zero (DiT's adaLN-Zero and output layer,
    PixArt's cross-attention outputs), the interval embeddings' apart: a zero output would
    hide whether the interval reaches it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".interval." not in name and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def randomize_intervals(model, seed: int = 3) -> None:
    """Give the zero-initialised interval embeddings' output layers random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IntervalEmbedding):
                for p in m.mlp.linear_2.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_average_backbones_read_the_interval_start_at_r_eq_t_and_export(kind, tmp_path):
    cfg, model = build(kind, tmp_path)
    assert model.average and model.spec.name == SPECS[kind]
    wake(model)
    n = 4
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, *model.sample_shape, generator=g), torch.rand(n, generator=g) * 0.5
    r = t + 0.4
    c = conditions(model, n)
    with torch.no_grad():
        at_t = model(x, t, c)
        # the interval embeddings start at zero: an untrained model's u does not depend on r
        assert torch.equal(model(x, t, c, r=t), at_t) and torch.equal(model(x, t, c, r=r), at_t)
        randomize_intervals(model)
        moved, same = model(x, t, c, r=r), model(x, t, c, r=t)
        assert torch.equal(model(x, t, c), same)  # r defaults to t
    assert (moved - same).abs().max() > 1e-3 * same.abs().max()
    export_model(model, cfg, tmp_path / "export", autoencoder=IdentityAutoencoder(),
                 class_names=[str(i) for i in range(10)], step=0)  # fmt: skip
    loaded = load_model(tmp_path / "export").model
    assert loaded.average and loaded.spec.name == SPECS[kind]
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c, r=r), moved)


@pytest.mark.parametrize("kind", ["unet-class", "dit-text"])
def test_forward_ad_through_the_backbones_matches_finite_differences(kind, tmp_path):
    """d/dt u(x + t v, t, r) by torch.func.jvp (attention blocks and group norms included) equals
    a central difference, Richardson-extrapolated (error O(h^4)). The backbones compute their
    sinusoidal time features in float32 (diffusers' get_timestep_embedding), so the times and
    steps are dyadic: 1000 t and 1000 (t +- h) are exact in float32, and what is left is the
    float32 rounding of the features' arguments, ~1e-4 relative. A tangent that leaves out the
    time (not the total derivative) is off by more than 10%."""
    over = ["model.unet.attention_levels=[1]"] if kind.startswith("unet") else []
    cfg = load_config(DIGITS, [*TINY, *MEANFLOW, f"train.run_dir={tmp_path}", *KINDS[kind], *over])
    torch.manual_seed(0)
    model = build_model(cfg, build_conditioning(cfg, 10)).eval().double()
    wake(model)
    randomize_intervals(model)
    n = 3
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, *model.sample_shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.25, 0.5, 0.625], dtype=torch.float64)
    r = t + 0.25
    c = conditions(model, n)

    def u(xs, ts, rs):
        with forward_ad_ready(model):
            return model(xs, ts, c, r=rs)

    def central(h: float) -> torch.Tensor:
        return (model(x + h * v, t + h, c, r=r) - model(x - h * v, t - h, c, r=r)) / (2 * h)

    with torch.no_grad():
        _, dudt = torch.func.jvp(u, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        _, x_only = torch.func.jvp(u, (x, t, r), (v, torch.zeros_like(t), torch.zeros_like(r)))
        fd = (4 * central(2.0**-13) - central(2.0**-12)) / 3
    scale = fd.abs().max()
    assert (dudt - fd).abs().max() < 1e-3 * scale
    assert (x_only - fd).abs().max() > 0.1 * scale


def test_a_velocity_model_refuses_r_and_the_meanflow_sampler(tmp_path):
    cfg = load_config(DIGITS, [*TINY, f"train.run_dir={tmp_path}"])
    model = build_model(cfg, build_conditioning(cfg, 10))
    assert not model.average
    x, t = torch.randn(2, *model.sample_shape), torch.rand(2)
    with pytest.raises(ValueError, match="only models trained with loss.name=meanflow"):
        model(x, t, torch.arange(2), r=t)
    with pytest.raises(SampleError, match="sampler 'meanflow' steps with the average velocity"):
        generate(model, make_path(cfg), SamplingSpec("meanflow", 1), num=2, cond=torch.arange(2))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.prediction_type=eps"], "set model.prediction_type=velocity"),
        (["loss.reweight=edm"], "loss.reweight='edm' does not combine with loss.name=meanflow"),
        (["loss.uncertainty=true"], "loss.uncertainty=True does not combine"),
        (["loss.meanflow_equal_share=1.5"], "loss.meanflow_equal_share: must lie in"),
        (["loss.meanflow_guidance=0"], "loss.meanflow_guidance must be > 0"),
    ],
)
def test_bad_meanflow_options_are_one_line_errors(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS, [*TINY, *MEANFLOW, f"train.run_dir={tmp_path}", *extra])


def test_a_bad_meanflow_option_exits_2_with_one_line(tmp_path):
    r = run_main("train", "--config", DIGITS, *TINY, *MEANFLOW, f"train.run_dir={tmp_path}",
                 "model.prediction_type=eps", "--dry-run")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "set model.prediction_type=velocity" in r.stderr


def test_folded_guidance_needs_a_conditional_model(shards, tmp_path):
    with pytest.raises(ConfigError, match="this model is unconditional"):
        train_tiny(shards, tmp_path / "u", 1, *MEANFLOW, "model.class_conditional=false",
                   "loss.meanflow_guidance=2")  # fmt: skip


GUIDED = [*MEANFLOW, "loss.meanflow_guidance=2", "loss.meanflow_kappa=0.2",
          "loss.meanflow_equal_share=0.5", "train.deterministic=true",
          "sample.sampler=meanflow", "sample.steps=2", "sample.guidance=1"]  # fmt: skip
BF16 = "train.mixed_precision=bf16"


@pytest.mark.slow
def test_meanflow_trains_resumes_exactly_exports_and_samples_in_one_and_two_steps(shards, tmp_path):
    """In bf16: the graded forward under autocast, the target's jvp in float32 beside it."""
    full = train_tiny(shards, tmp_path / "full", 4, *GUIDED, BF16)
    half = tmp_path / "half"
    train_tiny(shards, half, 2, *GUIDED, BF16)
    second = train_tiny(shards, half, 4, *GUIDED, BF16, resume="auto")
    (w_full, e_full), (w_res, e_res) = weights(latest(full.run_dir)), weights(latest(half))
    assert any("interval" in k for k in w_full)
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for a, b in zip(e_full, e_res, strict=True):
        assert torch.equal(a, b)
    # the interval embeddings trained (they start at zero)
    assert max(w_full[k].abs().max().item() for k in w_full if "interval.mlp.linear_2" in k) > 0
    loaded = load_model(second.export_dir)
    assert loaded.model.average
    spec = sampling_spec(loaded.config)
    assert spec.sampler == "meanflow" and spec.nfe == 2
    labels = torch.arange(4)
    for steps in (1, 2):
        one = generate(loaded.model, loaded.path, spec.replace(steps=steps), num=4, cond=labels, seed=3)
        split = torch.cat([generate(loaded.model, loaded.path, spec.replace(steps=steps), num=2,
                                    cond=labels[i : i + 2], seed=3, start=i) for i in (0, 2)])  # fmt: skip
        assert one.shape == (4, 1, 8, 8) and torch.isfinite(one).all()
        assert torch.allclose(one, split, atol=1e-5)  # the noise of sample i is (seed, i)'s
    # sample.py and FlowPipeline at 1 and 2 NFE
    for steps in ("1", "2"):
        out = tmp_path / f"s{steps}"
        r = run_main("sample", "--checkpoint", second.export_dir, "--sampler", "meanflow",
                     "--steps", steps, "--per-class", "1", "--out", out / "grid.png")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (out / "grid.png").is_file()
    from fmgen.pipeline import FlowPipeline

    pipe = FlowPipeline.from_pretrained(second.export_dir)
    images = pipe(class_labels=[0, 1], sampler="meanflow", num_inference_steps=1, seed=3,
                  output_type="pt").images  # fmt: skip
    direct = generate(loaded.model, loaded.path, spec.replace(steps=1), num=2, cond=labels[:2], seed=3)
    assert torch.allclose(images, (direct + 1) / 2, atol=1e-6)


def env() -> dict[str, str]:
    return {**subprocess_env(), "ACCELERATE_USE_CPU": "true"}


@pytest.mark.slow
def test_two_ranks_match_one_rank(shards, tmp_path):
    """MeanFlow's jvp runs on the unwrapped model beside DDP's forward: 2 gloo ranks train what 1
    rank trains (tolerance as in test_train.test_two_ranks_match_one_rank)."""
    common = [*tiny(shards, tmp_path / "x", 4), *GUIDED, "data.in_memory=true", "optim.eps=1e-4",
              "train.deterministic=false"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]  # fmt: skip
    for name, launcher in {"one": [sys.executable], "two": torchrun}.items():
        r = subprocess.run([*launcher, str(ROOT / "train.py"), "--config", str(DIGITS), *common,
                            f"train.run_dir={tmp_path / name}"],
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    assert_ranks_agree(tmp_path / "one", tmp_path / "two")


def test_the_compile_check_covers_the_meanflow_loss(shards, tmp_path, monkeypatch, caplog):
    import logging

    from test_precision import BackwardHalved

    import fmgen.train.loop as tr

    monkeypatch.setattr(tr.torch, "compile", BackwardHalved)
    with pytest.raises(tr.TrainingError, match=r"gradients 50\.0% away from eager"):
        train_tiny(shards, tmp_path / "bad", 1, *GUIDED, "train.compile=true")
    monkeypatch.setattr(tr.torch, "compile", lambda net: net)  # a faithful "compiler"
    with caplog.at_level(logging.INFO, logger="fmgen.train"):
        train_tiny(shards, tmp_path / "ok", 1, *GUIDED, "train.compile=true")
    assert any("torch.compile gradients match" in r.getMessage() for r in caplog.records)


def test_the_training_noise_draws_intervals_with_the_configured_share(tmp_path):
    from fmgen.models import ClassLabels
    from fmgen.train.loop import draw_noise

    cfg = load_config(DIGITS, [*TINY, *MEANFLOW, f"train.run_dir={tmp_path}"])
    gen = torch.Generator().manual_seed(0)
    t, eps, drop, r = draw_noise(gen, cfg, ClassLabels(10, 0.1), 4000, (1, 8, 8), torch.device("cpu"))
    assert r is not None and (r >= t).all() and eps.shape == (4000, 1, 8, 8)
    share = (r == t).float().mean().item()
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5
    cfm = load_config(DIGITS, [*TINY, f"train.run_dir={tmp_path}"])
    assert draw_noise(torch.Generator().manual_seed(0), cfm, ClassLabels(10, 0.1), 8, (1, 8, 8),
                      torch.device("cpu"))[3] is None  # fmt: skip


def test_nfe_of_meanflow_sampling_is_its_steps():
    for steps in (1, 2, 4):
        assert SamplingSpec("meanflow", steps).nfe == steps
        assert SamplingSpec("meanflow", steps, final_step="solver").nfe == steps
    assert json.loads(json.dumps(SamplingSpec("meanflow", 2).to_dict()))["nfe"] == 2
    assert BATCH == 16  # the tiny runs above count on it


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from fmgen.data import prepare

    out = tmp_path_factory.mktemp("digits8-text")
    prepare("digits", out, resolution=8, channels=1, caption_templates="digits")
    return out


@pytest.mark.parametrize("kind", ["unet-text", "dit-unconditional"])
def test_text_and_unconditional_models_train_with_meanflow(kind, shards, captioned, tmp_path):
    """Text guidance folded into the target (the null caption's rows), and an unconditional DiT;
    two steps each, then 1-NFE samples from the export."""
    data = captioned if "text" in kind else shards
    guided = ["loss.meanflow_guidance=2", "data.caption_templates=digits"] if "text" in kind else []
    res = train_tiny(data, tmp_path / kind, 2, *MEANFLOW, *KINDS[kind], *guided,
                     "loss.meanflow_equal_share=0.5", "sample.sampler=meanflow", "sample.steps=1",
                     "sample.guidance=1")  # fmt: skip
    loaded = load_model(res.export_dir)
    assert loaded.model.average and loaded.model.spec.name == SPECS[kind]
    cond = conditions(loaded.model, 2)
    images = generate(loaded.model, loaded.path, sampling_spec(loaded.config), num=2, cond=cond, seed=0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_the_training_noise_uses_loss_mode_scale(tmp_path):
    """loss.mode_scale reaches the training times (it did not before 2026-12-06): SD3's mode
    sampling at scale 0 is uniform, draw for draw, and at 1.29 it is not."""
    from fmgen.models import ClassLabels
    from fmgen.train.loop import draw_noise

    def times(*over: str) -> torch.Tensor:
        cfg = load_config(DIGITS, [*TINY, f"train.run_dir={tmp_path}", *over])
        gen = torch.Generator().manual_seed(0)
        return draw_noise(gen, cfg, ClassLabels(10, 0.1), 64, (1, 8, 8), torch.device("cpu"))[0]

    uniform = times("loss.time_sampling=uniform")
    assert torch.equal(times("loss.time_sampling=mode", "loss.mode_scale=0"), uniform)
    assert not torch.allclose(times("loss.time_sampling=mode", "loss.mode_scale=1.29"), uniform)
