"""SLURM integration: the launcher's command line, the batch scripts, and preemption on a real cluster.

The launch-line tests need no cluster. The others need SLURM: `.ci/slurm-up.sh` (run by the
`slurm` fixture as root) starts a one-node cluster on this machine. Without `sbatch` they are
skipped on a workstation but FAIL in CI (env CI set), so a broken cluster setup cannot pass
silently.

The 4-node `--test-only` checks use the partition `virtual` of that cluster: four GPU nodes in
state CLOUD (powered down; never run). SLURM validates a request against the nodes a partition
could provide, so a 4-node, 8-GPU-per-node request is checked as on a real GPU cluster; on the
one real node it would be rejected ("Requested node configuration is not available"), and
FUTURE or DOWN nodes are not counted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from fmgen.train.launch import Topology, accelerate_command, expand_hostlist, topology_from_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
SAMPLE_SBATCH = ROOT / "slurm" / "sample.sbatch"
BATCH = 16
# A tiny digits run that trains on CPU in seconds (8x8 images, a two-level U-Net, no W&B).
TINY_CPU_RUN = [
    "model.unet.block_out_channels=[8,16]",
    "data.resolution=8",
    f"train.batch_size={BATCH}",
    "logging.wandb=false",
    "eval.report=",
    "sample.steps=2",
    "sample.per_class=1",
]
# CPU job on the real node: no GPUs are configured there, so the script's GPU request is lifted.
CPU_JOB = ["--gpus-per-node=0", f"--cpus-per-task={os.cpu_count() or 1}", "--time=20"]


# --- launch line (no cluster needed) -----------------------------------------------------------


def launch_print(env_extra: dict[str, str], *launch_args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FMGEN_"))}
    env.pop("MASTER_PORT", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(env_extra)
    cmd = [sys.executable, "-m", "fmgen.train.launch", "--print", *launch_args]
    cmd += ["--", "train.py", "--config", "c.yaml", "a.b=1", "x=two words"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return shlex.split(out.stdout)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_launch_line_4_nodes_8_gpus():
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "123456",
    }
    argv = launch_print(env)
    assert argv[:2] == ["accelerate", "launch"]
    assert option(argv, "--num_processes") == "32"
    assert option(argv, "--num_machines") == "4"
    assert option(argv, "--machine_rank") == "2"
    assert option(argv, "--main_process_ip") == "gpu01"
    assert option(argv, "--main_process_port") == str(10000 + 123456 % 50000)
    assert "--multi_gpu" in argv and "--cpu" not in argv
    # the script and its arguments pass verbatim, last
    assert argv[-5:] == ["train.py", "--config", "c.yaml", "a.b=1", "x=two words"]


def test_launch_line_overrides_and_pass_through():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a1,b[2-3]"}
    env |= {"SLURM_GPUS_ON_NODE": "8", "FMGEN_GPUS_PER_NODE": "4", "MASTER_PORT": "29999"}
    argv = launch_print(env)
    assert option(argv, "--num_processes") == "8"  # FMGEN_GPUS_PER_NODE wins over SLURM
    assert option(argv, "--main_process_ip") == "a1"
    assert option(argv, "--main_process_port") == "29999"
    # mixed precision comes from the training config alone (train.mixed_precision)
    assert "--mixed_precision" not in argv
    argv = launch_print(env, "--gpus-per-node", "2")  # the flag wins over everything
    assert option(argv, "--num_processes") == "4"


def test_launch_line_one_node():
    argv = launch_print(
        {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n7", "SLURM_GPUS_ON_NODE": "1"}
    )
    assert option(argv, "--num_processes") == "1" and option(argv, "--num_machines") == "1"
    assert "--multi_gpu" not in argv and "--cpu" not in argv
    argv = launch_print({"SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "4"})
    assert option(argv, "--num_processes") == "4" and "--multi_gpu" in argv


def test_launch_line_cpu():
    argv = launch_print(
        {"SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "8", "FMGEN_GPUS_PER_NODE": "0"}
    )
    assert "--cpu" in argv and option(argv, "--num_processes") == "1"
    argv = launch_print({}, "--gpus-per-node", "0", "--cpu-procs-per-node", "2")
    assert option(argv, "--num_processes") == "2" and "--cpu" not in argv


def test_gpu_count_sources():
    assert topology_from_env({"SLURM_GPUS_PER_NODE": "a100:4"}).gpus_per_node == 4
    assert topology_from_env({"CUDA_VISIBLE_DEVICES": "0,1,2"}).gpus_per_node == 3
    assert topology_from_env({"CUDA_VISIBLE_DEVICES": ""}).gpus_per_node == 0
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        topology_from_env({"SLURM_NNODES": "2", "SLURM_NODEID": "2"})


def test_multi_node_uses_static_rendezvous():
    topo = Topology(2, 1, "n1", 12345, 8, 8)
    argv = accelerate_command(topo, ["t.py"])
    assert option(argv, "--rdzv_backend") == "static" and "--same_network" in argv


def test_cpu_processes_of_several_nodes_form_one_group_line():
    # `accelerate launch --cpu` would start one lone process per node: several CPU processes
    # must go through torchrun with ACCELERATE_USE_CPU=true (else each trains alone)
    argv = launch_print(
        {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "c[1-2]"},
        "--gpus-per-node",
        "0",
    )
    assert argv[:4] == ["env", "ACCELERATE_USE_CPU=true", "accelerate", "launch"]
    assert "--multi_gpu" in argv and "--cpu" not in argv
    assert option(argv, "--num_processes") == "2" and option(argv, "--machine_rank") == "1"


WORLD_PROBE = """
import torch
from accelerate import Accelerator
acc = Accelerator()
total = acc.reduce(torch.tensor([1.0]), "sum").item()
print(f"probe rank={acc.process_index} world={acc.num_processes} type={acc.distributed_type.value} sum={total:g}")
acc.end_training()  # closes the process group: a gloo group open at exit may abort the process
"""


@pytest.mark.slow
def test_two_simulated_cpu_nodes_join_one_process_group(tmp_path):
    """Two launchers as SLURM would start them on 2 nodes (here both on this machine)."""
    probe = tmp_path / "probe.py"
    probe.write_text(WORLD_PROBE)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FMGEN_"))}
    base.pop("CUDA_VISIBLE_DEVICES", None)
    base |= {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    base["MASTER_PORT"] = str(free_port())  # both launchers meet there
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fmgen.train.launch", "--gpus-per-node", "0", "--", str(probe)],
            env=base | {"SLURM_NODEID": str(rank)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    lines = sorted(line for out in outs for line in out.splitlines() if line.startswith("probe"))
    assert lines == [
        "probe rank=0 world=2 type=MULTI_CPU sum=2",
        "probe rank=1 world=2 type=MULTI_CPU sum=2",
    ], outs


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("n[9-10]", ["n9", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("login1", ["login1"]),
        ("x[1],y", ["x1", "y"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts
    if shutil.which("scontrol"):  # agrees with SLURM's own expander
        out = subprocess.run(
            ["scontrol", "show", "hostnames", spec], capture_output=True, text=True
        )
        assert out.stdout.split() == hosts


# --- the cluster -------------------------------------------------------------------------------


def _sinfo_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM cluster; started with .ci/slurm-up.sh (as root) if it does not answer."""
    if shutil.which("sbatch") is None and not os.environ.get("CI"):
        pytest.skip("SLURM is not installed (set CI=1 to make this a failure)")
    if not _sinfo_answers():
        if os.geteuid() != 0:
            pytest.fail("SLURM does not answer and only root can run .ci/slurm-up.sh")
        up = subprocess.run(
            [str(ROOT / ".ci" / "slurm-up.sh")], capture_output=True, text=True, timeout=600
        )
        if up.returncode != 0 or not _sinfo_answers():
            pytest.fail(f".ci/slurm-up.sh failed:\n{up.stdout}\n{up.stderr}")


