"""LoRA on DiaNA's dialogue tower through `peft` (peft 0.21: `get_peft_model` / `PeftModel`
directly; transformers' built-in adapter methods need peft >= 0.22)."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from diana.modeling_diana import DiaNAModel

# Every linear layer of the Llama tower, and nothing of the image tower (which has `query`/`value`
# names of its own, so a plain module-name list would also hit Swinv2).
TEXT_TOWER_TARGETS = (
    r"text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
# Trained in full beside the adapters and saved with them. `logit_scale` is a bare parameter that
# `modules_to_save` cannot hold, so it stays at its loaded value under LoRA.
FULLY_TRAINED_MODULES = ["vision_model", "visual_projection", "text_projection", "refiner"]


def apply_lora(model: DiaNAModel, rank: int, alpha: float | None = None, dropout: float = 0.05) -> PeftModel:
    """Wraps `model` with rank-`rank` adapters on the dialogue tower; the image tower, the
    projections and the refiner stay fully trainable."""
    if rank <= 0:
        raise ValueError(f"lora_rank must be positive, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=TEXT_TOWER_TARGETS,
        modules_to_save=FULLY_TRAINED_MODULES,
    )
    return get_peft_model(model, config)


__all__ = ["FULLY_TRAINED_MODULES", "TEXT_TOWER_TARGETS", "apply_lora"]
