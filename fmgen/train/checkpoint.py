"""Writing checkpoints: every rank into a hidden folder, renamed into place, then ``latest``.

The file names and reading belong to ``fmgen.models.store`` (sampling and evaluation load
checkpoints without the training layer); this module writes them and checks that a resume
is compatible. A checkpoint is written into a hidden temporary folder and renamed into place;
``latest`` is replaced atomically afterwards, so it never names a half-written checkpoint,
and old checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fmgen.config import Config, to_dict
from fmgen.models.store import (
    EXTRA_FILE,
    LATEST,
    STATE_FILE,
    CheckpointError,
    loader_file,
    write_atomic,
)


def publish_checkpoint(tmp_dir: Path, final_dir: Path, keep: int) -> None:
    """Rename a fully written checkpoint into place, point ``latest`` at it, prune old ones."""
    if final_dir.exists():  # the same step saved again (e.g. a stop right after a save)
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    write_atomic(final_dir.parent / LATEST, final_dir.name + "\n")
    done = sorted(p for p in final_dir.parent.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        if old != final_dir:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Any, final: Path, *, extra: dict[str, Any], loader_state: Any, keep: int
) -> Path:
    """Write a checkpoint on every rank into a hidden folder, then rename it and move ``latest``.

    ``accelerator`` is the run's Accelerator: every rank saves its RNG state, the main process
    the model, optimizer and scaler. ``extra`` (EMA, generator, train state, config, class
    names) is written by the main process; every rank writes its ``loader_state``.
    """
    tmp = final.parent / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(loader_state, loader_file(tmp, accelerator.process_index))
    if main:
        torch.save(extra, tmp / EXTRA_FILE)
        summary = {
            **extra["state"], "world_size": accelerator.num_processes, "checkpoint": final.name
        }  # fmt: skip
        (tmp / STATE_FILE).write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if main:
        publish_checkpoint(tmp, final, keep)
    accelerator.wait_for_everyone()
    return final


def check_resumable(cfg: Config, saved: dict[str, Any], ckpt: Path) -> None:
    """Model, path, data shape and batch must match the checkpoint's; other settings may change."""
    now = to_dict(cfg)
    for section in ("model", "path"):
        if now[section] != saved[section]:
            diff = {
                k: (saved[section].get(k), v)
                for k, v in now[section].items()
                if saved[section].get(k) != v
            }
            raise CheckpointError(
                f"cannot resume from {ckpt}: {section} settings differ from the checkpoint's "
                f"(key: (checkpoint, now)) {diff}; use the checkpoint's config or a new train.run_dir"
            )
    for key in ("resolution", "channels"):
        if now["data"][key] != saved["data"][key]:
            raise CheckpointError(
                f"cannot resume from {ckpt}: data.{key} is {now['data'][key]}, the checkpoint was "
                f"trained with {saved['data'][key]}"
            )
    if now["train"]["batch_size"] != saved["train"]["batch_size"]:
        raise CheckpointError(
            f"cannot resume from {ckpt}: train.batch_size is {now['train']['batch_size']}, the "
            f"checkpoint used {saved['train']['batch_size']} (the data position counts batches)"
        )
