"""The run folder's files: names, the newest checkpoint, the exported model, loading a model.

Layout of a run directory::

    RUN_DIR/checkpoints/step_0000440/   Accelerate state (model, optimizer, scaler, RNG per rank)
                                        + fmgen_extra.pt (EMA, noise generator, train state, config)
                                        + fmgen_loader_<rank>.pt (data stream position per rank)
                                        + fmgen_state.json (step, images, W&B run id; readable)
    RUN_DIR/checkpoints/latest          name of the newest COMPLETE checkpoint
    RUN_DIR/export/backbone/            diffusers save_pretrained of the EMA backbone
    RUN_DIR/export/fmgen.json           backbone type and class, prediction type, conditioning,
                                        autoencoder stage, path, classes, config

Training writes checkpoints (``fmgen.train.checkpoint``); this module reads them, and writes
and reads exports, so sampling and evaluation load models without the training layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fmgen.base import FmgenError
from fmgen.config import Config, ConfigError, config_from_dict, make_path, to_dict
from fmgen.core.paths import GaussianPath
from fmgen.models.autoencoder import Autoencoder, autoencoder_from_dict, build_autoencoder
from fmgen.models.backbones import get_backbone
from fmgen.models.conditioning import conditioning_from_dict
from fmgen.models.flow import FlowModel, build_conditioning, build_model, describe_model

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


def loader_file(ckpt: Path, rank: int) -> Path:
    """The data stream position of one rank inside a checkpoint."""
    return ckpt / f"fmgen_loader_{rank}.pt"


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


# --- exported models ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: FlowModel
    path: GaussianPath
    autoencoder: Autoencoder
    config: Config
    class_names: list[str]
    step: int
    weights: str  # "ema" or "raw"
    source: str


EXPORT_FORMAT = "fmgen-export-2"


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


def export_model(
    model: FlowModel, cfg: Config, out_dir: Path, *, autoencoder: Autoencoder,
    class_names: list[str], step: int,
) -> None:  # fmt: skip
    """diffusers ``save_pretrained`` of the backbone plus what rebuilds the model around it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out_dir / "backbone")
    meta = {
        "format": EXPORT_FORMAT,
        **describe_model(model),
        "autoencoder": autoencoder.to_dict(),
        "path": {"name": cfg.path.name, "b0": cfg.path.b0, "b1": cfg.path.b1},
        "class_names": class_names,
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "time_convention": "t=0 noise, t=1 data",
        "step": step,
        "config": to_dict(cfg),
    }
    write_atomic(out_dir / "fmgen.json", json.dumps(meta, indent=2))


def _load_export(src: Path, device: str | torch.device) -> LoadedModel:
    meta = json.loads((src / "fmgen.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{src}: export format {meta.get('format')!r}, this fmgen reads {EXPORT_FORMAT!r}; "
            f"export the model again from its checkpoint"
        )
    cfg = _config_of(meta["config"], src, src.parent)
    spec = get_backbone(meta["backbone"]["type"])
    if spec.class_name != meta["backbone"]["class"]:
        raise CheckpointError(
            f"{src}: the backbone was saved as {meta['backbone']['class']}, but model.type "
            f"{spec.name!r} is now {spec.class_name}; register the backbone it was trained with"
        )
    backbone = spec.module_class.from_pretrained(src / "backbone")
    model = FlowModel(backbone, spec, prediction_type=meta["prediction_type"],
                      conditioning=conditioning_from_dict(meta["conditioning"]),
                      sample_shape=tuple(meta["sample_shape"]))  # fmt: skip
    return LoadedModel(model.to(device).eval(), make_path(cfg),
                       autoencoder_from_dict(meta["autoencoder"]), cfg, meta["class_names"],
                       meta["step"], "ema", str(src))  # fmt: skip


def _config_of(tree: dict, where: Path, run_folder: Path) -> Config:
    try:
        return _resolve_run_paths(config_from_dict(tree), run_folder)
    except ConfigError as e:
        raise CheckpointError(
            f"{where}: its saved config does not load with this fmgen ({e})"
        ) from None


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
        return _load_export(src, device)
    if src.is_dir() and (src / "export" / "fmgen.json").is_file() and weights == "ema":
        return _load_export(src / "export", device)
    ckpt = find_checkpoint(src, "auto") if (src / "checkpoints").is_dir() else src
    if ckpt is None or not (ckpt / EXTRA_FILE).is_file():
        raise CheckpointError(
            f"{src}: not an fmgen checkpoint, run folder or exported model (looked for "
            f"{EXTRA_FILE}, checkpoints/{LATEST} and fmgen.json)"
        )
    extra = torch.load(ckpt / EXTRA_FILE, map_location="cpu", weights_only=False)
    cfg = _config_of(extra["config"], ckpt, ckpt.parent.parent)
    class_names = extra["class_names"]
    autoencoder = build_autoencoder(cfg)
    model = build_model(cfg, build_conditioning(cfg, len(class_names)), autoencoder)
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

        model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return LoadedModel(model.to(device).eval(), make_path(cfg), autoencoder, cfg, class_names,
                       extra["state"]["step"], weights, str(ckpt))  # fmt: skip
