"""Checkpoints: no pickle on any load path, checksums, fallback to the last good one, kill -9 at
any moment, the run-folder lock, and a full disk."""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BATCH, DIGITS, ROOT, run_main, subprocess_env, tiny, train_tiny
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from test_train import latest, weights

from fmgen.models import CheckpointError, load_model
from fmgen.models.store import verify_folder
from fmgen.train.checkpoint import (
    flatten_optimizer,
    rng_states,
    set_rng_states,
    unflatten_optimizer,
)
from fmgen.train.lock import LOCK_FILE, RunFolderLocked, RunLock

# What a checkpoint of one process holds (test_train.py checks the rank files of two).
CHECKPOINT_FILES = [
    "ema.safetensors",
    "fmgen_extra.json",
    "fmgen_manifest.json",
    "fmgen_rank_0.json",
    "fmgen_rank_0.safetensors",
    "fmgen_state.json",
    "model.safetensors",
    "optimizer.safetensors",
]
DET = "train.deterministic=true"
EVERY_STEP = f"train.checkpoint_every_images={BATCH}"


def same_weights(a: Path, b: Path) -> None:
    (wa, ea), (wb, eb) = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} hold other weights"
    assert len(ea) == len(eb) and all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --- the format --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(shards, tmp_path_factory):
    """3 steps with a checkpoint after each (all kept), and the same run taken to 5 steps."""
    base = tmp_path_factory.mktemp("base")
    train_tiny(shards, base, 3, DET, EVERY_STEP, "train.keep_checkpoints=3")
    ref = train_tiny(shards, tmp_path_factory.mktemp("ref5"), 5, DET)
    return base, ref.checkpoint


def test_a_checkpoint_is_safetensors_and_json_with_a_manifest(base_run):
    base, _ = base_run
    ckpt = latest(base)
    assert sorted(p.name for p in ckpt.iterdir()) == CHECKPOINT_FILES
    for path in ckpt.iterdir():
        raw = path.read_bytes()
        if path.suffix == ".safetensors":
            load_safetensors(raw)
        else:  # JSON, not a pickle (b"\x80") nor a torch.save zip (b"PK")
            assert raw.startswith(b"{"), path.name
            json.loads(raw)
    listed = verify_folder(ckpt)
    assert sorted(listed) == [n for n in CHECKPOINT_FILES if n != "fmgen_manifest.json"]
    assert all(listed[n]["size"] == (ckpt / n).stat().st_size for n in listed)
    opt = load_file(ckpt / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= opt.keys()
    extra = json.loads((ckpt / "fmgen_extra.json").read_text())
    assert extra["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert extra["ema"]["optimization_step"] == 3 and extra["class_names"][0] == "0"


def test_optimizer_and_rng_states_round_trip_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95))
    for _ in range(2):
        sum((p**2).sum() for p in params).backward()
        opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    tensors, meta = load_safetensors(save_safetensors(tensors)), json.loads(json.dumps(meta))
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = torch.optim.AdamW(twin_params, lr=0.5)
    twin.load_state_dict(unflatten_optimizer(tensors, meta, twin.state_dict()))
    assert twin.param_groups[0]["betas"] == (0.8, 0.95) and twin.param_groups[0]["lr"] == 1e-2
    for o, ps in ((opt, params), (twin, twin_params)):  # one more step from each: identical
        o.zero_grad()
        sum((p**3).sum() for p in ps).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params, strict=True))

    gen = torch.Generator().manual_seed(3)
    torch.randn(7, generator=gen)
    t, j = rng_states(gen)
    t, j = load_safetensors(save_safetensors(t)), json.loads(json.dumps(j))
    draws = (torch.randn(4), torch.randn(4, generator=gen), random.random(), np.random.rand())  # noqa: NPY002
    set_rng_states(t, j, gen)
    again = (torch.randn(4), torch.randn(4, generator=gen), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1])
    assert draws[2:] == again[2:]


# --- no pickle is ever loaded ------------------------------------------------------------------


class WritesMarker:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


OLD_FORMAT = ["fmgen_extra.pt", "optimizer.bin", "random_states_0.pkl", "scaler.pt", "fmgen_loader_0.pt"]  # fmt: skip


def poison(folder: Path, marker: Path) -> list[Path]:
    """Replace every file that is not safetensors by a pickle that writes ``marker``."""
    payload = pickle.dumps(WritesMarker(marker))
    done = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix != ".safetensors":
            path.write_bytes(payload)
            done.append(path)
    return done


