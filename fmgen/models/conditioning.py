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
from torch import Tensor

from fmgen.base import FmgenError


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


def conditioning_from_dict(d: dict[str, Any]) -> Conditioning:
    """Rebuild a conditioning saved with ``to_dict`` (exports)."""
    if d.get("kind") == ClassLabels.kind:
        return ClassLabels(int(d["num_classes"]), float(d.get("p_drop", 0.0)))
    if d.get("kind") == Unconditional.kind:
        return Unconditional()
    raise ConditionError(f"unknown conditioning {d!r}; this fmgen knows class-labels and none")
