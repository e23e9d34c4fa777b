"""`DiaNATrainer`: the stock `Trainer` plus DiaNA's loss terms in the logs and the retrieval
protocol (DESIGN.md §3) as `evaluate()`."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .evaluation import evaluate_retrieval


class DiaNATrainer(Trainer):
    """Trainer for both DiaNA stages.

    - `compute_loss` asks the model for its loss (ITC, SDM, refiner terms per `DiaNAConfig`) and
      keeps every term and the logit scale for the next log line.
    - `evaluate` ranks the evaluation split's gallery with every dialogue at every round count
      (gallery encoded once, all rounds from one encoder pass) and reports R@K / mAP / mINP / mFR
      per score mode; `metric_for_best_model` (default `eval_global/full/R@1`) picks the best
      checkpoint on validation.

    Args:
        eval_score_modes: score modes to evaluate (`global`, `attribute`, `fused`).
        eval_reference: optional per-round reference curve (e.g. the SynthPedes attribute oracle)
            drawn beside the model's in the picture.
        eval_on_bad_image: "error" or "skip": what evaluation does with a gallery image that cannot
            be loaded (see `evaluate_retrieval`).
    """

    # The contrastive loss is a per-batch mean, not a sum over items: the Trainer must divide it
    # by the accumulation steps itself (../shared/notes/stack.md).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, eval_score_modes: tuple[str, ...] = ("global", "attribute", "fused"),
                 eval_reference: dict[str, Any] | None = None, eval_on_bad_image: str = "error", **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_score_modes = tuple(eval_score_modes)
        self.eval_reference = eval_reference
        self.eval_on_bad_image = eval_on_bad_image
        # Running sums of detached tensors: converting to Python floats only at log time keeps the
        # training step free of host synchronisation.
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(CollatorEpochCallback(self.data_collator))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            person_ids=inputs["person_ids"],
            return_loss=True,
        )
        if model.training:
            self.record_terms({
                "itc_loss": outputs.itc_loss,
                "sdm_loss": outputs.sdm_loss,
                "refiner_loss": outputs.refiner_loss,
                "logit_scale": outputs.logit_scale,
            })
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def record_terms(self, terms: dict[str, torch.Tensor | None]) -> None:
        """Adds one training step's loss terms (None = not computed) to the next log line's means."""
        for name, value in terms.items():
            if value is not None:
                self._term_sums[name] = self._term_sums.get(name, 0) + value.detach().float()
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training log lines carry "loss" (every process calls log() for them): add the mean of every
        # term since the previous line, averaged over processes like the Trainer's own loss.
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]).to(self.args.device) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[name] = round(value, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("DiaNATrainer.evaluate needs an evaluation split (validation persons or test)")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        output_dir = os.path.join(self.args.output_dir, f"{metric_key_prefix}_step{self.state.global_step}")
        results = evaluate_retrieval(
            model,
            self.processing_class,
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            score_modes=self.eval_score_modes,
            accelerator=self.accelerator,
            output_dir=output_dir if self.args.should_save else None,
            reference=self.eval_reference,
            desc=f"{metric_key_prefix} (step {self.state.global_step})",
            on_bad_image=self.eval_on_bad_image,
        )
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in results["flat"].items()}
        self.log(metrics)
        self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.last_eval_results = results
        return metrics


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so each batch's augmentation is a function of
    (seed, epoch, rows) and a resumed run replays exactly the draws of an uninterrupted one."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # Batches consumed so far // batches per epoch: exact on resume, unlike the float state.epoch.
        batches = state.global_step * args.gradient_accumulation_steps
        per_epoch = len(train_dataloader) if train_dataloader is not None else 0
        self.collator.set_epoch(batches // per_epoch if per_epoch else int(state.epoch or 0))
