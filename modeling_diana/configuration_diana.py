"""DiaNA model configuration (Bai et al., CVPR 2025, "Chat-based Person Retrieval via Dialogue-Refined
Cross-Modal Alignment").

A composite configuration in the `VisionTextDualEncoderConfig` shape: a Swinv2 `vision_config`, a Llama
`text_config`, the joint width, and the attribute refiner shared by both modalities.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PreTrainedConfig

# `strict` is huggingface_hub's decorator (it runs the validate_* methods), taken through transformers:
# this file travels with the weights and may import only torch and transformers.
from transformers.configuration_utils import SubConfigSpec, strict

# The paper's image tower: Swinv2-B (ImageNet-22k), patch 4, window 12, at 384x192 (H x W).
DEFAULT_VISION_CONFIG: dict = {
    "model_type": "swinv2",
    "image_size": [384, 192],
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 128,
    "depths": [2, 2, 18, 2],
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
    "mlp_ratio": 4.0,
    "drop_path_rate": 0.2,
}

# The paper's dialogue tower: Llama-3.2-1B base, with the Llama-3 special ids (the pad id is
# `<|finetune_right_pad_id|>`, which the processor pads with).
DEFAULT_TEXT_CONFIG: dict = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "pad_token_id": 128004,
}

ATTRIBUTE_REDUCTIONS = ("mean", "max", "min", "logsumexp", "neg_logsumexp")
SCORE_MODES = ("global", "attribute", "fused")
# "patch": Swinv2's own patch embedding (one 4x4 stride-4 convolution; the paper's tower).
# "conv": two 3x3 stride-2 convolutions (GroupNorm, GELU) and a 1x1 one in its place (Xiao et al. 2021,
# "Early Convolutions Help Transformers See Better"): a from-scratch tower learns fine shape attributes
# (hair, sleeves, bag) faster with it; the SynthPedes presets use it.
VISION_STEMS = ("patch", "conv")
# "last": the dialogue vector is the last token's hidden state (the paper's; a round's vector is the state at
# its last token). "mean": the mean of the attended tokens' states up to there; a small from-scratch tower
# binds each answer to its question locally but gathers five rounds into one token poorly, and the mean
# reads every answer directly (SynthPedes main job, README).
TEXT_POOLINGS = ("last", "mean")


@strict
class DiaNAConfig(PreTrainedConfig):
    r"""Configuration of a [`DiaNAModel`]: the two towers, the joint space, the attribute refiner and the losses.

    Defaults build the paper's full-size model (Swinv2-B at 384x192 + Llama-3.2-1B, 768-d joint space, 16
    attribute queries, as in ChatPedes fine-tuning).

    Args:
        vision_config: Swinv2 configuration (object or dict) of the image tower.
        text_config: Llama configuration (object or dict) of the dialogue tower.
        projection_dim: Width D of the joint space (both projections, the refiner and the queries).
        num_attribute_queries: Number K of learnable attribute queries (24 in pretraining, 16 in fine-tuning).
        refiner_num_layers: Pre-LN transformer blocks after the refiner's cross-attention.
        refiner_num_heads: Attention heads of the refiner (the official model uses D / 64, i.e. 12 at D = 768).
        refiner_mlp_ratio: Hidden width of the refiner MLP as a multiple of D.
        attribute_reduction: How per-slot cosines are reduced over the K slots into one attribute similarity:
            "mean", "max", "min", "logsumexp" or "neg_logsumexp" (= -logsumexp(-x)).
        logit_scale_init_value: Initial inverse temperature (stored as its log in the model).
        logit_scale_max: Clamp of the inverse temperature.
        use_sdm_loss: Add the SDM (KL) loss on the global and, with the refiner, the attribute similarity.
        use_refiner_loss: Add the attribute-similarity losses of the refiner.
        sdm_epsilon: Epsilon inside the log of the SDM targets.
        score_mode: Default retrieval score of `DiaNAModel.similarity`: "global", "attribute" or "fused".
        initializer_factor: Multiplies the width-scaled standard deviations of the projections' and the
            refiner's initialisation (CLIP's convention; 1.0 = the scaled defaults).
        vision_stem: The image tower's first layer: "patch" (Swinv2's patch embedding, the paper's) or "conv"
            (a convolutional stem of the same output size, rebuilt by `DiaNAModel` on every load; needs
            `vision_config.patch_size` 4).
        text_pooling: How the dialogue tower's token states become the dialogue vector: "last" (the last
            attended token, the paper's) or "mean" (the mean of the attended tokens). Both are causal, so a
            round's vector only sees rounds up to it and all rounds come from one tower pass.
        rejection_weight: How far a witness's "not this person" moves the search away from the photos they
            rejected, in [0, 1]: the dialogue vector q becomes normalise(q - w * mean of the rejected photos'
            vectors) (Rocchio's negative feedback; per attribute slot too in the attribute / fused modes).
            0 only removes the rejected photos from the ranking. The default 0.15 is Rocchio's classic
            negative weight (gamma, with the query's own weight 1). A search setting: it changes no
            embedding, so a gallery index made before a change still fits.

    Example:
    ```python
    >>> from diana.modeling_diana import DiaNAConfig, DiaNAModel
    >>> config = DiaNAConfig(num_attribute_queries=24, use_sdm_loss=False)  # the pretraining stage
    >>> config.text_config.hidden_size
    2048
    ```
    """

    model_type = "diana"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="swinv2",
            init_kwargs={k: v for k, v in DEFAULT_VISION_CONFIG.items() if k != "model_type"},
        ),
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="llama",
            init_kwargs={k: v for k, v in DEFAULT_TEXT_CONFIG.items() if k != "model_type"},
        ),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 768
    num_attribute_queries: int = 16
    refiner_num_layers: int = 2
    refiner_num_heads: int = 12
    refiner_mlp_ratio: float | int = 4.0
    attribute_reduction: str = "mean"
    logit_scale_init_value: float | int = 50.0
    logit_scale_max: float | int = 100.0
    use_sdm_loss: bool = True
    use_refiner_loss: bool = True
    sdm_epsilon: float = 1e-6
    score_mode: str = "global"
    initializer_factor: float = 1.0
    vision_stem: str = "patch"
    text_pooling: str = "last"
    rejection_weight: float | int = 0.15

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Validated here rather than in `validate_*` hooks so that an impossible value raises a plain
        # ValueError naming the field, at construction, whichever way the config is built.
        for name in ("projection_dim", "num_attribute_queries", "refiner_num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiaNAConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.refiner_num_layers < 0:
            raise ValueError(f"DiaNAConfig.refiner_num_layers must be >= 0, got {self.refiner_num_layers}.")
        if self.projection_dim % self.refiner_num_heads != 0:
            raise ValueError(
                f"DiaNAConfig.projection_dim ({self.projection_dim}) must be divisible by refiner_num_heads "
                f"({self.refiner_num_heads}): every refiner head gets projection_dim / refiner_num_heads channels."
            )
        if not self.refiner_mlp_ratio > 0:
            raise ValueError(f"DiaNAConfig.refiner_mlp_ratio must be > 0, got {self.refiner_mlp_ratio}.")
        if int(self.projection_dim * self.refiner_mlp_ratio) <= 0:
            raise ValueError("DiaNAConfig: projection_dim * refiner_mlp_ratio must give at least one MLP unit.")
        if self.attribute_reduction not in ATTRIBUTE_REDUCTIONS:
            raise ValueError(
                f"DiaNAConfig.attribute_reduction must be one of {ATTRIBUTE_REDUCTIONS}, got {self.attribute_reduction!r}."
            )
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"DiaNAConfig.score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}.")
        if not (self.logit_scale_init_value > 0 and math.isfinite(self.logit_scale_init_value)):
            raise ValueError(
                f"DiaNAConfig.logit_scale_init_value must be a finite positive number, got {self.logit_scale_init_value}."
            )
        if not self.logit_scale_max > 0:
            raise ValueError(f"DiaNAConfig.logit_scale_max must be > 0, got {self.logit_scale_max}.")
        if self.logit_scale_init_value > self.logit_scale_max:
            raise ValueError(
                f"DiaNAConfig.logit_scale_init_value ({self.logit_scale_init_value}) exceeds logit_scale_max "
                f"({self.logit_scale_max}): the clamp would hide the initial value."
            )
        if not (0 < self.sdm_epsilon < 1):
            raise ValueError(f"DiaNAConfig.sdm_epsilon must be in (0, 1), got {self.sdm_epsilon}.")
        if self.vision_config.model_type not in ("swinv2",):
            raise ValueError(
                f"DiaNAConfig.vision_config must be a Swinv2 config, got model_type {self.vision_config.model_type!r}."
            )
        if self.vision_stem not in VISION_STEMS:
            raise ValueError(f"DiaNAConfig.vision_stem must be one of {VISION_STEMS}, got {self.vision_stem!r}.")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"DiaNAConfig.text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}.")
        if not 0 <= self.rejection_weight <= 1:
            raise ValueError(
                f"DiaNAConfig.rejection_weight must be in [0, 1] (0: rejected photos only leave the ranking), "
                f"got {self.rejection_weight}."
            )
        patch = self.vision_config.patch_size
        if self.vision_stem == "conv" and tuple(patch if isinstance(patch, (list, tuple)) else (patch, patch)) != (4, 4):
            raise ValueError(
                f"DiaNAConfig.vision_stem 'conv' downsamples by 4 (two stride-2 convolutions), so it needs "
                f"vision_config.patch_size 4, got {patch}."
            )
        if self.text_config.model_type not in ("llama",):
            raise ValueError(
                f"DiaNAConfig.text_config must be a Llama config, got model_type {self.text_config.model_type!r}."
            )


__all__ = ["DiaNAConfig", "ATTRIBUTE_REDUCTIONS", "SCORE_MODES", "TEXT_POOLINGS", "VISION_STEMS"]
