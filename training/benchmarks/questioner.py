"""Questioner speed: proposing one info_gain question (every open bank question x candidate answer scored
over the top-N in one batched pass on the key/value cache) beside encoding one round with the cache
(`ChatSearchSession.add_round`), same model, same dialogue, same run, interleaved.

    python -m diana.training.benchmarks.questioner --model_name_or_path outputs/main_job/stage2 \\
        --data_dir outputs/main_job/synthpedes/chatpedes --top_n 50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import TextIO

import torch

from diana.processing.cli_errors import ArgumentParser, require_model_folder, require_path, require_range, run_cli
from diana.processing.data.synthpedes_attributes import ANSWERS, ATTRIBUTE_NAMES, QUESTIONS
from diana.processing.model_loading import load_model_and_processor
from diana.processing.search import ChatSearchSession, GalleryIndex
from diana.processing.search.fingerprints import model_fingerprint, processor_fingerprint
from diana.processing.search.questioner import QuestionBank, make_policy
from diana.training.evaluation.interactive import load_split_entries

DESCRIPTION = "The person had gray hair and wore a white top."
PERSON = {"hair_colour": "gray", "hair_length": "long", "hat": "green", "upper_colour": "white", "sleeves": "long",
          "pattern": "plain", "lower_colour": "brown", "lower_type": "shorts", "shoes": "white", "bag": "backpack",
          "bag_colour": "red"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diana.training.benchmarks.questioner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="DiaNA folder (the main job's stage2)")
    parser.add_argument("--data_dir", help="ChatPedes-layout folder whose test images make the gallery (default: a "
                                       "random gallery of --gallery_size embeddings)")
    parser.add_argument("--gallery_size", type=int, default=400)
    parser.add_argument("--question_bank", help="question bank JSON (default: SynthPedes')")
    parser.add_argument("--top_n", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="measure before rounds 2..R")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both (the interactive evaluation runs its sessions on one)")
    return parser


def _gallery(model, processor, args) -> GalleryIndex:
    if args.data_dir:
        _, gallery = load_split_entries(args.data_dir, "test")
        return GalleryIndex.build(gallery.paths, model, processor, ids=gallery.person_ids, progress=False)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(args.gallery_size, model.config.projection_dim, generator=generator), dim=-1)
    return GalleryIndex(embeds, [str(i) for i in range(args.gallery_size)], model_fingerprint(model),
                        processor_fingerprint(processor))


def benchmark(args: argparse.Namespace, out: TextIO) -> list[dict[str, float]]:
    """Prints, before each round, the proposal's and the cached round's times and their ratio."""
    torch.set_num_threads(args.threads)
    model, processor = load_model_and_processor(args.model_name_or_path, device="cpu")
    index = _gallery(model, processor, args)
    bank = QuestionBank.load(args.question_bank) if args.question_bank else QuestionBank.from_synthpedes()
    questioner = make_policy("info_gain", bank, top_n=args.top_n)
    session = ChatSearchSession(model, processor, index, check_index=False)  # the model's own score mode
    asked = [(QUESTIONS[a][0], ANSWERS[a].get(PERSON[a], ANSWERS[a].get("*"))[0].format(
        v=PERSON[a], V=PERSON[a].capitalize())) for a in ATTRIBUTE_NAMES if a not in ("hair_colour", "upper_colour")]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; dialogue tower hidden {model.config.text_config.hidden_size}, "
          f"{model.config.text_config.num_hidden_layers} layers; gallery {len(index)}; score mode {session.mode}; "
          f"top-{args.top_n}", file=out)
    print("round  hypotheses  propose ms (min/median)  cached round ms (min/median)  ratio (min/min)", file=out)
    rows = []
    for number in range(2, args.rounds + 1):
        def replay() -> None:
            session.start(DESCRIPTION)
            for question, answer in asked[: number - 2]:
                session.add_round(question, answer)
        replay()
        hypotheses = sum(len(q.answers) for q in bank.open_questions(session.rounds))
        propose_times, round_times = [], []
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            replay()
            start = time.perf_counter()
            questioner.propose(session)
            middle = time.perf_counter()
            session.add_round(*asked[number - 2])
            end = time.perf_counter()
            if repeat:
                propose_times.append(middle - start)
                round_times.append(end - middle)
        row = {"round": number, "hypotheses": hypotheses, "propose_min_ms": min(propose_times) * 1e3,
               "propose_median_ms": statistics.median(propose_times) * 1e3, "round_min_ms": min(round_times) * 1e3,
               "round_median_ms": statistics.median(round_times) * 1e3}
        row["ratio"] = row["propose_min_ms"] / row["round_min_ms"]
        rows.append(row)
        print(f"{number:>5}  {hypotheses:>10}  {row['propose_min_ms']:>9.1f} / {row['propose_median_ms']:<9.1f}  "
              f"{row['round_min_ms']:>13.1f} / {row['round_median_ms']:<12.1f}  {row['ratio']:.2f}", file=out)
    return rows


def main(argv: list[str] | None = None, out: TextIO | None = None) -> list[dict[str, float]]:
    args = build_parser().parse_args(argv)
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    require_path("--data_dir", args.data_dir, "folder")
    require_path("--question_bank", args.question_bank, "file")
    require_range("--gallery_size", args.gallery_size, 1)
    require_range("--top_n", args.top_n, 2)
    require_range("--rounds", args.rounds, 2, len(ATTRIBUTE_NAMES) - 1)
    require_range("--repeats", args.repeats, 1)
    require_range("--threads", args.threads, 1)
    return benchmark(args, out or sys.stdout)


if __name__ == "__main__":
    run_cli(main)
