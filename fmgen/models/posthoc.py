"""Post-hoc EMA snapshots of a run: their files, and the EMA of any sigma_rel rebuilt from them.

    RUN_DIR/posthoc/images_000000025600.safetensors
        one snapshot, taken after 25,600 images: the weights of every tracked power-function
        EMA profile ("p{j}.{parameter name}"); the header's metadata holds the format, images,
        step, each profile's sigma_rel and gamma, the config and the class names (JSON), so the
        snapshots rebuild a model without any checkpoint
    RUN_DIR/posthoc/superseded/
        snapshots of a run's future that a resume (or a new run in the folder) abandoned; not read

Training writes the snapshots (``fmgen.train.ema``); pruning checkpoints never touches them.
``reconstruct_ema`` solves EDM2's least squares (``fmgen.core.ema.posthoc_weights``) for the
weights on the snapshots and combines them in float64; ``export_reconstruction`` writes the
result like ``export/``, so ``sample.py`` and ``fmgen.evaluate`` load it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fmgen.base import FmgenError
from fmgen.config import Config
from fmgen.core.ema import SIGMA_REL_MAX, posthoc_weights, sigma_rel_to_gamma
from fmgen.models.autoencoder import Autoencoder, build_autoencoder
from fmgen.models.flow import FlowModel, build_conditioning, build_model
from fmgen.models.store import CheckpointError, export_model, saved_config

SNAPSHOT_DIR = "posthoc"
SUPERSEDED_DIR = "superseded"
SNAPSHOT_FORMAT = "fmgen-posthoc-1"
_SNAPSHOT = re.compile(r"images_(\d+)\.safetensors")


def snapshot_name(images: int) -> str:
    return f"images_{images:012d}.safetensors"


def snapshot_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(images, path) of the snapshot files of a run folder by name, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(m, p) for p in folder.iterdir() if p.is_file() and (m := _SNAPSHOT.fullmatch(p.name))]
    return sorted((int(m.group(1)), p) for m, p in found)


def snapshot_metadata(
    *, images: int, step: int, sigma_rels: list[float], gammas: list[float],
    config: dict[str, Any], class_names: list[str],
) -> dict[str, str]:  # fmt: skip
    """The header of a snapshot file (safetensors metadata holds strings only: JSON values)."""
    profiles = [{"sigma_rel": s, "gamma": g} for s, g in zip(sigma_rels, gammas, strict=True)]
    return {"format": SNAPSHOT_FORMAT, "images": str(images), "step": str(step),
            "profiles": json.dumps(profiles), "config": json.dumps(config),
            "class_names": json.dumps(class_names)}  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file, as its header describes it (no tensor read)."""

    path: Path
    images: int
    step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    config: dict[str, Any]
    class_names: list[str]


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {why}; move it into {path.parent / SUPERSEDED_DIR} to reconstruct without it"
    )


def read_snapshot(path: Path) -> Snapshot:
    """The header of a snapshot file; a damaged or foreign file raises ``CheckpointError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise _unreadable(path, f"does not read as safetensors ({' '.join(str(e).split())})") from None  # fmt: skip
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise _unreadable(path, f"format {meta.get('format')!r}, this fmgen reads {SNAPSHOT_FORMAT!r}")  # fmt: skip
    try:
        profiles = json.loads(meta["profiles"])
        return Snapshot(path, int(meta["images"]), int(meta["step"]),
                        tuple(float(p["sigma_rel"]) for p in profiles),
                        tuple(float(p["gamma"]) for p in profiles),
                        json.loads(meta["config"]), list(json.loads(meta["class_names"])))  # fmt: skip
    except (KeyError, ValueError, TypeError) as e:
        raise _unreadable(path, f"has a damaged header ({e})") from None


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The snapshots of a run folder, oldest first (``superseded/`` and work files left out)."""
    return [read_snapshot(p) for _, p in snapshot_files(run_dir)]


