"""The run folder's files: names, checksums, the newest good checkpoint, the export, loading a model.

Layout of a run directory::

    RUN_DIR/.fmgen.lock                 who trains into this folder now (fmgen.train.lock)
    RUN_DIR/checkpoints/step_0000440/
        model.safetensors               the training weights (the unwrapped model's state dict)
        ema.safetensors                 the EMA weights: shadow_params.{i}
        optimizer.safetensors           the optimizer's tensors: state.{i}.{name}
        posthoc_ema.safetensors         post-hoc EMA profiles p{j}.{parameter} (if tracked)
        fmgen_extra.json                config, class names, scalars of the EMA, the optimizer
                                        (param_groups) and the GradScaler
        fmgen_state.json                train state: step, images, W&B run id (readable)
        fmgen_rank_<r>.safetensors      rank r's torch RNG states (CPU, CUDA) and noise generator
        fmgen_rank_<r>.json             rank r's python / numpy RNG states and data position
        fmgen_manifest.json             sha256 and size of every file above, written last
    RUN_DIR/checkpoints/latest          name of the newest COMPLETE checkpoint
    RUN_DIR/export/backbone/            diffusers save_pretrained of the EMA backbone
    RUN_DIR/export/autoencoder/         latent models: the VAE's config and weights, copied
                                        byte for byte (the hash fmgen.json records)
    RUN_DIR/export/text_encoder/        text models: the learned encoder (save_pretrained), or a
                                        frozen encoder's folder copied byte for byte (with its
                                        tokenizer; a sibling tokenizer/ folder goes to tokenizer/)
                                        unless larger than text.export_copy_mb: then fmgen.json
                                        names its folder and hash
    RUN_DIR/export/fmgen.json           backbone type and class, prediction type, conditioning,
                                        autoencoder stage, path, classes, config
    RUN_DIR/export/model_index.json     the diffusers pipeline index (fmgen.pipeline.FlowPipeline)
    RUN_DIR/export/scheduler/           the stock diffusers scheduler of fmgen's Euler steps
    RUN_DIR/export/fmgen_manifest.json  checksums of the export
    RUN_DIR/posthoc/                    post-hoc EMA snapshots, never pruned (fmgen.models.posthoc)

No file is a pickle: unpickling (torch's and pickle's loaders) runs code from the file, so a shared
checkpoint could run anything on the machine that samples or resumes from it. Tensors are
safetensors, everything else JSON. A folder is read only after its manifest verifies, so flipped
bytes or a half-written copy are reported, naming the file, instead of loading silently.

Training writes checkpoints (``fmgen.train.checkpoint``); this module reads them, and writes
and reads exports, so sampling and evaluation load models without the training layer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from fmgen.base import FmgenError
from fmgen.config import Config, ConfigError, config_from_dict, make_path, to_dict
from fmgen.core.paths import GaussianPath
from fmgen.models.autoencoder import Autoencoder, autoencoder_from_dict, build_autoencoder
from fmgen.models.backbones import BackboneSpec, get_backbone
from fmgen.models.conditioning import TextConditioning, conditioning_from_dict
from fmgen.models.flow import FlowModel, build_conditioning, build_model, describe_model
from fmgen.models.pipeline_files import TEXT_ENCODER_DIR, write_pipeline_files
from fmgen.models.text import FrozenTextEncoder, LearnedTextEncoder, TextEncoderError, folder_hash

log = logging.getLogger("fmgen.models")

CHECKPOINT_FORMAT = "fmgen-checkpoint-2"  # 1: Accelerate's save_state + torch.save pickles
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
POSTHOC_FILE = "posthoc_ema.safetensors"  # with ema.posthoc_sigma_rels: the power-EMA profiles
HEADS_FILE = "heads.safetensors"  # with loss.uncertainty or repa: the training heads
EXTRA_FILE = "fmgen_extra.json"
STATE_FILE = "fmgen_state.json"
MANIFEST = "fmgen_manifest.json"
MANIFEST_FORMAT = "fmgen-manifest-1"
LATEST = "latest"
TMP_PREFIX = ".tmp-"  # hidden work folders and files; what is left of them is an interrupted save
# what the checkpoints of older fmgen versions held: pickles, never loaded
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
_STEP = re.compile(r"step_(\d+)")


class CheckpointError(FmgenError, RuntimeError):
    """A missing, incomplete or incompatible checkpoint; the message says what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint or export folder whose files do not match its manifest; ``file`` names one."""

    def __init__(self, folder: Path, file: str, problem: str) -> None:
        super().__init__(f"{folder}: {file} {problem}")
        self.folder, self.file = folder, file


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name (``step_0000440`` -> 440); None for other names."""
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def rank_files(rank: int) -> tuple[str, str]:
    """The RNG states and data position of one rank inside a checkpoint: (tensors, JSON)."""
    return f"fmgen_rank_{rank}.safetensors", f"fmgen_rank_{rank}.json"


