"""Text encoders behind one seam: a frozen ``transformers`` encoder from a local folder, or a small
transformer over bytes trained with the model (``model.text_encoder: learned``, as GLIDE did).

Every encoder turns prompts into a ``TextEmbedding``: token states (B, L, D), the token mask
(B, L) (True = a real token) and a pooled vector (B, P), the one the backbone adds to its time
embedding. The pooled vector is the encoder's own where it has one (CLIP's ``text_embeds`` with a
projection, else its ``pooler_output``, the end-of-text token's state; the learned encoder's
end-of-text state) and the masked mean of the token states where it has none (T5).

Frozen encoders are loaded with ``local_files_only=True`` and ``use_safetensors=True`` (nothing
is downloaded, no pickle is read); the sha256 of their folder's files identifies them in
manifests and exports. They are no ``nn.Module`` attribute of the model, so they never enter its
parameters, optimizer, EMA or checkpoints, and their outputs are computed without gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from fmgen.base import FmgenError

log = logging.getLogger("fmgen.models")

LEARNED = "learned"
ENCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the classes a frozen folder may hold (config.json's "architectures"); any other encoder with a
# tokenizer loads through AutoModel and must return last_hidden_state
KNOWN_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


class TextEncoderError(FmgenError, ValueError):
    """A text encoder folder that cannot be used; the message names the folder and the fix."""


@dataclass
class TextEmbedding:
    """What a text-reading backbone gets: token states, their mask, the pooled vector."""

    tokens: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) bool, True = a real token
    pooled: Tensor  # (B, P)


@dataclass
class Tokens:
    ids: Tensor  # (B, L) long
    mask: Tensor  # (B, L) bool
    truncated: list[int]  # indices of the prompts cut to max_length


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) -> (B, D): the mean of the real tokens' states."""
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def folder_hash(folder: Path) -> str:
    """sha256 over the sorted relative names and bytes of every file under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


# --- the learned encoder: bytes -> a small transformer ------------------------------------------

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3
BYTE_VOCAB = 256 + BYTE_OFFSET


def byte_tokens(prompts: list[str], max_length: int) -> Tokens:
    """UTF-8 bytes between BOS and EOS, padded with PAD to ``max_length`` (cut to fit, EOS kept).

    The empty caption is [BOS, EOS]: never an all-padding row, whose attention would be empty.
    """
    ids = torch.full((len(prompts), max_length), PAD, dtype=torch.long)
    truncated = []
    for i, p in enumerate(prompts):
        body = list(p.encode("utf-8"))
        if len(body) > max_length - 2:
            truncated.append(i)
            body = body[: max_length - 2]
        row = [BOS, *(b + BYTE_OFFSET for b in body), EOS]
        ids[i, : len(row)] = torch.tensor(row)
    return Tokens(ids, ids != PAD, truncated)


class LearnedTextEncoder(ModelMixin, ConfigMixin):
    """A pre-norm transformer over byte tokens, trained with the backbone (GLIDE's text encoder).

    ``forward(ids (B, L)) -> TextEmbedding`` with D = P = ``width``; the pooled vector is the
    final state of the EOS token (the last real token of each row).
    """

    @register_to_config
    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)  # fmt: skip
        # enable_nested_tensor=False: the fast path's nested tensors change results with the mask
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> TextEmbedding:
        mask = ids != PAD  # (B, L)
        h = self.embed(ids) + self.position[: ids.shape[1]]  # (B, L, D)
        h = self.norm(self.blocks(h, src_key_padding_mask=~mask))  # (B, L, D)
        last = mask.sum(1) - 1  # (B,) the EOS position
        pooled = h[torch.arange(len(ids), device=ids.device), last]  # (B, D)
        return TextEmbedding(h, mask, pooled)


# --- frozen encoders from a local folder --------------------------------------------------------


def _tokenizer_folder(folder: Path) -> Path:
    """The folder itself, or a pipeline's sibling ``tokenizer/`` when it is a ``text_encoder/``."""
    for cand in (folder, folder.parent / "tokenizer"):
        if any((cand / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json",
                                               "vocab.json", "spiece.model")):  # fmt: skip
            return cand
    raise TextEncoderError(
        f"model.text_encoder={str(folder)!r}: no tokenizer found (looked for tokenizer_config.json "
        f"in the folder and in {folder.parent / 'tokenizer'}); save the tokenizer beside the encoder "
        f"with tokenizer.save_pretrained"
    )


def encoder_architecture(folder: str | Path) -> str:
    """config.json's architecture of a local encoder folder; one-line errors for bad folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TextEncoderError(
            f"model.text_encoder={str(folder)!r}: no such folder; give a local transformers text "
            f"encoder folder (save_pretrained layout: config.json + model.safetensors + tokenizer), "
            f"or 'learned'"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
        arch = (config.get("architectures") or [""])[0] or str(config.get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        raise TextEncoderError(
            f"model.text_encoder={str(folder)!r} holds no transformers config (config.json missing "
            f"or unreadable); point it at the encoder's own folder (a pipeline keeps it in text_encoder/)"
        ) from None
    if not any(folder.glob("*.safetensors")):
        raise TextEncoderError(
            f"model.text_encoder={str(folder)!r} has no .safetensors weights (pickled .bin weights "
            f"are never loaded); save it with save_pretrained(safe_serialization=True)"
        )
    return arch


class FrozenTextEncoder:
    """A frozen transformers encoder and its tokenizer, from a local folder.

    ``encode(prompts) -> (TextEmbedding in float32 on the CPU, truncated prompt indices)``.
    """

    def __init__(self, folder: str | Path, *, max_length: int, dtype: str = "float32",
                 device: str | torch.device = "cpu", folder_sha256: str | None = None):  # fmt: skip
        """``folder_sha256``: the folder's ``folder_hash`` when the caller has just computed it
        (a large encoder's files are read once, not twice)."""
        import transformers

        self.folder = Path(folder)
        self.architecture = encoder_architecture(self.folder)
        self.max_length, self.dtype_name = max_length, dtype
        self.device = torch.device(device)
        cls = getattr(transformers, self.architecture, None) if self.architecture in KNOWN_ENCODERS else None
        cls = cls or transformers.AutoModel
        try:
            self.model = cls.from_pretrained(self.folder, local_files_only=True, use_safetensors=True,
                                             torch_dtype=ENCODER_DTYPES[dtype])  # fmt: skip
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                _tokenizer_folder(self.folder), local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"model.text_encoder={str(self.folder)!r} does not load: {' '.join(str(e).split())[:300]}") from None  # fmt: skip
        self.model.requires_grad_(False).eval().to(self.device)
        self.hash = folder_sha256 or folder_hash(self.folder)
        with torch.no_grad():
            probe = self.encode([""])[0]
        self.token_dim, self.pooled_dim = probe.tokens.shape[-1], probe.pooled.shape[-1]

    def tokens(self, prompts: list[str]) -> Tokens:
        t = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                           truncation=True, return_tensors="pt")  # fmt: skip
        full = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        truncated = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        mask = t["attention_mask"].bool()
        return Tokens(t["input_ids"], mask, truncated)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[TextEmbedding, list[int]]:
        tok = self.tokens(prompts)
        ids, mask = tok.ids.to(self.device), tok.mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        hidden = out.last_hidden_state.float()  # (B, L, D)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        pooled = masked_mean(hidden, mask) if pooled is None else pooled.float()
        return TextEmbedding(hidden.cpu(), tok.mask, pooled.cpu()), tok.truncated

    def record(self) -> dict[str, Any]:
        return {"kind": "frozen", "path": str(self.folder), "hash": self.hash,
                "architecture": self.architecture, "dtype": self.dtype_name}  # fmt: skip


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings off (commands that print their own)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def warn_truncated(prompts: list[str], truncated: list[int], max_length: int) -> None:
    if truncated:
        first = prompts[truncated[0]]
        log.warning(
            "%d prompt(s) longer than text.max_length=%d tokens were truncated (e.g. %r); raise "
            "text.max_length to keep them whole", len(truncated), max_length, first[:60],
        )  # fmt: skip
