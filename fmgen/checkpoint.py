"""Run-directory I/O: atomic checkpoints, the ``latest`` pointer, and the exported model.

Layout of a run directory::

    RUN_DIR/checkpoints/step_0000440/   Accelerate state (model, optimizer, scaler, RNG per rank)
                                        + fmgen_extra.pt (EMA, noise generator, train state, config)
                                        + fmgen_loader_<rank>.pt (data stream position per rank)
                                        + fmgen_state.json (step, images, W&B run id; readable)
    RUN_DIR/checkpoints/latest          name of the newest COMPLETE checkpoint
    RUN_DIR/export/unet/                diffusers save_pretrained of the EMA U-Net
    RUN_DIR/export/fmgen.json           path, prediction type, classes, resolution, config

A checkpoint is written into a hidden temporary folder and renamed into place; ``latest`` is
replaced atomically afterwards, so it never names a half-written checkpoint, and old
checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmgen.config import Config, ConfigError, config_from_dict, to_dict
from fmgen.errors import FmgenError
from fmgen.models import FlowModel, build_unet
from fmgen.paths import GaussianPath, get_path

EXTRA_FILE = "fmgen_extra.pt"
STATE_FILE = "fmgen_state.json"
LATEST = "latest"


class CheckpointError(FmgenError, RuntimeError):
    """A missing, incomplete or incompatible checkpoint; the message says what to do."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def loader_file(ckpt: Path, rank: int) -> Path:
    """The data stream position of one rank inside a checkpoint."""
    return ckpt / f"fmgen_loader_{rank}.pt"


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


def find_checkpoint(run_dir: str | Path, resume: str | None) -> Path | None:
    """Resolve ``--resume``: None/"" -> no resume, "auto" -> the latest in run_dir if any, else a path."""
    if not resume:
        return None
    if resume == "auto":
        pointer = Path(run_dir) / "checkpoints" / LATEST
        if not pointer.is_file():
            return None
        path = pointer.parent / pointer.read_text().strip()
        if not (path / EXTRA_FILE).is_file():
            raise CheckpointError(
                f"{pointer} names {path.name}, which is missing or incomplete; pass "
                f"--resume PATH with an intact checkpoint folder"
            )
        return path
    path = Path(resume)
    if path.is_dir() and (path / LATEST).is_file():  # a checkpoints/ folder
        path = path / (path / LATEST).read_text().strip()
    elif path.is_dir() and (path / "checkpoints" / LATEST).is_file():  # a run folder
        return find_checkpoint(path, "auto")
    if not (path / EXTRA_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume!r}: no fmgen checkpoint there (expected {EXTRA_FILE}); pass a "
            f"folder like RUN_DIR/checkpoints/step_0000100, a run folder, or 'auto'"
        )
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


# --- exported models ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: FlowModel
    path: GaussianPath
    config: Config
    class_names: list[str]
    step: int
    weights: str  # "ema" or "raw"
    source: str


def _resolve_run_paths(cfg: Config, run_folder: Path) -> Config:
    """Make a loaded config's relative paths work from any working directory.

    The config holds paths relative to where training ran (``runs/digits``, ``data/...``).
    The run folder's location gives that directory back: strip the relative run_dir from it.
    """
    run_folder = run_folder.resolve()
    rel = Path(cfg.train.run_dir)
    if not rel.is_absolute() and run_folder.parts[-len(rel.parts) :] == rel.parts:
        root = Path(*run_folder.parts[: -len(rel.parts)])
        data = Path(cfg.data.path)
        if not data.is_absolute() and not data.exists() and (root / data).exists():
            cfg.data.path = str(root / data)
    cfg.train.run_dir = str(run_folder)
    return cfg


def make_path(cfg: Config) -> GaussianPath:
    if cfg.path.name == "vp-linear":
        return get_path("vp-linear", b0=cfg.path.b0, b1=cfg.path.b1)
    return get_path(cfg.path.name)


def export_model(
    model: FlowModel, cfg: Config, out_dir: Path, *, class_names: list[str], step: int
) -> None:
    """diffusers ``save_pretrained`` of the U-Net plus fmgen's path/prediction metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out_dir / "unet")
    meta = {
        "format": "fmgen-export-1",
        "prediction_type": model.prediction_type,
        "path": {"name": cfg.path.name, "b0": cfg.path.b0, "b1": cfg.path.b1},
        "num_classes": model.num_classes,
        "null_label": model.null_label,
        "class_names": class_names,
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "time_convention": "t=0 noise, t=1 data; the U-Net receives 1000*t",
        "step": step,
        "config": to_dict(cfg),
    }
    write_atomic(out_dir / "fmgen.json", json.dumps(meta, indent=2))


def load_model(
    source: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load an exported model folder, a checkpoint folder, or a run folder (its latest checkpoint)."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights must be 'ema' or 'raw', got {weights!r}")
    src = Path(source)
    if (src / "fmgen.json").is_file():
        if weights == "raw":
            raise CheckpointError(
                f"{src} is an exported model, which holds the EMA weights only; pass a training "
                f"checkpoint for --weights raw"
            )
        meta = json.loads((src / "fmgen.json").read_text())
        from diffusers import UNet2DModel

        cfg = _resolve_run_paths(config_from_dict(meta["config"]), src.parent)
        unet = UNet2DModel.from_pretrained(src / "unet")
        model = FlowModel(unet, meta["prediction_type"], meta["num_classes"])
        return LoadedModel(
            model.to(device).eval(),
            make_path(cfg),
            cfg,
            meta["class_names"],
            meta["step"],
            "ema",
            str(src),
        )
    if src.is_dir() and (src / "export" / "fmgen.json").is_file() and weights == "ema":
        return load_model(src / "export", weights=weights, device=device)
    ckpt = find_checkpoint(src, "auto") if (src / "checkpoints").is_dir() else src
    if ckpt is None or not (ckpt / EXTRA_FILE).is_file():
        raise CheckpointError(
            f"{src}: not an fmgen checkpoint, run folder or exported model (looked for "
            f"{EXTRA_FILE}, checkpoints/{LATEST} and fmgen.json)"
        )
    extra = torch.load(ckpt / EXTRA_FILE, map_location="cpu", weights_only=False)
    try:
        cfg = _resolve_run_paths(config_from_dict(extra["config"]), ckpt.parent.parent)
    except ConfigError as e:
        raise CheckpointError(
            f"{ckpt}: its saved config does not load with this fmgen ({e})"
        ) from None
    class_names = extra["class_names"]
    model = FlowModel(
        build_unet(
            cfg.model,
            resolution=cfg.data.resolution,
            channels=cfg.data.channels,
            num_classes=len(class_names),
        ),
        cfg.model.prediction_type,
        len(class_names),
    )
    if weights == "ema":
        params = list(model.parameters())
        shadow = extra["ema"]["shadow_params"]
        if len(shadow) != len(params):
            raise CheckpointError(
                f"{ckpt}: EMA weights do not match the model built from its config"
            )
        with torch.no_grad():
            for p, s in zip(params, shadow, strict=True):
                p.copy_(s)
    else:
        from safetensors.torch import load_file

        state = load_file(ckpt / "model.safetensors")
        model.load_state_dict(state)
    return LoadedModel(
        model.to(device).eval(),
        make_path(cfg),
        cfg,
        class_names,
        extra["state"]["step"],
        weights,
        str(ckpt),
    )
