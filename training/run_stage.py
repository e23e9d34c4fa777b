"""Train one DiaNA stage: `accelerate launch training/run_stage.py --config <preset>.yaml [--flag value ...]`.

Stage 1 pretrains on MALS, stage 2 fine-tunes on ChatPedes from the stage 1 folder (as in the paper).
Presets live in training/configs/ (paper recipe and small SynthPedes versions for a CPU). Runs on
one CPU process, on several processes (ACCELERATE_USE_CPU=1 ... --multi_gpu) and on GPUs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from diana.hub_cards.merge_lora import load_and_merge
from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.modeling_diana.configuration_diana import ATTRIBUTE_REDUCTIONS, SCORE_MODES
from diana.processing import PRESETS, build_processor
from diana.processing.cli_errors import (
    UserInputError,
    require_choice,
    require_choices,
    require_model_folder,
    require_path,
    require_range,
    run_cli,
)
from diana.processing.data.annotations import MISSING_IMAGE_POLICIES
from diana.processing.data.chatpedes import load_chatpedes
from diana.processing.data.mals import load_mals
from diana.training.arguments import DataArguments, ModelArguments, parse_args
from diana.training.checkpointing import check_resumable
from diana.training.data.collator import DiaNACollator
from diana.training.data.dataset_columns import add_length_column, with_undecoded_images
from diana.training.data.image_augmentation import image_processor_geometry
from diana.training.lora import apply_lora
from diana.training.trainer import DiaNATrainer
from diana.training.vision_pretraining import (
    VisionPretrainingCollator,
    VisionPretrainingModel,
    VisionPretrainingTrainer,
    count_ngrams,
    readouts_problem,
    save_vocabulary,
    select_ngrams,
)

logger = logging.getLogger("diana.run_stage")


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Runs one stage; returns the final evaluation report (empty without an evaluation split).
    `callbacks` are extra `TrainerCallback`s for programmatic use."""
    # 1. Arguments: YAML preset + command-line overrides.
    model_args, data_args, training_args = parse_args(argv)
    validate_arguments(model_args, data_args, training_args)  # every flag, before any data is read
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # 2. Data: one row per dialogue (ChatPedes) or per image (MALS).
    train_dataset, eval_dataset, data_report = load_data(data_args)
    logger.info("data: %d training rows, %s evaluation rows (%s split)", len(train_dataset),
                len(eval_dataset) if eval_dataset is not None else "no", data_args.eval_split)

    # 3. Model and processor.
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

    if data_args.image_cache and not data_args.image_augmentation:
        # A preset's cache must not make `--image_augmentation false` fail: there is nothing to keep then.
        logger.warning("--image_cache keeps the training image pipeline's resized images: off, as "
                       "--image_augmentation is false")
        data_args.image_cache = False
    if data_args.image_cache:
        train_dataset = prepare_image_cache(train_dataset, data_args, processor)
    else:
        # The collator decodes, naming a file that fails (and skipping it under --on_missing_image skip);
        # `datasets` would decode on row access, where a truncated file fails without its name.
        train_dataset = with_undecoded_images(train_dataset)

    # A stable row id keys each row's augmentation to (seed, epoch, row): resumable (collator).
    train_dataset = train_dataset.add_column("row_index", list(range(len(train_dataset))))
    if data_args.objective == "image_attributes":
        # 4-7 for a random image tower's pretraining (vision_pretraining.py); stage 1 starts from its folder.
        return run_vision_pretraining(model, processor, train_dataset, model_args, data_args, training_args,
                                      data_report, callbacks)

    # 4. Collation (augmentation on for training only) and length-grouped batches.
    train_collator = DiaNACollator(
        processor,
        train=True,
        round_retaining=data_args.round_retaining and data_args.dataset == "chatpedes",
        token_masking=data_args.token_masking,
        image_augmentation=data_args.image_augmentation,
        image_augmentation_kwargs={"erasing_probability": data_args.random_erasing},
        mals_captions=data_args.dataset == "mals",
        max_length=data_args.max_length,
        seed=training_args.seed,
        image_cache=data_args.image_cache,
        on_bad_image=data_args.on_missing_image,
    )
    if training_args.train_sampling_strategy == "group_by_length":
        train_dataset = add_length_column(train_dataset, processor)

    # 5. Trainer.
    trainer = DiaNATrainer(
        model=model,
        args=training_args,
        data_collator=train_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        eval_score_modes=tuple(data_args.eval_score_modes),
        eval_on_bad_image=data_args.on_missing_image,
        callbacks=callbacks,
    )

    # 6. Train (continuing a killed run from its last checkpoint when asked).
    if training_args.do_train:
        train(trainer, training_args)

    # 7. Save: safetensors + processor + remote-code files (+ a merged plain folder under LoRA).
    trainer.save_model(training_args.output_dir)
    if model_args.lora_rank > 0 and trainer.is_world_process_zero():

        merged = load_and_merge(Path(training_args.output_dir) / "base", training_args.output_dir)
        merged.save_pretrained(Path(training_args.output_dir) / "merged")
        processor.save_pretrained(Path(training_args.output_dir) / "merged")

    # 8. Evaluate: validation by default, test only when asked (--eval_split test).
    results = {}
    if eval_dataset is not None:
        metrics = trainer.evaluate(eval_dataset, metric_key_prefix=f"eval_{data_args.eval_split}")
        results = trainer.last_eval_results
        trainer.save_metrics(f"eval_{data_args.eval_split}", metrics)
    if trainer.is_world_process_zero():
        write_run_record(training_args.output_dir, model_args, data_args, training_args, results, data_report)
    return results


