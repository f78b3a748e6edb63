"""fmgen: flow matching and diffusion for images, from one CPU to many GPUs.

Time convention, everywhere: t = 0 is noise, t = 1 is data (see ``fmgen.core.paths``).

The library API of the math is re-exported here (``from fmgen import get_path, Oracle, ...``).
Layers, each importing only those below it (checked by import-linter in CI):
``core`` < ``base``, ``config`` < ``models`` < ``data`` < ``eval`` < ``train`` < ``cli``.
"""

from fmgen.core import (
    DSM_WEIGHTINGS,
    LOSSES,
    PATHS,
    PREDICTION_TYPES,
    SAMPLERS,
    TIME_GRIDS,
    TIME_SAMPLINGS,
    GaussianPath,
    Oracle,
    SamplingSpec,
    beta_sigma,
    cfg_field,
    cfg_net,
    count_nfe,
    get_loss,
    get_path,
    get_sampler,
    nfe,
    sample_time,
    solve,
    time_grid,
    velocity_field,
)

__version__ = "0.1.0"

__all__ = [
    "DSM_WEIGHTINGS",
    "LOSSES",
    "PATHS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "TIME_GRIDS",
    "TIME_SAMPLINGS",
    "GaussianPath",
    "Oracle",
    "SamplingSpec",
    "beta_sigma",
    "cfg_field",
    "cfg_net",
    "count_nfe",
    "get_loss",
    "get_path",
    "get_sampler",
    "nfe",
    "sample_time",
    "solve",
    "time_grid",
    "velocity_field",
]
