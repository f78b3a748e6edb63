"""A frozen rank ends the run within train.dist_timeout_s with a message naming it (2 gloo ranks).

Rank 1 sleeps before its 4th step (a stand-in for a hung file system or data worker); rank 0
then waits in DDP's gradient all-reduce until the process-group timeout, asks the store which
ranks still answer, and exits through train.py's error boundary: one line, exit status 2.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from conftest import DIGITS, ROOT, free_port, subprocess_env, tiny

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch.distributed as dist
    import fmgen.train.loop as loop
    from fmgen.cli.train import main

    calls = {"n": 0}
    real_draw = loop.draw_noise
    def draw(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4 and dist.get_rank() == 1:
            time.sleep(float(sys.argv[1]))
        return real_draw(*a, **k)
    loop.draw_noise = draw
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_a_frozen_rank_is_named_within_the_timeout(shards, tmp_path):
    script = tmp_path / "freeze.py"
    script.write_text(SCRIPT)
    timeout_s, sleep_s = 5, 25
    overrides = tiny(shards, tmp_path / "run", 10, "train.sample_every_images=0",
                     f"train.dist_timeout_s={timeout_s}")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script), str(sleep_s), "--config", str(DIGITS),
           *overrides]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    took = time.monotonic() - t0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    named = [ln for ln in errors if "stopped answering" in ln]
    assert len(named) == 1, r.stderr[-3000:]  # rank 0's; rank 1, woken, says rank 0 left first
    assert named[0].startswith("error: rank 1 of 2 stopped answering (frozen or dead) at step 3: "
                               "rank 0 waited in a collective for train.dist_timeout_s=5 s")  # fmt: skip
    assert (
        "failed (exitcode: 2) local_rank: 0" in r.stderr
    )  # the CLI's error boundary, no traceback
    print(f"\n{named[0]}\n(run ended after {took:.0f} s; rank 1 slept {sleep_s} s)")
