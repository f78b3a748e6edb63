"""The training loop: Accelerate, EMA, atomic checkpoints, exact resume, W&B.

Read top to bottom: set-up, resume, the step loop, the end (export, grid, quality report).
Invariants that make a config mean the same on 1 or 64 processes:
- ``train.batch_size`` is the global batch; per process it is batch / (processes x accum).
- The noise (t, eps, label drop) of every step is drawn for the GLOBAL batch from one generator
  seeded identically on every rank; each rank takes its slice, so the randomness does not
  depend on the number of processes.
- Durations, warm-up, EMA half-life and cadences count images seen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from fmgen.checkpoint import (
    EXTRA_FILE,
    check_resumable,
    checkpoint_name,
    export_model,
    find_checkpoint,
    loader_file,
    make_path,
    save_checkpoint,
)
from fmgen.config import Config, ConfigError, to_dict, to_yaml
from fmgen.errors import FmgenError
from fmgen.losses import get_loss, sample_time
from fmgen.models import FlowModel, build_unet, count_parameters, drop_labels, flat_gradient
from fmgen.tracking import Tracker
from fmgen.train_data import open_train_data

log = logging.getLogger("fmgen.train")


class TrainingError(FmgenError, RuntimeError):
    """Training stopped for a reason the user must act on; the message says which."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    images: int = 0  # images seen (global)
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    wandb_run_id: str = ""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images: int
    stopped_by_signal: bool
    checkpoint: Path | None
    export_dir: Path | None
    grid: Path | None
    quality: dict[str, Any] | None
    images_per_s: float = float("nan")  # steady state: after the first steps, before the end
    peak_memory_gb: float = float("nan")  # CUDA only


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self.signum = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.set, self.signum = True, signum

    def install(self) -> dict[int, Any]:
        old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            old[sig] = signal.signal(sig, self)
        return old


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (one explicit all-reduce)."""
    if not _distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def ema_decay(cfg: Config) -> float:
    """Per-step decay for a half-life counted in images: 0.5 ** (batch / half_life)."""
    return 0.5 ** (cfg.train.batch_size / cfg.ema.half_life_images)


def ema_model_copy(model: FlowModel, ema: EMAModel) -> FlowModel:
    """A separate FlowModel holding the EMA weights (the training weights stay untouched)."""
    out = copy.deepcopy(model)
    ema.copy_to(out.parameters())
    return out.eval()


def draw_noise(
    gen: torch.Generator,
    cfg: Config,
    global_batch: int,
    shape: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (G,), eps (G, C, H, W), label-drop mask (G,) for the global micro-batch G."""
    t = sample_time(
        global_batch,
        cfg.loss.time_sampling,
        generator=gen,
        device=device,
        t_min=cfg.loss.t_min,
        t_max=1 - cfg.loss.t_min,
        loc=cfg.loss.loc,
        scale=cfg.loss.scale,
    )
    eps = torch.randn((global_batch, *shape), generator=gen, device=device)
    drop = torch.rand(global_batch, generator=gen, device=device) < cfg.model.p_uncond
    return t, eps, drop


