"""The diffusers side of an export: ``model_index.json`` and the stock scheduler's config.

With them an export folder is a diffusers pipeline folder that ``fmgen.pipeline.FlowPipeline``
loads through ``DiffusionPipeline.from_pretrained``::

    export/model_index.json    {"_class_name": "FlowPipeline", "backbone": [library, class],
                               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                               "autoencoder": [library, class] or [null, null]}
    export/scheduler/          FlowMatchEulerDiscreteScheduler(invert_sigmas=True): the stock
                               scheduler whose Euler steps are fmgen's (README, "diffusers")

diffusers loads component NAME from the subfolder NAME, so the components are named after the
folders the export writes: ``backbone/`` and, for a latent model, ``autoencoder/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from fmgen.models.unet import TIME_SCALE

PIPELINE_CLASS = "FlowPipeline"
MODEL_INDEX = "model_index.json"
SCHEDULER_DIR = "scheduler"
AUTOENCODER_DIR = "autoencoder"
TEXT_ENCODER_DIR = "text_encoder"
# the libraries diffusers imports by name; a class of any other module is recorded under its
# module's full name and resolves once that module is imported (a registered backbone's is)
_LIBRARIES = ("diffusers", "transformers")


def stock_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The diffusers scheduler that takes fmgen's Euler steps (given fmgen's grid as sigmas).

    ``invert_sigmas=True`` turns the scheduler's sigma (1 = noise) into fmgen's t (0 = noise):
    its sigmas are then fmgen's times, its steps x + (t_next - t) u, and its timesteps
    1000 t, the U-Net's own time input (``TIME_SCALE``).
    """
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(TIME_SCALE), shift=1.0, invert_sigmas=True
    )


def library_entry(module: nn.Module | type | None) -> list[str | None]:
    """``[library, class]`` of a component as ``DiffusionPipeline.save_pretrained`` records it."""
    if module is None:
        return [None, None]
    cls = module if isinstance(module, type) else type(module)
    top = cls.__module__.split(".")[0]
    return [top if top in _LIBRARIES else cls.__module__, cls.__name__]


def _saved_class(folder: Path) -> list[str | None]:
    """The entry of a diffusers model saved in ``folder`` (its config.json names the class)."""
    config = folder / "config.json"
    if not config.is_file():
        return [None, None]
    name = json.loads(config.read_text()).get("_class_name")
    return ["diffusers", name] if isinstance(name, str) and hasattr(diffusers, name) else [None, None]  # fmt: skip


def write_pipeline_files(folder: Path, backbone: nn.Module,
                         text_encoder: nn.Module | None = None) -> None:  # fmt: skip
    """Write the scheduler's config and ``model_index.json`` into an export being written.

    Called after the backbone (and an autoencoder stage's ``autoencoder/`` folder, written with
    ``save_pretrained``) is in ``folder`` and before its manifest, so the manifest covers both.
    """
    stock_scheduler().save_pretrained(folder / SCHEDULER_DIR)
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "backbone": library_entry(backbone),
        "scheduler": library_entry(FlowMatchEulerDiscreteScheduler),
        "autoencoder": _saved_class(folder / AUTOENCODER_DIR),
        # a learned text encoder trains with the backbone: a component; a frozen one is read by
        # fmgen from text_encoder/ (with its tokenizer), not by diffusers
        "text_encoder": library_entry(text_encoder),
    }
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
