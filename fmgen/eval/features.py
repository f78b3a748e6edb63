"""Feature networks for FID and precision/recall: a registry of builders, each giving a ``FeatureSpec``.

Built in: ``inception`` (torchmetrics' InceptionV3: the ``fid`` extra, i.e. torch-fidelity, and
its weights, ``--inception-weights PATH`` offline), ``digits-classifier`` (``fmgen.eval.digits``;
trained on digits, refused on other data unless forced). Networks read from a file or folder
(``fmgen.eval.networks``): ``dinov2`` (a local ``transformers`` folder), ``module:FILE.py:FACTORY``
and ``torchscript:FILE.pt`` (or a bare ``FILE.pt``). Such a network is named ``KIND:PATH`` or by
its kind plus ``eval.feature_network_path`` / ``--feature-network-path``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fmgen.base import FmgenError, file_hash

log = logging.getLogger("fmgen.eval")


class EvalError(FmgenError):
    """A bad evaluation request; the message names the fix."""


@dataclass
class FeatureSpec:
    """What turns images into features: the module (or Inception's feature size) and its identity.

    ``trained_on``: the data set the network was trained on, when it is specific to one (its
    features mean nothing elsewhere); None for general networks (Inception, DINOv2).
    """

    name: str
    feature: int | nn.Module
    weights_hash: str
    resize: str
    channels: int  # channels the network expects (gray images are repeated for Inception)
    path: str = ""  # the file or folder the network was read from ("" for built-in ones)
    trained_on: str | None = None

    @property
    def dim(self) -> int:
        """The feature dimension: FID needs more samples than this on each side."""
        return self.feature if isinstance(self.feature, int) else int(self.feature.num_features)


FeatureBuilder = Callable[..., FeatureSpec]
"""builder(*, resolution, channels, inception_weights, cache_dir, path, device) -> FeatureSpec."""

FEATURE_NETWORKS: dict[str, FeatureBuilder] = {}
FEATURE_DIMS: dict[str, int] = {}  # known without building the network (checks before sampling)
FEATURE_TRAINED_ON: dict[str, str] = {}  # the data set of a network, known without building it
PATH_NETWORKS: dict[str, str] = {}  # networks read from a path -> what the path is, for messages

CONFIG_FLAGS = ("eval.feature_network", "eval.feature_network_path")
CLI_FLAGS = ("--feature-network", "--feature-network-path")
FORCE_FIX = "--force-feature-network (eval.force_feature_network=true)"


def register_feature_network(
    name: str, builder: FeatureBuilder, *, dim: int | None = None, trained_on: str | None = None,
    path: str = "",
) -> None:  # fmt: skip
    """Register ``builder`` under ``name``; ``path`` (e.g. "a folder saved by save_pretrained")
    makes it a network read from a path, named ``name:PATH`` or given the path separately."""
    FEATURE_NETWORKS[name] = builder
    if dim is not None:
        FEATURE_DIMS[name] = dim
    if trained_on is not None:
        FEATURE_TRAINED_ON[name] = trained_on
    if path:
        PATH_NETWORKS[name] = path


@dataclass(frozen=True)
class FeatureChoice:
    """A feature network as the user named it: a registered kind and the path it reads."""

    kind: str
    path: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


def _valid_names() -> str:
    return ", ".join(f"{k}:{PATH_NETWORKS[k].split(' ')[0]}" if k in PATH_NETWORKS else k
                     for k in FEATURE_NETWORKS)  # fmt: skip


def parse_feature_network(
    name: str, path: str = "", *, flags: tuple[str, str] = CONFIG_FLAGS, check_path: bool = True
) -> FeatureChoice:
    """``inception``, ``dinov2:FOLDER``, ``module:FILE.py:FACTORY``, ``FILE.pt``, or a kind of
    ``PATH_NETWORKS`` with ``path`` given separately -> the kind and its path.

    Raises EvalError naming ``flags`` (the option and the path option, as the user wrote them)
    for an unknown name, a path missing or not needed, or (``check_path``) a path that does not
    exist.
    """
    flag, path_flag = flags
    kind, _, inline = name.partition(":")
    if kind not in PATH_NETWORKS and name.endswith(".pt"):
        kind, inline = "torchscript", name  # a TorchScript file of the user's own
    if kind not in FEATURE_NETWORKS or (inline and kind not in PATH_NETWORKS):
        raise EvalError(f"{flag} {name!r} is not a feature network; valid: {_valid_names()}")
    if inline and path and inline != path:
        raise EvalError(f"{flag} {name!r} names a path and {path_flag} {path!r} another; give one")
    path = inline or path
    if kind not in PATH_NETWORKS:
        if path:
            raise EvalError(f"{path_flag} {path!r} is for networks read from a path "
                            f"({', '.join(PATH_NETWORKS)}); {kind} needs none: drop it")  # fmt: skip
        return FeatureChoice(kind)
    if not path:
        raise EvalError(f"{flag} {kind} needs {PATH_NETWORKS[kind]}: {flag} {kind}:PATH or "
                        f"{path_flag} PATH")  # fmt: skip
    file = path.rsplit(":", 1)[0] if kind == "module" else path
    if check_path and not Path(file).exists():
        raise EvalError(f"{flag} {kind}:{path}: {file} does not exist; give {PATH_NETWORKS[kind]}")
    return FeatureChoice(kind, path)


def check_fid_count(num: int, dim: int, network: str, *, what: str = "generated samples",
                    fix: str = "use --num-samples N with N > {dim}") -> None:  # fmt: skip
    """Refuse FID from ``num`` <= ``dim`` samples: their covariance is singular, the number noise."""
    if num <= dim:
        raise EvalError(
            f"FID of {num} {what} with the {dim}-d {network} features is meaningless (the "
            f"covariance of n samples is singular for n <= {dim}); {fix.format(dim=dim)}"
        )


def same_data_set(trained_on: str, data: str | None) -> bool:
    """Whether ``data`` (``fmgen.data.reference.data_set_name``) is the data set ``trained_on``;
    a hub name matches with or without its owner (``zalando-datasets/fashion_mnist``)."""
    if data is None:
        return False
    a, b = trained_on.strip().lower(), data.strip().lower()
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def check_trained_on(
    network: str, trained_on: str | None, data: str | None, *, where: str, force: bool
) -> None:
    """Refuse a network trained on one data set for the images of another, unless forced: its
    features were never taught what matters in these images, so its FID is not a quality score."""
    if trained_on is None or force or same_data_set(trained_on, data):
        return
    seen = f"data set {data!r}" if data else "images of unknown origin"
    raise EvalError(
        f"the {network} feature network was trained on {trained_on!r} but {where} holds {seen}; "
        f"use a general network (inception, dinov2:FOLDER) or your own (module:FILE.py:FACTORY), "
        f"or score anyway with {FORCE_FIX}"
    )


def feature_spec(
    name: str,
    *,
    resolution: int,
    channels: int,
    inception_weights: str = "",
    cache_dir: Path | None = None,
    path: str = "",
    device: str | torch.device | None = None,
    flags: tuple[str, str] = CONFIG_FLAGS,
) -> FeatureSpec:
    """Build the feature network named ``name`` (see ``parse_feature_network``).

    ``device``: where a network read from a path runs (default: the CPU); its features come
    back on the device of the images.
    """
    choice = parse_feature_network(name, path, flags=flags)
    return FEATURE_NETWORKS[choice.kind](resolution=resolution, channels=channels,
                                         inception_weights=inception_weights, cache_dir=cache_dir,
                                         path=choice.path, device=device)  # fmt: skip


def inception_spec(*, inception_weights: str = "", **_: object) -> FeatureSpec:
    weights = (
        f"file:{file_hash(Path(inception_weights))}"
        if inception_weights
        else "torch-fidelity default (pt_inception-2015-12-05)"
    )
    return FeatureSpec("inception", 2048, weights, "bilinear to 299x299, antialias=False", 3)


register_feature_network("inception", inception_spec, dim=2048)


def weights_hash(module: nn.Module) -> str:
    """A hash of a module's tensors (names and values), whatever file they came from."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class NetworkFeatures(nn.Module):
    """A network as torchmetrics' feature extractor: uint8 (B, C, H, W) -> float64 (B, D).

    ``prepare`` maps the uint8 images to the network's input; by default floats in [-1, 1], the
    range fmgen's models generate. Float64 out: torchmetrics casts its FID to the features'
    dtype, and a float32 FID keeps 7 digits.
    """

    def __init__(
        self, net: nn.Module, num_features: int, *, device: str | torch.device | None = None,
        prepare: Callable[[Tensor], Tensor] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        # a plain attribute, not a submodule: torchmetrics' set_dtype(float64) casts every
        # submodule, which would run a float32 network in float64 (another network than the
        # one the user wrote, and slow on GPUs); the network keeps its dtype and device
        self.__dict__["net"] = net.eval().to(device or "cpu")
        self.num_features = num_features
        self.device = torch.device(device or "cpu")
        floats = [p.dtype for p in net.parameters() if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.float32
        self.prepare = prepare if prepare is not None else self.to_unit_range

    def to_unit_range(self, u8: Tensor) -> Tensor:
        return u8.to(self.dtype) / 127.5 - 1  # [0, 255] -> [-1, 1]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = self.prepare(images.to(self.device))  # (B, C, H, W) as the network takes them
        return self.net(x).double().to(images.device)  # (B, D)


# --- caches: tensors in safetensors, the rest in JSON, never a pickle ----------------------------

CACHE_FORMAT = "fmgen-cache-v1"


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        tmp.unlink(missing_ok=True)


def cache_files(stem: Path) -> tuple[Path, Path]:
    """The tensor file and the JSON record of the cache ``stem`` (a path without extension)."""
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


def write_cache(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """``stem.safetensors`` (tensors) and ``stem.json`` (``meta`` + the tensor file's hash).

    The JSON file is written last and names the hash of the tensor file it belongs to, so a
    pair left mixed by an interrupted rewrite is detected on reading. A cache that cannot be
    written (full disk, read-only folder) is a warning: the numbers are still right.
    """
    tensor_file, meta_file = cache_files(stem)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _replace_atomically(tensor_file, lambda p: save_file(flat, str(p)))
        record = {"format": CACHE_FORMAT, **meta, "tensors_sha256": file_hash(tensor_file)}
        _replace_atomically(meta_file, lambda p: p.write_text(json.dumps(record, indent=2)))
    except (OSError, RuntimeError, SafetensorError) as e:
        log.warning("could not write the cache %s (disk full? read-only?): %s", stem.parent, e)


def read_cache(
    stem: Path, expect: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors and JSON record written by ``write_cache``, or None to recompute.

    None, silently, when no cache exists; None with a logged warning when a file is not what
    ``write_cache`` wrote (an old pickle, garbage, a foreign or half-replaced pair) or its
    record disagrees with ``expect``. Nothing here can run code from a file: JSON is parsed
    as text and safetensors holds raw tensor bytes.
    """
    tensor_file, meta_file = cache_files(stem)
    if not tensor_file.exists() and not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{meta_file.name} is not an {CACHE_FORMAT} record")
        for k, v in expect.items():
            if meta.get(k) != v:
                raise ValueError(f"{meta_file.name} has {k}={meta.get(k)!r}, expected {v!r}")
        if meta.get("tensors_sha256") != file_hash(tensor_file):
            raise ValueError(f"{tensor_file.name} is not the file its record names")
        tensors = load_file(str(tensor_file))
    except (OSError, ValueError, SafetensorError) as e:  # UnicodeDecodeError is a ValueError
        log.warning("ignoring the cache %s (%s); recomputing it", stem, e)
        return None
    return tensors, meta
