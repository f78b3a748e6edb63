"""Processes: the Accelerator of a run and the explicit cross-rank reductions of the loop.

Each reduction here is one visible all-reduce; the loop calls them at step boundaries only.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from fmgen.config import Config

log = logging.getLogger("fmgen.train")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (one explicit all-reduce)."""
    if not distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


# What gloo and NCCL say when a peer stops answering (a timeout) or is gone (a closed socket).
_PEER_FAILURES = ("timed out", "connection closed", "connection reset", "broken pipe", "nccl error")


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because of another rank (timed out or gone)."""
    dist_error = getattr(dist, "DistError", ())
    return (dist_error and isinstance(e, dist_error)) or any(
        s in str(e).lower() for s in _PEER_FAILURES
    )


def peer_failure(e: BaseException, *, rank: int, world: int, step: int, timeout_s: float) -> str:
    """A message for a collective that failed on ``rank`` at ``step``, naming the ranks that
    do not answer (asked through the store, waiting at most ``timeout_s``)."""
    missing = unresponsive_ranks(rank, world, wait_s=min(30.0, timeout_s))
    cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if missing:
        who = ", ".join(str(r) for r in missing)
        return (
            f"rank {who} of {world} stopped answering (frozen or dead) at step {step}: rank "
            f"{rank} waited in a collective for train.dist_timeout_s={timeout_s:g} s ({cause}). "
            f"Look at the log of rank {missing[0]} (a hang in data loading or I/O, a dead node); "
            f"raise train.dist_timeout_s if one step legitimately takes longer"
        )
    if missing == []:  # every rank answered the store: a peer hit an error of its own and left
        return (f"a collective failed on rank {rank} at step {step} ({cause}): another rank "
                f"ended first; its error is the cause")  # fmt: skip
    return f"a collective failed on rank {rank} at step {step} ({cause}); the other ranks cannot be asked"


def unresponsive_ranks(rank: int, world: int, wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that do not answer within ``wait_s`` seconds.

    Every surviving rank writes a key into the process group's store (the launcher's TCP store,
    which outlives a frozen or dead worker) and looks for the others' keys; a frozen or dead
    rank never writes its own. None when the store cannot be reached (it died with the
    launcher, or there is no process group).
    """
    if not distributed():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()  # no public accessor in torch
        store.set(f"fmgen/answer/{rank}", "1")
        keys = {r: f"fmgen/answer/{r}" for r in range(world)}
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r, k in keys.items() if not store.check([k])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store's own errors are not worth more than "unknown"
        return None


def auto_cpu_threads(local_processes: int) -> int:
    """Torch threads per process on a CPU: the usable cores shared out, less one each.

    Measured with ``bench/threads.py`` (the default job's model on 2 cores): with other work
    running (load 2.6) 1 thread trained at 243 images/s and 2 threads at 114; on a quieter
    machine (load 1.7) 244 and 434. An intra-op thread that has to wait for a busy core stalls
    the whole step, so the default gives up the idle machine's gain for never halving: each
    process leaves a core to the data loader, the system and whoever else shares the machine.
    A deterministic rule (not a timing at start-up) keeps runs bit-reproducible: the thread
    count changes the rounding of CPU kernels.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_processes) - 1)


def set_cpu_threads(cfg: Config, accelerator: Accelerator) -> None:
    """``train.cpu_threads`` (0: ``auto_cpu_threads``, unless OMP_NUM_THREADS is set) on a CPU."""
    import os

    if accelerator.device.type != "cpu" or (
        not cfg.train.cpu_threads and "OMP_NUM_THREADS" in os.environ
    ):
        return  # GPUs, or a thread count the user set in the environment

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    n = cfg.train.cpu_threads or auto_cpu_threads(local)
    torch.set_num_threads(n)
    log.info("torch threads per process: %d (train.cpu_threads=%d)", n, cfg.train.cpu_threads)


def leave_process_group() -> None:
    """Close the process group, if any, before the interpreter exits.

    A gloo group left open at exit can abort the process ("terminate called without an active
    exception", exit -6) when its peer closes first, so a finished multi-node job would be
    reported failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_accelerator(cfg: Config) -> Accelerator:
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
    # A frozen or dead rank leaves the others waiting in a collective: fail after
    # train.dist_timeout_s (torch's default is 30 minutes of silence, NCCL's 10).
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision, cpu=not cuda, kwargs_handlers=[timeout]
    )
