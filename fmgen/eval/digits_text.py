"""The ``eval.report: digits-text`` report: does a text model trained on captioned digits draw
the digit a prompt names?

For every digit k the report samples the HELD-OUT prompts of ``fmgen.data.captions`` (templates
no training caption was drawn from: "an image of the digit seven") and, for comparison, the
TRAINING ones, guided at the config's ``sample.guidance``; the digits classifier of
``fmgen.eval.digits`` judges whether each sample shows k. Unconditional samples (the null caption,
no guidance) give class coverage and, as in the digits report, FID on the classifier's features
next to the real floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmgen.config import Config, ConfigError, sampling_spec
from fmgen.core.sampling import SamplingSpec
from fmgen.data.captions import TEMPLATE_SETS, held_out_prompts, training_prompts
from fmgen.eval.digits import (
    FEATURE_DIM,
    TrainedClassifier,
    classifier_cache,
    classify,
    fid_fields,
    train_digits_classifier,
    unconditional_coverage,
)
from fmgen.eval.generate import generate
from fmgen.models.autoencoder import Autoencoder

TEMPLATES = "digits"
TRAINING_STRIDE = 8  # the report's training-template prompts: every 8th template
DIGIT_BAR = 0.9  # a digit "follows its prompts" when more than this fraction is classified as it


def prompt_accuracy(
    model: Any, path: Any, spec: SamplingSpec, clf: TrainedClassifier, prompts: list[list[str]],
    n: int, *, seed: int, negative: str = "", **common: Any,
) -> tuple[Tensor, dict[str, Any]]:  # fmt: skip
    """Samples of ``prompts[k]`` (the prompts of digit k), ``n`` in all spread evenly over the
    prompts (at least one each), and how many the classifier calls k.

    Returns (images (N, C, R, R) in digit, then prompt order; fields ``accuracy``,
    ``per_digit`` (K,), ``digits_above_bar`` (digits with accuracy > DIGIT_BAR), ``per_template``
    (the accuracy of each template position), ``samples``). Sample i's noise depends on (seed, i) only.
    """
    flat = [(k, j, p) for k, ps in enumerate(prompts) for j, p in enumerate(ps)]
    templates = max(len(ps) for ps in prompts)
    per_prompt = max(1, n // len(flat))
    cond = model.encode_prompts([p for _, _, p in flat]).repeat_interleave(per_prompt, 0)  # (N, F)
    digit = torch.tensor([k for k, _, _ in flat]).repeat_interleave(per_prompt)  # (N,)
    template = torch.tensor([j for _, j, _ in flat]).repeat_interleave(per_prompt)  # (N,)
    neg = model.encode_prompts([negative]).expand(len(cond), -1) if negative else None  # (N, F)
    images = generate(
        model, path, spec, num=len(cond), cond=cond, seed=seed, negative=neg, **common
    )
    right = (classify(clf.model, images) == digit).float()  # (N,)
    per_digit = [float(right[digit == k].mean()) for k in range(len(prompts))]
    return images, {
        "accuracy": float(right.mean()),
        "per_digit": [round(a, 4) for a in per_digit],
        "digits_above_bar": sum(a > DIGIT_BAR for a in per_digit),
        "per_template": [round(float(right[template == j].mean()), 4) for j in range(templates)],
        "samples": len(cond),
    }


def digits_text_report(
    model: Any, path: Any, cfg: Config, *, autoencoder: Autoencoder | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Held-out and training prompts' accuracy per digit, unconditional class coverage and FID,
    judged by the digits classifier; ``eval.report_samples`` samples for each of the three.

    Refuses a model that reads no text (ConfigError): its digits report is ``eval.report: digits``.
    """
    if not getattr(model, "reads_text", False):
        raise ConfigError(
            "eval.report='digits-text' judges text models (model.text_encoder set, e.g. learned); "
            "this model reads class labels or nothing: set eval.report=digits"
        )
    clf = train_digits_classifier(cfg.data.resolution, cfg.data.channels,
                                  cache_dir=classifier_cache(Path(cfg.train.run_dir) / "cache"))  # fmt: skip
    spec = sampling_spec(cfg)
    digits = range(clf.model.meta["num_classes"])
    n = cfg.eval.report_samples
    common = dict(device=device, autoencoder=autoencoder)
    negative = cfg.sample.negative_prompt  # guidance steers away from it, not the null caption
    s = TEMPLATE_SETS[TEMPLATES]
    report: dict[str, Any] = {"classifier_heldout_accuracy": clf.heldout_accuracy,
                              "sampling": spec.to_dict(), "negative_prompt": negative,
                              "templates": TEMPLATES, "held_out_templates": list(s.held_out),
                              "training_templates": list(s.training), "digit_bar": DIGIT_BAR}  # fmt: skip
    prompts = [held_out_prompts(TEMPLATES, k) for k in digits]
    held_out, fields = prompt_accuracy(model, path, spec, clf, prompts, n, seed=1,
                                       negative=negative, **common)  # fmt: skip
    report.update({f"held_out_prompts_{k}": v for k, v in fields.items()})
    # a spread of the training templates (every TRAINING_STRIDE-th): the set has ~70
    prompts = [training_prompts(TEMPLATES, k)[::TRAINING_STRIDE] for k in digits]
    _, fields = prompt_accuracy(model, path, spec, clf, prompts, n, seed=3, negative=negative,
                                **common)  # fmt: skip
    report.update({f"training_prompts_{k}": v for k, v in fields.items()})
    uncond, coverage = unconditional_coverage(model, path, spec, clf, n, **common)
    report.update(coverage)
    report["unconditional_class_counts"] = torch.bincount(
        classify(clf.model, uncond), minlength=len(digits)
    ).tolist()
    report.update(fid_fields(clf, cfg, uncond, {"held_out_prompts": held_out}))
    return report


def digits_text_report_lines(q: dict[str, Any]) -> list[str]:
    """The report as the lines ``train.py`` prints at the end."""
    per_digit = ", ".join(f"{k}: {a:.2f}" for k, a in enumerate(q["held_out_prompts_per_digit"]))
    lines = [
        f"prompts (guidance {q['sampling']['guidance']}): held-out templates accuracy "
        f"{q['held_out_prompts_accuracy']:.3f} ({q['held_out_prompts_digits_above_bar']}/"
        f"{len(q['held_out_prompts_per_digit'])} digits > {q['digit_bar']}), training templates "
        f"{q['training_prompts_accuracy']:.3f} ({q['training_prompts_digits_above_bar']} digits > "
        f"{q['digit_bar']}); classifier held-out accuracy {q['classifier_heldout_accuracy']:.3f}",
        f"held-out prompts per digit: {per_digit}",
        f"unconditional: {q['unconditional_classes_covered']} of "
        f"{len(q['unconditional_class_counts'])} classes, max class fraction "
        f"{q['unconditional_max_fraction']:.3f}, counts {q['unconditional_class_counts']}",
    ]
    if "fid_unconditional_vs_train" not in q:
        return [*lines, f"FID: not computed ({q['fid_samples']} samples <= {FEATURE_DIM} feature "
                        f"dimensions; raise eval.report_samples)"]  # fmt: skip
    return [
        *lines,
        f"FID (digits-classifier features, {q['fid_samples']} images each, vs the train split): "
        f"held-out prompts {q['fid_held_out_prompts_vs_train']:.2f}, unconditional "
        f"{q['fid_unconditional_vs_train']:.2f}, floor (held-out real split) "
        f"{q['fid_heldout_vs_train']:.2f}",
    ]
