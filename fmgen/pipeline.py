"""``FlowPipeline``: an fmgen export as a diffusers pipeline, sampled by fmgen's own code.

    from fmgen.pipeline import FlowPipeline
    pipe = FlowPipeline.from_pretrained("runs/digits/export")
    images = pipe(class_labels=[3, 3, 7], num_inference_steps=20, guidance_scale=2.0).images

``from_pretrained`` verifies the export's manifest, lets diffusers load the components that
``model_index.json`` names (``backbone``, ``scheduler``, the optional ``autoencoder``), and
rebuilds the model around the backbone from fmgen.json (path, prediction type, conditioning,
class names, the config's sampling options). ``__call__`` then draws through
``fmgen.eval.generate`` with a ``SamplingSpec``: any sampler, path and prediction type, the same
images as ``sample.py`` for the same seed, labels, steps and guidance.

The ``scheduler`` component is the stock diffusers recipe for loops outside fmgen
(``FlowMatchEulerDiscreteScheduler(invert_sigmas=True)``, see the README); this pipeline's
solver is the ``sampler`` argument (default: the export's ``sample.sampler``), so replacing the
scheduler changes nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from fmgen.base import FmgenError
from fmgen.config import sampling_spec
from fmgen.core.grids import time_grid
from fmgen.core.sampling import SamplingSpec
from fmgen.eval.generate import generate
from fmgen.eval.images import images_to_numpy
from fmgen.models.autoencoder import Autoencoder
from fmgen.models.flow import FlowModel
from fmgen.models.pipeline_files import MODEL_INDEX, stock_scheduler
from fmgen.models.store import LoadedModel, assemble_export, export_model, read_export

OUTPUT_TYPES = ("pil", "np", "pt")


class PipelineError(FmgenError, ValueError):
    """A pipeline argument or folder FlowPipeline cannot use; the message names the fix."""


def scheduler_sigmas(steps: int) -> np.ndarray:
    """The ``sigmas`` that make ``stock_scheduler().set_timesteps(sigmas=...)`` take fmgen's
    uniform Euler grid of ``steps`` steps: 1 - t_i for t_i = i / steps, i < steps, (steps,).

    The scheduler inverts them (sigma -> 1 - sigma) into fmgen's times and appends t = 1; its
    default grid ``set_timesteps(steps)`` ends at t = 0.999, not fmgen's.
    """
    ts = time_grid(steps, dtype=torch.float64)
    return (1.0 - ts[:-1]).numpy()


def autoencoder_stage(stage: Autoencoder, module: nn.Module | None) -> Autoencoder:
    """fmgen's autoencoder stage of an export, beside the weights of its ``autoencoder``
    component, which diffusers loads from ``autoencoder/`` when model_index.json names one.

    Pixel exports: the identity stage, no component. Latent exports: the stage fmgen.json
    records, read from the same ``autoencoder/`` folder (byte-for-byte the VAE whose hash the
    shards and FID records name), so generate decodes with fmgen's own latent normalization;
    the component is the same weights, for loops outside fmgen.
    """
    if module is not None and stage.kind == "identity":
        raise PipelineError(
            f"an autoencoder component ({type(module).__name__}) was given, but the export "
            f"samples in pixel space (fmgen.json autoencoder: identity); pass autoencoder=None"
        )
    return stage


class FlowPipeline(DiffusionPipeline):
    """An fmgen flow model as a diffusers pipeline: class labels in, images out.

    Components: ``backbone`` (the network, e.g. ``UNet2DModel``), ``scheduler`` (the stock
    diffusers scheduler of fmgen's Euler steps, for loops outside fmgen) and the optional
    ``autoencoder`` (a latent model's VAE). Load with ``from_pretrained(export)``, or
    ``from_loaded(fmgen.models.load_model(...))`` for a training checkpoint.
    """

    _optional_components = ["autoencoder", "text_encoder"]
    model_cpu_offload_seq = "text_encoder->backbone->autoencoder"

    def __init__(self, backbone: ModelMixin, scheduler: SchedulerMixin,
                 autoencoder: ModelMixin | None = None,
                 text_encoder: ModelMixin | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(backbone=backbone, scheduler=scheduler, autoencoder=autoencoder,
                              text_encoder=text_encoder)  # fmt: skip
        self._loaded: LoadedModel | None = None

    # --- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FlowPipeline:  # type: ignore[override]  # fmt: skip
        """Load an fmgen export folder (or a run folder, for its ``export/``).

        The manifest is checked first; then diffusers loads the components of model_index.json
        (safetensors only: ``use_safetensors`` is forced, a pickle is never read) with the other
        ``kwargs`` (``torch_dtype``, ...), and fmgen.json rebuilds the model around the backbone.
        """
        src = Path(pretrained_model_name_or_path)
        if (src / "export" / "fmgen.json").is_file():
            src = src / "export"
        if not (src / "fmgen.json").is_file():
            raise PipelineError(
                f"{pretrained_model_name_or_path}: not an fmgen export folder (no fmgen.json); "
                f"pass RUN_DIR/export, or a local copy of one (huggingface_hub.snapshot_download)"
            )
        meta = read_export(src)
        if not (src / MODEL_INDEX).is_file():
            raise PipelineError(
                f"{src} has no {MODEL_INDEX}: an export written before fmgen wrote pipelines; "
                f"export it again (fmgen.models.load_model, then export_model into the folder)"
            )
        kwargs["use_safetensors"] = True
        pipe = super().from_pretrained(src, **kwargs)
        pipe._bind(assemble_export(src, meta, pipe.backbone, text_encoder=pipe.text_encoder))
        return pipe

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, autoencoder: nn.Module | None = None) -> FlowPipeline:
        """A pipeline around a model fmgen loaded (``load_model``: an export or a checkpoint)."""
        pipe = cls(backbone=loaded.model.backbone, scheduler=stock_scheduler(),
                   autoencoder=autoencoder, text_encoder=loaded.model.text_encoder)  # fmt: skip
        pipe._bind(loaded)
        return pipe

    def _bind(self, loaded: LoadedModel) -> None:
        self._stage = autoencoder_stage(loaded.autoencoder, self.autoencoder)
        self._loaded = loaded

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True,
                        **kwargs: Any) -> None:  # fmt: skip
        """Write the pipeline as an fmgen export (fmgen.json, model_index.json, manifest), so
        ``from_pretrained`` loads it back; written aside and swapped in, as training's export."""
        if not safe_serialization or kwargs:
            given = ["safe_serialization=False"] * (not safe_serialization) + list(kwargs)
            raise PipelineError(
                f"save_pretrained takes only the folder here (got {', '.join(given)}): an fmgen "
                f"export is safetensors, one variant, unsharded; upload the folder afterwards"
            )
        loaded = self._export()
        export_model(self.flow_model, loaded.config, Path(save_directory),
                     autoencoder=loaded.autoencoder, class_names=loaded.class_names,
                     step=loaded.step)  # fmt: skip

    # --- what the export says --------------------------------------------------------------------

    def _export(self) -> LoadedModel:
        if self._loaded is None:
            raise PipelineError(
                "this FlowPipeline knows no fmgen export (built by hand): load it with "
                "FlowPipeline.from_pretrained(export) or FlowPipeline.from_loaded(load_model(...))"
            )
        return self._loaded

    @property
    def flow_model(self) -> FlowModel:
        """The FlowModel around the current ``backbone`` (moved, cast or replaced as it is)."""
        m = self._export().model
        return FlowModel(self.backbone, m.spec, prediction_type=m.prediction_type,
                         conditioning=m.conditioning, sample_shape=m.sample_shape,
                         text_encoder=self.text_encoder)  # fmt: skip

    @property
    def class_names(self) -> list[str]:
        return list(self._export().class_names)

    @property
    def sampling(self) -> SamplingSpec:
        """The default sampling options: the export config's ``sample.*`` (as sample.py's)."""
        return sampling_spec(self._export().config)

    # --- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        sampling: SamplingSpec | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per class label (indices or class names), ``num_images_per_prompt``
        images per ``prompt`` (text models; guidance steers away from ``negative_prompt``, by
        default the export's ``sample.negative_prompt``, "" = the null caption), or
        ``batch_size`` images with the null condition (unconditional) when neither is given.

        ``sampling`` (default: the export's ``sample.*``) is the solver, grid and guidance;
        ``sampler``, ``num_inference_steps`` and ``guidance_scale`` change its fields. Image i's
        random numbers depend on (seed, i) only, as sample.py's: ``seed`` is sample.py's
        ``--seed``; otherwise the seed is drawn from ``generator`` (or torch's global
        generator). Returns images in [0, 1]: PIL images (the uint8 of sample.py's PNGs), an
        array (B, H, W, C) ("np") or a tensor (B, C, H, W) ("pt").
        """
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")  # fmt: skip
        loaded, model = self._export(), self.flow_model
        negative = None
        if prompt is not None:
            num, cond, negative = self._prompt_conditions(prompt, negative_prompt,
                                                          num_images_per_prompt, class_labels, model)  # fmt: skip
        else:
            if model.reads_text and class_labels is not None:
                raise PipelineError("this model reads text, not class labels: pass prompt=... (or batch_size=N for unconditional images)")  # fmt: skip
            num, cond = self._conditions(class_labels, batch_size, model)
        spec = self._spec(sampling, sampler, num_inference_steps, guidance_scale)
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        images = generate(model, loaded.path, spec, num=num, cond=cond, seed=_seed(seed, generator),
                          device=self.device, autoencoder=self._stage, progress=progress,
                          negative=negative)  # fmt: skip
        self.maybe_free_model_hooks()
        out = _convert(images, output_type)
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def _conditions(self, class_labels: Any, batch_size: int | None,
                    model: FlowModel) -> tuple[int, Tensor | None]:  # fmt: skip
        """How many images, and their (B,) labels (the null label for unconditional images;
        None for an unconditional model)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):  # fmt: skip
            raise PipelineError(f"batch_size must be a whole number >= 1; got {batch_size!r}")
        if class_labels is None:
            n = batch_size or 1
            return n, model.conditioning.null(n) if model.conditional else None
        if not model.conditional:
            raise PipelineError(
                "class_labels given, but this model is unconditional; pass batch_size=N instead"
            )
        labels = self._label_ids(class_labels, model.num_classes)
        if batch_size is not None and batch_size != len(labels):
            raise PipelineError(
                f"batch_size={batch_size} but {len(labels)} class labels: one image per label; "
                f"drop batch_size or repeat the labels"
            )
        return len(labels), labels

    def _prompt_conditions(self, prompt: Any, negative_prompt: str | None, per_prompt: int,
                           class_labels: Any, model: FlowModel) -> tuple[int, Tensor, Tensor | None]:  # fmt: skip
        """The condition rows of ``per_prompt`` images of each prompt, and of the negative one."""
        if not model.reads_text:
            raise PipelineError("prompt given, but this model was trained without text; pass class_labels (or batch_size) instead")  # fmt: skip
        if class_labels is not None:
            raise PipelineError("give prompt or class_labels, not both")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise PipelineError(f"prompt must be a string or a list of strings; got {prompt!r}")
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise PipelineError(f"num_images_per_prompt must be a whole number >= 1; got {per_prompt!r}")  # fmt: skip
        cond = model.encode_prompts(prompts).repeat_interleave(per_prompt, dim=0)
        neg = self._export().config.sample.negative_prompt if negative_prompt is None else negative_prompt
        negative = model.encode_prompts([neg]).expand(len(cond), -1).clone() if neg else None
        return len(cond), cond, negative

    def _label_ids(self, class_labels: Any, num_classes: int) -> Tensor:
        """Class indices 0..num_classes-1 (the null label is asked for by passing none)."""
        if isinstance(class_labels, Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        items = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        names = self.class_names
        ids = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise PipelineError(f"class label {item!r} is not a class of this model; its classes: {', '.join(names[:20])}")  # fmt: skip
                ids.append(names.index(item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise PipelineError(f"class label {item!r}: give class indices or class names")
        if not ids:
            raise PipelineError("class_labels is empty; give class indices like [3, 3, 7]")
        for i in ids:
            if not 0 <= i < num_classes:
                raise PipelineError(
                    f"class label {i} is outside the model's classes 0..{num_classes - 1}; "
                    f"for unconditional images pass class_labels=None"
                )
        return torch.tensor(ids, dtype=torch.long)

    def _spec(self, sampling: SamplingSpec | None, sampler: str | None, steps: int | None,
              guidance: float | None) -> SamplingSpec:  # fmt: skip
        base = self.sampling if sampling is None else sampling
        if not isinstance(base, SamplingSpec):
            raise PipelineError(f"sampling must be a fmgen.core.SamplingSpec; got {type(base).__name__}")  # fmt: skip
        try:
            return base.replace(sampler=sampler, steps=steps, guidance=guidance)
        except ValueError as e:
            raise PipelineError(f"sampling options: {e}") from None


def _seed(seed: int | None, generator: torch.Generator | None) -> int:
    """fmgen's seed of a call: ``seed`` itself, or one draw from the generator."""
    if seed is not None and generator is not None:
        raise PipelineError("give seed (sample.py's --seed) or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PipelineError(f"seed must be a whole number >= 0; got {seed!r}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise PipelineError(
            f"generator must be one torch.Generator (images get their own noise from (seed, "
            f"index) anyway); got {type(generator).__name__}"
        )
    device = generator.device if generator is not None else "cpu"
    # 32 bits, as seeds are commonly given: generate derives 64-bit generator seeds from it
    return int(torch.randint(0, 2**32, (1,), generator=generator, device=device))


def _convert(images: Tensor, output_type: str) -> list[Image.Image] | np.ndarray | Tensor:
    """(B, C, H, W) in [-1, 1] -> the output type, in [0, 1] as diffusers' pipelines return."""
    if output_type == "pil":
        # fmgen's uint8 rounding, so the images are sample.py's PNGs byte for byte
        arrays = images_to_numpy(images)  # (B, H, W, C) uint8
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    unit = images * 0.5 + 0.5
    return unit if output_type == "pt" else rearrange(unit, "b c h w -> b h w c").numpy()
