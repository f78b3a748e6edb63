"""The training loop: Accelerate, EMA, atomic checkpoints, exact resume, W&B.

Read top to bottom: set-up, resume, the step loop, the end (export, grid, the config's report).
Invariants that make a config mean the same on 1 or 64 processes:
- ``train.batch_size`` is the global batch; per process it is batch / (processes x accum).
- The noise (t, eps, condition dropout) of every step is drawn for the GLOBAL batch from one generator
  seeded identically on every rank; each rank takes its slice, so the randomness does not
  depend on the number of processes.
- Durations, warm-up, EMA half-life and cadences count images seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from fmgen.base import FmgenError
from fmgen.config import Config, ConfigError, make_path, sampling_spec, to_dict, to_yaml
from fmgen.core.losses import MEANFLOW, get_loss, sample_time
from fmgen.core.meanflow import meanflow_loss, sample_interval_times
from fmgen.data import check_data_config, open_train_data
from fmgen.eval import REPORTS, check_eval_config, fid_of_model, generate, save_grid
from fmgen.models import (
    Autoencoder,
    Conditioning,
    FlowModel,
    TextConditioning,
    autoencoder_for_data,
    build_conditioning,
    build_model,
    check_model_config,
    count_parameters,
    export_model,
)
from fmgen.models.average import forward_ad_ready
from fmgen.models.flow import load_frozen_encoder
from fmgen.models.store import checkpoint_name, find_checkpoint, step_folders
from fmgen.models.text import LEARNED
from fmgen.train.checkpoint import remove_leftovers, restore_checkpoint, save_checkpoint
from fmgen.train.compile_check import check_compiled_gradients
from fmgen.train.dist import (
    any_rank,
    is_collective_failure,
    make_accelerator,
    mean_over_ranks,
    peer_failure,
    set_cpu_threads,
)
from fmgen.train.ema import (
    PowerEMA,
    ema_decay,
    ema_model_copy,
    snapshot_disk_estimate,
    snapshot_on_main,
    supersede_snapshots,
)
from fmgen.train.errors import TrainingError
from fmgen.train.heads import RepaTarget, build_heads, learning_rate, recipe_terms
from fmgen.train.lock import hold_run_folder
from fmgen.train.tracking import Tracker

log = logging.getLogger("fmgen.train")


def check_config(cfg: Config) -> None:
    """Every check of a config, including those of the layers above the schema (model.type and
    its options, data.source, eval.feature_network, eval.report): train.py runs it before any
    work, and --dry-run too."""
    check_model_config(cfg)
    check_data_config(cfg.data)
    check_eval_config(cfg)


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
    report: dict[str, Any] | None  # the eval.report's result (None: no report)
    report_lines: list[str] = field(default_factory=list)
    images_per_s: float = float("nan")  # steady state: after the first steps, before the end
    peak_memory_gb: float = float("nan")  # CUDA only
    wall_s: float = float("nan")  # the whole call: set-up, steps, export, grid, report

    def summary(self) -> str:
        """The one line a finished run ends with."""
        ips = self.images_per_s
        speed = f"{ips:.1f} images/s" if math.isfinite(ips) else "n/a (too few steps)"
        return (f"done: {self.step} steps, {self.images} images in {self.wall_s:.1f} s wall; "
                f"steady {speed}")  # fmt: skip


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


def draw_noise(
    gen: torch.Generator,
    cfg: Config,
    conditioning: Conditioning,
    global_batch: int,
    shape: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """t (G,), eps (G, C, H, W), condition-drop mask (G,) and, for MeanFlow, the interval ends
    r (G,) (else None) for the global micro-batch G."""
    times = dict(generator=gen, device=device, t_min=cfg.loss.t_min, t_max=1 - cfg.loss.t_min,
                 kind=cfg.loss.time_sampling, loc=cfg.loss.loc, scale=cfg.loss.scale,
                 mode_scale=cfg.loss.mode_scale)  # fmt: skip
    r = None
    if cfg.loss.name == MEANFLOW:
        t, r = sample_interval_times(global_batch, equal_share=cfg.loss.meanflow_equal_share, **times)
    else:
        t = sample_time(global_batch, times.pop("kind"), **times)
    eps = torch.randn((global_batch, *shape), generator=gen, device=device)
    drop = conditioning.dropout_mask(gen, global_batch, device)
    return t, eps, drop, r


def meanflow_options(cfg: Config, model: FlowModel, per_proc: int, device: torch.device) -> dict[str, Any]:
    """The arguments of ``meanflow_loss`` that stay fixed: the config's weights and guidance, the
    null conditions of a micro-batch of ``per_proc`` rows, and the target's network: ``model``
    itself (no DDP: the jvp and the guidance terms are stop-gradient, so they neither sync
    gradients nor keep graphs), in float32 and ready for forward-mode AD (``forward_ad_ready``)."""
    lc = cfg.loss
    if not model.conditional and (lc.meanflow_guidance != 1 or lc.meanflow_kappa != 0):
        raise ConfigError(
            f"loss.meanflow_guidance={lc.meanflow_guidance} / loss.meanflow_kappa="
            f"{lc.meanflow_kappa} fold classifier-free guidance into the target, but this model "
            f"is unconditional; set loss.meanflow_guidance=1 loss.meanflow_kappa=0"
        )

    def target_net(x: torch.Tensor, t: torch.Tensor, y: Any, r: torch.Tensor) -> torch.Tensor:
        with forward_ad_ready(model):
            # the class's forward: Accelerate's prepare() wraps the instance's in autocast under
            # bf16/fp16, which forward_ad_ready must keep off
            return FlowModel.forward(model, x.float(), t.float(), y, r.float())

    return {"target_net": target_net, "guidance": lc.meanflow_guidance, "kappa": lc.meanflow_kappa,
            "power": lc.meanflow_power, "c": lc.meanflow_c,
            "null": model.conditioning.null(per_proc, device)}  # fmt: skip


def _meanflow_check_loss(path: Any, options: dict[str, Any]) -> Any:
    """The compile check's loss for MeanFlow: every other row with an interval (r = (t + 1) / 2),
    so the check covers the jvp's target as well as the r = t rows."""

    def loss(m: Any, *, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y: Any) -> torch.Tensor:
        n = len(t)
        r = torch.where(torch.arange(n, device=t.device) % 2 == 0, t, (t + 1) / 2)
        keep = torch.ones(n, dtype=torch.bool, device=t.device)
        return meanflow_loss(m, z, path, t=t, r=r, eps=eps, y=y, keep=keep, **options)

    return loss