def test_pickles_in_checkpoints_and_exports_are_never_loaded(shards, tmp_path):
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(WritesMarker(marker)))  # the payload works ...
    assert marker.exists()
    marker.unlink()  # ... so a loader that unpickled it would leave the marker
    run = tmp_path / "run"
    train_tiny(shards, run, 2, EVERY_STEP)
    ckpt = latest(run)
    poisoned = poison(run, marker)
    assert {"fmgen_extra.json", "fmgen_manifest.json", "fmgen.json", "latest", LOCK_FILE} <= {
        p.name for p in poisoned
    }
    for step in run.glob("checkpoints/step_*"):  # and the files of the old, pickled format
        for name in OLD_FORMAT:
            torch.save(WritesMarker(marker), step / name)
    torch.save(WritesMarker(marker), run / "export" / "backbone" / "diffusion_pytorch_model.bin")

    for source, kw in ((ckpt, {}), (ckpt, {"weights": "raw"}), (run, {}), (run, {"weights": "raw"}),
                       (run / "export", {}), (run / "checkpoints", {})):  # fmt: skip
        with pytest.raises(CheckpointError):
            load_model(source, **kw)
    for resume in ("auto", str(ckpt), str(run)):
        with pytest.raises(CheckpointError, match="verifies|manifest"):
            train_tiny(shards, run, 3, resume=resume)
    assert not marker.exists()

    # a checkpoint of the old format: refused with a message that says why
    old = tmp_path / "old" / "step_0000002"
    old.mkdir(parents=True)
    for name in OLD_FORMAT:
        torch.save(WritesMarker(marker), old / name)
    shutil.copy(ckpt / "model.safetensors", old)
    with pytest.raises(CheckpointError, match=r"older fmgen: .*fmgen_extra\.pt.* pickles"):
        load_model(old)
    with pytest.raises(CheckpointError, match="older fmgen"):
        train_tiny(shards, tmp_path / "new", 3, resume=str(old))

    for args in ([str(run)], [str(run), "--weights", "raw"], [str(old)]):
        r = run_main("sample", "--checkpoint", *args, "--steps", "2", "--out", tmp_path / "g.png")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


# --- damage: fall back to the last good checkpoint, and keep it --------------------------------


def flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_file_falls_back_to_the_previous_checkpoint(base_run, shards, tmp_path, caplog, name):  # fmt: skip
    base, ref = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    flip_middle_byte(run / "checkpoints" / "step_0000003" / name)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        verify_folder(run / "checkpoints" / "step_0000003")
    with caplog.at_level(logging.INFO):
        # keep 2, one save at step 5: the damaged step_3 must not count as one of the two
        res = train_tiny(shards, run, 5, DET, "train.keep_checkpoints=2", resume="auto")
    text = messages(caplog)
    assert re.search(rf"skipping checkpoint step_0000003: .*{re.escape(name)}", text), text
    assert re.search(r"resumed from \S*step_0000002 at step 2", text), text
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0000002",
        "step_0000005",
    ]
    verify_folder(run / "checkpoints" / "step_0000002")
    assert res.step == 5
    same_weights(res.checkpoint, ref)  # the fallback lost nothing: as if never interrupted


def test_without_latest_resume_takes_the_newest_verified_step(base_run, shards, tmp_path, caplog):
    base, ref = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step_0000002" / "fmgen_manifest.json").unlink()  # an older, incomplete
    with caplog.at_level(logging.INFO):
        res = train_tiny(shards, run, 5, DET, resume="auto")
    text = messages(caplog)
    assert "latest is missing or unreadable; using step_0000003" in text, text
    assert re.search(r"resumed from \S*step_0000003 at step 3", text), text
    same_weights(res.checkpoint, ref)


