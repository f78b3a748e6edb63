"""Which diffusers transformer reads text for ``model.type: dit``: PixArt's or SD3's (MMDiT).

At equal width, depth, heads, patch and token count this prints, for each: parameters, the
training step time (forward + backward) per image on this machine, and how much the output of one
prompt changes when its padding to ``max_length`` changes (what a mask removes). fmgen's
``dit-text`` is the PixArt one (``fmgen.models.text_backbones``); run this to see why:

    python bench/text_backbones.py [--width 128 --depth 4 --tokens 32 --batch 32 --size 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import SD3Transformer2DModel

from fmgen.models.text_backbones import TextDiT


def build(kind: str, a: argparse.Namespace) -> torch.nn.Module:
    heads, head_dim = a.heads, a.width // a.heads
    if kind == "pixart":
        return TextDiT(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                       out_channels=4, num_layers=a.depth, cross_attention_dim=a.width,
                       caption_channels=a.text_dim, sample_size=a.size, patch_size=2,
                       norm_type="ada_norm_single", use_additional_conditions=False,
                       pooled_channels=a.text_dim)  # fmt: skip
    return SD3Transformer2DModel(sample_size=a.size, patch_size=2, in_channels=4, num_layers=a.depth,
                                 attention_head_dim=head_dim, num_attention_heads=heads,
                                 joint_attention_dim=a.text_dim, caption_projection_dim=a.width,
                                 pooled_projection_dim=a.text_dim, out_channels=4,
                                 pos_embed_max_size=a.size)  # fmt: skip


def call(kind: str, net, x, t, tokens, mask, pooled):
    if kind == "pixart":
        return net(x, encoder_hidden_states=tokens, timestep=t, added_cond_kwargs={"pooled": pooled},
                   encoder_attention_mask=mask).sample  # fmt: skip
    return net(x, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t).sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 4, a.size, a.size, generator=g)
    t = torch.rand(a.batch, generator=g) * 1000
    tokens = torch.randn(a.batch, a.tokens, a.text_dim, generator=g)
    mask = torch.arange(a.tokens) < torch.randint(2, a.tokens, (a.batch, 1), generator=g)
    pooled = torch.randn(a.batch, a.text_dim, generator=g)
    rows = {}
    for kind in ("pixart", "sd3"):
        torch.manual_seed(0)
        net = build(kind, a)
        for prm in net.parameters():  # zero-initialised outputs would hide the text's effect
            prm.data.add_(torch.randn_like(prm) * 0.02)
        call(kind, net, x, t, tokens, mask, pooled).square().mean().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            net.zero_grad(set_to_none=True)
            call(kind, net, x, t, tokens, mask, pooled).square().mean().backward()
        step = (time.perf_counter() - t0) / a.steps
        with torch.no_grad():  # one prompt of 3 real tokens, padded to L or to L // 2 tokens
            one = tokens[:1].clone()
            one[:, 3:] = 0.0  # padding embeddings (what an encoder gives for pad tokens varies)
            m = torch.arange(a.tokens) < 3
            full = call(kind, net, x[:1], t[:1], one, m[None], pooled[:1])
            half = call(kind, net, x[:1], t[:1], one[:, : a.tokens // 2], m[None, : a.tokens // 2],
                        pooled[:1])  # fmt: skip
        rows[kind] = {
            "parameters_M": round(sum(q.numel() for q in net.parameters()) / 1e6, 3),
            "train_ms_per_image": round(1000 * step / a.batch, 3),
            "padding_changes_output_by": float((full - half).abs().max()),
        }
    print(json.dumps({"settings": vars(a), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
