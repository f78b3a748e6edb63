"""Feature networks read from the user's files: ``dinov2:FOLDER``, ``module:FILE.py:FACTORY``,
``torchscript:FILE.pt``. Nothing is downloaded; each spec records the sha256 of what it read.

- ``dinov2``: a ``transformers`` Dinov2Model folder (``save_pretrained``; safetensors only).
  Features are the CLS token after the final layer norm (``pooler_output``), as FD-DINOv2 of
  EDM2 uses them (ViT-L/14): images resized to 224x224 (bicubic, antialiased, as EDM2's
  ``resize_mode='torch'``), scaled to [0, 1] and normalized with ImageNet's mean and std; gray
  images are repeated to 3 channels.
- ``module``: ``FACTORY()`` in a Python file returns an ``nn.Module`` mapping images in [-1, 1]
  (B, C, H, W) to features (B, D). A ``trained_on`` string attribute of that module names the
  data set it was trained on; it is then refused for other data unless forced.
- ``torchscript``: a ``torch.jit.save`` archive of such a module (``trained_on`` likewise).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fmgen.base import file_hash
from fmgen.eval.features import (
    EvalError,
    FeatureSpec,
    NetworkFeatures,
    register_feature_network,
    weights_hash,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_SIZE = 224  # EDM2's FD-DINOv2 input size


def _probe(net: nn.Module, *, what: str, channels: int, resolution: int) -> tuple[int, str | None]:
    """The feature size of ``net`` and its ``trained_on``; EvalError when it does not map a
    (2, C, R, R) batch in [-1, 1] to (2, D) features."""
    floats = [p.dtype for p in net.parameters() if p.is_floating_point()]
    x = torch.linspace(-1, 1, 2 * channels * resolution**2).reshape(
        2, channels, resolution, resolution
    )
    try:
        with torch.no_grad():
            out = net.eval()(x.to(floats[0] if floats else torch.float32))
    except Exception as e:  # the user's code: any error is theirs to fix
        raise EvalError(f"{what} fails on a batch of (2, {channels}, {resolution}, {resolution}) "
                        f"images in [-1, 1] ({type(e).__name__}: {e})".splitlines()[0]) from None  # fmt: skip
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise EvalError(f"{what} maps (2, {channels}, {resolution}, {resolution}) images to "
                        f"{shape}; a feature network must return (B, D) features")  # fmt: skip
    trained_on = getattr(net, "trained_on", None)
    if trained_on is not None and not isinstance(trained_on, str):
        raise EvalError(f"{what}: its trained_on attribute is {trained_on!r}; make it the name "
                        f"of the data set (a string) or drop it")  # fmt: skip
    return int(out.shape[1]), trained_on or None


def _module_network(
    *, resolution: int, channels: int, path: str, device: Any = None, **_: Any
) -> FeatureSpec:
    file, _, factory = path.rpartition(":")
    what = f"module:{path}"
    if not file or not factory.isidentifier():
        raise EvalError(f"{what}: expected module:FILE.py:FACTORY, FACTORY the name of a "
                        f"function in FILE.py that returns the network")  # fmt: skip
    # the user's own file, run as Python on purpose: it is their code, as train.py is ours
    name = f"fmgen_features_{hashlib.sha256(file.encode()).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise EvalError(f"{what}: {file} is not a Python file (FILE.py)")
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        raise EvalError(
            f"{what}: importing {file} failed ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    make = getattr(module, factory, None)
    if not callable(make):
        raise EvalError(f"{what}: {file} defines no function {factory}; define "
                        f"`def {factory}() -> torch.nn.Module` there or name another")  # fmt: skip
    try:
        net = make()
    except Exception as e:
        raise EvalError(
            f"{what}: {factory}() failed ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    if not isinstance(net, nn.Module):
        raise EvalError(
            f"{what}: {factory}() returned a {type(net).__name__}, not a torch.nn.Module"
        )
    dim, trained_on = _probe(net, what=what, channels=channels, resolution=resolution)
    # the file and the tensors: weights the factory loads from elsewhere count too
    weights = f"sha256:{file_hash(file)}+tensors:{weights_hash(net)}"
    return FeatureSpec("module", NetworkFeatures(net, dim, device=device), weights,
                       "none (native resolution)", channels, path=path, trained_on=trained_on)  # fmt: skip


def _torchscript_network(
    *, resolution: int, channels: int, path: str, device: Any = None, **_: Any
) -> FeatureSpec:
    what = f"torchscript:{path}"
    # torch.jit.load is not pickle.load: the archive's code is TorchScript, compiled and run by
    # torch's own interpreter, and its data.pkl is read by a C++ unpickler that builds tensors
    # and TorchScript objects only and refuses any other global (so a torch.save pickle is
    # refused, its code never run; tests/test_features.py proves it). A TorchScript program may
    # still call any torch operator, file I/O among them: like a module file, it must be yours.
    try:
        net = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0]  # torch's guesses about corrupted checkpoints follow
        raise EvalError(f"{what} is not a TorchScript archive (save one with torch.jit.save of "
                        f"torch.jit.script(net)): {first}") from None  # fmt: skip
    dim, trained_on = _probe(net, what=what, channels=channels, resolution=resolution)
    return FeatureSpec("torchscript", NetworkFeatures(net, dim, device=device),
                       f"sha256:{file_hash(path)}", "none (native resolution)", channels,
                       path=path, trained_on=trained_on)  # fmt: skip


def folder_hash(folder: Path) -> str:
    """sha256 over every file of a folder (names and contents), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}:{file_hash(f)}\n".encode())
    return h.hexdigest()[:16]


