"""Train one DiaNA stage: `accelerate launch training/run_stage.py --config <preset> [--flag value ...]`.

Stage 0 (SynthPedes presets) trains the random image tower alone on MALS-layout captions; stage 1
pretrains on MALS; stage 2 fine-tunes on ChatPedes from the stage 1 folder (as in the paper).
Presets live in training/configs/ (the paper's recipe and small SynthPedes versions for a CPU).
Runs on one CPU process, on several processes (ACCELERATE_USE_CPU=1 ... --multi_gpu) and on GPUs.
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
from diana.modeling_diana import DiaNAModel
from diana.processing.cli_errors import run_cli
from diana.training.arguments import DataArguments, ModelArguments, parse_args
from diana.training.checkpointing import check_resumable
from diana.training.data.collator import DiaNACollator
from diana.training.data.dataset_columns import add_length_column
from diana.training.stage_checks import validate_arguments
from diana.training.stage_data import load_data, prepare_image_cache, prepare_training_rows
from diana.training.stage_model import prepare_model
from diana.training.trainer import DiaNATrainer
from diana.training.vision_pretraining import (
    VisionPretrainingCollator,
    VisionPretrainingModel,
    VisionPretrainingTrainer,
    count_ngrams,
    save_vocabulary,
    select_ngrams,
)

logger = logging.getLogger("diana.run_stage")


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Runs one stage; returns the final evaluation report (empty without an evaluation split).
    `callbacks` are extra `TrainerCallback`s for programmatic use."""
    # 1. Arguments: YAML preset + command-line overrides, every one checked before any data is read.
    model_args, data_args, training_args = parse_args(argv)
    validate_arguments(model_args, data_args, training_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # 2. Data: one row per dialogue (ChatPedes) or per image (MALS).
    train_dataset, eval_dataset, data_report = load_data(data_args)
    logger.info("data: %d training rows, %s evaluation rows (%s split)", len(train_dataset),
                len(eval_dataset) if eval_dataset is not None else "no", data_args.eval_split)

    # 3. Model and processor (frozen / compiled tower, LoRA), then the training rows they read.
    model, processor = prepare_model(model_args, data_args, training_args)
    train_dataset = prepare_training_rows(train_dataset, data_args, processor)
    if data_args.objective == "image_attributes":
        # Stage 0 trains the random image tower alone (vision_pretraining.py); stage 1 starts from its folder.
        return run_vision_pretraining(model, processor, train_dataset, model_args, data_args, training_args,
                                      data_report, callbacks)
    return run_retrieval(model, processor, train_dataset, eval_dataset, model_args, data_args, training_args,
                         data_report, callbacks)


def run_retrieval(model, processor, train_dataset, eval_dataset, model_args: ModelArguments, data_args: DataArguments,
                  training_args, data_report: dict, callbacks: list | None) -> dict:
    """Stages 1 and 2 (`--objective retrieval`): trains, saves the folder, evaluates; returns the report."""
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


def run_vision_pretraining(model: DiaNAModel, processor, train_dataset, model_args: ModelArguments,
                           data_args: DataArguments, training_args, data_report: dict, callbacks: list | None) -> dict:
    """Stage 0 (`--objective image_attributes`): trains `model.vision_model` (shared, not copied) to predict
    its MALS caption's n-grams and its labels, then saves the whole DiaNA folder for stage 1."""
    # One pass over the captions (1.5M in MALS): the counts give the vocabulary and, being counts of
    # captions, the mean number of its n-grams on per caption.
    counts, total = count_ngrams(train_dataset["caption"])
    vocabulary = select_ngrams(counts, total)
    ngrams_per_caption = sum(counts[g] for g in vocabulary) / total
    logger.info("stage 0 targets: %d caption n-grams (%.1f on per caption, most frequent: %s) + 27 MALS labels",
                len(vocabulary), ngrams_per_caption, ", ".join(vocabulary[:8]))
    readouts = list(data_args.pretraining_readouts)
    num_tokens = None
    if "tokens" in readouts:  # the position-keeping head needs the number of final tokens: one blank image tells
        height, width = (int(v) for v in model.config.vision_config.image_size)
        with torch.no_grad():
            num_tokens = model.vision_model(pixel_values=torch.zeros(1, 3, height, width)).last_hidden_state.shape[1]
    trainee = VisionPretrainingModel(model.vision_model, len(vocabulary), 27, ngrams_per_caption,
                                     readouts=readouts, num_tokens=num_tokens)
    logger.info("stage 0 heads: %s", ", ".join(readouts) + (f" ({num_tokens} final tokens)" if num_tokens else ""))
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


# Re-exported for the main job and the tests: the one argument check and the cache's memory rule.
__all__ = ["main", "prepare_image_cache", "train", "validate_arguments", "write_run_record"]


if __name__ == "__main__":
    run_cli(main)  # a user's error is one line (DIANA_DEBUG=1: the traceback), also under `accelerate launch`