# --- durable writes ----------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, renames) durable, not only the files' contents."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes | str) -> None:
    """Write a file and fsync it, so a later rename never publishes a file still in the cache."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` by rename: readers see the old or the new content."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


def remove_folder(folder: Path) -> None:
    """Delete a folder by renaming it hidden first, so no half-deleted folder ever shows."""
    if not folder.exists():
        return
    aside = folder.with_name(f"{TMP_PREFIX}removed-{folder.name}")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """Put a fully written folder ``tmp`` in the place of ``final`` (which may exist).

    A folder cannot replace a non-empty one in one rename (and Python has no renameat2
    RENAME_EXCHANGE): the old one is renamed aside, the new one renamed in, the old deleted. An
    interruption leaves at worst no ``final`` and hidden leftovers, never a mixed folder.
    """
    aside = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, also when a library hid it in its own exception's message or cause."""
    for _ in range(8):  # the exception and its causes
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        # safetensors says "No space left on device (os error 28)"; torch's serialization says
        # "unexpected pos" or "basic_ios::clear", never "disk full"
        if any(s in text for s in ("No space left", "os error 28", "unexpected pos", "basic_ios")):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(e: BaseException | None, what: str, folder: Path, needed: int) -> CheckpointError:
    """One line for a failed write: disk full (with the sizes) or the OS's reason."""
    free = shutil.disk_usage(_existing(folder)).free
    if _disk_full(e) or (e is not None and free < needed):
        return CheckpointError(
            f"disk full while writing {what} to {folder}: needs about {needed:,} bytes, {free:,} "
            f"free; free space or point train.run_dir elsewhere"
        )
    reason = " ".join(str(e).split()) if e is not None else "another process failed (see its error)"
    return CheckpointError(
        f"could not write {what} to {folder}: {reason}; check that the folder is writable, or "
        f"point train.run_dir elsewhere"
    )


# --- checksums ---------------------------------------------------------------------------------


def _sha256(path: Path, *, sync: bool = False) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
        if sync:  # files written by a library (diffusers) get their fsync here
            os.fsync(f.fileno())
    return h.hexdigest(), size


def _files_digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> None:
    """Checksum every file under ``folder`` (fsyncing it) into its manifest, written last.

    The manifest carries a checksum of its own entries, so a damaged manifest is reported as
    such, not as a damaged file it happens to describe wrongly.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            sha, size = _sha256(path, sync=True)
            files[name] = {"sha256": sha, "size": size}
    for sub in sorted({p.parent for p in folder.rglob("*")}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)
    manifest = {"format": MANIFEST_FORMAT, "files": files, "sha256": _files_digest(files)}
    write_durable(folder / MANIFEST, json_bytes(manifest))
    fsync_dir(folder)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest's file entries, after its own checksum; old pickle checkpoints are refused."""
    path = folder / MANIFEST
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []  # fmt: skip
        if pickles:
            raise CheckpointError(
                f"{folder} was written by an older fmgen: {', '.join(pickles)} are pickles, "
                f"which can run code when loaded, so they are not loaded; load it with the fmgen "
                f"that wrote it (its export/ folder loads here), or train into a new train.run_dir"
            )
        raise DamagedCheckpointError(
            folder, MANIFEST, "is missing: an interrupted save, or not an fmgen checkpoint folder"
        )
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        ok = (
            manifest["format"] == MANIFEST_FORMAT
            and manifest["sha256"] == _files_digest(files)
            and all(
                isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()
            )
        )
    except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError: a ValueError
        ok = False
    if not ok:
        raise DamagedCheckpointError(folder, MANIFEST, "is damaged (not a valid fmgen manifest)")
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise DamagedCheckpointError(folder, MANIFEST, f"names a file outside it: {name!r}")
    return files


