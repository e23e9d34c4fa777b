"""The README's main job on the built-in SynthPedes data, end to end on a CPU:

1. generate SynthPedes (ChatPedes and MALS layouts) and its attribute oracle;
2. stage 0: the random image tower alone learns the MALS-layout captions' n-grams and labels
   (`vision_pretraining`: the stand-in for the paper's ImageNet-22k Swinv2);
   stage 1: pretrain the small DiaNA on the MALS-layout captions from there, its image tower fixed;
3. stage 2: fine-tune it on the ChatPedes-layout dialogues (best checkpoint on validation persons);
4. evaluate on the held-out test persons, per round, beside the oracle, and probe which attributes
   the model's embeddings carry (`attribute_probe`: why it falls short of the oracle); then search
   for every test person with a simulated witness, the questions asked by the random, info_gain
   and oracle questioners (`evaluation.interactive`);
5. export a Hub-ready model folder (card, pictures, remote code) and check that it loads.

    python -m diana.training.main_job --output_dir outputs/main_job
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from diana.hub_cards.evaluation_report import format_round_table
from diana.hub_cards.export import main as export
from diana.processing.cli_errors import ArgumentParser, UserInputError, require_range, run_cli
from diana.processing.data.synthpedes import generate
from diana.training.arguments import load_yaml_preset, parse_args
from diana.training.evaluation.attribute_probe import format_table
from diana.training.evaluation.attribute_probe import run as attribute_probe
from diana.training.evaluation.evaluate_model import evaluate_folder
from diana.training.evaluation.interactive import evaluate_interactive_folder, format_interactive_table
from diana.training.run_stage import main as run_stage
from diana.training.run_stage import validate_arguments

logger = logging.getLogger("diana.main_job")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked (the presets included) before any data is generated.

    Raises:
        UserInputError (ValueError): naming the flag, the value and the valid ones.
    """
    parser = ArgumentParser(prog="python -m diana.training.main_job", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/main_job", help="folder for the data, every stage and the report")
    parser.add_argument("--persons", type=int, default=3000,
                        help="SynthPedes persons (train + test); more persons for the same stage-2 steps generalise "
                             "better (RESULTS.md)")
    parser.add_argument("--test_persons", type=int, default=100, help="held-out persons of the test split")
    parser.add_argument("--images_per_person", type=int, default=4, help="SynthPedes images drawn per person")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per dialogue")
    parser.add_argument("--mals_images", type=int, default=16000,
                        help="MALS-layout images for stage 1 (each its own identity; more data, fewer epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--stage0_config", default="stage0_synthpedes_small",
                        help="stage 0 preset (the image tower alone learns the MALS-layout captions' words and "
                             "labels); 'none' starts stage 1 from a random model")
    parser.add_argument("--stage1_config", default="stage1_synthpedes_small", help="stage 1 preset (MALS layout)")
    parser.add_argument("--stage2_config", default="stage2_synthpedes_small", help="stage 2 preset (ChatPedes layout)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to both stages, e.g. --extra --num_train_epochs 1")
    args = parser.parse_args(argv)
    if not 1 <= args.test_persons <= args.persons - 2:
        raise UserInputError(f"--test_persons {args.test_persons}: must be in [1, {args.persons - 2}] (at least 2 of "
                             f"--persons {args.persons} stay for training)")
    for flag in ("images_per_person", "rounds", "mals_images"):
        require_range(f"--{flag}", getattr(args, flag), 1)
    for flag in ("stage0_config", "stage1_config", "stage2_config"):
        if not (flag == "stage0_config" and getattr(args, flag) == "none"):
            load_yaml_preset(getattr(args, flag), f"--{flag}")
    # Each stage's arguments (--extra included) are checked now, not after the stages before it have run;
    # their folders are made by the job, so only their existence is left to the stage.

    for name, stage_argv in stage_argvs(args):
        try:
            validate_arguments(*parse_args(stage_argv), check_paths=False)
        except ValueError as error:
            raise UserInputError(f"{name}: {error}") from error
    return args


def stage_argvs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, run_stage arguments) of every stage the job runs, in order."""
    out = Path(args.output_dir)
    mals, chatpedes = str(out / "synthpedes" / "mals"), str(out / "synthpedes" / "chatpedes")
    stages = []
    if args.stage0_config != "none":
        stages.append(("stage 0", ["--config", args.stage0_config, "--data_dir", mals,
                                   "--output_dir", str(out / "stage0"), *args.extra]))
        start_from, unfreeze = ["--model_name_or_path", str(out / "stage0")], []
    else:
        # The stage 1 and 2 presets keep stage 0's image tower fixed; without stage 0 it is random and must train.
        start_from, unfreeze = [], ["--freeze_vision_model", "false"]
    stages.append(("stage 1", ["--config", args.stage1_config, "--data_dir", mals, "--output_dir", str(out / "stage1"),
                               *start_from, *unfreeze, *args.extra]))
    stages.append(("stage 2", ["--config", args.stage2_config, "--data_dir", chatpedes, "--model_name_or_path",
                               str(out / "stage1"), "--output_dir", str(out / "stage2"), *unfreeze, *args.extra]))
    return stages


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(args.output_dir)
    start = time.time()

    # 1. Data and the ceiling any model can reach on it.

    summary = generate(str(out / "synthpedes"), persons=args.persons, images_per_person=args.images_per_person,
                       rounds=args.rounds, seed=args.seed, mals_images=args.mals_images,
                       test_fraction=args.test_persons / args.persons,
                       mals_files=4, overwrite=True, progress=True)
    oracle = summary["oracle"]
    logger.info("SynthPedes written to %s in %.0f s", out / "synthpedes", time.time() - start)

    # 2-3. The stages, exactly as `accelerate launch training/run_stage.py` runs them.

    for name, stage_argv in stage_argvs(args):
        run_stage(stage_argv)
        logger.info("%s done at %.0f s", name, time.time() - start)

    # 4. Held-out test persons, every round count, beside the oracle.

    results = evaluate_folder(out / "stage2", out / "synthpedes" / "chatpedes", split="test",
                              output_dir=out / "test_eval", reference=oracle)
    print("\nSynthPedes test persons (text -> image), DiaNA vs the attribute oracle:\n")
    print(format_round_table(results, reference=oracle))

    # The oracle assumes every stated attribute is perceived; the probe shows which ones the model reads.

    probe = attribute_probe(out / "stage2", out / "synthpedes" / "chatpedes", out / "attribute_probe")
    print("\nLinear probes of the trained embeddings per attribute (test persons; majority = always the most "
          "frequent class):\n")
    print(format_table(probe))
    interactive_step(out)

    # 5. A Hub-ready folder, checked by loading it in a fresh process.

    export(["--model_name_or_path", str(out / "stage2"),
            "--eval_results_file", str(out / "test_eval" / "eval_results.json"),
            "--run_args_file", str(out / "stage2" / "run_args.json"), "--dataset", "synthpedes", "--split", "test",
            "--output_dir", str(out / "hub_model"), "--overwrite"])
    rounds = [key for key in results["global"] if key.startswith("round_")]
    per_round = [results["global"][key]["R@1"] for key in rounds]
    full_r1, oracle_r1 = results["global"]["full"]["R@1"], oracle["full"]["R@1"]
    verdict = {
        "minutes": round((time.time() - start) / 60, 1),
        "model_R@1_per_round": per_round,
        "model_full_R@1": full_r1,
        "oracle_full_R@1": oracle_r1,
        "chance_R@1": oracle.get("chance_R@1"),
        "fraction_of_oracle": round(full_r1 / oracle_r1, 3) if oracle_r1 else None,
        "reaches_80_percent_of_oracle": bool(oracle_r1 and full_r1 >= 0.8 * oracle_r1),
        "R@1_rises_with_rounds": per_round[-1] > per_round[0],
        "attribute_probe": {name: {k: round(v, 3) for k, v in row.items() if k in ("image", "text")}
                            for name, row in probe.items()},
    }
    (out / "main_job_summary.json").write_text(json.dumps(verdict, indent=2))
    print(f"\nfull-dialogue R@1 {full_r1:.1f} = {verdict['fraction_of_oracle']:.0%} of the oracle's {oracle_r1:.1f} "
          f"(chance {oracle.get('chance_R@1')}); >= 80% of the oracle: {verdict['reaches_80_percent_of_oracle']}; "
          f"rises with rounds: {verdict['R@1_rises_with_rounds']}; {verdict['minutes']} min. Hub folder: {out / 'hub_model'}")


def interactive_step(out: Path, rounds: int = 10) -> dict:
    """Which question to ask matters: one search per test person, round 1 its description, then the
    random, info_gain and oracle questioners side by side with a simulated witness (the person's true
    attributes in SynthPedes' answer templates)."""
    results = evaluate_interactive_folder(out / "stage2", out / "synthpedes" / "chatpedes", split="test",
                                          policies=("random", "info_gain", "oracle"), rounds=rounds,
                                          targets_per="person", output_dir=out / "interactive")
    print(f"\nInteractive search, simulated witness ({results['meta']['num_targets']} test persons, "
          f"{results['meta']['num_gallery']} images; round 1 = the description; {results['meta']['seconds']:.0f} s):\n")
    print(format_interactive_table(results))
    return results


if __name__ == "__main__":
    run_cli(main)