class Dinov2Input(nn.Module):
    """uint8 (B, C, H, W) -> DINOv2's input (B, 3, 224, 224): EDM2's FD-DINOv2 preprocessing."""

    def forward(self, u8: Tensor) -> Tensor:
        x = u8.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        # resized in [0, 255] and not clamped, as EDM2 does (bicubic may overshoot a little)
        x = F.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return (x / 255 - mean) / std


class Dinov2Cls(nn.Module):
    """A transformers Dinov2Model as a feature network: the layer-normed CLS token (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).pooler_output  # (B, hidden_size)


def _dinov2_network(*, channels: int, path: str, device: Any = None, **_: Any) -> FeatureSpec:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise EvalError(f"dinov2:{path} holds no config.json; give a folder written by "
                        f"transformers' Dinov2Model.save_pretrained")  # fmt: skip
    try:
        from transformers import Dinov2Model  # only here: transformers is needed for dinov2 alone
    except ImportError:
        raise EvalError("dinov2 features need transformers: pip install transformers") from None
    try:
        # local files only (nothing downloaded); safetensors only (never a pickled .bin)
        model = Dinov2Model.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"dinov2:{path} could not be loaded as a Dinov2Model with safetensors "
                        f"weights: {first}") from None  # fmt: skip
    net = Dinov2Cls(model.eval())
    features = NetworkFeatures(net, int(model.config.hidden_size), device=device,
                               prepare=Dinov2Input())  # fmt: skip
    return FeatureSpec("dinov2", features, f"sha256:{folder_hash(folder)}",
                       "bicubic to 224x224, antialias=True; ImageNet mean/std; CLS token", 3,
                       path=path)  # fmt: skip


register_feature_network("dinov2", _dinov2_network,
                         path="FOLDER (a transformers Dinov2Model saved with save_pretrained)")  # fmt: skip
register_feature_network("module", _module_network,
                         path="FILE.py:FACTORY (FACTORY() returns the network)")  # fmt: skip
register_feature_network("torchscript", _torchscript_network,
                         path="FILE.pt (torch.jit.save of a scripted network)")  # fmt: skip
