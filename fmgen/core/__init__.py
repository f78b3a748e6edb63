"""The math of fmgen: Gaussian paths and conversions, the exact oracle, losses, solvers, grids,
MeanFlow (average velocity, few-step), power-function EMA and its post-hoc reconstruction.

Pure torch (no Accelerate, no torch.distributed, no W&B, no file I/O, no config objects), so
every formula is testable in milliseconds. Time convention: t = 0 is noise, t = 1 is data.
"""

from fmgen.core.ema import (
    SIGMA_REL_MAX,
    PosthocWeights,
    gamma_to_sigma_rel,
    posthoc_weights,
    power_ema_beta,
    power_profile_dot,
    sigma_rel_to_gamma,
)
from fmgen.core.grids import TIME_GRIDS, check_times, time_grid
from fmgen.core.guidance import cfg_field, cfg_net, velocity_field
from fmgen.core.losses import (
    DSM_WEIGHTINGS,
    LOSSES,
    MODE_SCALE_RANGE,
    REWEIGHTINGS,
    TIME_SAMPLINGS,
    get_loss,
    reweight_factor,
    sample_time,
)
from fmgen.core.meanflow import (
    AverageField,
    adaptive_weight,
    meanflow_loss,
    meanflow_target,
    sample_interval_times,
    sample_meanflow,
)
from fmgen.core.oracle import Oracle
from fmgen.core.paths import PATHS, PREDICTION_TYPES, GaussianPath, get_path
from fmgen.core.samplers import SAMPLERS, Churn, beta_sigma, count_nfe, get_sampler
from fmgen.core.sampling import SAMPLING_GRIDS, SamplingSpec, nfe, solve, steps_within
from fmgen.core.solver_base import FINAL_STEPS

__all__ = [
    "DSM_WEIGHTINGS",
    "MODE_SCALE_RANGE",
    "REWEIGHTINGS",
    "FINAL_STEPS",
    "LOSSES",
    "PATHS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLING_GRIDS",
    "SIGMA_REL_MAX",
    "TIME_GRIDS",
    "TIME_SAMPLINGS",
    "AverageField",
    "Churn",
    "GaussianPath",
    "Oracle",
    "PosthocWeights",
    "SamplingSpec",
    "adaptive_weight",
    "beta_sigma",
    "cfg_field",
    "cfg_net",
    "gamma_to_sigma_rel",
    "check_times",
    "count_nfe",
    "get_loss",
    "get_path",
    "get_sampler",
    "meanflow_loss",
    "meanflow_target",
    "nfe",
    "steps_within",
    "posthoc_weights",
    "power_ema_beta",
    "power_profile_dot",
    "reweight_factor",
    "sample_interval_times",
    "sample_meanflow",
    "sample_time",
    "sigma_rel_to_gamma",
    "solve",
    "time_grid",
    "velocity_field",
]