def verify_folder(folder: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check every file of a checkpoint or export against its manifest; return the entries.

    Raises ``DamagedCheckpointError`` naming the first file that is missing, of another size or
    of another sha256 (or one of ``required`` the manifest does not list).
    """
    files = read_manifest(folder)
    for name in required:
        if name not in files:
            raise DamagedCheckpointError(folder, name, "is not in the manifest (incomplete)")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpointError(folder, name, "is missing")
        sha, size = _sha256(path)
        if size != entry["size"]:
            raise DamagedCheckpointError(
                folder, name, f"has {size} bytes, the manifest says {entry['size']} (truncated?)"
            )
        if sha != entry["sha256"]:
            raise DamagedCheckpointError(folder, name, "is damaged: its sha256 differs from the manifest's")  # fmt: skip
    return files


def read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: {name} does not read as JSON ({e})") from None


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors((folder / name).read_bytes())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: {name} does not read as safetensors ({e})") from None


# --- finding the checkpoint to load ------------------------------------------------------------

CHECKPOINT_CORE = (EXTRA_FILE, STATE_FILE, MODEL_FILE, EMA_FILE)


def step_folders(root: Path) -> list[Path]:
    """The ``step_*`` folders of a checkpoints/ folder, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(found, key=lambda p: step_of(p.name) or 0, reverse=True)


def _read_pointer(pointer: Path, quiet: bool) -> str | None:
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if step_of(name) is None:
        if not quiet:
            log.warning("%s is unreadable (%r); ignoring it", pointer, name[:40])
        return None
    return name


def newest_good_checkpoint(root: Path, *, quiet: bool = False) -> Path | None:
    """The checkpoint of ``root`` (a checkpoints/ folder) to resume from; None if it holds none.

    The one ``latest`` names if it verifies, else the newest step folder that verifies. Every
    damaged or incomplete one passed over is reported with a warning naming the damaged file;
    when step folders exist and none verifies, this refuses (never a silent restart at step 0).
    """
    steps, pointer = step_folders(root), root / LATEST
    named = _read_pointer(pointer, quiet)
    if not steps:
        if pointer.exists():
            raise CheckpointError(
                f"{pointer} exists but {root} holds no checkpoint folder; restore the "
                f"checkpoints, or move {root} away to train from step 0"
            )
        return None
    order = [p for p in steps if p.name == named] + [p for p in steps if p.name != named]
    failures = []
    for path in order:
        try:
            verify_folder(path, CHECKPOINT_CORE)
        except CheckpointError as e:
            failures.append(str(e))
            if not quiet:
                log.warning("skipping checkpoint %s: %s", path.name, e)
            continue
        if not quiet and path.name != named:
            why = "is missing or unreadable" if named is None else f"names {named}"
            log.warning(
                "%s %s; using %s, the newest checkpoint that verifies", pointer, why, path.name
            )
        return path
    raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {root} verifies (newest: {failures[0]}); "
        f"pass --resume PATH with an intact copy, or move {root} away to train from step 0"
    )


def find_checkpoint(run_dir: str | Path, resume: str | None, *, quiet: bool = False) -> Path | None:
    """Resolve ``--resume`` to a verified checkpoint folder.

    None/"" -> no resume; "auto" -> the newest good checkpoint of run_dir, None if it has none;
    a run folder or a checkpoints/ folder -> its newest good checkpoint; else a checkpoint folder,
    which must verify. ``quiet`` silences the warnings (ranks other than the main process).
    """
    if not resume:
        return None
    if resume == "auto":
        return newest_good_checkpoint(Path(run_dir) / "checkpoints", quiet=quiet)
    path = Path(resume)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / LATEST).exists() or step_folders(root):
        found = newest_good_checkpoint(root, quiet=quiet)
        if found is not None:
            return found
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume!r}: no such folder; pass a folder like "
            f"RUN_DIR/checkpoints/step_0000100, a run folder, or 'auto'"
        )
    verify_folder(path, CHECKPOINT_CORE)
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
    class_names: list[str], step: int, provenance: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """diffusers ``save_pretrained`` of the backbone plus what rebuilds the model around it.

    fmgen.json holds fmgen's own metadata; model_index.json and scheduler/ make the folder a
    diffusers pipeline (``fmgen.pipeline.FlowPipeline.from_pretrained``). ``provenance`` (JSON)
    says where weights other than the run's EMA came from (post-hoc EMA).

    Written into a hidden sibling folder with a manifest and swapped in by rename, so an
    interrupted export never leaves the weights of one step beside the metadata of another.
    """
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
        **({"provenance": provenance} if provenance else {}),
    }
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    needed = sum(t.numel() * t.element_size() for t in model.backbone.state_dict().values())
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        autoencoder.export(tmp / "autoencoder")  # latent models: the VAE (identity: nothing)
        meta["conditioning"] = _export_text_encoder(model, cfg, tmp)
        write_durable(tmp / "fmgen.json", json.dumps(meta, indent=2))
        write_pipeline_files(tmp, model.backbone, model.text_encoder)
        write_manifest(tmp)
        swap_in(tmp, out_dir)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, "the export", out_dir, needed) from None


