"""The error type of training."""

from fmgen.base import FmgenError


class TrainingError(FmgenError, RuntimeError):
    """Training stopped for a reason the user must act on; the message says which."""
