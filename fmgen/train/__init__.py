"""Training: the loop, checkpoints, tracking, the cluster launcher (``python -m fmgen.train.launch``).

The loop is imported on first use, not with the package: the launcher (stdlib only) runs once
per node before every SLURM job step, and the loop's imports (Accelerate, diffusers) would add
~5 s to each start.
"""

__all__ = ["TrainResult", "TrainState", "TrainingError", "check_config", "train"]


def __getattr__(name: str):
    if name == "TrainingError":
        from fmgen.train.errors import TrainingError

        return TrainingError
    if name in __all__:
        from fmgen.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
