"""Experiment tracking through W&B, on the main process only.

The run id is chosen once and stored in every checkpoint, so a resumed (or requeued) job
continues the same W&B run whatever its job id. ``logging.wandb: false`` turns it off;
``WANDB_MODE=offline`` (or ``logging.mode: offline``) keeps everything on disk.
"""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from typing import Any

from fmgen.config import LoggingConfig

log = logging.getLogger("fmgen.train.tracking")


class Tracker:
    """A thin W&B wrapper: ``log`` scalars, ``log_image`` a PNG file, ``finish``."""

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        run_dir: Path,
        config: dict[str, Any],
        run_id: str = "",
        enabled: bool = True,
    ):
        self.run = None
        self.run_id = run_id
        if not (enabled and cfg.wandb):
            return
        import wandb

        self._wandb = wandb
        # our own id (W&B's helper moved between versions): 8 lowercase letters/digits
        self.run_id = run_id or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or run_dir.name,
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=cfg.mode or None,
        )
        log.info("W&B run %s (%s)", self.run_id, self.run.dir if self.run else "disabled")

    @property
    def dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, scalars: dict[str, float], *, step: int) -> None:
        if self.run is not None:
            self.run.log(scalars, step=step)

    def log_image(self, key: str, png: Path, *, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(png))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
