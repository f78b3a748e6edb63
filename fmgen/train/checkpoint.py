"""Writing and restoring checkpoints: safetensors + JSON, checksummed, renamed into place.

The file names and reading belong to ``fmgen.models.store`` (sampling and evaluation load
checkpoints without the training layer); this module writes them, restores a run from them and
checks that a resume is compatible.

Accelerate's ``save_state``/``load_state`` are not used: they write the optimizer and the RNG
states as pickles (optimizer.bin, random_states_<rank>.pkl) and read them back with
weights-only off, so a shared checkpoint could run code. Here tensors go to safetensors and
the rest to JSON, with the same content: the unwrapped model (main process), optimizer, EMA,
GradScaler, and each rank's RNG states and data position (every rank writes its own).

A save: every rank writes into a hidden folder, then the main process writes the manifest
(checksums, fsyncing every file), renames the folder into place, moves ``latest`` and prunes.
The previous checkpoint is untouched until the new one is in place and verified.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from fmgen.config import Config, to_dict
from fmgen.models.store import (
    CHECKPOINT_FORMAT,
    EMA_FILE,
    EXTRA_FILE,
    HEADS_FILE,
    LATEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    POSTHOC_FILE,
    STATE_FILE,
    TMP_PREFIX,
    CheckpointError,
    json_bytes,
    rank_files,
    read_checkpoint_extra,
    read_json,
    read_manifest,
    read_tensors,
    remove_folder,
    step_folders,
    step_of,
    swap_in,
    verify_folder,
    write_atomic,
    write_durable,
    write_error,
    write_manifest,
)
from fmgen.train.dist import any_rank
from fmgen.train.ema import PowerEMA, power_ema_bytes
from fmgen.train.errors import TrainingError

log = logging.getLogger("fmgen.train")


def _tensors(d: dict[str, torch.Tensor]) -> bytes:
    # safetensors stores dense row-major tensors: channels_last ones are copied to that layout
    return safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in d.items()})


# --- optimizer and RNG states as tensors + JSON ------------------------------------------------


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as tensors ("state.{i}.exp_avg", ...) and JSON (param_groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g, group in enumerate(sd["param_groups"]):
        groups.append({k: v for k, v in group.items() if not torch.is_tensor(v)})
        tensors.update({f"param_groups.{g}.{k}": v for k, v in group.items() if torch.is_tensor(v)})
    return tensors, {"state": scalars, "param_groups": groups}


def _like(saved: Any, live: Any) -> Any:
    return tuple(saved) if isinstance(live, tuple) and isinstance(saved, list) else saved


def unflatten_optimizer(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], live: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of ``flatten_optimizer``; tuples (betas) come back as the live optimizer's."""
    state: dict[int, dict[str, Any]] = {}
    groups = [dict(g) for g in meta["param_groups"]]
    for name, value in tensors.items():
        kind, index, key = name.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[key] = value
        else:
            groups[int(index)][key] = value
    for idx, scalars in meta["state"].items():
        state.setdefault(int(idx), {}).update(scalars)
    for group, now in zip(groups, live["param_groups"], strict=False):
        for k in group:
            if k in now:
                group[k] = _like(group[k], now[k])
    return {"state": state, "param_groups": groups}


