"""The work of ``sample.py``: which samples to draw, split across processes, written to disk.

``sample_request`` turns the user's choice (labels, per-class grid, N unconditional) into the
conditions of every sample; ``draw_samples`` generates them in noise blocks, each process taking
every world-th block (same images as one process), and writes the grid and per-sample files.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmgen.core.sampling import SamplingSpec
from fmgen.eval.generate import NOISE_BLOCK, SampleError, gather_blocks, generate, index_blocks
from fmgen.eval.images import merge_npz_parts, save_grid, save_samples, to_uint8
from fmgen.models.store import LoadedModel


@dataclass
class SampleRequest:
    """The conditions of every sample (None: unconditional) and how the grid is laid out."""

    num: int
    cond: Tensor | None
    per_class: int | None  # grid rows are classes (or prompts) when set
    row_names: list[str] | None = None  # prompts: the grid's row labels
    negative: Tensor | None = None  # text models: the negative prompt's conditions (num, F)


def parse_labels(text: str, num_classes: int) -> Tensor:
    """``"3,3,7"`` -> tensor([3, 3, 7]), each checked against the model's classes."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SampleError(
            f"--labels {text!r}: expected comma-separated class indices like 3,3,7"
        ) from None
    for v in values:
        if not 0 <= v < num_classes:
            raise SampleError(f"--labels: class {v} is outside 0..{num_classes - 1}")
    if not values:
        raise SampleError("--labels is empty; give class indices like 3,3,7")
    return torch.tensor(values)


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"--prompts-file {path!r} cannot be read ({e.__class__.__name__}); give a UTF-8 text file, one prompt per line") from None  # fmt: skip
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise SampleError(f"--prompts-file {path!r} holds no prompt; write one prompt per line")
    return prompts


def prompt_request(loaded: LoadedModel, prompts: list[str], num_per_prompt: int,
                   negative_prompt: str | None = None) -> SampleRequest:  # fmt: skip
    """``num_per_prompt`` samples of each prompt (grid rows = prompts), sample i of prompt j at
    index j * num_per_prompt + i."""
    model = loaded.model
    if not model.reads_text:
        raise SampleError(
            "--prompt given, but this model was trained without text (class labels or none); "
            "use --labels, --per-class or --num-samples"
        )
    if num_per_prompt <= 0:
        raise SampleError(f"--num-per-prompt must be > 0; got {num_per_prompt}")
    cond = model.encode_prompts(prompts).repeat_interleave(num_per_prompt, dim=0)
    neg = loaded.config.sample.negative_prompt if negative_prompt is None else negative_prompt
    negative = None
    if neg:
        negative = model.encode_prompts([neg]).expand(len(cond), -1).clone()
    return SampleRequest(len(cond), cond, num_per_prompt, list(prompts), negative)


def sample_request(
    loaded: LoadedModel, *, labels: str | None = None, num_samples: int | None = None,
    per_class: int | None = None, prompts: list[str] | None = None,
    num_per_prompt: int | None = None, negative_prompt: str | None = None,
) -> SampleRequest:  # fmt: skip
    """Labels ("3,3,7"), prompts, N unconditional samples, or N per class (the default grid;
    for a text model N per prompt of ``sample.prompts``)."""
    model = loaded.model
    if num_per_prompt is not None and not model.reads_text:
        raise SampleError(
            "--num-per-prompt given, but this model was trained without text; use --per-class N "
            "or --num-samples N"
        )
    k = num_per_prompt or (per_class or loaded.config.sample.per_class)
    if prompts:
        return prompt_request(loaded, prompts, k, negative_prompt)
    if labels and model.reads_text:
        raise SampleError(
            "--labels given, but this model reads text, not class labels; use --prompt \"...\" "
            "or --prompts-file"
        )
    if model.reads_text and num_samples is None:
        if not loaded.config.sample.prompts:
            raise SampleError(
                "this model reads text: give --prompt \"...\" (repeatable) or --prompts-file F, "
                "or --num-samples N for unconditional samples"
            )
        return prompt_request(loaded, list(loaded.config.sample.prompts), k, negative_prompt)
    if labels:
        if not model.conditional:
            raise SampleError("--labels given, but this model is unconditional; use --num-samples")
        cond = parse_labels(labels, model.num_classes)
        return SampleRequest(len(cond), cond, None)
    if num_samples is not None:
        if num_samples <= 0:
            raise SampleError(f"--num-samples must be > 0; got {num_samples}")
        return SampleRequest(num_samples, model.conditioning.null(num_samples), None)
    n = loaded.config.sample.per_class if per_class is None else per_class
    if n <= 0:
        raise SampleError(f"--per-class must be > 0; got {n}")
    if model.conditional:
        cond = torch.arange(model.num_classes).repeat_interleave(n)
        return SampleRequest(len(cond), cond, n)
    return SampleRequest(n * n, None, None)


