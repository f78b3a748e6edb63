"""CLIP score from a local folder: torchmetrics' number, the folder's identity, refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fmgen.eval.clip_score import clip_record, clip_score, clip_scores, folder_hash, load_clip
from fmgen.eval.features import EvalError

WORDS = ["a", "photo", "of", "red", "green", "blue", "cat", "dog", "digit", "zero", "one"]
PROMPTS = [
    "a photo of a red cat",
    "a green dog",
    "blue",
    "digit zero",
    "a photo of one dog",
    # longer than the 16 text positions: torchmetrics cuts the batch, we must too
    "a photo of a red cat and a green dog and a blue digit zero",
    "one",
    "a red digit",
]
N = len(PROMPTS)


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [
        *"abcdefghijklmnopqrstuvwxyz",
        *(f"{c}</w>" for c in "abcdefghijklmnopqrstuvwxyz"),
    ]:
        vocab[piece] = len(vocab)
    for w in WORDS:
        vocab.setdefault(f"{w}</w>", len(vocab))
    merges = []  # whole words from letters: l + e -> le, le + t -> let, ... (BPE merge rules)
    for w in WORDS:
        left = w[0]
        for i, c in enumerate(w[1:], start=1):
            right = c + ("</w>" if i == len(w) - 1 else "")
            merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges), len(vocab)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny CLIPModel + CLIPProcessor saved with save_pretrained (safetensors), built once.

    "openai" in the folder's name: torchmetrics 1.9 takes a string path only when it names one
    of its model families (it then calls from_pretrained on it, which reads a local folder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab_size = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    # a direction shared by both embeddings (through the final layer norms' biases) makes the
    # cosines mostly positive, as a trained CLIP's are, so torchmetrics' clamp at 0 hides nothing
    with torch.no_grad():
        v = torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(v)
        shared = model.visual_projection.weight @ v  # (16,)
        model.text_model.final_layer_norm.bias.copy_(
            torch.linalg.pinv(model.text_projection.weight) @ shared
        )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip") / "openai-tiny-clip"
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def images_u8(channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """(N, C, H, W) uint8: a colour per image plus noise, so images differ as prompts do."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (N, channels, 1, 1), generator=g).float()
    noise = torch.randn((N, channels, *size), generator=g) * 40
    return (base + noise).clamp(0, 255).round().to(torch.uint8)


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns
    BaseModelOutputWithPooling (the projected embeddings are its pooler_output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def torchmetrics_score(source, images, prompts, batch_size: int) -> float:
    """torchmetrics' CLIPScore of a folder (read by torchmetrics) or of a ClipScorer's model."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if isinstance(source, Path):
        metric = CLIPScore(model_name_or_path=str(source))
        metric.model = TensorFeatures(metric.model)
    else:
        metric = CLIPScore(
            model_name_or_path=lambda: (TensorFeatures(source.model), source.processor)
        )
    for s in range(0, len(images), batch_size):
        metric.update(images[s : s + batch_size], prompts[s : s + batch_size])
    return float(metric.compute())


@pytest.mark.parametrize("channels, size", [(3, (40, 48)), (1, (28, 28))])
def test_clip_score_is_torchmetrics_clip_score(clip_folder, channels, size):
    pytest.importorskip("torchmetrics.multimodal.clip_score")
    scorer = load_clip(clip_folder, "cpu")
    u8 = images_u8(channels, size, seed=channels)
    for batch_size in (N, 3):  # torchmetrics pads each update's texts together, as we pad a batch
        ours = clip_score(scorer, u8, PROMPTS, batch_size=batch_size)
        theirs = torchmetrics_score(clip_folder, u8, PROMPTS, batch_size)
        assert 1 < ours < 100  # not clamped to 0: the comparison is of the mean itself
        assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    per_sample = clip_scores(scorer, u8, PROMPTS, batch_size=N)
    assert per_sample.shape == (N,) and per_sample.dtype == torch.float32
    assert max(per_sample.double().mean().item(), 0) == pytest.approx(ours, rel=1e-6, abs=0)


def test_the_mean_is_clamped_at_0_not_each_sample(clip_folder):
    pytest.importorskip("torchmetrics.multimodal.clip_score")
    scorer = load_clip(clip_folder)
    with torch.no_grad():  # without the shared direction the cosines take both signs
        scorer.model.vision_model.post_layernorm.bias.zero_()
        scorer.model.text_model.final_layer_norm.bias.zero_()
    u8 = images_u8(3, (32, 32), seed=5)
    s = clip_scores(scorer, u8, PROMPTS, batch_size=1)
    negative = [i for i in range(N) if s[i] < 0]
    mixed = [i for i in range(N) if s[i] > 0] + [int(s.argmin())]
    assert negative and s[mixed].mean() > 0  # the case to test: a negative sample, a positive mean
    for subset in (mixed, negative):
        images, prompts = u8[subset], [PROMPTS[i] for i in subset]
        ours = clip_score(scorer, images, prompts, batch_size=len(subset))
        theirs = torchmetrics_score(scorer, images, prompts, len(subset))
        assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert (
        ours == 0.0
        and clip_score(scorer, u8[mixed], [PROMPTS[i] for i in mixed])
        < s[mixed].clamp(min=0).mean()
    )


def test_prompts_matter_and_the_score_is_in_0_100(clip_folder):
    scorer = load_clip(clip_folder)
    u8 = images_u8(3, (32, 32), seed=7)
    matched = clip_scores(scorer, u8, PROMPTS)
    shuffled = clip_scores(scorer, u8, PROMPTS[1:] + PROMPTS[:1])
    assert (matched - shuffled).abs().max() > 0.1
    assert clip_score(scorer, u8, PROMPTS) != pytest.approx(
        clip_score(scorer, u8, PROMPTS[1:] + PROMPTS[:1]), rel=1e-4
    )
    assert ((matched >= -100) & (matched <= 100)).all()
    assert 0 <= clip_score(scorer, u8, PROMPTS) <= 100
    # gray images are the same images repeated to RGB
    gray = images_u8(1, (32, 32), seed=8)
    assert torch.equal(
        clip_scores(scorer, gray, PROMPTS), clip_scores(scorer, gray.repeat(1, 3, 1, 1), PROMPTS)
    )


def test_the_record_is_json_and_names_the_folder_and_its_hash(clip_folder):
    scorer = load_clip(clip_folder)
    u8 = images_u8(1, (28, 28), seed=3)
    record = clip_record(scorer, u8, PROMPTS, sampling={"solver": "euler", "steps": 2})
    again = json.loads(json.dumps(record))
    assert again["clip_score"] == clip_score(scorer, u8, PROMPTS)
    assert again["num_samples"] == N and again["num_prompts"] == N
    assert again["clip_folder"] == str(clip_folder)
    assert again["clip_folder_hash"] == f"sha256:{folder_hash(clip_folder)}"
    assert again["clip_image_size"] == [32, 32]
    assert again["prompts_truncated"] == 1  # the long prompt
    assert again["torchmetrics-compatible"] is True
    assert again["sampling"] == {"solver": "euler", "steps": 2}


def test_the_folder_hash_follows_every_byte(clip_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(clip_folder, copy)
    assert folder_hash(copy) == folder_hash(clip_folder)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    assert folder_hash(copy) != folder_hash(clip_folder)
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    assert folder_hash(copy) == folder_hash(clip_folder)
    (copy / "model.safetensors").rename(copy / "other.safetensors")  # names count too
    assert folder_hash(copy) != folder_hash(clip_folder)


def one_line_error(folder, match: str) -> str:
    with pytest.raises(EvalError, match=match) as e:
        load_clip(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    return message


def test_bad_folders_are_refused_in_one_line(clip_folder, tmp_path):
    one_line_error(tmp_path / "nowhere", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "save_pretrained" in one_line_error(empty, "no config.json")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    one_line_error(bert, "model_type 'bert', not 'clip'")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(clip_folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    one_line_error(pickled, r"only pickled weights \(pytorch_model.bin\).*safe_serialization")
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_folder / name, no_processor / name)
    one_line_error(no_processor, "could not be loaded")
