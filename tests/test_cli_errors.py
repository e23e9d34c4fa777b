"""Command-line errors: every argument refused before any data or model is loaded, with a message
naming the flag, the value and the valid ones; and every user error one line on stderr with exit
status 2 (`diana.processing.cli_errors.run_cli`), the traceback only under DIANA_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diana.hub_cards import export
from diana.modeling_diana import DiaNAModel
from diana.processing import tokenizer_setup
from diana.processing.data import synthpedes
from diana.processing.search import cli as search_cli
from diana.processing.cli_errors import ArgumentParser, UserInputError, run_cli
from diana.hub_cards import convert_official_checkpoint
from diana.training import main_job, run_stage
from diana.training.evaluation import attribute_probe, evaluate_model
from diana.training.arguments import parse_args
from diana.training.benchmarks import run as benchmarks_run
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def one_line_exit(capsys, main, argv) -> str:
    """Runs `main` under run_cli; asserts exit status 2 and that the error is one stderr line, the
    last (progress bars of a model load may come before it); returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert err.endswith("\n") and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


# ------------------------------------------------------------------------------------------ run_cli


def test_run_cli_prints_one_line_exits_2_and_re_raises_under_debug(capsys, monkeypatch):
    monkeypatch.delenv("DIANA_DEBUG", raising=False)

    def bad(argv):
        raise FileNotFoundError(f"{argv[0]}: not here\n(second line of the message)")

    assert one_line_exit(capsys, bad, ["photo.jpg"]) == "error: photo.jpg: not here (second line of the message)"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: 0, [])
    assert exit_info.value.code == 0

    def bug(argv):
        raise ZeroDivisionError("a bug, not a user's mistake")

    with pytest.raises(ZeroDivisionError):  # not hidden behind a one-line message
        run_cli(bug, [])
    monkeypatch.setenv("DIANA_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="not here"):
        run_cli(bad, ["photo.jpg"])


def test_parser_errors_are_user_errors_with_the_flag(capsys):
    parser = ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("go")
    sub.add_argument("--top-k", type=int, required=True)
    with pytest.raises(UserInputError, match=r"argument --top-k: invalid int value: 'x' \(see tool go --help\)"):
        parser.parse_args(["go", "--top-k", "x"])
    line = one_line_exit(capsys, lambda argv: parser.parse_args(argv), ["go"])
    assert "the following arguments are required: --top-k" in line


# --------------------------------------------------------------------------------------- run_stage


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    model = root / "model"
    model.mkdir()
    tiny_config().save_pretrained(model)  # a config.json is all the checks look at
    return {"root": root, "data": root / "data", "model": model}


def stage2(folders, *extra: str) -> list[str]:
    return ["--config", "stage2_synthpedes_small", "--data_dir", str(folders["data"]), "--output_dir",
            str(folders["root"] / "out"), "--model_name_or_path", str(folders["model"]), *extra]


RUN_STAGE_REFUSALS = {
    # flag family: (extra flags, expected message)
    "score modes": (["--eval_score_modes", "globl"],
                    r"--eval_score_modes: unknown \['globl'\]; give distinct values out of global, attribute, fused"),
    "default score mode": (["--score_mode", "fusd"], r"--score_mode 'fusd': not one of global, attribute, fused"),
    "attribute reduction": (["--attribute_reduction", "avg"], r"--attribute_reduction 'avg': not one of mean, max"),
    "eval split": (["--eval_split", "testt"], r"--eval_split 'testt': not one of validation, test"),
    "validation persons": (["--validation_persons", "0"], r"--eval_split validation needs --validation_persons > 0"),
    "lora rank": (["--lora_rank", "-1"], r"--lora_rank -1: must be >= 0"),
    "lora alpha": (["--lora_rank", "4", "--lora_alpha", "0"], r"--lora_alpha 0.0: must be > 0"),
    "lora alpha without lora": (["--lora_alpha", "8"], r"--lora_alpha 8.0 has no effect without --lora_rank > 0"),
    "lora dropout": (["--lora_rank", "4", "--lora_dropout", "1"], r"--lora_dropout 1.0: must be in \[0.0, 1.0\)"),
    "token masking": (["--token_masking", "1.5"], r"--token_masking 1.5: must be in \[0.0, 1.0\]"),
    "random erasing": (["--random_erasing", "-0.1"], r"--random_erasing -0.1: must be in \[0.0, 1.0\]"),
    "processor profile": (["--processor_profile", "finetun"],
                          r"--processor_profile 'finetun': not one of finetune, pretrain"),
    "dataset": (["--dataset", "cuhk"], r"--dataset 'cuhk': not one of chatpedes, mals"),
    "missing-image policy": (["--on_missing_image", "ignore"], r"--on_missing_image 'ignore': not one of error, skip"),
    "attention": (["--text_attn_implementation", "flash"], r"--text_attn_implementation 'flash': not one of eager"),
    "token limit": (["--max_length", "0"], r"--max_length 0: must be >= 1"),
    "sample limit": (["--max_train_samples", "0"], r"--max_train_samples 0: must be >= 1"),
    "attribute queries": (["--num_attribute_queries", "0"], r"--num_attribute_queries 0: must be >= 1"),
    "image size": (["--image_size", "64", "0"], r"--image_size \[64, 0\]: must be two positive integers"),
    "best-model metric": (["--eval_score_modes", "fused"],
                          r"--metric_for_best_model 'eval_global/full/R@1' needs score mode 'global'"),
    "mals files": (["--mals_files", "a.json"], r"--mals_files belongs to --dataset mals, got --dataset chatpedes"),
    "tokenizer folder": (["--tokenizer_dir", "/no/such/tokenizer"], r"--tokenizer_dir: folder not found: /no/such"),
    "parse error": (["--lora_rank", "x"], r"argument --lora_rank/--lora-rank: invalid int value: 'x'"),
}


@pytest.mark.parametrize("family", sorted(RUN_STAGE_REFUSALS))
def test_run_stage_refuses_each_flag_family_before_any_data_is_read(family, folders, monkeypatch):
    extra, message = RUN_STAGE_REFUSALS[family]

    def no_data(*args, **kwargs):
        raise AssertionError("the data were read before the arguments were checked")

    monkeypatch.setattr(run_stage, "load_data", no_data)
    with pytest.raises(UserInputError, match=message):
        run_stage.main(stage2(folders, *extra))


def test_run_stage_paths_and_model_sources(folders):
    def refused(argv: list[str]) -> str:
        with pytest.raises(UserInputError) as error:
            run_stage.validate_arguments(*parse_args(argv))
        return str(error.value)

    model_args, data_args, training_args = parse_args(stage2(folders))
    run_stage.validate_arguments(model_args, data_args, training_args)  # the preset with real folders passes
    missing = folders["root"] / "stage1"  # a local path (its parent exists), not a Hub repository id
    assert refused(stage2(folders, "--model_name_or_path", str(missing))) == (
        f"--model_name_or_path: model folder not found: {missing}")
    assert refused(stage2(folders, "--model_name_or_path", str(folders["data"]))) == (
        f"--model_name_or_path: {folders['data']} has no config.json (not a saved model folder)")
    assert refused(stage2(folders, "--data_dir", str(folders["root"] / "nowhere"))) == (
        f"--data_dir: folder not found: {folders['root'] / 'nowhere'}")
    base = ["--config", "stage2_synthpedes_small", "--data_dir", str(folders["data"]), "--output_dir",
            str(folders["root"] / "out")]
    assert refused(base).startswith("no model: give --model_name_or_path")
    # The stage 2 preset keeps a trained image tower fixed: a random one may not be.
    assert refused([*base, "--model_config", "models/synthpedes_small.yaml"]).startswith(
        "--freeze_vision_model true would keep a randomly initialised image tower fixed")
    assert refused([*base, "--vision_model_path", str(folders["model"])]) == (
        "--vision_model_path needs --text_model_path too (the two towers come together)")
    with pytest.raises(UserInputError, match=r"--config 'stage9': no such file, nor a preset \(presets: .*stage2_"):
        parse_args(["--config", "stage9"])
    with pytest.raises(UserInputError, match="--config needs a preset name"):
        parse_args(["--output_dir", "x", "--config"])


def test_run_stage_as_a_script_prints_one_line(folders, tmp_path):
    """`accelerate launch training/run_stage.py ...` runs the file as a script: one line there too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    env.pop("DIANA_DEBUG", None)
    proc = subprocess.run([sys.executable, str(REPO / "training" / "run_stage.py"),
                           *stage2(folders, "--eval_score_modes", "globl")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: --eval_score_modes: unknown ['globl']; give distinct values out of global, attribute, fused"]


# ---------------------------------------------------------------------------------- evaluate_model


def test_evaluate_model_split_model_folder_and_modes(folders, capsys):
    data, model = str(folders["data"]), str(folders["model"])
    line = one_line_exit(capsys, evaluate_model.main, ["--model_name_or_path", model, "--data_dir", data, "--split", "dev"])
    assert line == "error: --split (of --dataset chatpedes) 'dev': not one of test, validation"
    missing = str(folders["root"] / "trained")
    line = one_line_exit(capsys, evaluate_model.main, ["--model_name_or_path", missing, "--data_dir", data])
    assert line == f"error: --model_name_or_path: model folder not found: {missing}"
    with pytest.raises(UserInputError, match="--split validation needs --validation_persons N"):
        evaluate_model.main(["--model_name_or_path", model, "--data_dir", data, "--split", "validation"])
    with pytest.raises(UserInputError, match=r"--split \(of --dataset mals\) 'test': not one of train"):
        evaluate_model.main(["--model_name_or_path", model, "--data_dir", data, "--dataset", "mals", "--split", "test"])
    with pytest.raises(UserInputError, match=r"--score_modes: unknown \['best'\]"):
        evaluate_model.main(["--model_name_or_path", model, "--data_dir", data, "--score_modes", "global", "best"])
    with pytest.raises(UserInputError, match=r"--batch_size 0: must be >= 1"):
        evaluate_model.main(["--model_name_or_path", model, "--data_dir", data, "--batch_size", "0"])
    with pytest.raises(UserInputError, match=r"--device 'gpu0': not a device"):
        evaluate_model.main(["--model_name_or_path", model, "--data_dir", data, "--device", "gpu0"])


def test_evaluate_model_module_prints_one_line(folders, tmp_path):
    """A real `python -m` run: one stderr line, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("DIANA_DEBUG", None)
    missing = folders["root"] / "no_model"
    proc = subprocess.run([sys.executable, "-m", "diana.training.evaluation.evaluate_model",
                           "--model_name_or_path", str(missing), "--data_dir", str(folders["data"])], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: --model_name_or_path: model folder not found: {missing}"]


# -------------------------------------------------------------------------------------- search_cli


@pytest.fixture(scope="module")
def search_setup(tiny_processor, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search")
    for name, seed in (("model", 0), ("other_model", 1)):
        torch.manual_seed(seed)
        DiaNAModel(tiny_config()).save_pretrained(root / name)
        tiny_processor.save_pretrained(root / name)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (70, 30, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    index = root / "gallery.safetensors"
    search_cli.main(["index", "--model_name_or_path", str(root / "model"), "--images_dir", str(photos), "--index_path", str(index)],
                    out=open(os.devnull, "w"))
    return {"root": root, "photos": photos, "index": index}


def test_search_cli_user_errors_are_one_line(search_setup, capsys):
    root, index = search_setup["root"], search_setup["index"]
    model, other = str(root / "model"), str(root / "other_model")
    # An index built by another model.
    line = one_line_exit(capsys, search_cli.main, ["search", "--model_name_or_path", other, "--index_path", str(index)])
    assert line.startswith(f"error: {index} was built with another model (its weights differ)")
    # An existing output; a corrupt image.
    line = one_line_exit(capsys, search_cli.main,
                         ["index", "--model_name_or_path", model, "--images_dir", str(search_setup["photos"]),
                          "--index_path", str(index)])
    assert line == f"error: {index} exists: use --add to extend it, or another --index_path"
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.jpg").write_bytes(b"not a JPEG at all")
    line = one_line_exit(capsys, search_cli.main,
                         ["index", "--model_name_or_path", model, "--images_dir", str(corrupt), "--index_path", str(root / "new")])
    assert "broken.jpg" in line
    # Flags refused before the model loads.
    assert one_line_exit(capsys, search_cli.main, ["search", "--model_name_or_path", model, "--index_path", str(root / "none.st")]) == (
        f"error: --index_path: file not found: {root / 'none.st'}")
    assert one_line_exit(capsys, search_cli.main, ["search", "--model_name_or_path", model, "--index_path", str(index), "--top_k", "0"]
                         ) == "error: --top_k 0: must be >= 1"
    line = one_line_exit(capsys, search_cli.main, ["index", "--model_name_or_path", model, "--data_dir", str(root),
                                                   "--split", "dev", "--index_path", str(root / "x")])
    assert "argument --split: invalid choice: 'dev'" in line
    missing = str(root / "model_v2")
    assert one_line_exit(capsys, search_cli.main, ["search", "--model_name_or_path", missing, "--index_path", str(index)]) == (
        f"error: --model_name_or_path: model folder not found: {missing}")
    search = ["search", "--model_name_or_path", model, "--index_path", str(index)]
    assert one_line_exit(capsys, search_cli.main, [*search, "--rejection_weight", "1.5"]) == (
        "error: --rejection_weight 1.5: must be in [0, 1]")
    line = one_line_exit(capsys, search_cli.main, [*search, "--policy", "oracle"])
    assert "argument --policy: invalid choice: 'oracle'" in line
    assert one_line_exit(capsys, search_cli.main, [*search, "--question_bank", str(root / "bank.json")]) == (
        f"error: --question_bank: file not found: {root / 'bank.json'}")
    (root / "bank.json").write_text('{"format": "diana-question-bank", "version": 1, "questions": [{"question": "Hat?"}]}')
    line = one_line_exit(capsys, search_cli.main, [*search, "--question_bank", str(root / "bank.json")])
    assert line.startswith(f"error: question bank {root / 'bank.json'}: question 0")
    pytest.importorskip("faiss")  # the test extra installs it; without it the command says so instead
    line = one_line_exit(capsys, search_cli.main, ["search", "--model_name_or_path", model, "--index_path", str(index), "--backend",
                                                   "faiss", "--score_mode", "fused"])
    assert line.startswith("error: --score_mode fused: --backend faiss scores the global embeddings only")


# ----------------------------------------------------------------------------- the other commands


def test_export_main_job_synthpedes_convert_probe_and_benchmarks_refuse_bad_arguments(folders, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("keep me")
    line = one_line_exit(capsys, export.main, ["--model_name_or_path", str(folders["model"]), "--output_dir", str(full)])
    assert line == f"error: --output_dir {full} exists and is not empty (use --overwrite)"
    with pytest.raises(UserInputError, match=f"--run_args_file: file not found: {tmp_path / 'run_args.json'}"):
        export.main(["--model_name_or_path", str(folders["model"]), "--output_dir", str(tmp_path / "o"),
                     "--run_args_file", str(tmp_path / "run_args.json")])

    with pytest.raises(UserInputError, match=r"--stage1_config 'stage1_synthpedes': no such file, nor a preset"):
        main_job.parse(["--stage1_config", "stage1_synthpedes"])
    with pytest.raises(UserInputError, match=r"--rounds 0: must be >= 1"):
        main_job.parse(["--rounds", "0"])
    # Flags for the stages are checked before the data are generated, not when their stage starts.
    job = tmp_path / "job"
    assert [name for name, _ in main_job.stage_argvs(main_job.parse(["--output_dir", str(job)]))] == [
        "stage 0", "stage 1", "stage 2"]
    assert not job.exists()
    with pytest.raises(UserInputError, match=r"^stage 0: --eval_score_modes: unknown \['globl'\]"):
        main_job.parse(["--output_dir", str(job), "--extra", "--eval_score_modes", "globl"])
    with pytest.raises(UserInputError, match=r"^stage 1: --lora_rank -1: must be >= 0"):
        main_job.parse(["--output_dir", str(job), "--stage0_config", "none", "--extra", "--lora_rank", "-1"])

    with pytest.raises(UserInputError, match=r"--test_fraction 1.5: must be in \[0.0, 1.0\)"):
        synthpedes.main(["--output_dir", str(tmp_path / "s"), "--test_fraction", "1.5"])
    with pytest.raises(UserInputError, match=r"--image_size 8 4: must be at least 16 8"):
        synthpedes.main(["--output_dir", str(tmp_path / "s"), "--image_size", "8", "4"])
    (tmp_path / "s" / "chatpedes").mkdir(parents=True)
    (tmp_path / "s" / "chatpedes" / "old.json").write_text("[]")
    line = one_line_exit(capsys, synthpedes.main, ["--output_dir", str(tmp_path / "s"), "--persons", "4"])
    assert line.startswith(f"error: {tmp_path / 's' / 'chatpedes'} exists and is not empty")

    line = one_line_exit(capsys, convert_official_checkpoint.main,
                         ["--official_dir", str(tmp_path / "official"), "--output_dir", str(tmp_path / "hf")])
    assert line == f"error: --official_dir: folder not found: {tmp_path / 'official'}"
    with pytest.raises(UserInputError, match=f"--model_name_or_path: model folder not found: {tmp_path / 'm'}"):
        attribute_probe.main(["--model_name_or_path", str(tmp_path / "m"), "--data_dir", str(tmp_path)])
    with pytest.raises(UserInputError, match=r"argument --suite: invalid choice: 'gpus'"):
        benchmarks_run.main(["--suite", "gpus", "--output_file", str(tmp_path / "b.json")])
    with pytest.raises(UserInputError, match=r"--device 'gpu': not a device"):
        benchmarks_run.main(["--device", "gpu", "--output_file", str(tmp_path / "b.json")])


@pytest.mark.parametrize("name", [
    "run_stage", "evaluate_model", "search_cli index", "search_cli search", "export", "main_job",
    "synthpedes", "convert_official_checkpoint", "attribute_probe", "tokenizer_setup", "benchmarks",
])
def test_every_entry_point_prints_its_help(name, capsys):
    """`--help` exits 0 and prints usage: a help text with a stray '%' made argparse raise instead."""
    mains = {
        "run_stage": run_stage.main, "evaluate_model": evaluate_model.main, "export": export.main,
        "search_cli index": lambda argv: search_cli.main(["index", *argv]),
        "search_cli search": lambda argv: search_cli.main(["search", *argv]),
        "main_job": main_job.main, "synthpedes": synthpedes.main,
        "convert_official_checkpoint": convert_official_checkpoint.main, "attribute_probe": attribute_probe.main,
        "tokenizer_setup": tokenizer_setup.main, "benchmarks": benchmarks_run.main,
    }
    with pytest.raises(SystemExit) as exit_info:
        mains[name](["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_diana_command_routes_each_subcommand_to_its_command(capsys, monkeypatch):
    """`diana SUB args` runs that command's main on args (index/search with their own subcommand first);
    an unknown or missing subcommand is one line with exit status 2."""
    from diana.training import cli

    assert set(cli.SUBCOMMANDS) >= {"train", "evaluate", "probe", "export", "index", "search", "synthpedes",
                                     "convert", "benchmark"}
    seen = {}
    monkeypatch.setattr(search_cli, "main", lambda argv: seen.setdefault("search_cli", argv) and 0)
    monkeypatch.setattr(synthpedes, "main", lambda argv: seen.setdefault("synthpedes", argv) and 0)
    assert cli.dispatch(["search", "--index", "g.safetensors"]) == 0
    cli.dispatch(["synthpedes", "--persons", "3"])
    assert seen == {"search_cli": ["search", "--index", "g.safetensors"], "synthpedes": ["--persons", "3"]}

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    listing = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"  {name} " in listing for name in cli.SUBCOMMANDS)
    assert sorted(name for names in cli.GROUPS.values() for name in names) == sorted(cli.SUBCOMMANDS)
    for argv, says in ((["trian"], "unknown subcommand 'trian'"), ([], "a subcommand is needed")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--split" in capsys.readouterr().out