def draw_samples(
    loaded: LoadedModel, spec: SamplingSpec, request: SampleRequest, *, state: Any,
    device: torch.device, seed: int = 0, precision: str = "fp32", grid: Path | None = None,
    grid_max: int = 400, out_dir: Path | None = None, fmt: str = "png",
) -> list[str]:  # fmt: skip
    """Generate the request's samples on this process's blocks; write the outputs.

    ``state`` is Accelerate's ``PartialState`` (process index and count). Returns, on the main
    process, one line per output written.
    """
    autocast = contextlib.nullcontext()
    if precision != "fp32":
        dt = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = torch.autocast(device_type=device.type, dtype=dt)
    num, cond = request.num, request.cond
    world = state.num_processes
    blocks = index_blocks(num, state.process_index, world, NOISE_BLOCK)
    k = min(num, grid_max)  # the grid holds samples 0..k-1, whichever process drew them
    data = loaded.config.data  # the decoded images' shape, on every process (some may draw none)
    cells = [torch.empty((0, data.channels, data.resolution, data.resolution), dtype=torch.uint8)]
    with autocast:
        for block in tqdm(
            blocks, disable=not state.is_main_process or len(blocks) < 2, desc="blocks"
        ):
            s, n = block.start, len(block)
            c = cond[s : s + n] if cond is not None else None
            neg = request.negative[s : s + n] if request.negative is not None else None
            images = generate(loaded.model, loaded.path, spec, num=n, cond=c, start=s, seed=seed,
                              device=device, autoencoder=loaded.autoencoder,
                              progress=state.is_main_process, negative=neg)  # fmt: skip
            if out_dir is not None:
                labels = c if loaded.model.conditional and not loaded.model.reads_text else None
                save_samples(images, labels, out_dir, start=s, fmt=fmt)
            cells.append(to_uint8(images[: max(0, k - s)]))
    grid = grid or Path(loaded.source) / "samples" / "grid.png"
    mine = torch.cat(cells)  # (this process's grid samples, C, H, W), its blocks in order
    if world > 1:
        mine = gather_blocks(mine, k, tuple(mine.shape[1:]), world=world, size=NOISE_BLOCK,
                             device=device)  # fmt: skip
    state.wait_for_everyone()
    if not state.is_main_process:
        return []
    lines = []
    if k > 0:
        per_class = request.per_class
        nrow = per_class or max(1, math.isqrt(k))
        rows = None
        if request.row_names is not None:
            rows = request.row_names[: math.ceil(k / per_class)]
        elif per_class and cond is not None:
            rows = [
                loaded.class_names[int(cond[r * per_class])]
                for r in range(math.ceil(k / per_class))
            ]
        save_grid(mine, grid, nrow=nrow, row_labels=rows)
        lines.append(f"grid: {grid} ({k} images, {spec.describe()}, {loaded.weights} weights, "
                     f"step {loaded.step})")  # fmt: skip
    if out_dir is not None:
        if fmt == "npz":
            lines.append(f"samples: {merge_npz_parts(out_dir)} ({num} images)")
        else:
            lines.append(f"samples: {out_dir} ({num} PNG files)")
    return lines
