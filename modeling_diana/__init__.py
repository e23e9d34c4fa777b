"""DiaNA model: configuration, model and losses (the Hub package)."""

from transformers import AutoConfig, AutoModel

from .configuration_diana import DiaNAConfig
from .loss_diana import (
    attribute_similarity,
    diana_loss,
    gather_with_grad,
    identity_targets,
    multi_positive_itc_loss,
    sdm_loss,
)
from .modeling_diana import (
    DiaNAAttributeRefiner,
    DiaNAConvStem,
    DiaNAImageEncoding,
    DiaNAModel,
    DiaNAOutput,
    DiaNAPreTrainedModel,
    DiaNATextEncoding,
)

# Local Auto* support (AutoConfig.for_model("diana"), AutoModel.from_config); the remote-code path uses
# the auto_map that save_pretrained writes. This file is not shipped with the weights.
AutoConfig.register("diana", DiaNAConfig, exist_ok=True)
AutoModel.register(DiaNAConfig, DiaNAModel, exist_ok=True)

__all__ = [
    "DiaNAAttributeRefiner",
    "DiaNAConfig",
    "DiaNAConvStem",
    "DiaNAImageEncoding",
    "DiaNAModel",
    "DiaNAOutput",
    "DiaNAPreTrainedModel",
    "DiaNATextEncoding",
    "attribute_similarity",
    "diana_loss",
    "gather_with_grad",
    "identity_targets",
    "multi_positive_itc_loss",
    "sdm_loss",
]