def _export_text_encoder(model: FlowModel, cfg: Config, tmp: Path) -> dict[str, Any]:
    """Write a text model's encoder into the export being written; its conditioning record."""
    record = model.conditioning.to_dict()
    cond = model.conditioning
    if not isinstance(cond, TextConditioning):
        return record
    if cond.learned:
        assert model.text_encoder is not None
        model.text_encoder.save_pretrained(tmp / TEXT_ENCODER_DIR, safe_serialization=True)
        return record
    folder = cond.frozen.folder if cond.frozen is not None else Path(cond.encoder["path"])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    copied = size <= cfg.text.export_copy_mb * 2**20
    if copied:
        shutil.copytree(folder, tmp / TEXT_ENCODER_DIR)
        sibling = folder.parent / "tokenizer"
        if not any(folder.glob("tokenizer*")) and sibling.is_dir():
            shutil.copytree(sibling, tmp / "tokenizer")
    else:
        log.warning("the text encoder %s (%.1f GB) is larger than text.export_copy_mb=%d: the "
                    "export names it (hash %s) and needs it there to sample from prompts",
                    folder, size / 2**30, cfg.text.export_copy_mb, cond.encoder["hash"][:12])  # fmt: skip
    record["encoder"] = {**record["encoder"], "copied": copied}
    return record


def export_text_encoder(src: Path, meta: dict[str, Any]) -> tuple[nn.Module | None, FrozenTextEncoder | None]:
    """An export's text encoder: (the learned module, None) or (None, the frozen encoder, read
    from the export's copy or the folder fmgen.json names, checked against the recorded hash)."""
    d = meta["conditioning"]
    if d.get("kind") != TextConditioning.kind:
        return None, None
    enc = d["encoder"]
    if enc.get("kind") == "learned":
        try:
            return LearnedTextEncoder.from_pretrained(src / TEXT_ENCODER_DIR, use_safetensors=True), None
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{src}: the text encoder does not load ({' '.join(str(e).split())})") from None  # fmt: skip
    folder = src / TEXT_ENCODER_DIR if enc.get("copied", True) else Path(enc["path"])
    if not folder.is_dir():
        raise CheckpointError(
            f"{src}: its frozen text encoder {str(folder)!r} (hash {enc['hash'][:12]}) is not there; "
            f"put the encoder folder back there to sample from prompts"
        )
    if folder_hash(folder) != enc["hash"]:
        raise CheckpointError(
            f"{src}: the text encoder in {folder} has another hash than the one the model was "
            f"trained with ({enc['hash'][:12]}); restore the original encoder folder"
        )
    try:
        frozen = FrozenTextEncoder(folder, max_length=int(d["max_length"]),
                                   dtype=enc.get("dtype", "float32"), folder_sha256=enc["hash"])  # fmt: skip
    except TextEncoderError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return None, frozen


def read_export(src: Path) -> dict[str, Any]:
    """fmgen.json of an export folder, after its manifest verifies and its format matches."""
    if (src / MANIFEST).is_file():
        verify_folder(src, ("fmgen.json",))
    else:
        log.warning("%s has no %s (written by hand or by an older fmgen): its files are not "
                    "checked for damage", src, MANIFEST)  # fmt: skip
    meta = read_json(src, "fmgen.json")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{src}: export format {found!r}, this fmgen reads {EXPORT_FORMAT!r}; "
            f"export the model again from its checkpoint"
        )
    return meta


def export_backbone_spec(src: Path, meta: dict[str, Any]) -> BackboneSpec:
    """The registry entry of an export's backbone; refused if it now names another class."""
    spec = get_backbone(meta["backbone"]["type"])
    if spec.class_name != meta["backbone"]["class"]:
        raise CheckpointError(
            f"{src}: the backbone was saved as {meta['backbone']['class']}, but model.type "
            f"{spec.name!r} is now {spec.class_name}; register the backbone it was trained with"
        )
    return spec


