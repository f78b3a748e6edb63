"""``model.type: dit``: diffusers' DiT trains, resumes exactly, exports and samples through fmgen;
fmgen's null label and seeded dropout reach it; the presets build the sizes they promise."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_main, tiny
from PIL import Image
from test_train import latest, weights

from fmgen.config import load_config
from fmgen.eval.images import GRID_GAP
from fmgen.models import ClassLabels, Unconditional, build_model, count_parameters, load_model
from fmgen.models.dit import DiT, build_dit

TINY_DIT = ROOT / "configs" / "tiny-dit.yaml"
SMALL = ["model.dit.depth=2", "model.dit.width=32", "model.dit.heads=2"]  # the tests' size


def train_dit(shards, run_dir, steps, *extra, resume=None):
    from fmgen.train import train

    cfg = load_config(TINY_DIT, tiny(shards, run_dir, steps, *SMALL, *extra))
    return train(cfg, resume=resume)


@pytest.mark.parametrize("conditional", [True, False], ids=["class-conditional", "unconditional"])
def test_dit_resumes_exactly_exports_and_sample_py_writes_a_grid(conditional, shards, tmp_path):
    extra = ["train.deterministic=true", f"model.class_conditional={str(conditional).lower()}"]
    n = 2
    full = train_dit(shards, tmp_path / "full", 2 * n, *extra)
    half = tmp_path / "half"
    first = train_dit(shards, half, n, *extra)
    w_mid, _ = weights(first.checkpoint)
    second = train_dit(shards, half, 2 * n, *extra, resume="auto")
    assert second.step == 2 * n
    (w_full, e_full), (w_res, e_res) = weights(latest(full.run_dir)), weights(latest(half))
    assert w_full.keys() == w_res.keys() and any("transformer_blocks" in k for k in w_full)
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for a, b in zip(e_full, e_res, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(w_mid[k], w_res[k]) for k in w_mid)

    meta = json.loads((second.export_dir / "fmgen.json").read_text())
    assert meta["backbone"] == {"type": "dit", "class": "fmgen.models.dit.DiT"}
    loaded = load_model(second.export_dir)
    assert type(loaded.model.backbone) is DiT and loaded.model.conditional is conditional
    grid = tmp_path / "grid.png"
    r = run_main("sample", "--checkpoint", second.export_dir, "--per-class", 2, "--steps", 2,
                 "--out", grid)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cell = 8 * (64 // 8) + GRID_GAP  # 8x8 images upscaled x8 in the grid, cells apart
    height = Image.open(grid).height + GRID_GAP
    assert height == 10 * cell if conditional else height % cell == 0 and height >= cell


@pytest.mark.parametrize("prediction", ["eps", "velocity"])
def test_dit_trains_with_dsm(prediction, shards, tmp_path):
    res = train_dit(shards, tmp_path / "dsm", 3, "loss.name=dsm",
                    f"model.prediction_type={prediction}")  # fmt: skip
    state = json.loads((res.checkpoint / "fmgen_state.json").read_text())
    assert res.step == 3 and state["nonfinite_total"] == 0  # every step's loss was finite
    assert all(torch.isfinite(p).all() for p in load_model(res.export_dir).model.parameters())


def tiny_model(conditioning, *extra):
    cfg = load_config(TINY_DIT, ["data.resolution=8", *SMALL, *extra])
    return build_model(cfg, conditioning)


def test_the_dit_starts_at_zero_and_leaves_label_dropout_to_fmgen(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(ClassLabels(10, p_drop=0.5)).train()
    x, t, y = torch.randn(6, 1, 8, 8), torch.rand(6), torch.arange(6)
    # adaLN-Zero (the DiT paper's initialisation): every block is the identity, the output 0
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = torch.get_rng_state()
    a, b = model(x, t, y), model(x, t, y)
    # in training mode diffusers' DiT would drop 10% of labels from the global RNG
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), rng)
    null = model(x, t, torch.full((6,), 10))  # the null label: the DiT's extra "dropped" row
    assert torch.equal(model(x, t), null) and not torch.equal(a, null)
    table = model.backbone.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11
    model.backbone.save_pretrained(tmp_path / "b", safe_serialization=True)
    again = DiT.from_pretrained(tmp_path / "b", use_safetensors=True).train()
    for p, q in zip(model.backbone.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(model.spec.call(again, x, t, y), a)  # reloaded: still no own dropout


def test_unconditional_dit_uses_one_constant_class_and_keeps_the_input_channels():
    torch.manual_seed(0)
    model = tiny_model(Unconditional(), "data.channels=3", "model.dit.patch_size=4")
    emb = model.backbone.transformer_blocks[0].norm1.emb.class_embedder
    assert model.backbone.config.num_embeds_ada_norm == 1 and emb.num_classes == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    out = model(x, t)  # no learned sigma: C channels out, not 2C
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, model.backbone(x, 1000 * t, class_labels=torch.zeros(2).long()).sample)


def test_imagenet_preset_is_sit_b2_sized_on_latents():
    """SiT-B/2 on 32x32x4 latents: 256 tokens of width 768; diffusers' per-block time and label
    embedders add 11 x 1.56M to SiT's 130M."""
    from fmgen.models import check_model_config

    cfg = load_config(ROOT / "configs" / "imagenet256-latent.yaml")
    assert cfg.model.autoencoder  # a latent preset: it names a VAE folder (a placeholder here)
    cfg = load_config(ROOT / "configs" / "imagenet256-latent.yaml", ["model.autoencoder="])
    check_model_config(cfg)
    assert cfg.train.batch_size == 256 and cfg.train.mixed_precision == "bf16"
    with torch.device("meta"):
        dit = build_dit(cfg, (4, 32, 32), ClassLabels(1000))
    assert dit.pos_embed.height * dit.pos_embed.width == 256 and dit.inner_dim == 768
    assert len(dit.transformer_blocks) == 12 and dit.config.num_attention_heads == 12
    assert 130e6 < count_parameters(dit) < 150e6


def test_checkpoints_written_before_model_dit_existed_still_resume(tmp_path):
    from fmgen.config import to_dict
    from fmgen.models import CheckpointError
    from fmgen.train.checkpoint import check_resumable

    cfg = load_config(ROOT / "configs" / "digits.yaml")
    saved = to_dict(cfg)
    del saved["model"]["dit"]  # a U-Net run's checkpoint from before model.type: dit
    check_resumable(cfg, saved, tmp_path)
    cfg.model.dit.depth = 2
    with pytest.raises(CheckpointError, match="model settings differ"):
        check_resumable(cfg, saved, tmp_path)
