"""The README's first command, `python -m diana.training.main_job`, end to end on a tiny budget: data and
oracle, the three stages with the shipped small presets (2 steps each), the per-round test table beside the
oracle, the verdict file and a Hub folder checked in a fresh process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diana.processing.cli_errors import UserInputError
from diana.training import main_job

pytestmark = pytest.mark.xdist_group("run_stage")  # shares the CPU with the other end-to-end runs


@pytest.mark.parametrize("stage0", ["stage0_synthpedes_small", "none"])
def test_main_job_runs_every_step_and_writes_its_verdict(stage0: str, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "main_job"
    monkeypatch.setattr(sys, "argv", [
        "main_job", "--output_dir", str(out), "--persons", "12", "--test_persons", "4", "--images_per_person", "2",
        "--rounds", "3", "--mals_images", "64", "--stage0_config", stage0,
        "--extra", "--max_steps", "2", "--per_device_train_batch_size", "8", "--validation_persons", "2",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--disable_tqdm", "true", "--cache_dir", str(tmp_path / "cache"),
    ])
    main_job.main()

    printed = capsys.readouterr().out
    assert "DiaNA vs the attribute oracle" in printed and "oracle R@1" in printed
    summary = json.loads((out / "main_job_summary.json").read_text())
    assert len(summary["model_R@1_per_round"]) == 3  # one entry per round count
    oracle = json.loads((out / "synthpedes" / "oracle.json").read_text())
    assert summary["oracle_full_R@1"] == oracle["full"]["R@1"]
    assert summary["reaches_80_percent_of_oracle"] == (summary["model_full_R@1"] >= 0.8 * oracle["full"]["R@1"])
    probe = json.loads((out / "attribute_probe" / "attribute_probe.json").read_text())
    assert set(probe) == set(summary["attribute_probe"]) and "hair_length" in probe
    assert "Linear probes of the trained embeddings" in printed and (out / "attribute_probe" / "attribute_probe.png").is_file()
    interactive = json.loads((out / "interactive" / "interactive_results.json").read_text())
    assert "Interactive search, simulated witness" in printed and set(interactive["policies"]) == {"random", "info_gain", "oracle"}
    test_eval = json.loads((out / "test_eval" / "eval_results.json").read_text())
    assert test_eval["global"]["full"]["R@1"] == summary["model_full_R@1"]
    assert len({row["id"] for row in json.loads(
        (out / "synthpedes" / "chatpedes" / "test_reid.json").read_text())}) == 4
    # Stage 0 trains the image tower, stages 1 and 2 start from it and keep it fixed: the final tower is
    # stage 0's bit for bit. Without stage 0, stage 1 starts from the random model and both stages train
    # the tower.
    stage1_args = json.loads((out / "stage1" / "run_args.json").read_text())["model"]
    stage2_args = json.loads((out / "stage2" / "run_args.json").read_text())["model"]
    final = load_file(out / "stage2" / "model.safetensors")
    stage1 = load_file(out / "stage1" / "model.safetensors")
    vision = [k for k in final if k.startswith("vision_model.")]
    if stage0 == "none":
        assert not (out / "stage0").exists()
        assert stage1_args["model_name_or_path"] is None and stage1_args["freeze_vision_model"] is False
        assert stage2_args["freeze_vision_model"] is False
        assert any(not torch.equal(final[k], stage1[k]) for k in vision)
    else:
        assert (out / "stage0" / "vision_pretraining.json").is_file()
        assert stage1_args["model_name_or_path"] == str(out / "stage0") and stage1_args["freeze_vision_model"] is True
        assert stage2_args["freeze_vision_model"] is True
        pretrained = load_file(out / "stage0" / "model.safetensors")
        for key in vision:
            torch.testing.assert_close(final[key], pretrained[key], rtol=0, atol=0, msg=key)
        assert any(not torch.equal(final[k], stage1[k]) for k in final if k.startswith("text_model."))
    for name in ("config.json", "model.safetensors", "README.md", "modeling_diana.py"):
        assert (out / "hub_model" / name).is_file(), name


def test_main_job_refuses_a_test_split_that_leaves_no_training_persons():
    with pytest.raises(UserInputError, match=r"--test_persons 9: must be in \[1, 8\]"):
        main_job.parse(["--persons", "10", "--test_persons", "9"])
