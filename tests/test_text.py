"""Text conditioning at the model level: tokens and masks, the packed rows of frozen encoders, the
null caption, backbones that honour the mask, frozen encoders outside the parameters, exports."""

from __future__ import annotations

import pytest
import torch
from conftest import DIGITS, TINY
from text_fixtures import save_tiny_encoder

from fmgen.config import ConfigError, load_config, make_path, sampling_spec
from fmgen.eval.generate import generate
from fmgen.models import (
    IdentityAutoencoder,
    TextConditioning,
    build_conditioning,
    build_model,
    export_model,
    load_model,
)
from fmgen.models.text import (
    BOS,
    EOS,
    PAD,
    LearnedTextEncoder,
    TextEncoderError,
    byte_tokens,
    folder_hash,
)

KINDS = ["clip", "clip-projection", "t5", "bert"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {k: save_tiny_encoder(root / k, k) for k in KINDS}


def text_cfg(encoder: str, *extra: str):
    return load_config(DIGITS, [*TINY, f"model.text_encoder={encoder}", "data.caption_key=txt",
                                "text.max_length=12", *extra])  # fmt: skip


def test_byte_tokens_frame_every_prompt_and_cut_long_ones_keeping_eos():
    tok = byte_tokens(["ab", "", "abcdefgh"], 6)
    assert tok.ids.tolist() == [
        [BOS, ord("a") + 3, ord("b") + 3, EOS, PAD, PAD],
        [BOS, EOS, PAD, PAD, PAD, PAD],  # the empty caption still has real tokens
        [BOS, *(c + 3 for c in b"abcd"), EOS],
    ]
    assert tok.truncated == [2]
    assert tok.mask.tolist()[1] == [True, True, False, False, False, False]


def test_learned_encoder_ignores_the_padding_length():
    torch.manual_seed(0)
    enc = LearnedTextEncoder(width=32, depth=2, heads=2, max_length=24).eval()
    short, long = (enc(byte_tokens(["a seven", "one"], n).ids) for n in (10, 24))
    assert torch.allclose(short.tokens[0, :9], long.tokens[0, :9], atol=1e-6, rtol=0)
    assert torch.allclose(short.pooled, long.pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(short.pooled[0], short.pooled[1], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_rows_pack_and_unpack_exactly_and_null_is_the_empty_caption(kind, encoders):
    cond = build_conditioning(text_cfg(str(encoders[kind])), 10)
    assert isinstance(cond, TextConditioning) and not cond.learned
    emb, _ = cond.frozen.encode(["a handwritten two", ""])
    rows = cond.encode(["a handwritten two", ""])
    assert rows.shape == (2, 12 * (cond.token_dim + 1) + cond.pooled_dim)
    back = cond.unpack(rows)
    assert torch.equal(back.tokens, emb.tokens.half().float())
    assert torch.equal(back.mask, emb.mask)
    assert torch.equal(back.pooled, emb.pooled.half().float())
    assert torch.equal(cond.null(3), rows[1:].expand(3, -1))
    if kind == "clip-projection":  # the projected text_embeds, not the token width
        assert cond.pooled_dim == 16 and cond.token_dim == 32


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("encoder", ["learned", "clip"])
def test_text_backbones_give_padding_no_attention(backbone, encoder, encoders):
    cfg = text_cfg("learned" if encoder == "learned" else str(encoders[encoder]),
                   f"model.type={backbone}", "model.dit.depth=2", "model.dit.width=32",
                   "model.dit.heads=2")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, build_conditioning(cfg, 10)).eval()
    for p in model.backbone.parameters():  # the DiT starts reading no text: wake it up
        p.data.add_(torch.randn_like(p) * 0.05)
    cond = model.conditioning
    emb = cond.embed(cond.encode(["a handwritten two", "three"]).float() if not cond.learned
                     else cond.encode(["a handwritten two", "three"]), model.text_encoder)  # fmt: skip
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    out = model.spec.call(model.backbone, x, t, emb)
    noisy = type(emb)(emb.tokens.clone(), emb.mask, emb.pooled)
    noisy.tokens[~emb.mask] = torch.randn(int((~emb.mask).sum()), emb.tokens.shape[-1]) * 10
    assert torch.allclose(model.spec.call(model.backbone, x, t, noisy), out, atol=1e-6, rtol=0)
    other = type(emb)(emb.tokens.flip(0), emb.mask.flip(0), emb.pooled.flip(0))
    assert not torch.allclose(model.spec.call(model.backbone, x, t, other), out, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_encoders_are_no_parameters_and_get_no_gradients(kind, encoders):
    cfg = text_cfg(str(encoders[kind]))
    model = build_model(cfg, build_conditioning(cfg, 10))
    frozen = model.conditioning.frozen
    ours = {id(p) for p in model.parameters()}
    assert not any(id(p) in ours for p in frozen.model.parameters())
    assert not any("text" in k for k in model.state_dict()), "frozen weights would be checkpointed"
    rows = model.encode_prompts(["a cat", "four five"])
    model(torch.randn(2, 1, 8, 8), torch.rand(2), rows).square().mean().backward()
    assert all(p.grad is None for p in frozen.model.parameters())
    assert any(p.grad is not None for p in model.parameters())
    copy = __import__("copy").deepcopy(model)  # the EMA copy shares the encoder, never copies it
    assert copy.conditioning.frozen is frozen


def test_the_learned_encoder_trains_with_the_model():
    cfg = text_cfg("learned")
    model = build_model(cfg, build_conditioning(cfg, 10))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("text_encoder.") for n in names)
    rows = model.encode_prompts(["a cat", "four five"])
    model(torch.randn(2, 1, 8, 8), torch.rand(2), rows).square().mean().backward()
    assert model.text_encoder.embed.weight.grad is not None


@pytest.mark.parametrize("encoder", ["learned", "t5"])
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_exports_carry_the_text_encoder_and_sample_the_same_images(encoder, backbone, encoders,
                                                                    tmp_path):  # fmt: skip
    te = "learned" if encoder == "learned" else str(encoders[encoder])
    cfg = text_cfg(te, f"model.type={backbone}", "model.dit.depth=2", "model.dit.width=32",
                   "model.dit.heads=2", "sample.steps=3")  # fmt: skip
    torch.manual_seed(1)
    model = build_model(cfg, build_conditioning(cfg, 10)).eval()
    export_model(model, cfg, tmp_path / "export", autoencoder=IdentityAutoencoder(),
                 class_names=[str(i) for i in range(10)], step=0)  # fmt: skip
    assert (tmp_path / "export" / "text_encoder").is_dir()
    if encoder != "learned":  # the copy is byte for byte the encoder the model was trained with
        assert folder_hash(tmp_path / "export" / "text_encoder") == folder_hash(encoders[encoder])
    loaded = load_model(tmp_path / "export")
    prompts = ["a handwritten two", "three", ""]
    a = generate(model, make_path(cfg), sampling_spec(cfg), num=3, seed=4,
                 cond=model.encode_prompts(prompts))  # fmt: skip
    b = generate(loaded.model, loaded.path, sampling_spec(cfg), num=3, seed=4,
                 cond=loaded.model.encode_prompts(prompts))  # fmt: skip
    assert torch.equal(a, b)


def test_bad_text_encoder_folders_are_one_line_errors(tmp_path, encoders):
    with pytest.raises(TextEncoderError, match="no such folder"):
        build_conditioning(text_cfg(str(tmp_path / "nothing")), 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="holds no transformers config"):
        build_conditioning(text_cfg(str(tmp_path / "empty")), 10)
    with pytest.raises(ConfigError, match="data.caption_key"):
        load_config(DIGITS, [*TINY, "model.text_encoder=learned"])


def test_an_export_names_a_large_frozen_encoder_and_checks_its_hash(encoders, tmp_path):
    import shutil

    from fmgen.models import CheckpointError

    enc = tmp_path / "t5"  # a copy this test may damage
    shutil.copytree(encoders["t5"], enc)
    cfg = text_cfg(str(enc), "text.export_copy_mb=0", "sample.steps=2")  # never copied
    torch.manual_seed(2)
    model = build_model(cfg, build_conditioning(cfg, 10)).eval()
    export_model(model, cfg, tmp_path / "export", autoencoder=IdentityAutoencoder(),
                 class_names=[str(i) for i in range(10)], step=0)  # fmt: skip
    assert not (tmp_path / "export" / "text_encoder").exists()
    loaded = load_model(tmp_path / "export")  # reads the folder fmgen.json names
    rows = model.encode_prompts(["a cat"])
    assert torch.equal(loaded.model.encode_prompts(["a cat"]), rows)
    weights = next(enc.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the weights: another encoder than the model's
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="another hash"):
        load_model(tmp_path / "export")
    shutil.rmtree(enc)
    with pytest.raises(CheckpointError, match="is not there"):
        load_model(tmp_path / "export")


def test_the_encoder_computes_in_text_dtype(encoders):
    exact = build_conditioning(text_cfg(str(encoders["t5"])), 10)
    half = build_conditioning(text_cfg(str(encoders["t5"]), "text.dtype=bfloat16"), 10)
    assert next(half.frozen.model.parameters()).dtype == torch.bfloat16
    a, b = exact.encode(["a handwritten two"]), half.encode(["a handwritten two"])
    assert a.dtype == b.dtype == torch.float32  # rows are float16 values either way
    assert 0 < (a - b).abs().max() < 0.1  # bfloat16 keeps ~3 digits
    assert half.frozen.record()["dtype"] == "bfloat16"
