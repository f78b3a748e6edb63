"""Build the ``accelerate launch`` command for the current SLURM allocation (stdlib only).

Run once per node (``srun --ntasks-per-node=1``); each node's launcher starts that node's
training processes::

    python -m fmgen.train.launch [--print] [--gpus-per-node N] -- train.py --config c.yaml a.b=1

Topology comes from the SLURM environment: nodes ``SLURM_NNODES`` (or ``SLURM_JOB_NUM_NODES``),
this node's rank ``SLURM_NODEID``, the main process on the first host of ``SLURM_JOB_NODELIST``,
port ``MASTER_PORT`` or ``10000 + SLURM_JOB_ID % 50000`` (one port per job, so two jobs sharing
a node do not collide). GPUs per node: ``--gpus-per-node``, else ``FMGEN_GPUS_PER_NODE``, else
``SLURM_GPUS_ON_NODE`` / ``SLURM_GPUS_PER_NODE`` / ``CUDA_VISIBLE_DEVICES``; 0 means CPU.
Outside SLURM it describes one node.

Signals: before exec'ing, the launcher sets SIGUSR1 to "ignore", which the launcher processes
(``accelerate launch``, torchrun) inherit. A SIGUSR1 sent to the whole job step (SLURM signals
every process of the step) then reaches ``train.py``, which installs its own handler and
checkpoints, while the launcher processes stay alive and wait for it. Without this,
single-process ``accelerate launch`` dies on the signal (default action): the step's task
fails ("task 0: User defined signal 1", srun exits 138) while the orphaned training still
checkpoints, so slurm/train.sbatch would not requeue; with cgroup process tracking SLURM may
also kill the orphan. torchrun (several processes) leaves SIGUSR1 alone, so it stays ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_PORT_BASE = 10000


def expand_hostlist(spec: str) -> list[str]:
    """Expand a SLURM hostlist: ``"node[01-03,07],login1"`` -> ``["node01", "node02", ...]``.

    Handles comma-separated hosts, bracketed ranges with zero padding, and several bracket
    groups in one name (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``).
    """
    hosts: list[str] = []
    for part in _split_top_level(spec.strip()):
        if part:
            hosts.extend(_expand_one(part))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in hostlist {spec!r}")
    parts.append("".join(cur))
    return parts


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for item in m.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            out.extend(f"{head}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
        else:
            out.append(f"{head}{item}")
    return [h for name in out for h in _expand_one(name + tail)]


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: ``scontrol show hostnames`` if present, else pure Python."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            names = res.stdout.split()
            if names:
                return names[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def gpus_from_env(env: Mapping[str, str]) -> int | None:
    """GPUs on this node as SLURM (or CUDA_VISIBLE_DEVICES) reports them; None if unknown."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if value:
            # SLURM_GPUS_PER_NODE may be typed, e.g. "a100:4"
            return int(value.rsplit(":", 1)[-1].split("(")[0])
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    return None


@dataclass(frozen=True)
class Topology:
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    gpus_per_node: int  # 0 = CPU
    procs_per_node: int

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.procs_per_node


def topology_from_env(
    env: Mapping[str, str],
    gpus_per_node: int | None = None,
    cpu_procs_per_node: int = 1,
) -> Topology:
    """Read the allocation from SLURM variables (defaults describe one local node)."""
    nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    rank = int(env.get("SLURM_NODEID") or 0)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    ip = first_host(nodelist) if nodelist else "127.0.0.1"
    if env.get("MASTER_PORT"):
        port = int(env["MASTER_PORT"])
    else:
        port = DEFAULT_PORT_BASE + int(env.get("SLURM_JOB_ID") or 0) % 50000
    if gpus_per_node is None and env.get("FMGEN_GPUS_PER_NODE", "").strip():
        gpus_per_node = int(env["FMGEN_GPUS_PER_NODE"])
    if gpus_per_node is None:
        gpus_per_node = gpus_from_env(env) or 0
    if not 0 <= rank < nodes:
        raise ValueError(f"SLURM_NODEID={rank} outside 0..{nodes - 1}")
    procs = gpus_per_node if gpus_per_node > 0 else cpu_procs_per_node
    return Topology(nodes, rank, ip, port, gpus_per_node, procs)


def accelerate_command(topo: Topology, script_and_args: Sequence[str]) -> list[str]:
    """The ``accelerate launch ...`` argv for this node; the script and its args verbatim.

    No mixed-precision flag: train.py takes it from its config (``train.mixed_precision``).
    """
    cmd = ["accelerate", "launch"]
    if topo.gpus_per_node == 0 and topo.num_processes == 1:
        cmd += ["--cpu"]
    elif topo.gpus_per_node == 0:
        # accelerate's --cpu starts ONE process per node with no process group (each node
        # would train alone), so CPU runs of several processes, on one node or many, go
        # through torchrun (--multi_gpu); ACCELERATE_USE_CPU=true then makes Accelerate
        # join them with gloo. Without it, torchrun's workers on a machine without CUDA
        # each train alone as DistributedType.NO (observed with accelerate 1.15).
        cmd = ["env", "ACCELERATE_USE_CPU=true", *cmd, "--multi_gpu"]
    elif topo.num_processes > 1:
        cmd += ["--multi_gpu"]
    cmd += [
        "--num_machines", str(topo.num_machines),
        "--num_processes", str(topo.num_processes),
        "--machine_rank", str(topo.machine_rank),
        "--main_process_ip", topo.main_process_ip,
        "--main_process_port", str(topo.main_process_port),
    ]  # fmt: skip
    if topo.num_machines > 1:
        # static rendezvous: every node knows its rank and the main node's address
        cmd += ["--rdzv_backend", "static", "--same_network"]
    cmd += ["--dynamo_backend", "no"]
    return cmd + list(script_and_args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.train.launch",
        description="Run `accelerate launch SCRIPT ARGS` for this node of the SLURM allocation.",
        usage="python -m fmgen.train.launch [options] -- train.py --config CFG [key=value ...]",
    )
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    p.add_argument("--gpus-per-node", type=int, default=None, help="0 = CPU (overrides the env)")
    p.add_argument(
        "--cpu-procs-per-node", type=int, default=1, help="processes per node on CPU (default 1)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, script = argv[:i], argv[i + 1 :]
    else:
        own, script = [], argv
    args = parser().parse_args(own)
    if not script:
        parser().error("nothing to launch: give `-- SCRIPT [ARGS ...]`")
    topo = topology_from_env(os.environ, args.gpus_per_node, args.cpu_procs_per_node)
    cmd = accelerate_command(topo, script)
    if args.print:
        print(shlex.join(cmd))
        return 0
    print(f"fmgen.train.launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the launchers; see the docstring
    os.execvp(cmd[0], cmd)
    return 127  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
