"""The run-folder lock: one training per run folder at a time.

The main process holds ``fcntl.flock`` on ``RUN_DIR/.fmgen.lock`` for the run's life; the file
says who holds it (host, pid, SLURM job id, start time) as JSON, for the message a second
training gets. The kernel drops a flock when its process dies, however it dies (kill -9, a
crashed node on a file system that tracks locks), so a stale lock needs no clean-up: a lock
file whose holder is gone is taken over with a warning, and a requeued SLURM job (a new process
after the old one exited) starts as usual. On release the file is emptied, so a file that still
names a holder after the lock was free means that holder did not exit cleanly.

File systems without working flock across hosts (some NFS and Lustre mounts) cannot protect
trainings started on two different hosts; on one host the lock always holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fmgen.base import FmgenError
from fmgen.train.dist import any_rank

log = logging.getLogger("fmgen.train")

LOCK_FILE = ".fmgen.lock"


class RunFolderLocked(FmgenError):
    """Another training holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dead_on(holder: dict[str, Any], host: str) -> bool:
    """The holder a lock file names ran on this host and is no longer running."""
    pid = holder.get("pid")
    return holder.get("host") == host and isinstance(pid, int) and pid > 0 and not _alive(pid)


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another training (it has not written its details yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started "
        f"{holder.get('started')}"
    )


class RunLock:
    """An exclusive flock on ``RUN_DIR/.fmgen.lock``; ``acquire`` raises ``RunFolderLocked``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self, wait_s: float = 10.0) -> None:
        """Take the lock. A holder that is alive gets an immediate refusal; one recorded as dead
        on this host is waited for up to ``wait_s`` (children it forked may still hold the open
        file for a moment after it died)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        host, deadline = socket.gethostname(), time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._read(fd)
                if not holder:  # the holder has the lock but has not written itself yet
                    time.sleep(0.2)
                    holder = self._read(fd)
                dead = _dead_on(holder, host)
                if not (dead and time.monotonic() < deadline):
                    os.close(fd)
                    orphans = " (it has exited; a process it started still holds the lock)"
                    raise RunFolderLocked(
                        f"{self.path.parent} is in use by another training: {describe(holder)}"
                        f"{orphans if dead else ''}; wait for it to end or stop it, or set "
                        f"another train.run_dir"
                    ) from None
                time.sleep(0.2)
        old = self._read(fd)
        if old:
            job = os.environ.get("SLURM_JOB_ID")
            if job and old.get("slurm_job_id") == job:
                log.info("taking over the lock of an earlier start of SLURM job %s (requeued)", job)
            elif _dead_on(old, host):
                log.warning("taking over the stale lock %s of %s, which is no longer running",
                            self.path, describe(old))  # fmt: skip
            else:
                log.warning("taking over the lock %s: it names %s, which did not release it, but "
                            "the lock was free", self.path, describe(old))  # fmt: skip
        me = {
            "host": host,
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # empty: released cleanly
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, *, main: bool, device: torch.device) -> Iterator[RunLock | None]:
    """The main process holds the run folder's lock for the block; every rank raises
    ``RunFolderLocked`` if the main process cannot take it (one explicit all-reduce)."""
    lock, error = (RunLock(run_dir) if main else None), None
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderLocked as e:
            error = e
    if any_rank(error is not None, device):
        raise error or RunFolderLocked(
            f"{run_dir} is in use by another training (the main process says which); wait for "
            f"it to end or stop it, or set another train.run_dir"
        )
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
