"""The digits judge: a small classifier of real digits that scores samples and serves as a small
FID feature network (``digits-classifier``); ``digits_report`` is the ``eval.report: digits``
end-of-training report.

The classifier is a 3-layer CNN trained in seconds on 80% of scikit-learn's digits (prepared
exactly like the training shards: upscaled to the training resolution) and checked on the held-out
20%. Its 128-d penultimate layer serves as the feature network of FID on digits, where the
Inception network would be both unavailable offline and meaningless at 16x16.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fmgen.config import Config, sampling_spec
from fmgen.core.sampling import SamplingSpec
from fmgen.data import digits_images
from fmgen.eval.features import (
    FeatureSpec,
    read_cache,
    register_feature_network,
    weights_hash,
    write_cache,
)
from fmgen.eval.fid import scores_against
from fmgen.eval.generate import generate
from fmgen.models.autoencoder import Autoencoder

log = logging.getLogger("fmgen.eval.digits")

CLASSIFIER_VERSION = 1
# A folder for the classifier shared by every run that names no other (see classifier_cache)
SHARED_CACHE_ENV = "FMGEN_DIGITS_CLASSIFIER_CACHE"
FEATURE_DIM = 128  # the penultimate layer: FID needs more samples than this


class DigitsClassifier(nn.Module):
    """(B, C, R, R) images in [-1, 1] -> (B, 10) logits; ``features`` gives the (B, 128) layer."""

    def __init__(self, channels: int = 1, resolution: int = 16, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.meta = {"channels": channels, "resolution": resolution, "num_classes": num_classes}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class FeatureNet(nn.Module):
    """Wraps a classifier as a torchmetrics FID feature extractor: uint8 (B, C, H, W) -> (B, 128)."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = FEATURE_DIM

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        # torchmetrics' set_dtype(float64) casts this module too: follow the weights' dtype
        dtype = next(self.classifier.parameters()).dtype
        x = x.to(dtype) / 127.5 - 1 if x.dtype == torch.uint8 else x.to(dtype)
        return self.classifier.features(x).double()


@dataclass
class TrainedClassifier:
    model: DigitsClassifier
    heldout_accuracy: float
    weights_hash: str


