"""The training step has no avoidable host-device sync or collective (2 gloo ranks, real processes).

A script under torchrun wraps every Python-level collective of torch.distributed (DDP's gradient
buckets run in C++ and are not counted: they are the step's necessary all-reduce) and every
host read of a tensor (``item``, ``bool``, ``float``, ``int``, ``tolist``), then trains; each
micro-step's noise draw marks a step boundary. Printed: the counts per optimizer step.

The run uses fused AdamW (``optim.fused=true``, as the GPU presets do): torch's for-loop AdamW
reads every parameter's step counter with ``item()``. Those counters are host tensors, so
the reads are no device sync, but they would hide the loop's own reads in the count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import DIGITS, ROOT, free_port, subprocess_env, tiny

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import fmgen.train.loop as loop
    from fmgen.config import load_config

    counts = {"collectives": 0, "host_reads": 0}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
                 "reduce", "gather", "scatter", "reduce_scatter", "all_to_all",
                 "all_gather_object", "broadcast_object_list", "gather_object"):
        real = getattr(dist, name)
        def wrapped(*a, _real=real, **k):
            counts["collectives"] += 1
            return _real(*a, **k)
        setattr(dist, name, wrapped)
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)
        def wrapped(self, *a, _real=real, **k):
            counts["host_reads"] += 1
            return _real(self, *a, **k)
        setattr(torch.Tensor, name, wrapped)

    marks = []
    real_draw = loop.draw_noise
    def draw(*a, **k):
        marks.append(dict(counts))
        return real_draw(*a, **k)
    loop.draw_noise = draw

    cfg = load_config(sys.argv[1], sys.argv[3:])
    loop.train(cfg)
    if dist.get_rank() == 0:
        json.dump(marks, open(sys.argv[2], "w"))
    """
)


@pytest.mark.slow
def test_a_training_step_has_at_most_one_collective_and_one_host_read(shards, tmp_path):
    steps, every = 25, 10
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    out = tmp_path / "marks.json"
    overrides = tiny(shards, tmp_path / "run", steps, "train.log_every_steps=1000",
                     f"train.stop_check_every_steps={every}", "train.sample_every_images=0",
                     "optim.fused=true")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script), str(DIGITS), str(out), *overrides]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), "ACCELERATE_USE_CPU": "true"},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    marks = json.loads(out.read_text())
    assert len(marks) == steps
    # steps 2 .. steps-1 (the first warms up, the last checkpoints and exports)
    per_step = [{k: b[k] - a[k] for k in a} for a, b in zip(marks[1:-1], marks[2:], strict=True)]
    coll = [s["collectives"] for s in per_step]
    reads = [s["host_reads"] for s in per_step]
    print(f"\nper optimizer step, 2 gloo ranks: collectives beyond DDP's buckets {coll} "
          f"(mean {sum(coll) / len(coll):.2f}); host reads {reads} (mean {sum(reads) / len(reads):.2f})")  # fmt: skip
    assert max(coll) <= 1 and sum(coll) <= len(coll) // every + 1  # the stop check, every N steps
    # the finite check of the all-reduced gradient norm, plus reading the stop check's result
    assert all(r <= 1 + c for r, c in zip(reads, coll, strict=True)), reads
