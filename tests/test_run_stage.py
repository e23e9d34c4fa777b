"""End-to-end runs of `training/run_stage.py` on a tiny SynthPedes (open_clip's
test_training_simple, for both DiaNA stages), plus resume, LoRA and two-process equivalence."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from diana.processing.data.synthpedes import generate
from diana.training.run_stage import main as run_stage
from diana.training.trainer import DiaNATrainer
from tests.helpers import launch_two_cpu_processes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("run_stage")  # shares the generated data and the CPU

# The tests' tiny odd-sized model (tests/helpers.py sizes) as a run_stage model_config.
TINY_MODEL = {
    "projection_dim": 24,
    "num_attribute_queries": 4,
    "refiner_num_layers": 1,
    "refiner_num_heads": 4,
    "vision_config": {
        "model_type": "swinv2", "image_size": [64, 32], "patch_size": 4, "embed_dim": 16, "depths": [1, 2],
        "num_heads": [2, 4], "window_size": 4, "mlp_ratio": 2.0, "drop_path_rate": 0.0,
    },
    "text_config": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 32, "intermediate_size": 37,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "bos_token_id": 128000, "eos_token_id": 128001,
        "pad_token_id": 128004, "tie_word_embeddings": False,
    },
}
COMMON = ["--image_size", "64", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
          "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthpedes")
    generate(str(root), persons=16, images_per_person=2, rounds=3, seed=1, image_size=(64, 32), progress=False)
    return root


@pytest.fixture(scope="module")
def model_config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny_model.json"
    path.write_text(json.dumps(TINY_MODEL))
    return str(path)


def stage1_args(synth: Path, out: Path, model_config_file: str, *extra: str) -> list[str]:
    return ["--config", "stage1_synthpedes_small", "--data_dir", str(synth / "mals"), "--output_dir", str(out),
            "--model_config", model_config_file, "--cache_dir", str(synth / "cache"), "--max_steps", "2",
            "--freeze_vision_model", "false", *COMMON, *extra]


def stage2_args(synth: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "stage2_synthpedes_small", "--data_dir", str(synth / "chatpedes"), "--output_dir", str(out),
            "--cache_dir", str(synth / "cache"), "--validation_persons", "3", "--freeze_vision_model", "false",
            *COMMON, *extra]


def log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def stage1_dir(synth, model_config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    run_stage(stage1_args(synth, out, model_config_file))
    return out


def test_stage1_writes_a_remote_code_folder_and_logs_its_loss_terms(stage1_dir):
    files = {p.name for p in stage1_dir.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_diana.py", "configuration_diana.py", "loss_diana.py",
            "processing_diana.py", "tokenizer.json", "processor_config.json"} <= files
    assert not any(name.endswith(".bin") and name != "training_args.bin" for name in files)
    # The recipe is recorded even without an evaluation split (stage 1 has none).
    assert "eval_results.json" not in files
    assert json.loads((stage1_dir / "run_args.json").read_text())["data"]["dataset"] == "mals"
    config = json.loads((stage1_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("DiaNAModel")
    assert config["use_sdm_loss"] is False and config["num_attribute_queries"] == 4
    steps = [entry for entry in log_history(stage1_dir) if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        # Stage 1 = ITC on the global and the attribute similarity, no SDM (as in the paper).
        assert {"itc_loss", "refiner_loss", "logit_scale"} <= entry.keys() and "sdm_loss" not in entry
        assert entry["loss"] == pytest.approx(entry["itc_loss"] + entry["refiner_loss"], rel=1e-3)


def test_stage2_from_stage1_reinitialises_queries_evaluates_per_round_and_loads_remotely(
    synth, stage1_dir, tmp_path, caplog
):
    out = tmp_path / "stage2"
    with caplog.at_level(logging.WARNING, logger="diana.run_stage"):
        results = run_stage(stage2_args(synth, out, "--model_name_or_path", str(stage1_dir), "--max_steps", "2",
                                        "--num_attribute_queries", "3", "--eval_strategy", "no",
                                        "--save_strategy", "no", "--load_best_model_at_end", "false"))
    assert "attribute queries re-initialised" in caplog.text and "K=4" in caplog.text and "K=3" in caplog.text
    steps = [entry for entry in log_history(out) if "loss" in entry]
    assert all({"itc_loss", "sdm_loss", "refiner_loss"} <= entry.keys() for entry in steps)

    report = json.loads((out / "eval_results.json").read_text())
    assert report == json.loads(json.dumps(results))
    rounds = [key for key in report["global"] if key.startswith("round_")]
    assert rounds == ["round_1", "round_2", "round_3"]
    for key in ("R@1", "R@5", "R@10", "mAP", "mINP", "mFR"):
        assert key in report["global"]["full"]
    assert any(out.glob("eval_validation_step*/per_round_curves.png"))
    assert json.loads((out / "config.json").read_text())["num_attribute_queries"] == 3
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["data"]["eval_split"] == "validation" and run_args["model"]["model_name_or_path"] == str(stage1_dir)

    # The saved folder is a trust_remote_code model: its features equal the in-process class's.
    code = (
        "import sys, torch; from transformers import AutoModel;"
        f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval();"
        "torch.manual_seed(0); x = torch.randn(2, 3, 64, 32);"
        "print(type(m).__module__); torch.save(m.get_image_features(x), sys.argv[1])"
    )
    target = tmp_path / "feat.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers_modules" in proc.stdout  # loaded from the folder's own code files
    from diana.modeling_diana import DiaNAModel

    local = DiaNAModel.from_pretrained(out).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = local.get_image_features(torch.randn(2, 3, 64, 32))
    torch.testing.assert_close(torch.load(target), expected, rtol=0, atol=1e-6)


def stage0_args(synth: Path, out: Path, model_config_file: str, *extra: str) -> list[str]:
    return ["--config", "stage0_synthpedes_small", "--data_dir", str(synth / "mals"), "--output_dir", str(out),
            "--model_config", model_config_file, "--cache_dir", str(synth / "cache"), *COMMON, *extra]


def test_stage0_trains_only_the_image_tower_and_stage1_starts_from_its_folder(synth, model_config_file, tmp_path):
    from transformers import set_seed

    from diana.modeling_diana import DiaNAConfig, DiaNAModel

    stage0 = tmp_path / "stage0"
    run_stage(stage0_args(synth, stage0, model_config_file, "--max_steps", "3"))
    files = {p.name for p in stage0.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_diana.py", "tokenizer.json", "processor_config.json",
            "vision_pretraining.json", "run_args.json"} <= files
    vocabulary = json.loads((stage0 / "vision_pretraining.json").read_text())["vocabulary"]
    assert "striped" in vocabulary and "a" not in vocabulary  # every SynthPedes caption says "a": no target
    for entry in [e for e in log_history(stage0) if "loss" in e]:
        assert entry["loss"] == pytest.approx(entry["ngram_loss"] + entry["label_loss"], rel=1e-3)

    # The run starts from the seeded random model: its text side is untouched, its image tower trained.
    set_seed(42)
    initial = DiaNAModel(DiaNAConfig(**TINY_MODEL)).state_dict()
    trained = load_file(stage0 / "model.safetensors")
    assert trained.keys() == initial.keys()
    vision = [k for k in trained if k.startswith("vision_model.")]
    assert any(not torch.equal(trained[k], initial[k]) for k in vision)
    for key in (k for k in trained if not k.startswith("vision_model.")):
        torch.testing.assert_close(trained[key], initial[key], rtol=0, atol=0, msg=key)

    # Stage 1 loads the folder; with --freeze_vision_model its image tower stays exactly stage 0's while
    # the rest trains.
    stage1 = tmp_path / "stage1"
    run_stage(stage1_args(synth, stage1, model_config_file, "--model_name_or_path", str(stage0),
                          "--freeze_vision_model", "true", "--learning_rate", "1e-3", "--warmup_steps", "0"))
    after = load_file(stage1 / "model.safetensors")
    for key in vision:
        torch.testing.assert_close(after[key], trained[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after[k], trained[k]) for k in after if k.startswith("text_model."))


def test_stage0_refuses_what_it_cannot_do(synth, model_config_file, tmp_path):
    with pytest.raises(ValueError, match="--objective must be 'retrieval' or 'image_attributes', got 'captions'"):
        run_stage(stage0_args(synth, tmp_path, model_config_file, "--objective", "captions"))
    with pytest.raises(ValueError, match="--dataset chatpedes"):
        run_stage(stage0_args(synth, tmp_path, model_config_file, "--dataset", "chatpedes"))
    with pytest.raises(ValueError, match="no retrieval to evaluate"):
        run_stage(stage0_args(synth, tmp_path, model_config_file, "--eval_data_dir", str(synth / "chatpedes")))
    with pytest.raises(ValueError, match="DeepSpeed or FSDP"):
        run_stage(stage0_args(synth, tmp_path, model_config_file, "--fsdp"))
    with pytest.raises(ValueError, match=r"--pretraining_readouts: readouts must be .* got \['mean', 'pixels'\]"):
        run_stage(stage0_args(synth, tmp_path, model_config_file, "--pretraining_readouts", "mean", "pixels"))
    with pytest.raises(ValueError, match="--pretraining_readouts belongs to --objective image_attributes"):
        run_stage(stage1_args(synth, tmp_path, model_config_file, "--pretraining_readouts", "tokens"))


class _KillAt(TrainerCallback):
    """Stands in for a killed job: raises right after `step` finishes (checkpoints already written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after step {self.step}")


def _fail_in_the_save_of(step: int):
    """Stands in for a run killed while writing checkpoint `step`: that save stops once the model,
    optimizer and scheduler are written, before the random states and trainer_state.json."""
    original = DiaNATrainer._save_scaler

    def save_scaler(self, output_dir):
        original(self, output_dir)
        if self.state.global_step == step:
            raise KeyboardInterrupt(f"killed while saving step {step}")

    return save_scaler


def training_log(out: Path) -> dict[int, dict]:
    """Step -> the training log line of that step (loss terms, grad norm, learning rate)."""
    return {entry["step"]: entry for entry in log_history(out) if "loss" in entry}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_resume_mid_epoch_two_with_length_grouped_batches_and_r3_replays_the_uninterrupted_run(
    synth, stage1_dir, tmp_path, monkeypatch, caplog
):
    """Stage 2's preset (length-grouped batches, R3, image cache): 24 training rows in batches of 8, so
    epoch 2 is steps 4-6. The killed run dies while writing checkpoint-6: the last complete checkpoint
    is checkpoint-4, in the middle of epoch 2, whose order the sampler drew from the random state of
    the epoch's start. The uninterrupted run saves nothing: checkpoints must not change a run either."""

    def args(out: Path, *extra: str) -> list[str]:
        return stage2_args(synth, out, "--model_name_or_path", str(stage1_dir), "--max_steps", "6",
                           "--eval_strategy", "no", "--load_best_model_at_end", "false", *extra)

    def saving(out: Path, *extra: str) -> list[str]:
        return args(out, "--save_strategy", "steps", "--save_steps", "2", *extra)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage(args(straight, "--save_strategy", "no"))
    with monkeypatch.context() as patch:
        patch.setattr(DiaNATrainer, "_save_scaler", _fail_in_the_save_of(6))
        with pytest.raises(KeyboardInterrupt):
            run_stage(saving(killed))
    # The interrupted save's parts stay under the staging name, which resuming never takes.
    assert not (killed / "checkpoint-6").exists()
    assert (killed / "tmp-checkpoint-6" / "model.safetensors").is_file()
    assert not (killed / "tmp-checkpoint-6" / "trainer_state.json").exists()
    assert get_last_checkpoint(str(killed)) == str(killed / "checkpoint-4")
    with caplog.at_level(logging.INFO, logger="diana.run_stage"):
        run_stage(saving(killed, "--resume_from_checkpoint", "last"))
    assert f"resuming from {killed / 'checkpoint-4'}" in caplog.text  # not from scratch (same weights too)

    want = load_file(straight / "model.safetensors")
    initial = load_file(stage1_dir / "model.safetensors")
    assert any(k in initial and want[k].shape == initial[k].shape and not torch.equal(want[k], initial[k])
               for k in want), "training did not change the weights"
    assert_same_weights(load_file(killed / "model.safetensors"), want)
    assert training_log(killed) == training_log(straight)
    assert sorted(training_log(straight)) == [1, 2, 3, 4, 5, 6]
    # The next save cleared the leftover; the checkpoint the resumed run wrote is complete.
    assert not (killed / "tmp-checkpoint-6").exists()
    assert {"trainer_state.json", "rng_state.pth", "epoch_start_rng_state.pth", "optimizer.pt",
            "model.safetensors"} <= {p.name for p in (killed / "checkpoint-6").iterdir()}


class _RecordingLengthGroupedSampler(LengthGroupedSampler):
    """The stock length-grouped sampler, noting the order it draws for every epoch in `orders`."""

    orders: list[list[int]]

    def __iter__(self):
        order = list(super().__iter__())
        self.orders.append(order)
        return iter(order)


def _recording_sampler_orders(trainer_class: type, orders: list[list[int]]) -> type:
    class Recording(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            assert type(sampler) is LengthGroupedSampler
            recording = _RecordingLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                                       generator=sampler.generator)
            recording.orders = orders
            return recording

    return Recording


class _StockEpochsAndCheckpoints(DiaNATrainer):
    """`DiaNATrainer` with the stock Trainer's epoch loop and checkpoint writing: none of the resume
    machinery (and no epoch for the collator, whose draws never touch the global generator)."""

    _run_epoch = Trainer._run_epoch
    _save_checkpoint = Trainer._save_checkpoint
    _save_rng_state = Trainer._save_rng_state


def test_a_fresh_run_draws_the_batch_order_of_the_stock_trainer(synth, model_config_file, tmp_path, monkeypatch):
    """Keeping the epoch-start random state must not change what a fresh run draws: epoch 2's order
    comes from the global generator after epoch 1 (and its checkpoints), as with the stock loop.
    Stage 1 with length-grouped batches (as stage1_mals): 32 rows in batches of 8, no evaluation."""
    import diana.training.run_stage as run_stage_module

    orders: dict[str, list[list[int]]] = {}
    for name, trainer_class in (("stock", _StockEpochsAndCheckpoints), ("diana", DiaNATrainer)):
        orders[name] = []
        monkeypatch.setattr(run_stage_module, "DiaNATrainer", _recording_sampler_orders(trainer_class, orders[name]))
        run_stage(stage1_args(synth, tmp_path / name, model_config_file, "--max_steps", "5", "--train_sampling_strategy",
                              "group_by_length", "--save_strategy", "steps", "--save_steps", "2"))
    assert len(orders["stock"]) == 2 and orders["stock"][0] != orders["stock"][1]
    assert sorted(orders["stock"][1]) == list(range(32))
    assert orders["diana"] == orders["stock"]


def test_image_cache_trains_the_same_weights_and_refuses_what_does_not_fit(synth, stage1_dir, tmp_path, caplog):
    def args(out: Path, *extra: str) -> list[str]:
        return stage2_args(synth, out, "--model_name_or_path", str(stage1_dir), "--max_steps", "3",
                           "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
                           "--freeze_vision_model", "false", *extra)

    with caplog.at_level(logging.INFO, logger="diana.run_stage"):
        run_stage(args(tmp_path / "cached", "--image_cache", "true"))
    assert "image cache: each training image decoded and resized once" in caplog.text
    run_stage(args(tmp_path / "plain", "--image_cache", "false"))
    cached, plain = load_file(tmp_path / "cached" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    for key in plain:  # the image tower trains here, so its pixels reach every weight
        assert torch.equal(cached[key], plain[key]), key

    # Without augmentation there is nothing to keep: the preset's cache is switched off, said and recorded.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diana.run_stage"):
        run_stage(args(tmp_path / "no_augmentation", "--image_cache", "true", "--image_augmentation", "false"))
    assert "--image_cache keeps the training image pipeline's resized images: off" in caplog.text
    assert json.loads((tmp_path / "no_augmentation" / "run_args.json").read_text())["data"]["image_cache"] is False
    from diana.processing import build_processor
    from diana.training.arguments import DataArguments
    from diana.training.run_stage import prepare_image_cache

    rows = [0] * 1000  # 1000 rows at 64x32: 6,144,000 bytes
    processor = build_processor(profile="finetune", image_size=(64, 32))
    with pytest.raises(ValueError, match=r"up to 0\.0 GiB \(1000 training rows at 64x32\), over a quarter"):
        prepare_image_cache(rows, DataArguments(), processor, memory_bytes=4 * 6_144_000 - 4)


def test_random_erasing_flag_reaches_the_training_images(synth, stage1_dir, tmp_path):
    def run(name: str, erasing: str) -> dict[str, torch.Tensor]:
        run_stage(stage2_args(synth, tmp_path / name, "--model_name_or_path", str(stage1_dir), "--max_steps", "2",
                              "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
                              "--freeze_vision_model", "false", "--random_erasing", erasing))
        assert json.loads((tmp_path / name / "run_args.json").read_text())["data"]["random_erasing"] == float(erasing)
        return load_file(tmp_path / name / "model.safetensors")

    off, always = run("off", "0"), run("always", "1")
    # Same seed and batches: only the erased rectangles differ, and the training image tower sees them.
    assert not torch.equal(off["vision_model.encoder.layers.0.blocks.0.attention.output.dense.weight"],
                           always["vision_model.encoder.layers.0.blocks.0.attention.output.dense.weight"])
    with pytest.raises(ValueError, match=r"--random_erasing -0.1: must be in \[0.0, 1.0\]"):
        run("bad", "-0.1")


def test_stage0_resumed_after_a_kill_ends_with_the_same_image_tower(synth, model_config_file, tmp_path):
    def args(out: Path, *extra: str) -> list[str]:
        return stage0_args(synth, out, model_config_file, "--max_steps", "4", "--save_strategy", "steps",
                           "--save_steps", "2", *extra)

    run_stage(args(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        run_stage(args(tmp_path / "killed"), callbacks=[_KillAt(3)])
    run_stage(args(tmp_path / "killed", "--resume_from_checkpoint", "last"))
    assert_same_weights(load_file(tmp_path / "killed" / "model.safetensors"),
                        load_file(tmp_path / "straight" / "model.safetensors"))
    assert training_log(tmp_path / "killed") == training_log(tmp_path / "straight")
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and (tmp_path / "killed" / "checkpoint-4").is_dir()


def test_lora_adapters_save_reload_and_merge_into_a_plain_model(synth, stage1_dir, tmp_path):
    from peft import PeftModel

    from diana.modeling_diana import DiaNAModel
    from diana.processing import build_processor

    out = tmp_path / "lora"
    run_stage(stage2_args(synth, out, "--model_name_or_path", str(stage1_dir), "--max_steps", "2",
                          "--lora_rank", "4", "--learning_rate", "5e-3", "--eval_strategy", "no",
                          "--save_strategy", "no", "--load_best_model_at_end", "false"))
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    adapter_keys = load_file(out / "adapter_model.safetensors").keys()
    assert any("lora_A" in k and "text_model" in k for k in adapter_keys)
    assert not any("lora_" in k and "vision_model" in k for k in adapter_keys)  # LoRA only on the dialogue tower

    base = DiaNAModel.from_pretrained(out / "base").eval()
    with_adapters = PeftModel.from_pretrained(DiaNAModel.from_pretrained(out / "base"), str(out)).eval()
    merged = DiaNAModel.from_pretrained(out / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())

    processor = build_processor(tokenizer_dir=str(out / "merged"), image_size=(64, 32))
    batch = processor(dialogues=["a woman in a red coat with a black bag", "a man in blue jeans"],
                      images=[torch.rand(3, 64, 32).numpy().transpose(1, 2, 0)] * 2)
    with torch.no_grad():
        text_adapted = with_adapters.get_text_features(batch["input_ids"], batch["attention_mask"])
        text_merged = merged.get_text_features(batch["input_ids"], batch["attention_mask"])
        text_base = base.get_text_features(batch["input_ids"], batch["attention_mask"])
        image_adapted = with_adapters.get_image_features(batch["pixel_values"])
        image_merged = merged.get_image_features(batch["pixel_values"])
    torch.testing.assert_close(text_merged, text_adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_merged, image_adapted, rtol=1e-5, atol=1e-5)
    assert (text_merged - text_base).abs().max() > 1e-4, "the adapters had no effect"


@pytest.mark.slow
def test_two_processes_gather_negatives_and_evaluate_like_one(synth, stage1_dir, tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`: a step on 2 x 4
    samples has the loss of one process seeing the 8-sample union batch (which holds only if each
    process's negatives include the other's samples), and the evaluation numbers equal a
    one-process evaluation of the same weights."""
    # Without random draws the two runs see the same union batch: accelerate hands process r the
    # r-th batch of 4 of the same permutation that one process cuts into batches of 8.
    plain = ["--model_name_or_path", str(stage1_dir), "--max_steps", "1", "--eval_strategy", "no",
             "--save_strategy", "no", "--load_best_model_at_end", "false", "--train_sampling_strategy", "random",
             "--round_retaining", "false", "--token_masking", "0", "--image_augmentation", "false",
             "--learning_rate", "0"]
    one = tmp_path / "one"
    run_stage(stage2_args(synth, one, *plain, "--per_device_train_batch_size", "8"))
    out = tmp_path / "ddp"
    proc = launch_two_cpu_processes(
        [str(REPO / "training" / "run_stage.py"), *stage2_args(synth, out, *plain, "--per_device_train_batch_size", "4")],
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (step_one,) = [entry for entry in log_history(one) if "loss" in entry]
    (step_two,) = [entry for entry in log_history(out) if "loss" in entry]
    for term in ("loss", "itc_loss", "sdm_loss", "refiner_loss"):
        assert step_two[term] == pytest.approx(step_one[term], rel=1e-4, abs=1e-4), term

    from diana.training.evaluation.evaluate_model import evaluate_folder

    two = json.loads((out / "eval_results.json").read_text())
    single = evaluate_folder(out, synth / "chatpedes", split="validation", cache_dir=str(synth / "cache"),
                             validation_persons=3, score_modes=("global",))  # the preset's modes
    assert two["meta"]["num_queries"] == single["meta"]["num_queries"]
    assert two["flat"].keys() == single["flat"].keys()
    for key, value in single["flat"].items():
        assert two["flat"][key] == pytest.approx(value, abs=1e-3), key


@pytest.mark.slow
def test_two_processes_killed_at_a_random_step_resume_to_the_uninterrupted_run(synth, stage1_dir, tmp_path):
    """Fault injection: process 1 of a two-process stage-2 run (length-grouped batches, R3) SIGKILLs itself
    at a random step of epoch 2 (24 rows in 2 x 4 per step: 3 steps per epoch), after checkpoint-4, in the
    middle of epoch 2. Resumed with `last`, past a half-written folder of a later
    step, the run ends with the uninterrupted run's weights and log lines, bit for bit."""
    kill_step = random.SystemRandom().choice([5, 6])
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def args(out: Path, *extra: str) -> list[str]:
        return stage2_args(synth, out, "--model_name_or_path", str(stage1_dir), "--max_steps", "6",
                           "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
                           "--eval_strategy", "no", "--load_best_model_at_end", "false",
                           *extra)

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DIANA_KILL_STEP": str(kill_step), "DIANA_KILL_PROCESS": "1"}
    # One launch runs the uninterrupted run, then the killed one (tests/_sigkill_run_stage.py).
    proc = launch_two_cpu_processes([str(REPO / "tests" / "_sigkill_run_stage.py"), *args(straight, "--save_strategy", "no"),
                                     "--and-then", *args(killed)], env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0 and (straight / "model.safetensors").is_file(), proc.stderr[-4000:]
    assert "SIGKILL" in proc.stderr, proc.stderr[-4000:]
    last = killed / "checkpoint-4"
    assert get_last_checkpoint(str(killed)) == str(last), f"killed at step {kill_step}"
    for checkpoint in killed.glob("checkpoint-*"):  # whatever the kill interrupted, no checkpoint lacks a part
        assert {"trainer_state.json", "model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth",
                "epoch_start_rng_state_0.pth", "epoch_start_rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    # What a kill during the next save leaves: the parts of a later step under the staging name.
    shutil.copytree(last, killed / "tmp-checkpoint-6")
    (killed / "tmp-checkpoint-6" / "trainer_state.json").unlink()

    proc = launch_two_cpu_processes([str(REPO / "training" / "run_stage.py"),
                                     *args(killed, "--resume_from_checkpoint", "last")],
                                    env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from {last}" in proc.stderr  # not from scratch, which would end with the same weights
    assert_same_weights(load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors"))
    assert training_log(killed) == training_log(straight), f"killed at step {kill_step}"
    assert not (killed / "tmp-checkpoint-6").exists()