def sbatch(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"} | env_extra
    return subprocess.run(
        ["sbatch", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("script", [TRAIN_SBATCH, SAMPLE_SBATCH], ids=["train", "sample"])
def test_sbatch_test_only_accepts_scripts(slurm, script, nodes):
    # the scripts' own GPU directives, validated against the virtual GPU nodes
    res = sbatch(
        ["--test-only", "--partition=virtual", f"--nodes={nodes}", str(script), "sample.py"],
        {"CONFIG": "configs/digits.yaml"},
    )
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr and "partition virtual" in res.stderr, res.stderr


def test_sbatch_test_only_cpu_on_this_node(slurm):
    res = sbatch(["--test-only", *CPU_JOB, str(TRAIN_SBATCH)], {"CONFIG": "configs/digits.yaml"})
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr


# --- end to end: real jobs running train.py on CPU ---------------------------------------------

# Each job asks for all the node's CPUs, so two at once would queue one behind the other and
# its test's wait could run out: under pytest-xdist they share one worker, one after another.
ON_THE_NODE = pytest.mark.xdist_group("slurm-node")


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(cond, timeout_s: float, what: str, log: Path, interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    tail = log.read_text()[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}; log tail:\n{tail}")


def finished(job_id: str) -> str | None:
    state = job_info(job_id).get("JobState", "")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def submit_train(
    tmp_path: Path, total_images: int, checkpoint_every: int
) -> tuple[str, Path, Path]:
    run_dir, log = tmp_path / "run", tmp_path / "train-%j.out"
    overrides = [
        *TINY_CPU_RUN,
        f"train.total_images={total_images}",
        f"train.checkpoint_every_images={checkpoint_every}",
        f"data.path={tmp_path / 'data'}",
    ]
    res = sbatch(
        ["--parsable", *CPU_JOB, f"--output={log}", str(TRAIN_SBATCH), *overrides],
        {"CONFIG": "configs/digits.yaml", "RUN_DIR": str(run_dir), "FMGEN_GPUS_PER_NODE": "0"},
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    return job_id, run_dir, Path(str(log).replace("%j", job_id))


def latest_state(run_dir: Path) -> dict | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    state = run_dir / "checkpoints" / latest.read_text().strip() / "fmgen_state.json"
    return json.loads(state.read_text()) if state.exists() else None


@pytest.mark.slow
@ON_THE_NODE
def test_train_job_runs_to_the_end(slurm, tmp_path):
    total_steps = 10
    job_id, run_dir, log = submit_train(tmp_path, total_steps * BATCH, 4 * BATCH)
    try:
        state = wait_until(lambda: finished(job_id), 600, f"job {job_id} to finish", log, 2)
        text = log.read_text()
        assert state == "COMPLETED", text[-4000:]
        info = job_info(job_id)
        assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
        assert "SLURM_RESTART_COUNT=0" in text and "requeueing" not in text
        assert latest_state(run_dir)["step"] == total_steps
        assert list((run_dir / "samples").glob("*.png")), "no sample grid"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.mark.slow(minutes=2)  # mostly waiting for SLURM
@ON_THE_NODE
def test_train_job_preempted_requeued_and_resumed(slurm, tmp_path):
    total_steps = 400  # long enough to still be running when the signal comes
    job_id, run_dir, log = submit_train(tmp_path, total_steps * BATCH, 40 * BATCH)
    try:
        wait_until(lambda: latest_state(run_dir), 600, "the first checkpoint", log)
        # what SLURM does 120 s before the time limit (--signal=B:USR1@120)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_until(
            lambda: int(job_info(job_id).get("Restarts", 0)) >= 1 or finished(job_id),
            300,
            "the requeue",
            log,
        )
        stopped_at = latest_state(run_dir)["step"]
        assert finished(job_id) is None, (
            f"job ended without a requeue; did training finish before the signal? "
            f"raise total_steps\n{log.read_text()[-4000:]}"
        )
        assert 0 < stopped_at < total_steps
        state = wait_until(lambda: finished(job_id), 900, "the resumed job to finish", log, 2)
        text = log.read_text()
        assert state == "COMPLETED", text[-4000:]
        assert job_info(job_id)["Restarts"] == "1"
        assert "stopped by signal" in text and "requeueing job" in text
        assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text
        assert latest_state(run_dir)["step"] == total_steps  # exactly, despite the interruption
        assert list((run_dir / "samples").glob("*.png")), "no sample grid"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