def assemble_export(src: Path, meta: dict[str, Any], backbone: nn.Module,
                    device: str | torch.device | None = None,
                    text_encoder: nn.Module | None = None) -> LoadedModel:  # fmt: skip
    """The model of an export around its loaded backbone (by fmgen or by diffusers' pipeline
    loader): the FlowModel of fmgen.json's prediction type, conditioning and sample shape.
    ``text_encoder``: a learned text encoder diffusers loaded (else read from the export)."""
    cfg = saved_config(meta["config"], src, src.parent)
    spec = export_backbone_spec(src, meta)
    if type(backbone) is not spec.module_class:
        raise CheckpointError(
            f"{src}: the backbone loaded as {type(backbone).__qualname__}, but fmgen.json says "
            f"{spec.class_name}; export the model again (model_index.json and fmgen.json disagree)"
        )
    learned, frozen = (text_encoder, None) if text_encoder is not None else export_text_encoder(src, meta)
    model = FlowModel(backbone, spec, prediction_type=meta["prediction_type"],
                      conditioning=conditioning_from_dict(meta["conditioning"], frozen),
                      sample_shape=tuple(meta["sample_shape"]), text_encoder=learned)  # fmt: skip
    model = model.eval() if device is None else model.to(device).eval()
    stage = autoencoder_from_dict(meta["autoencoder"], src / "autoencoder")  # the export's copy
    return LoadedModel(model, make_path(cfg), stage, cfg,
                       meta["class_names"], meta["step"], "ema", str(src))  # fmt: skip


def _load_export(src: Path, device: str | torch.device) -> LoadedModel:
    meta = read_export(src)
    spec = export_backbone_spec(src, meta)
    try:  # safetensors only: diffusers would otherwise fall back to a .bin file (a pickle)
        backbone = spec.module_class.from_pretrained(src / "backbone", use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{src}: the backbone does not load ({' '.join(str(e).split())})") from None  # fmt: skip
    return assemble_export(src, meta, backbone, device)


def saved_config(tree: dict, where: Path, run_folder: Path) -> Config:
    """The config saved in a checkpoint, export or snapshot, with paths that work from here."""
    try:
        return _resolve_run_paths(config_from_dict(tree), run_folder)
    except ConfigError as e:
        raise CheckpointError(
            f"{where}: its saved config does not load with this fmgen ({e})"
        ) from None


def read_checkpoint_extra(ckpt: Path) -> dict[str, Any]:
    """fmgen_extra.json of a verified checkpoint: config, class names, EMA/optimizer scalars."""
    extra = read_json(ckpt, EXTRA_FILE)
    if not isinstance(extra, dict) or extra.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{ckpt}: checkpoint format {extra.get('format') if isinstance(extra, dict) else None!r}, "
            f"this fmgen reads {CHECKPOINT_FORMAT!r}"
        )
    return extra


def load_model(
    source: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load an exported model folder, a checkpoint folder, or a run folder (its export, or for
    raw weights its newest checkpoint that verifies). Every folder is checked against its manifest."""
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
    if (src / "checkpoints").is_dir():  # a run folder: its newest checkpoint that verifies
        ckpt = find_checkpoint(src, "auto")
    elif (src / LATEST).is_file() or step_folders(src):  # a checkpoints/ folder
        ckpt = newest_good_checkpoint(src)
    elif (src / MANIFEST).is_file() or src.is_dir() and any(src.iterdir()):
        verify_folder(src, CHECKPOINT_CORE)
        ckpt = src
    else:
        ckpt = None
    if ckpt is None:
        raise CheckpointError(
            f"{src}: not an fmgen checkpoint, run folder or exported model (looked for "
            f"{MANIFEST}, checkpoints/ and fmgen.json)"
        )
    extra = read_checkpoint_extra(ckpt)
    cfg = saved_config(extra["config"], ckpt, ckpt.parent.parent)
    class_names = extra["class_names"]
    # the stage with the data's statistics, as trained (checkpoints of pixel models: identity)
    recorded = extra.get("autoencoder")
    autoencoder = autoencoder_from_dict(recorded) if recorded else build_autoencoder(cfg)
    model = build_model(cfg, build_conditioning(cfg, len(class_names)), autoencoder)
    if weights == "ema":
        params = list(model.parameters())
        shadow = read_tensors(ckpt, EMA_FILE)
        if len(shadow) != len(params):
            raise CheckpointError(
                f"{ckpt}: EMA weights do not match the model built from its config"
            )
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(shadow[f"shadow_params.{i}"])
    else:
        model.load_state_dict(read_tensors(ckpt, MODEL_FILE))
    step = read_json(ckpt, STATE_FILE)["step"]
    return LoadedModel(model.to(device).eval(), make_path(cfg), autoencoder, cfg, class_names,
                       step, weights, str(ckpt))  # fmt: skip
