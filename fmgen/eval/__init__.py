"""Evaluation: generation from a model, images and grids, FID and its feature networks, and
end-of-training reports (the digits judge, of class-label and of text models).

Importing this package registers every built-in feature network and report.
"""

from fmgen.eval.digits import digits_report  # registers the digits-classifier feature network
from fmgen.eval.digits_text import digits_text_report
from fmgen.eval.features import FEATURE_NETWORKS, EvalError, FeatureSpec, feature_spec
from fmgen.eval.fid import fid_against_reference, score_against_reference
from fmgen.eval.generate import NOISE_BLOCK, SampleError, block_noise, generate, model_field
from fmgen.eval.images import save_grid, to_uint8
from fmgen.eval.manifold import precision_recall
from fmgen.eval.networks import DINOV2_SIZE  # registers dinov2, module and torchscript
from fmgen.eval.protocol import fid_of_folder, fid_of_model
from fmgen.eval.reports import REPORTS, check_eval_config, run_report
from fmgen.eval.sampling import draw_samples, sample_request

__all__ = [
    "DINOV2_SIZE",
    "FEATURE_NETWORKS",
    "NOISE_BLOCK",
    "REPORTS",
    "EvalError",
    "FeatureSpec",
    "SampleError",
    "block_noise",
    "check_eval_config",
    "digits_report",
    "digits_text_report",
    "draw_samples",
    "feature_spec",
    "fid_against_reference",
    "fid_of_folder",
    "fid_of_model",
    "generate",
    "model_field",
    "precision_recall",
    "run_report",
    "sample_request",
    "save_grid",
    "score_against_reference",
    "to_uint8",
]