def train(trainer, training_args) -> None:
    """trainer.train(), from the last complete checkpoint of output_dir under `--resume_from_checkpoint last`
    (an interrupted save's `tmp-checkpoint-<step>` folder is never one: training/checkpointing.py)."""
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint in {training_args.output_dir}")
    elif resume is not None:
        check_resumable(resume)
    if resume is not None:
        logger.info("resuming from %s", resume)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()


def check_objective(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Fails before any data is read when the objective cannot run as asked."""
    if data_args.objective not in ("retrieval", "image_attributes"):
        raise ValueError(f"--objective must be 'retrieval' or 'image_attributes', got {data_args.objective!r}")
    if data_args.objective != "image_attributes":
        if list(data_args.pretraining_readouts or []) != ["mean"]:
            raise ValueError("--pretraining_readouts belongs to --objective image_attributes (it names the heads "
                             f"of the image-tower pretraining), got {data_args.pretraining_readouts} with "
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
    require_choice("--preset", data_args.preset, sorted(PRESETS))
    if data_args.image_size is not None and (len(data_args.image_size) != 2 or min(data_args.image_size) < 1):
        raise UserInputError(f"--image_size {data_args.image_size}: must be two positive integers (height width)")
    require_range("--max_length", data_args.max_length, 1)
    require_range("--token_masking", data_args.token_masking, 0.0, 1.0)
    require_range("--random_erasing", data_args.random_erasing, 0.0, 1.0)


def run_vision_pretraining(model: DiaNAModel, processor, train_dataset, model_args: ModelArguments,
                           data_args: DataArguments, training_args, data_report: dict, callbacks: list | None) -> dict:
    """`--objective image_attributes`: trains `model.vision_model` (shared, not copied) to predict its
    MALS caption's n-grams and its labels, then saves the whole DiaNA folder for stage 1."""

    # One pass over the captions (1.5M in MALS): the counts give the vocabulary and, being counts of
    # captions, the mean number of its n-grams on per caption.
    counts, total = count_ngrams(train_dataset["caption"])
    vocabulary = select_ngrams(counts, total)
    ngrams_per_caption = sum(counts[g] for g in vocabulary) / total
    logger.info("image-tower targets: %d caption n-grams (%.1f on per caption, most frequent: %s) + 27 MALS labels",
                len(vocabulary), ngrams_per_caption, ", ".join(vocabulary[:8]))
    readouts = list(data_args.pretraining_readouts)
    num_tokens = None
    if "tokens" in readouts:  # the position-keeping head needs the number of final tokens: one blank image tells
        height, width = (int(v) for v in model.config.vision_config.image_size)
        with torch.no_grad():
            num_tokens = model.vision_model(pixel_values=torch.zeros(1, 3, height, width)).last_hidden_state.shape[1]
    trainee = VisionPretrainingModel(model.vision_model, len(vocabulary), 27, ngrams_per_caption,
                                     readouts=readouts, num_tokens=num_tokens)
    logger.info("image-tower heads: %s", ", ".join(readouts) + (f" ({num_tokens} final tokens)" if num_tokens else ""))
    collator = VisionPretrainingCollator(processor, vocabulary, image_augmentation=data_args.image_augmentation,
                                         seed=training_args.seed, image_cache=data_args.image_cache,
                                         image_augmentation_kwargs={"erasing_probability": data_args.random_erasing},
                                         on_bad_image=data_args.on_missing_image)
    trainer = VisionPretrainingTrainer(model=trainee, args=training_args, data_collator=collator,
                                       train_dataset=train_dataset, processing_class=processor, callbacks=callbacks)
    train(trainer, training_args)
    if trainer.is_world_process_zero():
        # The DiaNA folder (its vision_model is the trained tower) is what stage 1 loads; the heads are not kept.
        model.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
        save_vocabulary(training_args.output_dir, vocabulary, ngrams_per_caption)
        write_run_record(training_args.output_dir, model_args, data_args, training_args, {}, data_report)
    return {}


def prepare_image_cache(train_dataset, data_args: DataArguments, processor, memory_bytes: int | None = None):
    """Checks that `--image_cache` fits (at most a quarter of this machine's memory, counting every row as its
    own image) and returns the training rows with undecoded images, so only the collator's cache decodes."""
    (height, width), *_ = image_processor_geometry(processor.image_processor)
    need = len(train_dataset) * 3 * height * width
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory_bytes // 4:
        raise ValueError(f"--image_cache would hold up to {need / 2**30:.1f} GiB ({len(train_dataset)} training rows "
                         f"at {height}x{width}), over a quarter of this machine's "
                         f"{memory_bytes / 2**30:.1f} GiB: leave it off for this data set")
    logger.info("image cache: each training image decoded and resized once, up to %.0f MiB", need / 2**20)
    return with_undecoded_images(train_dataset)


def load_data(data_args: DataArguments):
    """(train, eval or None, data report). The report lists what the builders skipped under
    `--on_missing_image skip` (never a silent drop)."""

    if data_args.data_dir is None:
        raise ValueError("--data_dir is required")

    def chatpedes(data_dir: str):
        splits, skips = load_chatpedes(
            data_dir, cache_dir=data_args.cache_dir, return_report=True,
            validation_persons=data_args.validation_persons, validation_seed=data_args.validation_seed,
            on_missing_image=data_args.on_missing_image,
        )
        return splits, skips

    reports = {}
    if data_args.dataset == "chatpedes":
        splits, reports["chatpedes"] = chatpedes(data_args.data_dir)
        train, evaluation = splits["train"], splits[data_args.eval_split]
    elif data_args.dataset == "mals":
        mals, reports["mals"] = load_mals(data_args.data_dir, cache_dir=data_args.cache_dir, files=data_args.mals_files,
                                          on_missing_image=data_args.on_missing_image, return_report=True)
        train, evaluation = mals["train"], None
        if data_args.eval_data_dir:
            splits, reports["chatpedes"] = chatpedes(data_args.eval_data_dir)
            evaluation = splits[data_args.eval_split]
    else:
        raise ValueError(f"--dataset must be 'chatpedes' or 'mals', got {data_args.dataset!r}")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.eval_max_samples is not None:
        evaluation = evaluation.select(range(min(data_args.eval_max_samples, len(evaluation))))
    report = {name: asdict(r) for name, r in reports.items() if r is not None}
    for name, r in report.items():
        skipped = sum(len(v) for v in r.get("skipped", {}).values())
        if skipped:
            logger.warning("%s: %d images skipped (listed in run_args.json)", name, skipped)
    return train, evaluation, report


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
    processor = build_processor(tokenizer_dir=tokenizer_dir, preset=data_args.preset, image_size=image_size)
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


def write_run_record(output_dir, model_args, data_args, training_args, results, data_report) -> None:
    """run_args.json (the recipe used) and, after an evaluation, eval_results.json (the report the
    model card renders)."""
    os.makedirs(output_dir, exist_ok=True)
    if results:
        with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    record = {
        "model": asdict(model_args),
        "data": asdict(data_args),
        "training": training_args.to_dict(),
        "data_report": data_report,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with open(os.path.join(output_dir, "run_args.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)


if __name__ == "__main__":
    run_cli(main)  # a user's error is one line (DIANA_DEBUG=1: the traceback), also under `accelerate launch`
