"""The EMAs of training: the usual one (diffusers' EMAModel, a half-life in images) and the
power-function EMAs of post-hoc EMA (EDM2), with their snapshots.

The power-function profiles live on the main process only: they are saved (in the checkpoint,
in the snapshots) by it alone, and the other ranks hold the same parameters, so copies there
would cost memory and time for nothing. Snapshots are counted in images seen, written by
temp file + rename, and live in ``RUN_DIR/posthoc/``, outside ``checkpoints/``: pruning never
sees them.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save as safetensors_bytes

from fmgen.base import FmgenError
from fmgen.config import Config, to_dict
from fmgen.core.ema import power_ema_beta, sigma_rel_to_gamma
from fmgen.models import FlowModel
from fmgen.models.posthoc import (
    SNAPSHOT_DIR,
    SUPERSEDED_DIR,
    snapshot_files,
    snapshot_metadata,
    snapshot_name,
)
from fmgen.models.store import TMP_PREFIX, fsync_dir, write_durable, write_error
from fmgen.train.dist import any_rank
from fmgen.train.errors import TrainingError

log = logging.getLogger("fmgen.train")


def ema_decay(cfg: Config) -> float:
    """Per-step decay for a half-life counted in images: 0.5 ** (batch / half_life)."""
    return 0.5 ** (cfg.train.batch_size / cfg.ema.half_life_images)


def ema_model_copy(model: FlowModel, ema: EMAModel) -> FlowModel:
    """A separate FlowModel holding the EMA weights (the training weights stay untouched)."""
    out = copy.deepcopy(model)
    ema.copy_to(out.parameters())
    return out.eval()


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per ``sigma_rel`` (``fmgen.core.ema``).

    ``update`` follows every optimizer step, skipped ones included: the parameters then did
    not change, and the profile's exact form needs one update per ``t_delta`` images.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: list[float]) -> None:
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.names = [name for name, _ in model.named_parameters()]
        # the first update has beta = 0 and overwrites these copies
        self.profiles = [[p.detach().clone() for p in model.parameters()] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], images: int, t_delta: int) -> None:
        """Average in ``params`` after the step that brought the images seen to ``images``."""
        for gamma, shadow in zip(self.gammas, self.profiles, strict=True):
            weight = 1 - power_ema_beta(gamma, images, t_delta)
            torch._foreach_lerp_(shadow, params, weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every profile's weights, keyed ``p{j}.{parameter name}`` (checkpoints, snapshots)."""
        return {f"p{j}.{name}": t for j, shadow in enumerate(self.profiles)
                for name, t in zip(self.names, shadow, strict=True)}  # fmt: skip

    def meta(self) -> dict[str, list[float]]:
        return {"sigma_rels": self.sigma_rels, "gammas": self.gammas}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for j, shadow in enumerate(self.profiles):
            for name, t in zip(self.names, shadow, strict=True):
                t.copy_(tensors[f"p{j}.{name}"])


def _blob(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    # safetensors stores dense row-major tensors: channels_last ones are copied to that layout
    return safetensors_bytes(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata
    )


def power_ema_bytes(tracker: PowerEMA) -> bytes:
    """The profiles as a checkpoint file."""
    return _blob(tracker.tensors())


def write_snapshot(
    run_dir: Path, tracker: PowerEMA, *, images: int, step: int, cfg: Config,
    class_names: list[str],
) -> Path:  # fmt: skip
    """Write ``RUN_DIR/posthoc/images_N.safetensors`` by temp file + rename (readers never see
    half a file); a failed write raises ``CheckpointError`` (disk full, with the sizes)."""
    folder = run_dir / SNAPSHOT_DIR
    final = folder / snapshot_name(images)
    meta = snapshot_metadata(images=images, step=step, sigma_rels=tracker.sigma_rels,
                             gammas=tracker.gammas, config=to_dict(cfg), class_names=class_names)  # fmt: skip
    blob = _blob(tracker.tensors(), meta)
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_durable(tmp, blob)
        os.replace(tmp, final)
        fsync_dir(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, "a post-hoc EMA snapshot", folder, len(blob)) from None
    return final


def snapshot_on_main(
    tracker: PowerEMA | None, run_dir: Path, *, images: int, step: int, cfg: Config,
    class_names: list[str], device: torch.device,
) -> None:  # fmt: skip
    """Every rank calls this; the main process (which holds ``tracker``) writes the snapshot,
    and a failed write stops every rank together instead of leaving them at the next collective."""
    failed: Exception | None = None
    if tracker is not None:
        try:
            write_snapshot(run_dir, tracker, images=images, step=step, cfg=cfg,
                           class_names=class_names)  # fmt: skip
        except FmgenError as e:
            failed = e
    if any_rank(failed is not None, device):
        raise failed or TrainingError(
            "the main process could not write a post-hoc EMA snapshot (see its error)"
        )


def supersede_snapshots(run_dir: Path, images: int) -> list[Path]:
    """Move the snapshots taken after ``images`` (a future that a resume from an older
    checkpoint, or a new run in the same folder, abandons) into ``posthoc/superseded/``; the
    run writes its own as it gets there. Leftover work files of an interrupted write go."""
    folder = run_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    for leftover in folder.glob(f"{TMP_PREFIX}*"):
        leftover.unlink(missing_ok=True)
    later = [path for taken, path in snapshot_files(run_dir) if taken > images]
    if later:
        aside = folder / SUPERSEDED_DIR
        aside.mkdir(exist_ok=True)
        for path in later:
            os.replace(path, aside / path.name)
        log.warning(
            "moved %d post-hoc EMA snapshots taken after %d images (%s ... %s) into %s: this run "
            "continues from %d images", len(later), images, later[0].name, later[-1].name, aside,
            images,
        )  # fmt: skip
    return later


def snapshot_disk_estimate(tracker: PowerEMA, cfg: Config) -> str:
    """One start-up line: profiles, cadence, and what the snapshots will take on disk."""
    per = sum(t.numel() * t.element_size() for t in tracker.profiles[0]) * len(tracker.profiles)
    count = cfg.train.total_images // cfg.ema.posthoc_every_images + 1
    profiles = ", ".join(f"{s:g} (gamma {g:.2f})" for s, g in zip(tracker.sigma_rels, tracker.gammas, strict=True))  # fmt: skip
    free = (
        shutil.disk_usage(Path(cfg.train.run_dir)).free if Path(cfg.train.run_dir).exists() else 0
    )
    return (f"post-hoc EMA: sigma_rel {profiles}; a snapshot every {cfg.ema.posthoc_every_images} "
            f"images: about {count} snapshots of {per / 2**20:.1f} MiB ({count * per / 2**30:.2f} GiB, "
            f"{free / 2**30:.0f} GiB free)")  # fmt: skip
