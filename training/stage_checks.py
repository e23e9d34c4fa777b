"""Every `run_stage` argument that cannot work, refused before any data is read or model built,
naming the flag, the bad value and the valid ones."""

from __future__ import annotations

import os

from diana.modeling_diana.configuration_diana import ATTRIBUTE_REDUCTIONS, SCORE_MODES
from diana.processing import PROCESSOR_PROFILES
from diana.processing.cli_errors import (
    UserInputError,
    require_choice,
    require_choices,
    require_model_folder,
    require_path,
    require_range,
)
from diana.processing.data.annotations import MISSING_IMAGE_POLICIES
from diana.training.arguments import DataArguments, ModelArguments
from diana.training.vision_pretraining import readouts_problem

# Attention implementations of the dialogue tower by name (a Hub kernel "owner/name" is also accepted).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
CHATPEDES_EVAL_SPLITS = ("validation", "test")


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, training_args, *,
                       check_paths: bool = True) -> None:
    """Refuses, before any data is read or model built, every argument that cannot work (the
    objective's own combinations: `check_objective`).

    Args:
        check_paths: also check that the folders exist (off for a job whose earlier steps make them).

    Raises:
        UserInputError (ValueError): naming the flag, the bad value and the valid ones.
    """
    validate_model_arguments(model_args, check_paths)
    validate_data_arguments(data_args, check_paths)
    if data_args.objective == "retrieval" and training_args.load_best_model_at_end:
        # "eval_<mode>/full/R@1": a mode that is not evaluated has no such metric at the first evaluation.
        mode = (training_args.metric_for_best_model or "").split("/")[0].removeprefix("eval_")
        if mode in SCORE_MODES and mode not in data_args.eval_score_modes:
            raise UserInputError(f"--metric_for_best_model {training_args.metric_for_best_model!r} needs score mode "
                                 f"{mode!r}, which --eval_score_modes {data_args.eval_score_modes} does not evaluate")
    check_objective(model_args, data_args, training_args)


def validate_model_arguments(model_args: ModelArguments, check_paths: bool = True) -> None:
    """The model source (a folder, two towers or a config), its overrides, and LoRA."""
    if check_paths:
        require_model_folder("--model_name_or_path", model_args.model_name_or_path, allow_hub_id=True)
        require_path("--tokenizer_dir", model_args.tokenizer_dir, "folder")
    if not model_args.model_name_or_path:
        towers = {"--vision_model_path": model_args.vision_model_path, "--text_model_path": model_args.text_model_path}
        given = [flag for flag, value in towers.items() if value]
        if len(given) == 1:
            missing = next(flag for flag in towers if flag not in given)
            raise UserInputError(f"{given[0]} needs {missing} too (the two towers come together)")
        for flag, value in towers.items():
            if check_paths:
                require_model_folder(flag, value, allow_hub_id=True)
        if not given and not model_args.model_config:
            raise UserInputError("no model: give --model_name_or_path, or --vision_model_path and --text_model_path, "
                                 "or --model_config (a preset's model_config)")
    if model_args.freeze_vision_model and not (model_args.model_name_or_path or model_args.vision_model_path):
        raise UserInputError("--freeze_vision_model true would keep a randomly initialised image tower fixed: start "
                             "from a trained one (--model_name_or_path, e.g. a stage 0 folder) or give "
                             "--freeze_vision_model false")
    require_range("--num_attribute_queries", model_args.num_attribute_queries, 1)
    if model_args.attribute_reduction is not None:
        require_choice("--attribute_reduction", model_args.attribute_reduction, ATTRIBUTE_REDUCTIONS)
    if model_args.score_mode is not None:
        require_choice("--score_mode", model_args.score_mode, SCORE_MODES)
    if "/" not in model_args.text_attn_implementation:
        require_choice("--text_attn_implementation", model_args.text_attn_implementation, ATTENTION_IMPLEMENTATIONS)
    require_range("--lora_rank", model_args.lora_rank, 0)
    if model_args.lora_alpha is not None:
        if model_args.lora_rank == 0:
            raise UserInputError(f"--lora_alpha {model_args.lora_alpha} has no effect without --lora_rank > 0")
        if model_args.lora_alpha <= 0:
            raise UserInputError(f"--lora_alpha {model_args.lora_alpha!r}: must be > 0")
    require_range("--lora_dropout", model_args.lora_dropout, 0.0, 1.0, high_inclusive=False)