def test_no_checkpoint_that_verifies_is_a_refusal_not_a_restart(base_run, shards, tmp_path):
    base, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for step in (run / "checkpoints").glob("step_*"):
        flip_middle_byte(step / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoints .* verifies"):
        train_tiny(shards, run, 5, resume="auto")
    for step in (run / "checkpoints").glob("step_*"):
        shutil.rmtree(step)
    with pytest.raises(CheckpointError, match="holds no checkpoint folder"):
        train_tiny(shards, run, 5, resume="auto")  # `latest` is left: checkpoints were lost
    one = tmp_path / "one"  # an explicit --resume PATH is checked as well
    shutil.copytree(base / "checkpoints" / "step_0000001", one)
    flip_middle_byte(one / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        train_tiny(shards, tmp_path / "other", 5, resume=str(one))


def test_leftovers_of_interrupted_saves_are_removed_at_start(base_run, shards, tmp_path, caplog):
    base, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "checkpoints" / ".tmp-step_0000004").mkdir()
    (run / "checkpoints" / ".tmp-step_0000004" / "model.safetensors").write_bytes(b"half")
    (run / ".tmp-export").mkdir()
    (run / "checkpoints" / ".tmp-latest").write_text("step_0000004")
    with caplog.at_level(logging.WARNING):
        train_tiny(shards, run, 4, DET, resume="auto")
    text = messages(caplog)
    for left in (".tmp-step_0000004", ".tmp-export", ".tmp-latest"):
        assert re.search(rf"removing \S*{re.escape(left)}, left by an interrupted save", text), text
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))
    assert load_model(run).step == 4


# --- kill -9 at random moments ----------------------------------------------------------------

