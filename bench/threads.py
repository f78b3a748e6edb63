"""CPU training throughput against the number of torch threads, to choose train.cpu_threads.

    python bench/threads.py                 # the default job's model and batch, ~30 s
    python bench/threads.py --threads 1,2,4 --seconds 5

A bare training step (the default job's U-Net, batch 128, AdamW, the CFM loss) is timed for
each thread count, alternated --repeats times (best kept), and the load average is printed:
on a machine whose cores are busy with other work, an intra-op thread that waits for a core
stalls every step, and fewer threads train faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmgen.config import load_config, make_path  # noqa: E402
from fmgen.core.losses import cfm_loss  # noqa: E402
from fmgen.models import ClassLabels, build_model  # noqa: E402
from fmgen.train.dist import auto_cpu_threads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=None, help="thread counts (default: 1..CPU count)")
    p.add_argument("--seconds", type=float, default=4.0, help="per setting and repeat (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="alternated repeats (default 3)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = (
        [int(n) for n in args.threads.split(",")] if args.threads else list(range(1, cores + 1))
    )
    cfg = load_config(ROOT / "configs" / "digits.yaml", [])
    torch.manual_seed(0)
    model, path = build_model(cfg, ClassLabels(10)), make_path(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    b, r = cfg.train.batch_size, cfg.data.resolution
    z, y = torch.randn(b, cfg.data.channels, r, r), torch.randint(0, 10, (b,))

    def step() -> None:
        loss = cfm_loss(model, z, path, t=torch.rand(b), eps=torch.randn_like(z), y=y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    best: dict[int, float] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for n in counts:
            torch.set_num_threads(n)
            step()  # warm-up at this thread count
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                step()
                k += 1
            best[n] = max(best.get(n, 0.0), k * b / (time.perf_counter() - t0))
    print(f"{cores} usable cores; load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"batch {b}, best of {args.repeats}")  # fmt: skip
    print(f"{'torch threads':>14} {'images/s':>10} {'vs 1 thread':>12}")
    for n, v in best.items():
        print(f"{n:>14} {v:>10.0f} {v / best[counts[0]]:>12.2f}")
    print(f"train.cpu_threads=0 (auto) picks {auto_cpu_threads(1)} thread(s) for 1 process here")


if __name__ == "__main__":
    main()
