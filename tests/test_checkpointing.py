"""training/checkpointing.py: the random state kept for a resumed epoch and checkpoint folders that are
never half written (end-to-end resumes: tests/test_run_stage.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from diana.training.checkpointing import (
    capture_random_state,
    check_resumable,
    epoch_start_state_path,
    load_epoch_start_state,
    publish_checkpoint,
    remove_staging_leftovers,
    restore_random_state,
    save_epoch_start_state,
    staging_checkpoint_dir,
)


def draws(generator: torch.Generator) -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randperm(8, generator=generator).tolist()


def test_a_saved_epoch_start_state_replays_every_generator(tmp_path):
    sampler = torch.Generator().manual_seed(3)
    torch.randperm(8, generator=sampler)  # a sampler generator part-way through its stream
    state = capture_random_state(sampler)
    path = epoch_start_state_path(tmp_path / "checkpoint-4", process_index=1, world_size=2)
    assert path.endswith("checkpoint-4/epoch_start_rng_state_1.pth")
    save_epoch_start_state(state, path)
    want = draws(sampler)
    draws(sampler)  # everything moves on
    restore_random_state(load_epoch_start_state(path), sampler, where=path)
    assert draws(sampler) == want


def test_a_checkpoint_without_the_file_has_no_epoch_start_state(tmp_path):
    assert load_epoch_start_state(epoch_start_state_path(tmp_path, 0, 1)) is None
    assert epoch_start_state_path(tmp_path, 0, 1).endswith("/epoch_start_rng_state.pth")


def test_a_sampler_generator_mismatch_is_said_and_the_global_state_still_restored(caplog):
    state = capture_random_state(None)
    want = torch.rand(2).tolist()
    with caplog.at_level("WARNING", logger="diana.training.checkpointing"):
        restore_random_state(state, torch.Generator(), where="ckpt/epoch_start_rng_state.pth")
    assert "saved with no sampler generator, this run has one" in caplog.text
    assert torch.rand(2).tolist() == want


def test_staging_folders_are_never_taken_for_checkpoints(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    staging = staging_checkpoint_dir(tmp_path / "checkpoint-6")
    assert staging == str(tmp_path / "tmp-checkpoint-6")
    (tmp_path / "tmp-checkpoint-6").mkdir()
    (tmp_path / "tmp-checkpoint-8.replaced").mkdir()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match=r"tmp-checkpoint-6: a checkpoint whose writing was interrupted .* "
                                         r"renamed to checkpoint-6 only when complete"):
        check_resumable(tmp_path / "tmp-checkpoint-6")
    check_resumable(tmp_path / "checkpoint-4")
    assert remove_staging_leftovers(tmp_path) == [str(tmp_path / "tmp-checkpoint-6"),
                                                  str(tmp_path / "tmp-checkpoint-8.replaced")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_publishing_replaces_an_existing_checkpoint_whole(tmp_path):
    final = tmp_path / "checkpoint-6"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / "tmp-checkpoint-6"
    staging.mkdir()
    (staging / "trainer_state.json").write_text("{}")
    publish_checkpoint(str(staging), str(final))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    assert sorted(p.name for p in final.iterdir()) == ["trainer_state.json"]
