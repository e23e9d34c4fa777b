"""The model and processor of one stage: from a DiaNA folder, two tower checkpoints or a config;
LoRA on the dialogue tower."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.processing import build_processor
from diana.training.arguments import DataArguments, ModelArguments
from diana.training.lora import apply_lora

logger = logging.getLogger("diana.run_stage")


def build_model(model_args: ModelArguments) -> DiaNAModel:
    overrides = {
        key: value
        for key, value in {
            "use_sdm_loss": model_args.use_sdm_loss,
            "use_refiner_loss": model_args.use_refiner_loss,
            "attribute_reduction": model_args.attribute_reduction,
            "score_mode": model_args.score_mode,
            "num_attribute_queries": model_args.num_attribute_queries,
        }.items()
        if value is not None
    }
    attn = {"text_config": model_args.text_attn_implementation, "vision_config": "eager"}
    if model_args.model_name_or_path:
        config = DiaNAConfig.from_pretrained(model_args.model_name_or_path)
        old_k = config.num_attribute_queries
        for key, value in overrides.items():
            setattr(config, key, value)
        if config.num_attribute_queries != old_k:
            # Stage 1 uses K = 24, stage 2 K = 16: the queries cannot carry over (as in the paper).
            logger.warning("attribute queries re-initialised: %s has K=%d, this stage uses K=%d",
                           model_args.model_name_or_path, old_k, config.num_attribute_queries)
        model = DiaNAModel.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=config.num_attribute_queries != old_k,
            attn_implementation=attn,
        )
    elif model_args.vision_model_path and model_args.text_model_path:
        model = DiaNAModel.from_vision_text_pretrained(
            model_args.vision_model_path, model_args.text_model_path, **overrides
        )
    elif model_args.model_config:
        config = DiaNAConfig(**{**model_args.model_config, **overrides})
        model = DiaNAModel(config)
    else:
        raise ValueError("give --model_name_or_path, or --vision_model_path and --text_model_path, or a "
                         "model_config in the YAML preset")
    # Checkpoints and the final folder carry auto_map + code files (trust_remote_code).
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    return model


def build_run_processor(model_args: ModelArguments, data_args: DataArguments, config: DiaNAConfig):
    tokenizer_dir = model_args.tokenizer_dir
    if tokenizer_dir is None and model_args.model_name_or_path:
        if (Path(model_args.model_name_or_path) / "tokenizer.json").exists():
            tokenizer_dir = model_args.model_name_or_path
    image_size = tuple(data_args.image_size) if data_args.image_size else tuple(config.vision_config.image_size)
    vision_size = config.vision_config.image_size
    vision_size = tuple(vision_size) if isinstance(vision_size, (list, tuple)) else (vision_size, vision_size)
    if image_size != vision_size:
        raise ValueError(f"image_size {list(image_size)} differs from the model's vision_config.image_size "
                         f"{list(vision_size)}")
    processor = build_processor(tokenizer_dir=tokenizer_dir, profile=data_args.processor_profile, image_size=image_size)
    processor.max_length = data_args.max_length
    processor.register_for_auto_class()
    return processor


def wrap_with_lora(model: DiaNAModel, model_args: ModelArguments, output_dir: str):
    """LoRA on the dialogue tower; the starting weights are saved under output_dir/base so that the
    adapters can always be reloaded and merged, even onto a randomly initialised model."""

    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(Path(output_dir) / "base")
    peft_model = apply_lora(model, model_args.lora_rank, model_args.lora_alpha, model_args.lora_dropout)
    peft_model.print_trainable_parameters()
    return peft_model


def model_config_of(model) -> DiaNAConfig:
    return model.config if isinstance(model, DiaNAModel) else model.get_base_model().config


def prepare_model(model_args: ModelArguments, data_args: DataArguments, training_args) -> tuple:
    """(model, processor) of a stage, ready to train: the image tower frozen or compiled as asked,
    LoRA-wrapped under `--lora_rank`, and DDP told when the refiner gets no gradient."""
    model = build_model(model_args)
    processor = build_run_processor(model_args, data_args, model.config)
    if model_args.freeze_vision_model:
        model.vision_model.requires_grad_(False)
    if model_args.compile_vision:
        # Compiles in place: parameter names and the saved state dict stay those of the plain tower.
        model.vision_model.compile()
    if model_args.lora_rank > 0:
        model = wrap_with_lora(model, model_args, training_args.output_dir)
    if not model_config_of(model).use_refiner_loss:
        # The refiner gets no gradient; DDP must be told.
        training_args.ddp_find_unused_parameters = True
    return model, processor