def train(cfg: Config, *, resume: str | None = None) -> TrainResult:
    """Train a model as the config says; returns where the results are.

    The main process holds the run folder's lock throughout (a second training on the same
    folder stops at once, naming this one); it is released however the run ends."""
    check_config(cfg)
    accelerator = make_accelerator(cfg)
    set_cpu_threads(cfg, accelerator)
    main, device = accelerator.is_main_process, accelerator.device
    t0 = time.perf_counter()
    with hold_run_folder(Path(cfg.train.run_dir), main=main, device=device):
        result = _train(cfg, accelerator, resume)
    result.wall_s = time.perf_counter() - t0
    return result


def _train(cfg: Config, accelerator: Any, resume: str | None) -> TrainResult:
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
        remove_leftovers(run_dir)  # of a save or export interrupted by a kill or a crash
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if not resume and step_folders(ckpt_root):
            log.warning(
                "training from step 0 in %s, which holds checkpoints up to %s; --resume auto "
                "continues them", run_dir, step_folders(ckpt_root)[0].name,
            )  # fmt: skip

    # --- data: prepared once by the main process, streamed by every rank ---
    frozen_text = bool(cfg.model.text_encoder) and cfg.model.text_encoder != LEARNED
    precomputed = frozen_text and cfg.text.precomputed  # embeddings read from the shards
    data = open_train_data(
        cfg.data,
        batch_size=per_proc,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        main=main,
        barrier=accelerator.wait_for_everyone,
        autoencoder=cfg.model.autoencoder,
        text=precomputed,
    )
    class_names = data.class_names
    # pixels, or the VAE with the latent shards' statistics (shards of another VAE are refused)
    autoencoder = autoencoder_for_data(cfg, data.latents, str(cfg.data.path))

    # --- model, EMA, optimizer ---
    path = make_path(cfg)
    meanflow = cfg.loss.name == MEANFLOW
    loss_fn = meanflow_loss if meanflow else get_loss(cfg.loss.name)
    loss_kwargs = {"weighting": cfg.loss.weighting} if cfg.loss.name == "dsm" else {}
    # a frozen text encoder: on the device when it encodes every batch, else on the CPU (its
    # null caption, the export's copy); never a parameter of the model
    frozen = load_frozen_encoder(cfg, device if not precomputed else "cpu") if frozen_text else None
    conditioning = build_conditioning(cfg, data.num_classes, frozen)
    if precomputed:
        from fmgen.data.text_embeddings import check_text_embeddings

        check_text_embeddings(data.text_info, conditioning.encoder, cfg.text.max_length,
                              str(cfg.data.path))  # fmt: skip
    model = build_model(cfg, conditioning, autoencoder).to(device)
    if meanflow:
        loss_kwargs = meanflow_options(cfg, model, per_proc, device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMAModel(model.parameters(), decay=ema_decay(cfg), use_ema_warmup=False, min_decay=0.0)
    if not cfg.ema.use_warmup:
        ema.get_decay = lambda step: ema.decay  # constant decay from the first step
    ema.to(device)
    posthoc = (
        PowerEMA(model, cfg.ema.posthoc_sigma_rels) if main and cfg.ema.posthoc_sigma_rels else None
    )
    # the recipe's training heads (EDM2's uncertainty, REPA's projector) and REPA's frozen target
    repa_target = RepaTarget(cfg, device, autoencoder) if cfg.repa.feature_network else None
    heads, capture = build_heads(cfg, model, repa_target.dim if repa_target else 0)
    trained = [*model.parameters(), *(heads.parameters() if heads is not None else ())]
    optimizer = torch.optim.AdamW(
        trained,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        fused=cfg.optim.fused or None,
    )
    if heads is None:
        net, optimizer = accelerator.prepare(model, optimizer)
        heads_net = None
    else:  # DDP-wrapped like the model: their gradients are all-reduced too
        net, heads_net, optimizer = accelerator.prepare(model, heads, optimizer)
    if cfg.train.compile:
        # Compiled after DDP wrapping (dynamo then splits the graph at DDP's gradient buckets),
        # and outside `prepare`: Accelerate saves what it prepared, so checkpoint keys stay
        # free of torch.compile's `_orig_mod.` prefix and load with or without compile.
        net = torch.compile(net)
    state = TrainState()

    # --- resume ---
    ckpt = find_checkpoint(run_dir, resume, quiet=not main)  # verified against its checksums
    if ckpt is not None:
        saved = restore_checkpoint(ckpt, accelerator, cfg=cfg, model=model, optimizer=optimizer,
                                   ema=ema, generator=gen, data=data, autoencoder=autoencoder,
                                   posthoc=posthoc, heads=heads)  # fmt: skip
        state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState)})
        log.info("resumed from %s at step %d (%d images)", ckpt, state.step, state.images)
    if main:
        supersede_snapshots(run_dir, state.images)
    if posthoc is not None:
        log.info("%s", snapshot_disk_estimate(posthoc, cfg))

    total_steps = math.ceil(cfg.train.total_images / cfg.train.batch_size)
    tracker = Tracker(
        cfg.logging, run_dir=run_dir, config=to_dict(cfg), run_id=state.wandb_run_id, enabled=main
    )
    state.wandb_run_id = tracker.run_id
    if main:
        log.info(
            "global batch %d = %d processes x %d per process x %d accumulation; %d steps (%d images); "
            "model %s, %.2fM parameters; %s path, %s loss, predicts %s",
            cfg.train.batch_size, world, per_proc, accum, total_steps, total_steps * cfg.train.batch_size,
            cfg.model.type, count_parameters(model) / 1e6, cfg.path.name, cfg.loss.name,
            cfg.model.prediction_type,
        )  # fmt: skip

    sample_shape = model.sample_shape
    if cfg.train.compile and cfg.train.compile_check:
        check_loss = (_meanflow_check_loss(path, loss_kwargs) if meanflow
                      else lambda m, **kw: loss_fn(m, path=path, **kw, **loss_kwargs))  # fmt: skip
        check_compiled_gradients(cfg, accelerator, model, net, check_loss, (per_proc, *sample_shape))

    stop = _StopFlag()
    old_handlers = stop.install()
    warned, first_captions = False, list[str]()  # text: truncation warned once; the grid's prompts
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
            lr = learning_rate(cfg, state.images + cfg.train.batch_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)  # read at the log interval only
            for micro in range(accum):
                # (b, C, H, W) in [-1, 1], (b,) labels; then with data.caption_key the captions,
                # with precomputed text embeddings their rows (b, F)
                z, y, *extra = next(batches)
                if isinstance(conditioning, TextConditioning):
                    y = extra[-1] if precomputed else conditioning.encode(extra[0], warn=not warned)
                    warned, first_captions = True, first_captions or list(extra[0])
                z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t, eps, drop, r = draw_noise(
                    gen, cfg, conditioning, micro_global, sample_shape, device
                )
                mine = slice(rank * per_proc, (rank + 1) * per_proc)
                y_in = conditioning.for_training(y, drop[mine])
                if meanflow:  # the interval ends; the rows whose condition guidance may use
                    loss_kwargs |= {"r": r[mine], "keep": ~drop[mine]}
                if cfg.train.channels_last:
                    z = z.contiguous(memory_format=torch.channels_last)
                with accelerator.autocast():
                    with capture.on() if capture is not None else contextlib.nullcontext():
                        # t lies in [t_min, 1 - t_min] by construction: no check (a host sync)
                        per_sample = loss_fn(net, z, path, t=t[mine], eps=eps[mine], y=y_in,
                                             check_t=False, **loss_kwargs)  # fmt: skip
                    per_sample = recipe_terms(cfg, path, per_sample, t[mine], z, heads_net,
                                              capture, repa_target)  # fmt: skip
                loss = per_sample.float().mean()
                last = micro == accum - 1
                with contextlib.ExitStack() as syncs:
                    if not last:  # gradients are all-reduced on the last micro-batch only
                        for wrapped in (net, heads_net) if heads_net is not None else (net,):
                            syncs.enter_context(accelerator.no_sync(wrapped))
                    accelerator.backward(loss / accum)
                step_loss += loss.detach() / accum
            # The finite check is one host read and no collective: a non-finite loss on any rank
            # makes its gradients non-finite, DDP's all-reduce spreads them to every rank, so the
            # norm of the synchronized gradients is non-finite on all ranks alike and they skip
            # the step together.
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(trained, clip)  # () on the device
            # with fp16's GradScaler, optimizer.step() itself skips a non-finite step and rescales
            bad = accelerator.scaler is None and not bool(torch.isfinite(grad_norm))
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
            if posthoc is not None:
                posthoc.update(list(model.parameters()), state.images, cfg.train.batch_size)
            window_images += cfg.train.batch_size
            if state.step == warm_step:
                steady_t0, steady_images = time.perf_counter(), 0
            elif state.step > warm_step:
                steady_images += cfg.train.batch_size
                steady_t1 = time.perf_counter()
            pbar.update(1)

            if state.step % cfg.train.log_every_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window_t0
                mean_loss = mean_over_ranks(float(window_loss) / max(1, window_n), device)
                grad_norm = float(grad_norm)
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
                grid = _sample_grid(cfg, ema_model_copy(model, ema), path, autoencoder, class_names,
                                    run_dir / "samples" / f"{checkpoint_name(state.step)}.png", device,
                                    first_captions)  # fmt: skip
                tracker.log_image("samples/grid", grid, step=state.step)
            every = cfg.eval.fid_every_images
            if every and state.images % every < cfg.train.batch_size:
                record = fid_of_model(ema_model_copy(model, ema), path, cfg, step=state.step,
                                      weights="ema", autoencoder=autoencoder, accelerator=accelerator)  # fmt: skip
                if main:
                    tracker.log({"eval/fid": record["fid"]}, step=state.step)

            every = cfg.ema.posthoc_every_images
            if cfg.ema.posthoc_sigma_rels and (state.images % every < cfg.train.batch_size
                                               or state.step == total_steps):  # fmt: skip
                snapshot_on_main(posthoc, run_dir, images=state.images, step=state.step, cfg=cfg,
                                 class_names=class_names, device=device)  # fmt: skip
            # the ranks agree on a stop signal (one all-reduce) every N steps, not every step
            every = cfg.train.stop_check_every_steps
            stopping = (world == 1 or state.step % every == 0) and any_rank(stop.set, device)
            due = state.images % cfg.train.checkpoint_every_images < cfg.train.batch_size
            if stopping or due or state.step == total_steps:
                last_ckpt = save_checkpoint(
                    accelerator, ckpt_root / checkpoint_name(state.step), model=model,
                    optimizer=optimizer, ema=ema, generator=gen, state=asdict(state), cfg=cfg,
                    class_names=class_names, data_state=data.state_dict(),
                    keep=cfg.train.keep_checkpoints, autoencoder=autoencoder.to_dict(),
                    posthoc=posthoc, heads=heads,
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
    except RuntimeError as e:
        if world > 1 and not isinstance(e, FmgenError) and is_collective_failure(e):
            # name the frozen rank, not gloo's or NCCL's socket
            raise TrainingError(peer_failure(e, rank=rank, world=world, step=state.step,
                                             timeout_s=cfg.train.dist_timeout_s)) from e  # fmt: skip
        raise
    finally:
        pbar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    images_per_s = steady_images / (steady_t1 - steady_t0) if steady_images else float("nan")
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    # --- the end: export, a sample grid, the config's report ---
    export_dir = grid_path = report = None
    lines: list[str] = []
    failed: Exception | None = None
    if main:
        final = ema_model_copy(model, ema)
        export_dir = run_dir / "export"
        try:
            export_model(final, cfg, export_dir, autoencoder=autoencoder,
                         class_names=class_names, step=state.step)  # fmt: skip
        except FmgenError as e:  # a full disk: the other ranks must not wait for us forever
            failed = e
    if any_rank(failed is not None, device):
        raise failed or TrainingError("the main process could not write the export (see its error)")
    if main:
        grid_path = _sample_grid(cfg, final, path, autoencoder, class_names,
                                 run_dir / "samples" / "final.png", device, first_captions)  # fmt: skip
        tracker.log_image("samples/grid", grid_path, step=state.step)
        if cfg.eval.report:
            judge = REPORTS[cfg.eval.report]
            report = judge.run(final, path, cfg, autoencoder=autoencoder, device=device)
            lines = judge.lines(report)
            (run_dir / "eval").mkdir(exist_ok=True)
            (run_dir / "eval" / f"{judge.name}.json").write_text(
                json.dumps({**report, "step": state.step}, indent=2)
            )
            tracker.log(
                {f"{judge.name}/{k}": v for k, v in report.items() if isinstance(v, (int, float))},
                step=state.step,
            )
            log.info("%s report: %s", judge.name, report)
    accelerator.wait_for_everyone()
    tracker.finish()
    return TrainResult(
        run_dir, state.step, state.images, False, last_ckpt, export_dir, grid_path, report,
        lines, images_per_s, peak_gb,
    )  # fmt: skip


def _sample_grid(
    cfg: Config, model: FlowModel, path: Any, autoencoder: Autoencoder, class_names: list[str],
    out: Path, device: torch.device, captions: list[str] | None = None,
) -> Path:  # fmt: skip
    """A grid of the config's sampling options: a row per class (conditional models), or per
    prompt (text models: ``sample.prompts``, else up to 8 captions of the first batch)."""
    n = cfg.sample.per_class
    if model.reads_text:
        prompts = list(cfg.sample.prompts) or list(dict.fromkeys(captions or [""]))[:8]
        cond = model.encode_prompts(prompts).repeat_interleave(n, dim=0)
        images = generate(model, path, sampling_spec(cfg), num=len(cond), cond=cond,
                          seed=cfg.train.seed, device=device, autoencoder=autoencoder)  # fmt: skip
        save_grid(images, out, nrow=n, row_labels=prompts)
        return out
    conditional = model.conditional
    labels = torch.arange(model.num_classes).repeat_interleave(n) if conditional else None
    images = generate(model, path, sampling_spec(cfg), num=n * (model.num_classes if conditional else 1),
                      cond=labels, seed=cfg.train.seed, device=device, autoencoder=autoencoder)  # fmt: skip
    save_grid(images, out, nrow=n, row_labels=class_names if conditional else None)
    return out
