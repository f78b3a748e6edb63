"""Caption template sets: a caption per image from its label, for data sets without captions.

``prepare(..., caption_templates="digits")`` writes each image's caption as its ``KEY.txt``
member, so a text model (``model.text_encoder``) can be trained and judged on scikit-learn's
digits. A template set has TRAINING templates, the only ones captions are drawn from, and
HELD-OUT templates, never written into shards: prompts from them ask whether a model follows
text it has not seen verbatim (``eval.report: digits-text``). The held-out templates reuse the
training vocabulary in new arrangements, so a byte-level encoder trained on the others can
plausibly generalize to them, while being strings no training caption equals.

Templates hold ``{name}`` (the digit's English name, "seven") and ``{numeral}`` ("7"). A sample's
template is a seeded choice by its index alone: the same (set, label, index, seed) always give
the same caption, in any process and in any order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fmgen.data.shards import DataError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class TemplateSet:
    """Templates over ``{name}`` and ``{numeral}``; ``names[label]`` fills ``{name}``."""

    name: str
    training: tuple[str, ...]
    held_out: tuple[str, ...]
    names: tuple[str, ...]

    def fill(self, template: str, label: int) -> str:
        if not 0 <= label < len(self.names):
            raise DataError(
                f"label {label} is outside the {len(self.names)} classes of the caption "
                f"template set {self.name!r}"
            )
        return template.format(name=self.names[label], numeral=str(label))


# The digits set is compositional: a prefix, the digit as a word or a numeral, a suffix. Its
# training templates are every combination that holds no held-out one, so a text encoder sees each
# phrase around many digits and each digit inside many phrases (8 fixed sentences let a small
# encoder memorise whole strings: held-out accuracy 0.65 against 1.00 on training prompts),
# and the held-out templates are combinations of seen phrases that no training caption is.
_DIGIT_PREFIXES = ("", "a handwritten ", "the digit ", "the number ", "a picture of the number ",
                   "a scan of a handwritten ", "a drawing of the digit ", "a scan of the digit ",
                   "a drawing of the number ", "a picture of a handwritten ")  # fmt: skip
_DIGIT_FORMS = ("{name}", "{numeral}")
_DIGIT_SUFFIXES = ("", ", written by hand", ", handwritten", " on a dark background")
_DIGITS_HELD_OUT = (
    "a drawing of the number {numeral}",
    "the number {name}, handwritten",
    "a scan of the digit {name}",
)
_DIGITS_ALL = tuple(p + f + s for p in _DIGIT_PREFIXES for f in _DIGIT_FORMS for s in _DIGIT_SUFFIXES)

TEMPLATE_SETS: dict[str, TemplateSet] = {
    "digits": TemplateSet(
        "digits",
        # no training caption holds a held-out one, not even inside a longer caption: 69 templates
        training=tuple(t for t in _DIGITS_ALL if not any(h in t for h in _DIGITS_HELD_OUT)),
        held_out=_DIGITS_HELD_OUT,
        names=DIGIT_NAMES,
    ),
}


def template_set(name: str) -> TemplateSet:
    if name not in TEMPLATE_SETS:
        raise DataError(
            f"caption template set {name!r} is not known; choose one of: "
            f"{', '.join(map(repr, TEMPLATE_SETS))} (data.caption_templates)"
        )
    return TEMPLATE_SETS[name]


def template_index(index: int, count: int, seed: int = 0) -> int:
    """Which of ``count`` templates sample ``index`` gets: a hash of (seed, index), no RNG state."""
    digest = hashlib.sha256(f"fmgen-caption|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


def caption(templates: str, label: int, index: int, seed: int = 0) -> str:
    """The caption of sample ``index`` (its source index) with class ``label``: one of the set's
    TRAINING templates, chosen by (seed, index), filled in for ``label``."""
    s = template_set(templates)
    return s.fill(s.training[template_index(index, len(s.training), seed)], label)


def training_prompts(templates: str, label: int) -> list[str]:
    """Every caption ``caption`` can give class ``label``, in template order."""
    s = template_set(templates)
    return [s.fill(t, label) for t in s.training]


def held_out_prompts(templates: str, label: int) -> list[str]:
    """The prompts of class ``label`` from the HELD-OUT templates (never in prepared shards)."""
    s = template_set(templates)
    return [s.fill(t, label) for t in s.held_out]


def caption_record(templates: str, seed: int = 0) -> dict[str, Any]:
    """What a manifest's source record says of its captions: the set, the seed and a hash of
    what decides them (the training templates, the names, how a template is chosen), so shards
    captioned otherwise are told apart. The held-out templates are left out: they are never
    written, so changing them needs no new shards."""
    s = template_set(templates)
    text = json.dumps({"training": s.training, "names": s.names, "choice": "sha256-v1"})
    return {
        "templates": s.name,
        "seed": seed,
        "hash": hashlib.sha256(text.encode()).hexdigest()[:16],
    }


def same_captions(record: dict[str, Any] | None, templates: str) -> bool:
    """Whether a manifest's caption record holds captions of the set ``templates`` as it is now
    (any seed: the seed changes which training template a sample gets, never the templates)."""
    want = caption_record(templates)
    return bool(record) and all(record.get(k) == want[k] for k in ("templates", "hash"))