def train(cfg: Config, *, resume: str | None = None) -> TrainResult:
    """Train a model as the config says; returns where the results are."""
    accelerator = _make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise TrainingError(
            f"the launcher started {launched} processes but Accelerate sees {world}; on CPU "
            f"launch with `accelerate launch --cpu` or set ACCELERATE_USE_CPU=true"
        )
    accum = cfg.train.grad_accum
    if cfg.train.batch_size % (world * accum):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (global) must be divisible by processes x "
            f"train.grad_accum = {world} x {accum}; choose a multiple of {world * accum}"
        )
    micro_global = cfg.train.batch_size // accum  # images per micro-step, all ranks together
    per_proc = micro_global // world
    device = accelerator.device
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed + rank)  # dropout etc.; the training noise uses `gen`
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    # --- data: prepared once by the main process, streamed by every rank ---
    data = open_train_data(
        cfg.data,
        batch_size=per_proc,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        main=main,
        barrier=accelerator.wait_for_everyone,
    )
    num_classes, class_names = data.num_classes, data.class_names

    # --- model, EMA, optimizer ---
    path = make_path(cfg)
    loss_fn = get_loss(cfg.loss.name)
    loss_kwargs = {"weighting": cfg.loss.weighting} if cfg.loss.name == "dsm" else {}
    unet = build_unet(
        cfg.model,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        num_classes=num_classes,
    )
    model = FlowModel(unet, cfg.model.prediction_type, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMAModel(model.parameters(), decay=ema_decay(cfg), use_ema_warmup=False, min_decay=0.0)
    if not cfg.ema.use_warmup:
        ema.get_decay = lambda step: ema.decay  # constant decay from the first step
    ema.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        fused=cfg.optim.fused or None,
    )
    net, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        # Compiled after DDP wrapping (dynamo then splits the graph at DDP's gradient buckets),
        # and outside `prepare`: Accelerate saves what it prepared, so checkpoint keys stay
        # free of torch.compile's `_orig_mod.` prefix and load with or without compile.
        net = torch.compile(net)
    state = TrainState()

    # --- resume ---
    ckpt = find_checkpoint(run_dir, resume)
    if ckpt is not None:
        extra = torch.load(ckpt / EXTRA_FILE, map_location="cpu", weights_only=False)
        check_resumable(cfg, extra["config"], ckpt)  # a clear message, not a size mismatch
        accelerator.load_state(str(ckpt))
        ema.load_state_dict(extra["ema"])
        ema.to(device)
        gen.set_state(extra["generator"])
        state = TrainState(**extra["state"])
        position = loader_file(ckpt, rank)
        if not position.is_file():
            raise TrainingError(
                f"{ckpt} has no data position for rank {rank} ({position.name}): it was written "
                f"by fewer processes; resume with the same number of processes"
            )
        data.load_state_dict(torch.load(position, weights_only=False))
        log.info("resumed from %s at step %d (%d images)", ckpt, state.step, state.images)

    total_steps = math.ceil(cfg.train.total_images / cfg.train.batch_size)
    tracker = Tracker(
        cfg.logging, run_dir=run_dir, config=to_dict(cfg), run_id=state.wandb_run_id, enabled=main
    )
    state.wandb_run_id = tracker.run_id
    if main:
        log.info(
            "global batch %d = %d processes x %d per process x %d accumulation; %d steps (%d images); "
            "model %.2fM parameters; %s path, %s loss, predicts %s",
            cfg.train.batch_size, world, per_proc, accum, total_steps, total_steps * cfg.train.batch_size,
            count_parameters(model) / 1e6, cfg.path.name, cfg.loss.name, cfg.model.prediction_type,
        )  # fmt: skip

    sample_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    if cfg.train.compile and cfg.train.compile_check:
        _check_compiled_gradients(
            cfg, accelerator, model, net, lambda m, **kw: loss_fn(m, path=path, **kw, **loss_kwargs),
            (per_proc, *sample_shape),
        )  # fmt: skip

    stop = _StopFlag()
    old_handlers = stop.install()
    batches = iter(data)
    last_ckpt: Path | None = ckpt
    # on the main process only, and not into log files (None: tqdm disables itself off a terminal)
    pbar = tqdm(
        total=total_steps, initial=state.step, disable=(not main) or None, desc="train", unit="step"
    )
    window_loss, window_n, window_t0, window_images = 0.0, 0, time.perf_counter(), 0
    warm_step = state.step + min(5, max(1, (total_steps - state.step) // 4))  # skip start-up costs
    steady_t0, steady_t1, steady_images = float("nan"), float("nan"), 0
    try:
        while state.step < total_steps:
            lr = cfg.optim.lr * min(
                1.0, (state.images + cfg.train.batch_size) / max(1, cfg.optim.warmup_images)
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, bad = 0.0, False
            for micro in range(accum):
                z, y = next(batches)  # (b, C, H, W) in [-1, 1], (b,)
                z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t, eps, drop = draw_noise(gen, cfg, micro_global, sample_shape, device)
                mine = slice(rank * per_proc, (rank + 1) * per_proc)
                y_in = drop_labels(y, drop[mine], model.null_label) if model.conditional else None
                if cfg.train.channels_last:
                    z = z.contiguous(memory_format=torch.channels_last)
                with accelerator.autocast():
                    per_sample = loss_fn(
                        net, z, path, t=t[mine], eps=eps[mine], y=y_in, **loss_kwargs
                    )
                loss = per_sample.float().mean()
                if _any_rank(not bool(torch.isfinite(loss)), device):
                    bad = True  # every rank skips together, so DDP stays in step
                    break
                last = micro == accum - 1
                with accelerator.no_sync(net) if not last else contextlib.nullcontext():
                    accelerator.backward(loss / accum)
                step_loss += loss.item() / accum
            grad_norm = float("nan")
            if not bad:
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(net.parameters(), clip))
                if not math.isfinite(grad_norm) and accelerator.scaler is None:
                    bad = True  # with fp16's GradScaler, optimizer.step() skips and rescales
            if not bad:
                optimizer.step()
                # fp16: the GradScaler found inf/NaN gradients and skipped the update; the EMA
                # must skip it too, and the step counts as non-finite for the guard.
                bad = accelerator.optimizer_step_was_skipped
            optimizer.zero_grad(set_to_none=True)
            if bad:
                state.nonfinite_total += 1
                state.nonfinite_streak += 1
                log.warning(
                    "non-finite loss or gradient at step %d: step skipped (%d in a row)",
                    state.step,
                    state.nonfinite_streak,
                )
                if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{state.nonfinite_streak} steps in a row with a non-finite loss or gradient "
                        f"at step {state.step}; "
                        f"training stopped (last good checkpoint: {last_ckpt}). Lower optim.lr, "
                        f"use train.mixed_precision=no or bf16, or check the data"
                    )
            else:
                ema.step(model.parameters())
                state.nonfinite_streak = 0
                window_loss += step_loss
                window_n += 1
            state.step += 1
            state.images += cfg.train.batch_size
            window_images += cfg.train.batch_size
            if state.step == warm_step:
                steady_t0, steady_images = time.perf_counter(), 0
            elif state.step > warm_step:
                steady_images += cfg.train.batch_size
                steady_t1 = time.perf_counter()
            pbar.update(1)

            if state.step % cfg.train.log_every_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_t0
                mean_loss = _mean_over_ranks(window_loss / max(1, window_n), device)
                scalars = {
                    "train/loss": mean_loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/images_per_s": window_images / max(elapsed, 1e-9),
                    "train/images": state.images,
                    "train/nonfinite_total": state.nonfinite_total,
                    "data/skipped": data.skipped,
                }
                tracker.log(scalars, step=state.step)
                if main:
                    log.info(
                        "step %d/%d images %d loss %.5f lr %.2e grad-norm %.3f images/s %.1f",
                        state.step, total_steps, state.images, mean_loss, lr, grad_norm,
                        scalars["train/images_per_s"],
                    )  # fmt: skip
                pbar.set_postfix(
                    loss=f"{mean_loss:.4f}", img_s=f"{scalars['train/images_per_s']:.0f}"
                )
                window_loss, window_n, window_t0, window_images = 0.0, 0, time.perf_counter(), 0

            every = cfg.train.sample_every_images
            if (
                main
                and every
                and state.images % every < cfg.train.batch_size
                and state.step < total_steps
            ):
                grid = _sample_grid(
                    cfg, ema_model_copy(model, ema), path, class_names, run_dir, state.step, device
                )
                tracker.log_image("samples/grid", grid, step=state.step)
            every = cfg.eval.fid_every_images
            if every and state.images % every < cfg.train.batch_size:
                _fid_during_training(
                    cfg, accelerator, ema_model_copy(model, ema), path, data, tracker, state
                )

            stopping = _any_rank(stop.set, device)
            due = state.images % cfg.train.checkpoint_every_images < cfg.train.batch_size
            if stopping or due or state.step == total_steps:
                extra = {
                    "ema": ema.state_dict(),
                    "generator": gen.get_state(),
                    "state": asdict(state),
                    "config": to_dict(cfg),
                    "class_names": class_names,
                }
                last_ckpt = save_checkpoint(
                    accelerator, ckpt_root / checkpoint_name(state.step), extra=extra,
                    loader_state=data.state_dict(), keep=cfg.train.keep_checkpoints,
                )  # fmt: skip
            if stopping:
                log.warning(
                    "stopped by signal %d at step %d; checkpoint %s",
                    stop.signum,
                    state.step,
                    last_ckpt,
                )
                pbar.close()
                tracker.finish()
                return TrainResult(
                    run_dir, state.step, state.images, True, last_ckpt, None, None, None
                )
    finally:
        pbar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    images_per_s = steady_images / (steady_t1 - steady_t0) if steady_images else float("nan")
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    # --- the end: export, a sample grid, the quality report ---
    export_dir = grid_path = quality = None
    if main:
        final = ema_model_copy(model, ema)
        export_dir = run_dir / "export"
        export_model(final, cfg, export_dir, class_names=class_names, step=state.step)
        grid_path = _sample_grid(
            cfg, final, path, class_names, run_dir, state.step, device, name="final"
        )
        tracker.log_image("samples/grid", grid_path, step=state.step)
        if cfg.eval.quality_check and cfg.data.source == "digits":
            from fmgen.quality import digits_quality_report

            quality = digits_quality_report(final, path, cfg, device=device)
            (run_dir / "eval").mkdir(exist_ok=True)
            (run_dir / "eval" / "quality.json").write_text(
                json.dumps({**quality, "step": state.step}, indent=2)
            )
            tracker.log(
                {f"quality/{k}": v for k, v in quality.items() if isinstance(v, (int, float))},
                step=state.step,
            )
            log.info("digits quality: %s", quality)
    accelerator.wait_for_everyone()
    tracker.finish()
    return TrainResult(
        run_dir, state.step, state.images, False, last_ckpt, export_dir, grid_path, quality,
        images_per_s, peak_gb,
    )  # fmt: skip


def _make_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this run, whatever an earlier run in the same process asked for."""
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator
    # with another mixed precision (a notebook, a sweep or a test session calling train() twice).
    # A finished run leaves nothing there worth keeping; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        log.warning(
            "train.mixed_precision=fp16 needs a GPU: without one Accelerate trains in fp32; "
            "use bf16 for mixed precision on a CPU"
        )
    # Without CUDA, Accelerate joins torchrun's processes (gloo) only when asked for CPU mode;
    # otherwise every process would train alone into the same run folder.
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cuda)


def _check_compiled_gradients(
    cfg: Config, accelerator: Accelerator, model: FlowModel, net: Any, loss: Any,
    shape: tuple[int, ...],
) -> None:  # fmt: skip
    """Refuse to train if torch.compile's gradients differ from eager execution.

    A compiler bug trains a wrong model silently; one extra backward pass at start-up catches
    it. (torch 2.13's CPU inductor fuses this U-Net's backward wrongly: gradients 20-60% off.)
    The check runs on a synthetic batch from its own generator, so the data stream and the
    training noise are untouched, and in train mode unless dropout would make the two
    passes draw different masks.
    """
    device = accelerator.device
    g = torch.Generator(device=device).manual_seed(cfg.train.seed + 12345)
    z = torch.rand(shape, generator=g, device=device) * 2 - 1  # (b, C, H, W)
    if cfg.train.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    t = torch.rand(shape[0], generator=g, device=device)
    eps = torch.randn(shape, generator=g, device=device)
    y = None
    if model.conditional:
        y = torch.randint(0, model.num_classes + 1, (shape[0],), generator=g, device=device)

    def loss_of(m: Any, autocast: bool = True) -> Any:
        def value() -> torch.Tensor:
            with accelerator.autocast() if autocast else contextlib.nullcontext():
                return loss(m, z=z, t=t, eps=eps, y=y).float().mean()

        return value

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    def fp32(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # the class's forward: prepare() patches autocast into the instance's under bf16/fp16
        return FlowModel.forward(model, x, t, y)

    fp32.prediction_type = model.prediction_type  # type: ignore[attr-defined]

    stochastic = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    model.train(not stochastic)
    params = list(model.parameters())
    with accelerator.no_sync(net):  # local gradients only: no all-reduce for a check
        exact = flat_gradient(params, loss_of(fp32, autocast=False))
        compiled = gap(flat_gradient(params, loss_of(net)), exact)
        # bf16/fp16 gradients are a few % off fp32 anyway; the compiled ones may be off by at
        # most twice what eager mixed precision is (measured: 2.6% for both in bf16).
        rounding = 0.0
        if cfg.train.mixed_precision != "no":
            rounding = gap(flat_gradient(params, loss_of(model)), exact)
    model.train()
    tol = 1e-3 + 2 * rounding
    if _any_rank(not compiled <= tol, device):
        raise TrainingError(
            f"torch.compile gives gradients {compiled:.1%} away from eager fp32 execution "
            f"(tolerance {tol:.1%}) with torch {torch.__version__} on {device.type}: a compiler "
            f"bug would train a wrong model. Train with train.compile=false, or another torch "
            f"version"
        )
    log.info(
        "torch.compile gradients match eager execution: %.1e from fp32 (tolerance %.1e)",
        compiled, tol,
    )  # fmt: skip


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not _distributed():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _sample_grid(
    cfg: Config, model: FlowModel, path: Any, class_names: list[str], run_dir: Path, step: int,
    device: torch.device, name: str | None = None,
) -> Path:  # fmt: skip
    from fmgen.generate import generate, save_grid

    n = cfg.sample.per_class
    labels = torch.arange(model.num_classes).repeat_interleave(n) if model.conditional else None
    images = generate(
        model, path, num=n * max(1, model.num_classes if model.conditional else 1), labels=labels,
        sampler=cfg.sample.sampler, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
        sde_sigma=cfg.sample.sde_sigma, t_start=cfg.sample.t_start, seed=cfg.train.seed, device=device,
    )  # fmt: skip
    out = run_dir / "samples" / f"{name or checkpoint_name(step)}.png"
    rows = class_names if model.conditional else None
    save_grid(images, out, nrow=n, row_labels=rows)
    return out


def _fid_during_training(cfg: Config, accelerator: Accelerator, model: FlowModel, path: Any, data: Any, tracker: Tracker, state: TrainState) -> None:  # fmt: skip
    from fmgen.evaluate import fid_of_model

    record = fid_of_model(model, path, cfg, accelerator=accelerator, step=state.step, weights="ema")
    if accelerator.is_main_process:
        tracker.log({"eval/fid": record["fid"]}, step=state.step)
