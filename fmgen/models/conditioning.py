"""The condition of a sample: what it is, its null value, its dropout for guidance.

One ``Conditioning`` object is shared by the training loop (which drops conditions to the null
value, per sample, so the model also learns the unconditional field), the model (which fills in
the null condition when none is given), guidance (which pairs each condition with the null one)
and generation (which checks the conditions asked for). A new kind of condition, e.g. text
embeddings, is one new subclass here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from fmgen.base import FmgenError
from fmgen.models.text import (
    LEARNED,
    FrozenTextEncoder,
    LearnedTextEncoder,
    TextEmbedding,
    byte_tokens,
    warn_truncated,
)


class ConditionError(FmgenError, ValueError):
    """A condition the model cannot take (a label outside its classes, labels for an unconditional model)."""


class Conditioning(ABC):
    """The condition of a sample and its null value.

    ``p_drop`` is the probability that training replaces a sample's condition by the null one
    (classifier-free guidance needs the model to know both fields).
    """

    kind: str = ""
    p_drop: float = 0.0

    @property
    @abstractmethod
    def conditional(self) -> bool: ...

    @property
    def num_embeddings(self) -> int | None:
        """Rows of a label embedding for a backbone (None: no condition input)."""
        return None

    @abstractmethod
    def null(self, n: int, device: Any = None) -> Tensor | None:
        """The null condition of n samples (None when the model takes no condition)."""

    def null_like(self, cond: Tensor) -> Tensor:
        """The null condition with the shape and device of ``cond``."""
        out = self.null(len(cond), cond.device)
        assert out is not None
        return out

    def dropout_mask(self, generator: torch.Generator, n: int, device: Any) -> Tensor:
        """(n,) bool: which samples of a training batch get the null condition.

        Always draws n uniform numbers, so the training noise stream does not depend on the
        kind of conditioning.
        """
        return torch.rand(n, generator=generator, device=device) < self.p_drop

    @abstractmethod
    def balanced(self, n: int) -> Tensor | None:
        """Conditions of n evaluation samples that cover the conditions evenly (FID)."""

    @abstractmethod
    def example(self, n: int, generator: torch.Generator, device: Any) -> Tensor | None:
        """n random valid model inputs (null ones included), for checks and benchmarks."""

    @abstractmethod
    def for_training(self, cond: Tensor, drop: Tensor) -> Tensor | None:
        """The model input of a batch's conditions, with ``drop`` (B,) set to the null one."""

    @abstractmethod
    def check(self, cond: Tensor | None, n: int) -> None:
        """Raise ConditionError unless ``cond`` is a valid condition of n samples (or None)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...


class Unconditional(Conditioning):
    """No condition: the model takes none and guidance does nothing."""

    kind = "none"

    @property
    def conditional(self) -> bool:
        return False

    def null(self, n: int, device: Any = None) -> None:
        return None

    def balanced(self, n: int) -> None:
        return None

    def example(self, n: int, generator: torch.Generator, device: Any) -> None:
        return None

    def for_training(self, cond: Tensor, drop: Tensor) -> None:
        return None

    def check(self, cond: Tensor | None, n: int) -> None:
        if cond is not None:
            raise ConditionError(
                "conditions were given to an unconditional model (model.class_conditional=false); "
                "sample without labels"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class ClassLabels(Conditioning):
    """Integer class labels 0..num_classes-1; the null label is ``num_classes``.

    Args:
        num_classes: number of real classes.
        p_drop: per-sample probability of the null label during training.
    """

    kind = "class-labels"

    def __init__(self, num_classes: int, p_drop: float = 0.0):
        if num_classes < 1:
            raise ConditionError(f"class conditioning needs >= 1 class; got {num_classes}")
        if not 0.0 <= p_drop < 1.0:
            raise ConditionError(f"the label dropout must lie in [0, 1); got {p_drop}")
        self.num_classes, self.p_drop = num_classes, p_drop

    @property
    def conditional(self) -> bool:
        return True

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_embeddings(self) -> int:
        return self.num_classes + 1  # one extra row: the null label

    def null(self, n: int, device: Any = None) -> Tensor:
        return torch.full((n,), self.null_label, dtype=torch.long, device=device)

    def balanced(self, n: int) -> Tensor:
        return torch.arange(n) % self.num_classes  # sample i gets class i mod K

    def example(self, n: int, generator: torch.Generator, device: Any) -> Tensor:
        return torch.randint(0, self.null_label + 1, (n,), generator=generator, device=device)

    def for_training(self, cond: Tensor, drop: Tensor) -> Tensor:
        return torch.where(drop, torch.full_like(cond, self.null_label), cond)

    def check(self, cond: Tensor | None, n: int) -> None:
        if cond is None:
            return
        if cond.shape != (n,):
            raise ConditionError(f"labels must have shape ({n},); got {tuple(cond.shape)}")
        if cond.is_floating_point():
            raise ConditionError(f"labels must be integers; got {cond.dtype}")
        bad = cond[(cond < 0) | (cond > self.null_label)]
        if bad.numel():
            raise ConditionError(
                f"label {int(bad[0])} is outside the model's classes 0..{self.num_classes - 1} "
                f"({self.null_label} = the null label)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "p_drop": self.p_drop}


def conditioning_from_dict(d: dict[str, Any], encoder: Any = None) -> Conditioning:
    """Rebuild a conditioning saved with ``to_dict`` (exports); ``encoder``: the frozen text
    encoder of a text conditioning (None: the learned one, or encode no prompts)."""
    if d.get("kind") == TextConditioning.kind:
        return TextConditioning.from_dict(d, encoder)
    if d.get("kind") == ClassLabels.kind:
        return ClassLabels(int(d["num_classes"]), float(d.get("p_drop", 0.0)))
    if d.get("kind") == Unconditional.kind:
        return Unconditional()
    raise ConditionError(f"unknown conditioning {d!r}; this fmgen knows text, class-labels and none")


class TextConditioning(Conditioning):
    """Captions: the condition of a sample is its caption's encoding.

    The condition tensor that batches, guidance and generation carry is, for the learned encoder,
    the caption's byte tokens (B, L) (the encoder runs inside the model and trains with it), and
    for a frozen encoder its output packed into one float row (B, L*D + L + P): token states,
    mask (0/1) and pooled vector, rounded to float16 as precomputed shards store them, so encoding
    on the fly and reading prepared shards give the same input.

    The null condition is the empty caption's encoding, not zeros: it is what the encoder says
    for "no text", so guidance's null branch and a negative prompt of "" are the same field (as
    in Stable Diffusion and PixArt's pipelines), and it has a real token (BOS/EOS), where a zero
    mask would give cross-attention no key to attend to.

    Args:
        encoder: {"kind": "learned", ...} or a frozen encoder's ``record()``.
        max_length: tokens per caption (longer ones are cut with a warning).
        token_dim, pooled_dim: D and P of the encoder's output.
        p_drop: per-sample probability of the null caption during training.
        frozen: the loaded frozen encoder (needed to encode prompts; None for learned).
        null_row: a frozen encoder's packed empty caption (1, F) when ``frozen`` is not given.
    """

    kind = "text"

    def __init__(self, encoder: dict[str, Any], *, max_length: int, token_dim: int,
                 pooled_dim: int, p_drop: float = 0.0, frozen: FrozenTextEncoder | None = None,
                 null_row: Tensor | None = None):  # fmt: skip
        if not 0.0 <= p_drop < 1.0:
            raise ConditionError(f"the caption dropout must lie in [0, 1); got {p_drop}")
        if max_length < 3:
            raise ConditionError(f"text.max_length must be >= 3 (BOS, a token, EOS); got {max_length}")
        self.encoder, self.max_length, self.p_drop = dict(encoder), max_length, p_drop
        self.token_dim, self.pooled_dim, self.frozen = token_dim, pooled_dim, frozen
        if self.learned:
            null_row = byte_tokens([""], max_length).ids
        elif frozen is not None:
            null_row = self.encode([""])
        self._null = null_row  # (1, F), or None: a frozen encoder not loaded (no null known)

    def __deepcopy__(self, memo: dict) -> TextConditioning:
        # immutable; a copy of the model (the EMA's) shares the frozen encoder, never copies it
        return self

    @property
    def learned(self) -> bool:
        return self.encoder.get("kind") == LEARNED

    @property
    def conditional(self) -> bool:
        return True

    @property
    def width(self) -> int:
        """F: the width of one condition row."""
        if self.learned:
            return self.max_length
        return self.max_length * (self.token_dim + 1) + self.pooled_dim

    def encode(self, prompts: list[str], *, warn: bool = True) -> Tensor:
        """Prompts -> condition rows (B, F) on the CPU; prompts over text.max_length are cut
        (with a warning naming it, unless ``warn`` is False)."""
        if self.learned:
            tok = byte_tokens(list(prompts), self.max_length)
            if warn:
                warn_truncated(list(prompts), tok.truncated, self.max_length)
            return tok.ids
        if self.frozen is None:
            raise ConditionError(
                "this model's frozen text encoder is not loaded, so prompts cannot be encoded; "
                f"its folder {self.encoder.get('path')!r} (hash {str(self.encoder.get('hash'))[:12]}) is needed"
            )
        emb, truncated = self.frozen.encode(list(prompts))
        if warn:
            warn_truncated(list(prompts), truncated, self.max_length)
        return self.pack(emb)

    def pack(self, emb: TextEmbedding) -> Tensor:
        """A frozen encoder's output -> rows (B, F), rounded to float16 and back to float32."""
        b = emb.tokens.shape[0]
        row = torch.cat([emb.tokens.reshape(b, -1), emb.mask.to(emb.tokens.dtype),
                         emb.pooled], dim=1)  # fmt: skip
        return row.half().float()

    def unpack(self, rows: Tensor) -> TextEmbedding:
        """Rows (B, F) -> the TextEmbedding they hold."""
        L, D, P = self.max_length, self.token_dim, self.pooled_dim
        tokens = rows[:, : L * D].reshape(-1, L, D)  # (B, L, D)
        mask = rows[:, L * D : L * D + L] > 0.5  # (B, L)
        return TextEmbedding(tokens, mask, rows[:, L * D + L : L * D + L + P])

    def embed(self, cond: Tensor, text_encoder: nn.Module | None) -> TextEmbedding:
        """The backbone's text input of condition rows: the learned encoder run on the tokens,
        or the frozen encoder's packed output unpacked."""
        if self.learned:
            assert text_encoder is not None, "a learned text conditioning needs its encoder"
            return text_encoder(cond)
        return self.unpack(cond)

    def null(self, n: int, device: Any = None) -> Tensor:
        if self._null is None:
            raise ConditionError(
                f"the null caption of this model's frozen text encoder is unknown: its folder "
                f"{self.encoder.get('path')!r} is needed"
            )
        return self._null.to(device).expand(n, -1).clone()

    def null_like(self, cond: Tensor) -> Tensor:
        return self.null(len(cond), cond.device).to(cond.dtype)

    def balanced(self, n: int) -> Tensor:
        """Evaluation conditions without prompts: the null caption (FID of a text model is
        measured on prompts the caller gives, e.g. held-out captions)."""
        return self.null(n)

    def example(self, n: int, generator: torch.Generator, device: Any) -> Tensor:
        if self.learned:
            words = [bytes(torch.randint(97, 123, (int(k),), generator=generator).tolist()).decode()
                     for k in torch.randint(0, self.max_length, (n,), generator=generator)]  # fmt: skip
            return self.encode(words).to(device)
        L, D = self.max_length, self.token_dim
        rows = torch.randn(n, self.width, generator=generator)
        rows[:, L * D : L * D + L] = (torch.arange(L) < torch.randint(1, L + 1, (n, 1), generator=generator)).float()  # fmt: skip
        return rows.half().float().to(device)

    def for_training(self, cond: Tensor, drop: Tensor) -> Tensor:
        return torch.where(drop[:, None], self.null_like(cond), cond)

    def check(self, cond: Tensor | None, n: int) -> None:
        if cond is None:
            return
        if cond.shape != (n, self.width):
            raise ConditionError(
                f"text conditions must have shape ({n}, {self.width}) (encoded prompts); got "
                f"{tuple(cond.shape)}"
            )
        if self.learned == cond.is_floating_point():
            want = "byte tokens (integers)" if self.learned else "packed embeddings (floats)"
            raise ConditionError(f"text conditions of this model are {want}; got {cond.dtype}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "max_length": self.max_length,
                "token_dim": self.token_dim, "pooled_dim": self.pooled_dim, "p_drop": self.p_drop}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], frozen: FrozenTextEncoder | None = None) -> TextConditioning:
        return cls(d["encoder"], max_length=int(d["max_length"]), token_dim=int(d["token_dim"]),
                   pooled_dim=int(d["pooled_dim"]), p_drop=float(d.get("p_drop", 0.0)),
                   frozen=frozen)  # fmt: skip


def learned_encoder_module(cond: Conditioning, width: int, depth: int, heads: int) -> nn.Module | None:
    """The trained text encoder a conditioning needs inside the model (None: none)."""
    if isinstance(cond, TextConditioning) and cond.learned:
        return LearnedTextEncoder(width=width, depth=depth, heads=heads, max_length=cond.max_length)
    return None
