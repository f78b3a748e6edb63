"""Processes: the Accelerator of a run and the explicit cross-rank reductions of the loop.

Each reduction here is one visible all-reduce; the loop calls them at step boundaries only.
"""

from __future__ import annotations

import datetime
import logging

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