def validate_data_arguments(data_args: DataArguments, check_paths: bool = True) -> None:
    """Data set, folders, splits, evaluation modes, processor and augmentation settings."""
    require_choice("--dataset", data_args.dataset, ("chatpedes", "mals"))
    if data_args.data_dir is None:
        raise UserInputError("--data_dir is required (the ChatPedes- or MALS-layout folder)")
    if check_paths:
        require_path("--data_dir", data_args.data_dir, "folder")
        require_path("--eval_data_dir", data_args.eval_data_dir, "folder")
    if data_args.mals_files and data_args.dataset != "mals":
        raise UserInputError(f"--mals_files belongs to --dataset mals, got --dataset {data_args.dataset}")
    require_choice("--on_missing_image", data_args.on_missing_image, MISSING_IMAGE_POLICIES)
    require_range("--validation_persons", data_args.validation_persons, 0)
    require_choice("--eval_split", data_args.eval_split, CHATPEDES_EVAL_SPLITS)
    evaluates_chatpedes = data_args.dataset == "chatpedes" or bool(data_args.eval_data_dir)
    if evaluates_chatpedes and data_args.eval_split == "validation" and data_args.validation_persons == 0:
        raise UserInputError("--eval_split validation needs --validation_persons > 0 (0 holds no persons out of train)")
    require_choices("--eval_score_modes", data_args.eval_score_modes, SCORE_MODES)
    require_range("--max_train_samples", data_args.max_train_samples, 1)
    require_range("--eval_max_samples", data_args.eval_max_samples, 1)
    require_choice("--processor_profile", data_args.processor_profile, sorted(PROCESSOR_PROFILES))
    if data_args.image_size is not None and (len(data_args.image_size) != 2 or min(data_args.image_size) < 1):
        raise UserInputError(f"--image_size {data_args.image_size}: must be two positive integers (height width)")
    require_range("--max_length", data_args.max_length, 1)
    require_range("--token_masking", data_args.token_masking, 0.0, 1.0)
    require_range("--random_erasing", data_args.random_erasing, 0.0, 1.0)


def check_objective(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Fails before any data is read when the objective cannot run as asked."""
    if data_args.objective not in ("retrieval", "image_attributes"):
        raise ValueError(f"--objective must be 'retrieval' or 'image_attributes', got {data_args.objective!r}")
    if data_args.objective != "image_attributes":
        if list(data_args.pretraining_readouts or []) != ["mean"]:
            raise ValueError("--pretraining_readouts belongs to --objective image_attributes (it names the heads "
                             f"of stage 0), got {data_args.pretraining_readouts} with "
                             f"--objective {data_args.objective}")
        return
    problems = []
    if data_args.dataset != "mals":
        problems.append(f"--dataset {data_args.dataset} (its targets are MALS captions and labels: --dataset mals)")
    if data_args.eval_data_dir or training_args.eval_strategy != "no":
        problems.append("an evaluation (it has no retrieval to evaluate: no --eval_data_dir, --eval_strategy no)")

    if problem := readouts_problem(data_args.pretraining_readouts):
        problems.append(f"--pretraining_readouts: {problem}")
    if model_args.lora_rank > 0:
        problems.append("--lora_rank (LoRA adapts the dialogue tower, which this objective does not train)")
    if training_args.load_best_model_at_end:
        problems.append("--load_best_model_at_end (there is no evaluation to choose on)")
    sharded = training_args.deepspeed or training_args.fsdp or any(
        os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true") for name in ("DEEPSPEED", "FSDP"))
    if sharded:
        # The tower is saved from process zero's own copy, which ZeRO-3 / FSDP would have sharded away.
        problems.append("DeepSpeed or FSDP (one process or DDP: it saves the tower from process zero)")
    if problems:
        raise ValueError("--objective image_attributes cannot run with " + "; ".join(problems))
