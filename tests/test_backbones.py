"""The backbone seam: a stand-in backbone registered by this test alone trains, checkpoints,
resumes, exports, reloads and samples through fmgen's registry, with no edits to fmgen."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tiny
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F

from fmgen.core import SamplingSpec
from fmgen.eval import generate
from fmgen.models import BACKBONES, BackboneSpec, ConditionError, FlowModel, load_model


class TinyConv(ModelMixin, ConfigMixin):
    """Three 3x3 convolutions; t enters as an extra input channel, the label as a bias."""

    @register_to_config
    def __init__(self, channels: int = 1, width: int = 16, num_embeddings: int | None = None):
        super().__init__()
        self.inp = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.emb = nn.Embedding(num_embeddings, width) if num_embeddings else None
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        z = self.inp(torch.cat([x, t.to(x.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)], 1))
        if self.emb is not None:
            z = z + self.emb(c)[:, :, None, None]  # (B, width, 1, 1)
        return self.out(F.silu(self.mid(F.silu(z))))


def build_tiny(cfg, shape, conditioning) -> TinyConv:
    return TinyConv(channels=shape[0], width=16, num_embeddings=conditioning.num_embeddings)


@pytest.fixture
def tiny_backbone(monkeypatch):
    spec = BackboneSpec("tinyconv", TinyConv, build=build_tiny)
    monkeypatch.setitem(BACKBONES, "tinyconv", spec)  # the registry entry, removed afterwards
    return spec


def test_a_registered_backbone_trains_resumes_exports_reloads_and_samples(
    tiny_backbone, shards, tmp_path
):
    run = tmp_path / "run"
    first = train_tiny(shards, run, 3, "model.type=tinyconv")
    assert first.step == 3 and first.grid.is_file()
    resumed = train_tiny(shards, run, 5, "model.type=tinyconv", resume="auto")
    assert resumed.step == 5

    meta = json.loads((resumed.export_dir / "fmgen.json").read_text())
    assert meta["backbone"] == {"type": "tinyconv", "class": f"{__name__}.TinyConv"}
    assert meta["step"] == 5
    exported = load_model(resumed.export_dir)
    from_ckpt = load_model(resumed.checkpoint, weights="ema")
    for loaded in (exported, from_ckpt):
        assert isinstance(loaded.model, FlowModel) and type(loaded.model.backbone) is TinyConv
        assert loaded.model.sample_shape == (1, 8, 8) and loaded.model.num_classes == 10
        assert not any(type(m).__name__ == "UNet2DModel" for m in loaded.model.modules())
    for a, b in zip(exported.model.parameters(), from_ckpt.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the export holds the checkpoint's EMA weights
    raw = load_model(resumed.checkpoint, weights="raw")
    assert any(not torch.equal(a, b) for a, b in
               zip(raw.model.parameters(), from_ckpt.model.parameters(), strict=True))  # fmt: skip

    spec = SamplingSpec("heun", steps=3, guidance=2.0)
    labels = torch.arange(10)
    x = generate(exported.model, exported.path, spec, num=10, cond=labels, seed=1)
    y = generate(from_ckpt.model, from_ckpt.path, spec, num=10, cond=labels, seed=1)
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all() and torch.equal(x, y)
    # the conditioning seam reaches the stand-in: labels change its samples
    z = generate(exported.model, exported.path, spec, num=10, cond=labels.flip(0), seed=1)
    assert not torch.equal(x, z)


def test_an_unconditional_stand_in_takes_no_labels(tiny_backbone, shards, tmp_path):
    res = train_tiny(
        shards, tmp_path / "u", 2, "model.type=tinyconv", "model.class_conditional=false"
    )
    loaded = load_model(res.export_dir)
    assert loaded.model.backbone.emb is None and not loaded.model.conditional
    x = generate(loaded.model, loaded.path, SamplingSpec(steps=2), num=4, seed=0)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ConditionError, match="unconditional"):
        loaded.model(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 2]))


def test_an_unregistered_backbone_is_a_clear_error(shards, tmp_path):
    from fmgen.config import ConfigError

    with pytest.raises(ConfigError, match="model.type: 'tinyconv' is not a registered backbone"):
        train_tiny(shards, tmp_path / "x", 1, "model.type=tinyconv")