# One interpreter imports fmgen once and forks a child per training: a fresh `python train.py`
# costs ~8 s of imports on 2 busy cores, the trainings themselves ~1 s.
FORK_SERVER = r"""
import json, os, sys, traceback
from fmgen.base import setup_logging
from fmgen.config import load_config
from fmgen.train import train

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            setup_logging()
            train(load_config(job["config"], job["overrides"]), resume="auto")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"status": os.waitpid(pid, 0)[1]}), flush=True)
"""


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=ROOT, env=subprocess_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()  # fmt: skip
        assert json.loads(self.lines.get(timeout=300)) == {"ready": True}  # imports done
        self.seconds = float("nan")  # how long the last training ran

    def train(
        self, overrides: list[str], log: Path, *, kill_after: float | None = None,
        after: Path | None = None,
    ) -> int:  # fmt: skip
        """Run one training (resume auto) in a fork; SIGKILL it ``kill_after`` seconds after it
        started, or after the file ``after`` appeared (``self.appeared``: when that was)."""
        job = {"config": str(DIGITS), "overrides": overrides, "log": str(log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.lines.get(timeout=120))["pid"]
        t0 = time.monotonic()
        if after is not None:
            while not after.exists() and self.lines.empty():  # (empty: still running)
                time.sleep(0.002)
            self.appeared = time.monotonic() - t0
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = json.loads(self.lines.get(timeout=300))["status"]
        self.seconds = time.monotonic() - t0
        return status

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(shards, tmp_path):
    steps, trials = 6, 32
    overrides = lambda run: tiny(shards, run, steps, DET, EVERY_STEP, "train.keep_checkpoints=2")  # noqa: E731
    server = ForkServer()
    try:
        first = tmp_path / "ref" / "checkpoints" / "latest"
        assert server.train(overrides(tmp_path / "ref"), tmp_path / "ref.log", after=first) == 0
        duration, saving = server.seconds, server.seconds - server.appeared
        rng = random.Random(20261123)
        mid_save = stale_locks = 0
        for i in range(trials):
            run, log = tmp_path / f"t{i}", tmp_path / f"t{i}.log"
            # even trials: any moment of the run (start-up, lock); odd ones: once it checkpoints
            when = {"kill_after": rng.uniform(0.0, duration)} if i % 2 == 0 else {
                "kill_after": rng.uniform(0.0, saving), "after": run / "checkpoints" / "latest"
            }  # fmt: skip
            status = server.train(overrides(run), log, **when)
            assert status in (0, signal.SIGKILL), log.read_text()[-3000:]  # killed, or done first
            mid_save += bool(list((run / "checkpoints").glob(".tmp-*")))
            locked = (run / LOCK_FILE).is_file() and (run / LOCK_FILE).read_text().strip() != ""
            stale_locks += locked
            before = log.read_text() if log.exists() else ""
            assert server.train(overrides(run), log) == 0, log.read_text()[-3000:]
            resumed = log.read_text()[len(before) :]
            if locked:
                assert "taking over the stale lock" in resumed, resumed[-3000:]
            same_weights(latest(run), latest(tmp_path / "ref"))
            exported, ref_export = (
                load_model(run / "export"),
                load_model(tmp_path / "ref" / "export"),
            )
            assert all(torch.equal(a, b) for a, b in
                       zip(exported.model.parameters(), ref_export.model.parameters(), strict=True))  # fmt: skip
        # the kills landed where it matters: inside saves, and while the lock was held
        assert mid_save >= 1 and stale_locks >= trials // 2, (mid_save, stale_locks)
    finally:
        server.close()


# --- the run-folder lock -----------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    t0 = time.monotonic()
    with pytest.raises(RunFolderLocked, match=rf"in use by another training: pid {os.getpid()} on host"):  # fmt: skip
        b.acquire()
    assert time.monotonic() - t0 < 2  # a live holder: refused at once
    a.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly
    b.acquire()
    b.release()

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = {"host": socket.gethostname(), "pid": dead.pid, "slurm_job_id": None, "started": "x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(left))  # what kill -9 leaves behind
    with caplog.at_level(logging.INFO):
        c = RunLock(tmp_path)
        c.acquire()
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {dead.pid}" in messages(
        caplog
    )
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    c.release()

    # a requeued SLURM job: the same job id, a new process after the old one exited
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_FILE).write_text(json.dumps({**left, "host": "node7", "slurm_job_id": "4242"}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        d = RunLock(tmp_path)
        d.acquire()
    assert "earlier start of SLURM job 4242 (requeued)" in messages(caplog)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job_id"] == "4242"
    d.release()


def test_train_refuses_a_locked_folder_and_releases_on_errors(shards, tmp_path):
    from fmgen.config import ConfigError

    run = tmp_path / "run"
    holder = RunLock(run)
    holder.acquire()
    with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()}"):
        train_tiny(shards, run, 1)
    assert not (run / "config.yaml").exists()  # refused before writing anything
    holder.release()
    with pytest.raises(ConfigError):  # raised inside the locked part of train()
        train_tiny(shards, run, 1, "train.batch_size=15", "train.grad_accum=2")
    assert (run / LOCK_FILE).read_text() == ""
    again = RunLock(run)
    again.acquire()  # free again
    again.release()


@pytest.mark.slow
def test_a_second_training_on_a_run_folder_exits_naming_the_holder(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(DIGITS),
        *tiny(shards, run, 5000),
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        for line in first.stdout:  # until it trains (and so holds the lock)
            if "step 1/" in line:
                break
            assert time.monotonic() < deadline, "the first training did not start"
        t0 = time.monotonic()
        second = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        took = time.monotonic() - t0
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by another training: pid {first.pid} on host {socket.gethostname()}" in second.stderr  # fmt: skip
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the second training waited for the first to end"
        assert took < 60, f"{took:.0f} s"  # python's imports, then the refusal
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and "stopped by signal" in out, out[-3000:]


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (CI runs as root); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {r.stderr}")
        pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    size = shutil.disk_usage(disk).free - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(shards, small_disk):
    run = small_disk / "run"
    keep = "train.keep_checkpoints=5"
    first = train_tiny(shards, run, 1, keep)
    good = first.checkpoint
    size = sum(p.stat().st_size for p in good.iterdir())
    fill(small_disk, leave=size // 3)
    with pytest.raises(CheckpointError) as err:
        train_tiny(shards, run, 2, keep, resume="auto")
    msg = str(err.value)
    m = re.fullmatch(
        rf"disk full while writing the checkpoint to {re.escape(str(run))}/checkpoints/step_0000002: "
        r"needs about ([\d,]+) bytes, ([\d,]+) free; free space or point train.run_dir elsewhere",
        msg,
    )
    assert m, msg
    needed, free = (int(g.replace(",", "")) for g in m.groups())
    assert 0.9 * size < needed < 1.1 * size and free < needed
    assert not list((run / "checkpoints").glob(".tmp-*")), "the partial folder was left"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [good.name]
    assert (run / "checkpoints" / "latest").read_text().strip() == good.name
    verify_folder(good)
    assert load_model(good, weights="raw").step == 1

    # the export: written aside, so a full disk leaves the previous export whole
    export_size = sum(p.stat().st_size for p in (run / "export").rglob("*") if p.is_file())
    fill(small_disk, leave=export_size // 3)
    with pytest.raises(CheckpointError, match=rf"^disk full while writing the export to {re.escape(str(run))}/export: needs about"):  # fmt: skip
        train_tiny(shards, run, 1, keep, resume="auto")  # at its end already: only the export
    assert not list(run.glob(".tmp-*"))
    assert load_model(run / "export").step == 1