@dataclass
class Reconstruction:
    """The EMA of one sigma_rel at one point of training, rebuilt from snapshots.

    ``weights`` holds (snapshot file name, profile sigma_rel, coefficient) for every profile used.
    """

    model: FlowModel
    config: Config
    autoencoder: Autoencoder
    class_names: list[str]
    sigma_rel: float
    gamma: float
    images: int
    step: int
    profile_error: float
    weights: list[tuple[str, float, float]]

    def provenance(self) -> dict[str, Any]:
        """What an export records about these weights."""
        return {"kind": "post-hoc EMA (EDM2)", "sigma_rel": self.sigma_rel, "gamma": self.gamma,
                "images": self.images, "profile_error": self.profile_error,
                "snapshots": [{"file": f, "sigma_rel": s, "weight": w} for f, s, w in self.weights]}  # fmt: skip


def reconstruct_ema(
    run_dir: str | Path, sigma_rel: float, *, images: int | None = None
) -> Reconstruction:
    """The power-function EMA of ``sigma_rel`` after ``images`` images (default: the newest
    snapshot's), from the snapshots taken up to then. On the CPU, combined in float64."""
    run_dir = Path(run_dir)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise FmgenError(
            f"sigma_rel {sigma_rel}: must lie in (0, {SIGMA_REL_MAX:.4f}) (gamma > 0), e.g. "
            f"0.05-0.2, where EDM2 found its best values"
        )
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(
            f"{run_dir} holds no post-hoc EMA snapshots ({run_dir / SNAPSHOT_DIR}/images_*.safetensors); "
            f"train with ema.posthoc_sigma_rels=[0.05,0.1] to record them"
        )
    newest = snapshots[-1].images
    target = newest if images is None else images
    if not 0 < target <= newest:
        raise FmgenError(
            f"images {target}: the snapshots cover 1 to {newest} images; choose a value in that range"
        )
    used = [s for s in snapshots if s.images <= target]
    if not used:
        raise FmgenError(
            f"images {target}: the first snapshot was taken at {snapshots[0].images} images; "
            f"choose at least that"
        )
    gamma = sigma_rel_to_gamma(sigma_rel)
    profiles = [(s, j) for s in used for j in range(len(s.gammas))]
    times = torch.tensor([float(s.images) for s, _ in profiles], dtype=torch.float64)
    gammas = torch.tensor([s.gammas[j] for s, j in profiles], dtype=torch.float64)
    solution = posthoc_weights(times, gammas, float(target), gamma)

    last = used[-1]
    cfg = saved_config(last.config, last.path, run_dir)
    autoencoder = build_autoencoder(cfg)
    model = build_model(cfg, build_conditioning(cfg, len(last.class_names)), autoencoder)
    params = dict(model.named_parameters())
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
    for (snap, j), x in zip(profiles, solution.weights.tolist(), strict=True):
        _accumulate(total, snap.path, f"p{j}.", x)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(total[name])
    listed = [(s.path.name, s.sigma_rels[j], x)
              for (s, j), x in zip(profiles, solution.weights.tolist(), strict=True)]  # fmt: skip
    step = last.step + (target - last.images) // cfg.train.batch_size  # the step at ``target``
    return Reconstruction(model.eval(), cfg, autoencoder, last.class_names, sigma_rel, gamma,
                          target, step, solution.profile_error, listed)  # fmt: skip


def _accumulate(total: dict[str, torch.Tensor], path: Path, prefix: str, x: float) -> None:
    """total += x * (the profile ``prefix`` of the snapshot ``path``), one tensor at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = {k[len(prefix) :] for k in f.keys() if k.startswith(prefix)}
            if names != total.keys():
                missing = sorted(total.keys() - names)[:3] or sorted(names - total.keys())[:3]
                raise _unreadable(path, f"does not match the model of its config (e.g. {missing})")
            for name in names:
                total[name] += x * f.get_tensor(prefix + name).double()
    except (OSError, SafetensorError) as e:
        raise _unreadable(path, f"does not read as safetensors ({' '.join(str(e).split())})") from None  # fmt: skip


def export_reconstruction(rec: Reconstruction, out_dir: str | Path) -> Path:
    """Write a reconstruction like ``RUN_DIR/export`` (with its provenance in fmgen.json)."""
    out = Path(out_dir)
    export_model(rec.model, rec.config, out, autoencoder=rec.autoencoder,
                 class_names=rec.class_names, step=rec.step, provenance=rec.provenance())  # fmt: skip
    return out
