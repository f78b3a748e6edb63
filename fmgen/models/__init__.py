"""Models: backbones behind one registry, the prediction-type wrapper, conditioning, the
autoencoder stage, and the run folder's model files (export, loading a checkpoint).

Importing this package registers the built-in backbones (``unet``, ``dit``, their text-reading
variants and their variants with a second time input for MeanFlow).
"""

from fmgen.models import average as _average  # noqa: F401  (registers the *-meanflow variants)
from fmgen.models import dit as _dit  # noqa: F401  (registers model.type: dit)
from fmgen.models import text_backbones as _text  # noqa: F401  (registers unet-text, dit-text)
from fmgen.models import unet as _unet  # noqa: F401  (registers model.type: unet)
from fmgen.models.autoencoder import (
    Autoencoder,
    AutoencoderError,
    IdentityAutoencoder,
    KLAutoencoder,
    autoencoder_for_data,
    autoencoder_from_dict,
    build_autoencoder,
)
from fmgen.models.backbones import BACKBONES, BackboneSpec, get_backbone, register_backbone
from fmgen.models.conditioning import (
    ClassLabels,
    ConditionError,
    Conditioning,
    TextConditioning,
    Unconditional,
    conditioning_from_dict,
)
from fmgen.models.flow import (
    FlowModel,
    build_conditioning,
    build_model,
    check_model_config,
    count_parameters,
    pixel_shape,
)
from fmgen.models.store import CheckpointError, LoadedModel, export_model, load_model

__all__ = [
    "BACKBONES",
    "Autoencoder",
    "AutoencoderError",
    "BackboneSpec",
    "CheckpointError",
    "ClassLabels",
    "ConditionError",
    "Conditioning",
    "TextConditioning",
    "FlowModel",
    "IdentityAutoencoder",
    "KLAutoencoder",
    "LoadedModel",
    "Unconditional",
    "autoencoder_for_data",
    "autoencoder_from_dict",
    "build_autoencoder",
    "build_conditioning",
    "build_model",
    "check_model_config",
    "conditioning_from_dict",
    "count_parameters",
    "export_model",
    "get_backbone",
    "load_model",
    "pixel_shape",
    "register_backbone",
]
