"""`DiaNATrainer`: the stock `Trainer` plus DiaNA's loss terms in the logs, the retrieval
protocol as `evaluate()`, exact resumption and checkpoints that are never half written."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.utils import logging

from diana.modeling_diana.configuration_diana import SCORE_MODES

from .checkpointing import (
    capture_random_state,
    epoch_start_state_path,
    load_epoch_start_state,
    publish_checkpoint,
    remove_staging_leftovers,
    restore_random_state,
    save_epoch_start_state,
    staging_checkpoint_dir,
)
from .evaluation import evaluate_retrieval

logger = logging.get_logger(__name__)


class DiaNATrainer(Trainer):
    """Trainer for both DiaNA stages.

    - `compute_loss` asks the model for its loss (ITC, SDM, refiner terms per `DiaNAConfig`) and
      keeps every term and the logit scale for the next log line.
    - `evaluate` ranks the evaluation split's gallery with every dialogue at every round count
      (gallery encoded once, all rounds from one encoder pass) and reports R@K / mAP / mINP / mFR
      per score mode; `metric_for_best_model` (default `eval_global/full/R@1`) picks the best
      checkpoint on validation.
    - Resuming from any checkpoint replays the uninterrupted run: each checkpoint keeps the random state
      of the start of the epoch it resumes into, restored before that epoch draws its data order
      (`_run_epoch`); the collator's augmentation is keyed to the epoch index (`DiaNACollator.set_epoch`).
    - Checkpoints are written under `tmp-checkpoint-<step>` and renamed when complete (`_save_checkpoint`).

    Args:
        eval_score_modes: score modes to evaluate (`global`, `attribute`, `fused`).
        eval_reference: optional per-round reference curve (e.g. the SynthPedes attribute oracle)
            drawn beside the model's in the picture.
        eval_on_bad_image: "error" or "skip": what evaluation does with a gallery image that cannot
            be loaded (see `evaluate_retrieval`).
    """

    # The contrastive loss is a per-batch mean, not a sum over items: the Trainer must divide it
    # by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, eval_score_modes: tuple[str, ...] = SCORE_MODES,
                 eval_reference: dict[str, Any] | None = None, eval_on_bad_image: str = "error", **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_score_modes = tuple(eval_score_modes)
        self.eval_reference = eval_reference
        self.eval_on_bad_image = eval_on_bad_image
        # Running sums of detached tensors: converting to Python floats only at log time keeps the
        # training step free of host synchronisation.
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        # Set by _run_epoch: the running epoch's start state (for the checkpoints written during it), the
        # sampler's own generator (None: it draws from the global one) and the epoch's optimizer steps.
        self._epoch_start_state: dict[str, Any] | None = None
        self._sampler_generator: torch.Generator | None = None
        self._update_steps_per_epoch = 0

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

    # ---- exact resumption ------------------------------------------------------------------------

    def _run_epoch(self, *, epoch: int, train_dataloader, num_update_steps_per_epoch: int,
                   resume_from_checkpoint: str | None, epochs_trained: int, **kwargs):
        """Runs before the epoch's data loader is iterated, i.e. before the sampler draws the epoch's order.

        On the epoch a resumed run continues, it first restores the random state that epoch started with
        in the uninterrupted run (saved with the checkpoint). It then records this epoch's start state for
        the checkpoints written during the epoch, and keys the collator's augmentation to the epoch index.
        """
        sampler_generator = getattr(train_dataloader, "synchronized_generator", None)
        if resume_from_checkpoint is not None and epoch == epochs_trained and not self.args.ignore_data_skip:
            self._restore_epoch_start(resume_from_checkpoint, sampler_generator,
                                      mid_epoch=self.state.global_step % num_update_steps_per_epoch != 0)
        self._epoch_start_state = capture_random_state(sampler_generator)
        self._sampler_generator = sampler_generator
        self._update_steps_per_epoch = num_update_steps_per_epoch
        if hasattr(self.data_collator, "set_epoch"):
            self.data_collator.set_epoch(epoch)
        return super()._run_epoch(epoch=epoch, train_dataloader=train_dataloader,
                                  num_update_steps_per_epoch=num_update_steps_per_epoch,
                                  resume_from_checkpoint=resume_from_checkpoint, epochs_trained=epochs_trained,
                                  **kwargs)

    def _restore_epoch_start(self, checkpoint: str, sampler_generator: torch.Generator | None, mid_epoch: bool) -> None:
        """Sets the generators to the start state of the epoch `checkpoint` resumes into."""
        path = epoch_start_state_path(checkpoint, self.args.process_index, self.args.world_size)
        state = load_epoch_start_state(path)
        if state is not None:
            restore_random_state(state, sampler_generator, where=path)
            return
        if mid_epoch or sampler_generator is not None:
            logger.warning_once(f"{path} is missing (a checkpoint written without it): the resumed epoch may be "
                                "drawn in another order than the uninterrupted run's")
        if not mid_epoch:
            # At an epoch boundary the checkpoint's own global state is the next epoch's start. The Trainer
            # loads it too, but only after this epoch's start state has been recorded.
            self._load_rng_state(checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        save_epoch_start_state(self._resume_epoch_start_state(),
                               epoch_start_state_path(output_dir, self.args.process_index, self.args.world_size))

    def _resume_epoch_start_state(self) -> dict[str, Any]:
        """The start state of the epoch a run resumed from the current step continues: the running epoch's
        in its middle; at its end the next epoch's, which is the state now."""
        mid_epoch = self._update_steps_per_epoch and self.state.global_step % self._update_steps_per_epoch
        if mid_epoch and self._epoch_start_state is not None:
            return self._epoch_start_state
        return capture_random_state(self._sampler_generator)

    # ---- checkpoints that are never half written ----------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint's contents, written under `tmp-checkpoint-<step>` and renamed to
        `checkpoint-<step>` by the saving process once every process has written its part."""
        run_dir = self._get_output_dir(trial=trial)
        final_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging_dir = staging_checkpoint_dir(final_dir)
        if self.args.should_save:
            remove_staging_leftovers(run_dir)
        self.accelerator.wait_for_everyone()

        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging_dir, _internal_call=True)
        self._record_best_checkpoint(run_dir)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)
        if self.args.should_save:
            self._export_callback_states()
            self.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every process's files are in
        if self.args.should_save:
            publish_checkpoint(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()  # nobody reads the final folder before it exists

        if self.args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _record_best_checkpoint(self, run_dir: str) -> None:
        """Points `best_model_checkpoint` at the best step's final folder (this save's, once renamed)."""
        best_step = self.state.best_global_step
        if not best_step or self.args.save_strategy not in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            return
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best_dir):
            self.state.best_model_checkpoint = best_dir

    def _export_callback_states(self) -> None:
        """Copies the state of every `ExportableState` callback (early stopping, the control) into
        `self.state`, which the checkpoint's trainer_state.json then carries."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(callback.state())
            else:
                self.state.stateful_callbacks[name] = callback.state()