def rng_states(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch (CPU, every CUDA device, the noise generator) as uint8
    tensors; python's and numpy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    # numpy's global (legacy) generator: what third-party code draws from, as Accelerate saved it
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_states(
    tensors: dict[str, torch.Tensor], saved: dict[str, Any], generator: torch.Generator
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["generator"])
    if torch.cuda.is_available():
        for i in range(min(torch.cuda.device_count(), sum(k.startswith("cuda.") for k in tensors))):
            torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002


# --- saving ------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Any, final: Path, *, model: torch.nn.Module, optimizer: Any, ema: Any,
    generator: torch.Generator, state: dict[str, Any], cfg: Config, class_names: list[str],
    data_state: dict[str, Any], keep: int, autoencoder: dict[str, Any] | None = None,
    posthoc: PowerEMA | None = None, heads: torch.nn.Module | None = None,
) -> Path:  # fmt: skip
    """Write a checkpoint: every rank its RNG states and data position, the main process the
    rest (with the post-hoc EMA profiles, which only it holds); then the manifest, the rename
    into place, ``latest``, pruning.

    A failed write (a full disk) on any rank removes the partial folder and raises a
    ``CheckpointError`` on every rank; the previous checkpoint stays as it was.
    """
    main, rank, device = accelerator.is_main_process, accelerator.process_index, accelerator.device
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    blobs: dict[str, bytes] = {}
    rank_tensors, rank_json = rank_files(rank)
    rng_t, rng_j = rng_states(generator)
    blobs[rank_tensors] = _tensors(rng_t)
    blobs[rank_json] = json_bytes({**rng_j, "data": data_state})
    if main:
        opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
        ema_state = ema.state_dict()
        shadow = {f"shadow_params.{i}": p for i, p in enumerate(ema_state.pop("shadow_params"))}
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        # the autoencoder stage with its latent statistics: what sampling a checkpoint decodes with
        extra = {"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "class_names": class_names,
                 "ema": ema_state, "optimizer": opt_meta, "scaler": scaler,
                 "autoencoder": autoencoder}  # fmt: skip
        if posthoc is not None:
            extra["posthoc"] = posthoc.meta()
            blobs[POSTHOC_FILE] = power_ema_bytes(posthoc)
        if heads is not None:
            blobs[HEADS_FILE] = _tensors(heads.state_dict())
        summary = {**state, "world_size": accelerator.num_processes, "checkpoint": final.name}
        blobs.update({
            MODEL_FILE: _tensors(model.state_dict()), EMA_FILE: _tensors(shadow),
            OPTIMIZER_FILE: _tensors(opt_tensors), EXTRA_FILE: json_bytes(extra),
            STATE_FILE: json_bytes(summary),
        })  # fmt: skip
    needed = sum(len(b) for b in blobs.values())

    error: BaseException | None = None
    if main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()  # the folder exists before any rank writes into it
    if error is None:
        try:
            for name, blob in blobs.items():
                write_durable(tmp / name, blob)
        except OSError as e:
            error = e
    # an all-reduce, so that every rank leaves together instead of waiting at a barrier forever
    if not any_rank(error is not None, device) and main:
        try:
            write_manifest(tmp)  # reads back every rank's files: last, after all were written
            swap_in(tmp, final)
            write_atomic(final.parent / LATEST, final.name + "\n")
        except OSError as e:
            error = e
    if any_rank(error is not None, device):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(error, "the checkpoint", final, needed)
    if main:
        prune_checkpoints(final.parent, final, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, newest: Path, keep: int) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest older checkpoints that verify; remove the rest.

    Damaged checkpoints are never counted as kept (they are removed, with a warning), and
    nothing is removed unless ``newest`` itself verifies. Folders of later steps than ``newest``
    (another run's, e.g. after a resume from an older checkpoint) are left alone.
    """
    try:
        verify_folder(newest)
    except CheckpointError as e:
        log.warning("not pruning old checkpoints: the new one does not verify (%s)", e)
        return
    kept, new_step = 1, step_of(newest.name) or 0
    for old in step_folders(root):
        if (step_of(old.name) or 0) >= new_step:
            continue
        if kept < keep:
            try:
                verify_folder(old)
                kept += 1
                continue
            except CheckpointError as e:
                log.warning("removing damaged checkpoint %s: %s", old.name, e)
        try:
            remove_folder(old)
        except OSError as e:  # a folder left behind costs disk, not the run
            log.warning("could not remove old checkpoint %s: %s", old, e)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what interrupted saves and exports left (hidden ``.tmp-*`` files and folders)."""
    found = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            found += sorted(folder.glob(f"{TMP_PREFIX}*"))
    for path in found:
        log.warning("removing %s, left by an interrupted save", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


# --- restoring ---------------------------------------------------------------------------------


def restore_checkpoint(
    ckpt: Path, accelerator: Any, *, cfg: Config, model: torch.nn.Module, optimizer: Any,
    ema: Any, generator: torch.Generator, data: Any, autoencoder: Any = None,
    posthoc: PowerEMA | None = None, heads: torch.nn.Module | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Load a verified checkpoint (``find_checkpoint``) into the run; returns the train state.

    ``posthoc``: the main process's post-hoc EMA profiles (None on the other ranks)."""
    extra = read_checkpoint_extra(ckpt)
    check_resumable(cfg, extra["config"], ckpt)  # a clear message, not a size mismatch
    saved_ae = (extra.get("autoencoder") or {}).get("hash", "identity")
    if autoencoder is not None and saved_ae != autoencoder.hash:
        raise CheckpointError(
            f"cannot resume from {ckpt}: it was trained with the autoencoder of hash {saved_ae}, "
            f"model.autoencoder now has hash {autoencoder.hash}; restore that VAE or train into "
            f"a new train.run_dir"
        )
    check_posthoc_resumable(cfg, extra.get("posthoc"), ckpt)  # on every rank: all fail together
    rank = accelerator.process_index
    rank_tensors, rank_json = rank_files(rank)
    listed = read_manifest(ckpt)
    if rank_tensors not in listed or rank_json not in listed:
        raise TrainingError(
            f"{ckpt} has no RNG state and data position for rank {rank} ({rank_json}): it was "
            f"written by fewer processes; resume with the same number of processes"
        )
    if (heads is not None) != (HEADS_FILE in listed):
        has = "has" if HEADS_FILE in listed else "has no"
        raise TrainingError(
            f"cannot resume from {ckpt}: it {has} training heads ({HEADS_FILE}: loss.uncertainty, "
            f"repa.feature_network) and this config {'asks for' if heads is not None else 'has'} "
            f"{'them' if heads is not None else 'none'}; set loss.uncertainty and repa.* as the "
            f"run was started, or train into a new train.run_dir"
        )
    model.load_state_dict(read_tensors(ckpt, MODEL_FILE))
    if heads is not None:
        heads.load_state_dict(read_tensors(ckpt, HEADS_FILE))
    live = optimizer.state_dict()
    optimizer.load_state_dict(
        unflatten_optimizer(read_tensors(ckpt, OPTIMIZER_FILE), extra["optimizer"], live)
    )
    shadow = read_tensors(ckpt, EMA_FILE)
    ema.load_state_dict(
        {
            **extra["ema"],
            "shadow_params": [shadow[f"shadow_params.{i}"] for i in range(len(shadow))],
        }
    )
    ema.to(accelerator.device)
    if posthoc is not None:
        posthoc.load(read_tensors(ckpt, POSTHOC_FILE))
    if accelerator.scaler is not None and extra.get("scaler"):
        accelerator.scaler.load_state_dict(extra["scaler"])
    saved = read_json(ckpt, rank_json)
    data.load_state_dict(saved["data"])
    set_rng_states(read_tensors(ckpt, rank_tensors), saved, generator)
    return read_json(ckpt, STATE_FILE)


def check_resumable(cfg: Config, saved: dict[str, Any], ckpt: Path) -> None:
    """Model, path, data shape and batch must match the checkpoint's; other settings may change."""
    now, defaults = to_dict(cfg), to_dict(Config())
    for section in ("model", "path"):
        # a key newer than the checkpoint (e.g. model.autoencoder) counts as its default
        was = {**defaults[section], **saved[section]}
        # model.autoencoder is a path: the VAE may move; its hash is checked instead
        diff = {k: (was.get(k), v) for k, v in now[section].items()
                if was.get(k) != v and k != "autoencoder"}  # fmt: skip
        if diff:
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


def check_posthoc_resumable(cfg: Config, saved: dict[str, Any] | None, ckpt: Path) -> None:
    """A run that tracks post-hoc EMA profiles resumes only the same profiles: a profile's
    state after t images depends on all of them, so one cannot be started half-way."""
    now = cfg.ema.posthoc_sigma_rels
    if not now:
        if saved:
            log.warning("%s tracked post-hoc EMA profiles %s; ema.posthoc_sigma_rels is empty, so "
                        "tracking stops here", ckpt, saved["sigma_rels"])  # fmt: skip
        return
    was = saved["sigma_rels"] if saved else []
    if was != now:
        raise CheckpointError(
            f"cannot resume from {ckpt}: ema.posthoc_sigma_rels is {now}, the checkpoint tracked "
            f"{was or 'none'} (a profile needs the whole run); set ema.posthoc_sigma_rels={was} "
            f"or use a new train.run_dir"
        )