def split_indices(
    n: int, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of n samples."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * holdout_fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def real_digits(resolution: int, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All 1797 digits prepared like the training shards: (N, C, R, R) in [-1, 1], labels (N,)."""
    images, labels = digits_images(resolution=resolution, channels=channels)  # uint8 (N, R, R[, C])
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1, torch.from_numpy(np.asarray(labels)).long()


def train_digits_classifier(
    resolution: int,
    channels: int = 1,
    *,
    epochs: int = 25,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> TrainedClassifier:
    """Train (or load from ``cache_dir``) the classifier; deterministic for a given seed.

    The cache is ``KEY.safetensors`` (the weights) + ``KEY.json`` (held-out accuracy, version,
    weights hash); a cache that is not valid is ignored with a warning and the classifier is
    trained again.
    """
    key = f"digits-cnn-v{CLASSIFIER_VERSION}-r{resolution}-c{channels}-e{epochs}-s{seed}"
    stem = cache_dir / key if cache_dir is not None else None
    expect = {"kind": "digits-classifier", "version": CLASSIFIER_VERSION, "key": key}
    cached = read_cache(stem, expect) if stem is not None else None
    if cached is not None:
        loaded = _classifier_from_cache(*cached, channels=channels, resolution=resolution)
        if loaded is not None:
            return loaded
        log.warning("ignoring the cache %s (its weights do not fit its record); retraining", stem)
    x, y = real_digits(resolution, channels)
    tr, te = split_indices(len(x), 0.2, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier(channels, resolution)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xtr, ytr = x[tr], y[tr]
    shift = max(1, resolution // 8)  # small random translations: robust to imperfect samples
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
            xb = torch.roll(xtr[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[te]).argmax(1) == y[te]).float().mean())
    trained = TrainedClassifier(model, acc, weights_hash(model))
    if stem is not None:
        write_cache(stem, model.state_dict(),
                    {**expect, "heldout_accuracy": acc, "weights_hash": trained.weights_hash})  # fmt: skip
    return trained


def _classifier_from_cache(
    tensors: dict[str, Tensor], meta: dict[str, Any], *, channels: int, resolution: int
) -> TrainedClassifier | None:
    """The cached classifier, or None when the weights do not fit the network or the record."""
    model = DigitsClassifier(channels, resolution)
    try:
        model.load_state_dict(tensors)
    except RuntimeError:  # missing, unexpected or misshapen tensors
        return None
    acc = meta.get("heldout_accuracy")
    if not isinstance(acc, float) or weights_hash(model) != meta.get("weights_hash"):
        return None
    return TrainedClassifier(model.eval(), acc, meta["weights_hash"])


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat(
        [
            classifier(images[i : i + batch].float().cpu()).argmax(1)
            for i in range(0, len(images), batch)
        ]
    )


def digits_spec(clf: TrainedClassifier, channels: int) -> FeatureSpec:
    """The FID feature spec of a trained digits classifier."""
    return FeatureSpec(
        "digits-classifier", FeatureNet(clf.model), clf.weights_hash, "none (native resolution)",
        channels, trained_on="digits",
    )  # fmt: skip


def classifier_cache(cache_dir: Path | None) -> Path | None:
    """Where a run keeps the classifier: ``$FMGEN_DIGITS_CLASSIFIER_CACHE`` when set, else
    ``cache_dir`` (the run's or the data's cache folder).

    The classifier depends on no run and no data set, only on its key (resolution, channels,
    epochs, seed, version), so one folder can serve every run on a machine: a sweep or a test
    session trains it once per resolution instead of once per run (~10 s of a CPU core at
    16x16). Its cache is checked like any other (``read_cache``): a file that does not verify
    is retrained and rewritten, so concurrent runs may share the folder.
    """
    shared = os.environ.get(SHARED_CACHE_ENV, "").strip()
    return Path(shared) if shared else cache_dir


def _digits_feature_network(
    *, resolution: int, channels: int, cache_dir: Path | None = None, **_: Any
) -> FeatureSpec:
    clf = train_digits_classifier(resolution, channels, cache_dir=classifier_cache(cache_dir))
    return digits_spec(clf, channels)


# trained on scikit-learn's digits: refused for other data unless forced (its features do not
# describe, say, clothes)
register_feature_network(
    "digits-classifier", _digits_feature_network, dim=FEATURE_DIM, trained_on="digits"
)


def digits_report(
    model: Any, path: Any, cfg: Config, *, autoencoder: Autoencoder | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Guided samples' accuracy and unconditional samples' class coverage, judged by the classifier.

    Bars (the default job's acceptance): classifier held-out accuracy >= 0.95, guided accuracy
    >= 0.97 (class-conditional models), unconditional samples cover all classes with none above
    20%. Samples use the config's sampling options (guidance for the guided ones, none for the
    unconditional ones).
    """
    clf = train_digits_classifier(cfg.data.resolution, cfg.data.channels,
                                  cache_dir=classifier_cache(Path(cfg.train.run_dir) / "cache"))  # fmt: skip
    spec = sampling_spec(cfg)
    num_classes = clf.model.meta["num_classes"]
    n = cfg.eval.report_samples
    common = dict(device=device, autoencoder=autoencoder)
    report: dict[str, Any] = {"classifier_heldout_accuracy": clf.heldout_accuracy,
                              "sampling": spec.to_dict()}  # fmt: skip
    guided = None
    if model.conditional:
        n_per = max(1, n // model.num_classes)
        labels = torch.arange(model.num_classes).repeat_interleave(n_per)
        guided = generate(model, path, spec, num=len(labels), cond=labels, seed=1, **common)
        pred = classify(clf.model, guided)
        report["guided_accuracy"] = float((pred == labels).float().mean())
        report["guided_samples"] = len(labels)
    uncond, coverage = unconditional_coverage(model, path, spec, clf, n, **common)
    report.update(coverage)
    report.update(fid_fields(clf, cfg, uncond, {} if guided is None else {"guided": guided}))
    report["passed"] = bool(
        report["classifier_heldout_accuracy"] >= 0.95
        and report.get("guided_accuracy", 1.0) >= 0.97
        and report["unconditional_classes_covered"] == num_classes
        and report["unconditional_max_fraction"] <= 0.20
    )
    return report


def unconditional_coverage(
    model: Any, path: Any, spec: SamplingSpec, clf: TrainedClassifier, n: int, **common: Any
) -> tuple[Tensor, dict[str, Any]]:
    """n samples of the null condition (no guidance, seed 2) and the classes they fall in:
    (images (n, C, R, R), the report's ``unconditional_*`` fields)."""
    null = model.conditioning.null(n)
    uncond = generate(model, path, spec.replace(guidance=1.0), num=n, cond=null, seed=2, **common)
    num_classes = clf.model.meta["num_classes"]
    counts = torch.bincount(classify(clf.model, uncond), minlength=num_classes).float()
    frac = (counts / counts.sum()).tolist()
    return uncond, {
        "unconditional_samples": n,
        "unconditional_class_fractions": [round(f, 4) for f in frac],
        "unconditional_max_fraction": max(frac),
        "unconditional_classes_covered": int((counts > 0).sum()),
    }


def fid_fields(
    clf: TrainedClassifier, cfg: Config, uncond: Tensor, ordered: dict[str, Tensor]
) -> dict[str, Any]:
    """FID with the classifier's features: samples vs the training split, next to the floor
    (a held-out real split vs the training split), with the same number k of images on all.

    ``uncond`` (iid samples) gives its first k; each of ``ordered`` (samples in class or prompt
    order) a seeded random k. -> ``fid_samples`` and ``fid_{unconditional,heldout,NAME}_vs_train``.
    """
    x, _ = real_digits(cfg.data.resolution, cfg.data.channels)
    tr, te = split_indices(len(x), 0.2, 0)
    k = min(len(te), len(uncond), *(len(v) for v in ordered.values()))
    out: dict[str, Any] = {"fid_samples": k}
    if k <= FEATURE_DIM:  # a singular covariance: no number rather than a meaningless one
        log.warning("no FID in the digits report: %d samples <= %d feature dimensions; set "
                    "eval.report_samples > %d", k, FEATURE_DIM, FEATURE_DIM)  # fmt: skip
        return out
    fakes = {"unconditional": uncond[:k], "heldout": x[te][:k]}
    for name, samples in ordered.items():
        pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))[:k]
        fakes[name] = samples[pick]
    # precision/recall beside FID, on the same features of the same split
    scores = scores_against(x[tr], fakes, digits_spec(clf, cfg.data.channels),
                            pr_k=cfg.eval.precision_recall_k)  # fmt: skip
    for name, (fid, pr) in scores.items():
        out[f"fid_{name}_vs_train"] = fid
        if pr is not None:
            out[f"precision_{name}"], out[f"recall_{name}"] = pr.precision, pr.recall
    return out


def digits_report_lines(q: dict[str, Any]) -> list[str]:
    """The report as the lines ``train.py`` prints at the end."""
    guided = f"guided accuracy {q['guided_accuracy']:.3f}, " if "guided_accuracy" in q else ""
    fid_guided = (f"guided samples {q['fid_guided_vs_train']:.2f}; "
                  if "fid_guided_vs_train" in q else "")  # fmt: skip
    quality = (
        f"quality: classifier held-out accuracy {q['classifier_heldout_accuracy']:.3f}, {guided}"
        f"unconditional max class fraction {q['unconditional_max_fraction']:.3f}, classes covered "
        f"{q['unconditional_classes_covered']}: {'PASS' if q['passed'] else 'FAIL'}"
    )
    if "fid_unconditional_vs_train" not in q:
        return [quality, f"FID: not computed ({q['fid_samples']} samples <= {FEATURE_DIM} "
                         f"feature dimensions; set eval.report_samples > {FEATURE_DIM})"]  # fmt: skip
    return [
        quality,
        f"FID (digits-classifier features, {q['fid_samples']} images each, vs the train split): "
        f"unconditional samples {q['fid_unconditional_vs_train']:.2f}, {fid_guided}floor "
        f"(held-out real split) {q['fid_heldout_vs_train']:.2f}",
    ]
