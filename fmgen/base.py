"""The base layer above the math: the error type a user can fix, and logging set-up.

The command line (``fmgen.cli``) prints an ``FmgenError``'s message alone and exits with status
2; every layer raises it (or a subclass) for bad input, so no layer needs the command line.
"""

from __future__ import annotations

import logging
import os


class FmgenError(Exception):
    """A bad input, config, data set or checkpoint; the message names the value and the fix."""


def setup_logging() -> None:
    """One format for every fmgen command; only the main process logs below warnings."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "wandb", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def file_hash(path: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of a file's sha256, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
