"""Training: the loop, checkpoints, tracking, the cluster launcher (``python -m fmgen.train.launch``)."""

from fmgen.train.errors import TrainingError
from fmgen.train.loop import TrainResult, TrainState, check_config, train

__all__ = ["TrainResult", "TrainState", "TrainingError", "check_config", "train"]
