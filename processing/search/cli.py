"""Terminal front end of the chat search: build / extend a gallery index, then search it by dialogue.

    # encode a folder of photos once (or a data set split), then add more later; an index is a folder
    # of shards (or one file when --index_path ends in .safetensors, for small galleries)
    python -m diana.processing.search.cli index --model_name_or_path MODEL_DIR --images_dir photos/ --index_path gallery_index
    python -m diana.processing.search.cli index --model_name_or_path MODEL_DIR --images_dir more/ --index_path gallery_index --add
    python -m diana.processing.search.cli index --model_name_or_path MODEL_DIR --data_dir DATA_DIR --split test --index_path test_index
    # several processes, each encoding a share (DataLoader workers decode the images)
    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 -m diana.processing.search.cli index \
        --model_name_or_path MODEL_DIR --images_dir photos/ --index_path gallery_index --num_workers 2

    # chat on stdin: the system proposes each next question, you answer it, ask your own, or reject photos
    python -m diana.processing.search.cli search --model_name_or_path MODEL_DIR --index_path gallery_index \
        --contact_sheet top.png
    # or replay dialogues from a JSON file
    python -m diana.processing.search.cli search --model_name_or_path MODEL_DIR --index_path gallery_index \
        --dialogue_file dialogue.json --top_k 8 --contact_sheet top.png

The ranking is printed after every step with the tokens it ran through the dialogue tower;
``--contact_sheet`` saves a picture with one row per step and the top-k photos labelled with rank
and score. A dialogue file holds one dialogue in any form the processor accepts (ChatPedes rounds,
(question, answer) pairs, {"question", "answer"} dicts, a plain description) or
``{"dialogues": [dialogue, ...]}`` for several. ``search --help`` lists the chat's commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
import time
from pathlib import Path
from typing import Any, TextIO

from ..cli_errors import (
    ArgumentParser,
    UserInputError,
    one_line,
    require_device,
    require_model_folder,
    require_path,
    require_range,
    run_cli,
)
from ..data.chatpedes import load_chatpedes
from ..model_loading import load_model_and_processor
from ..processing_diana import normalize_dialogue
from .ann import ANN_MIN_IMAGES
from .contact_sheet import save_contact_sheet
from .index import GalleryIndex, dataset_paths_and_ids, list_images
from .parallel_indexing import ProcessGroup, index_images
from .questioner import QuestionBank, make_policy
from .session import ChatSearchSession, RoundResult
from .topk import faiss_available

CHATPEDES_SPLITS = ("train", "validation", "test")
# The questioner policies a live witness can use: "dataset" replays annotated questions and "oracle"
# needs the gallery's true attributes (evaluation only); "none" proposes nothing (the witness asks).
CHAT_POLICIES = ("info_gain", "random", "none")


def read_dialogues(path: str | Path) -> list[Any]:
    """Dialogues of a JSON file: one dialogue, or ``{"dialogues": [...]}``; each is checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read dialogue file {str(path)!r}: {error}") from error
    if isinstance(data, dict) and "dialogues" in data:
        dialogues = data["dialogues"]
        if not isinstance(dialogues, list) or not dialogues:
            raise ValueError(f"{str(path)!r}: 'dialogues' must be a non-empty list")
    else:
        dialogues = [data]
    for number, dialogue in enumerate(dialogues, start=1):
        try:
            normalize_dialogue(dialogue)
        except ValueError as error:
            raise ValueError(f"{str(path)!r}, dialogue {number}: {error}") from error
    return dialogues


def format_round(result: RoundResult) -> str:
    """The ranking after one round (or one "not this person" step), one line per photo."""
    flag = "  [truncated at max_length]" if result.truncated else ""
    if result.is_rejection:
        lines = [f"round {result.round_index}, not this person (+0 tokens): " + ", ".join(result.rejected_paths)]
    else:
        lines = [f"round {result.round_index} (+{result.new_tokens} tokens){flag}",
                 f"  Q: {result.question}", f"  A: {result.answer}"]
    for rank, (score, path, person) in enumerate(zip(result.scores, result.paths, result.ids), start=1):
        label = f"  (id {person})" if person >= 0 else ""
        lines.append(f"  {rank:>3}. {score:+.4f}  {path}{label}")
    if not result.paths:
        lines.append("  (every photo has been rejected)")
    return "\n".join(lines)


def _sheet_path(base: str | None, number: int, total: int) -> Path | None:
    if base is None:
        return None
    base_path = Path(base)
    return base_path if total == 1 else base_path.with_name(f"{base_path.stem}_{number}{base_path.suffix or '.png'}")


def run_dialogues(session: ChatSearchSession, dialogues: list[Any], contact_sheet: str | None, out: TextIO) -> list[list[RoundResult]]:
    """Replay every dialogue round by round, printing each ranking."""
    all_results = []
    for number, dialogue in enumerate(dialogues, start=1):
        try:
            pairs = session.processor.normalize_dialogue(dialogue)
        except ValueError as error:
            raise ValueError(f"dialogue {number}: {error}") from error
        session.reset()
        print(f"=== dialogue {number}/{len(dialogues)} ({len(pairs)} rounds)", file=out)
        for question, answer in pairs:
            print(format_round(session.add_round(question, answer)), file=out)
        sheet = _sheet_path(contact_sheet, number, len(dialogues))
        if sheet is not None:
            save_contact_sheet(session.results, sheet, title=f"dialogue {number}: top-{session.k} per round")
            print(f"contact sheet: {sheet}", file=out)
        all_results.append(list(session.results))
    return all_results


# ------------------------------------------------------------------------------- interactive chat

CHAT_COMMANDS = """\
interactive chat (without --dialogue_file):
  First describe the person you saw. After every round the ranking is printed (and drawn into
  --contact_sheet) with the tokens the round ran through the dialogue tower, then the system
  proposes a question (--policy, from --question_bank). At the '>' prompt type:
    ANSWER             answer the proposed question
    ask QUESTION       ask your own question instead; its answer is asked for next
    not N [N ...]      "not this person": drop the photos at ranks N of the latest ranking for
                       the rest of the search (the search also moves away from them)
    = TEXT             answer with TEXT even if it reads like a command (e.g. "= not 2 of them")
    help               show this list
    done               finish (so do an empty line and end of input)
"""


@dataclass(frozen=True)
class WitnessInput:
    """One line the witness typed at the prompt, parsed (see CHAT_COMMANDS)."""

    kind: str  # "answer" | "ask" | "reject" | "help" | "done"
    text: str = ""
    ranks: tuple[int, ...] = ()


def parse_witness_line(line: str) -> WitnessInput:
    """What a prompt line asks for.

    Raises:
        ValueError: a command with a bad argument (``not`` without rank numbers, ``ask`` without a question).
    """
    text = line.strip()
    word, _, rest = text.partition(" ")
    word, rest = word.lower(), rest.strip()
    if not text or (word == "done" and not rest):
        return WitnessInput("done")
    if word == "help" and not rest:
        return WitnessInput("help")
    if text.startswith("="):
        return WitnessInput("answer", text[1:].strip())
    if word == "ask":
        if not rest:
            raise ValueError("ask: type your question after it, e.g. ask Is she wearing a hat?")
        return WitnessInput("ask", rest)
    if word == "not" and rest[:1].isdigit():
        numbers = rest.replace(",", " ").split()
        if not all(number.isdigit() for number in numbers):
            raise ValueError(f"not {rest}: give the ranks as numbers, e.g. not 2 5 (or '= not ...' to answer that)")
        return WitnessInput("reject", ranks=tuple(int(number) for number in numbers))
    return WitnessInput("answer", text)


def _describe_proposal(proposal: Any) -> str:
    """The proposed question with its suggested answers and the policy that picked it."""
    hint = f"  [{' / '.join(proposal.answers)}]" if proposal.answers else ""
    return f"Proposed question ({proposal.policy}): {proposal.question}{hint}"


def chat_loop(
    session: ChatSearchSession, contact_sheet: str | None, stdin: TextIO, out: TextIO, questioner: Any = None,
) -> list[RoundResult]:
    """Interactive search: a description, then rounds driven by the witness's commands (CHAT_COMMANDS).

    Args:
        questioner: proposes each next question (``propose(session) -> ProposedQuestion | None``); None
            proposes nothing (the witness asks with ``ask QUESTION``).
    """
    def read(prompt: str) -> str | None:
        print(prompt, end="", file=out, flush=True)
        line = stdin.readline()
        return None if not line else line.strip()

    def show(result: RoundResult) -> None:
        print(format_round(result), file=out)
        if contact_sheet:
            save_contact_sheet(session.results, contact_sheet, title=f"top-{session.k} after every step")
            print(f"contact sheet: {contact_sheet}", file=out)

    description = read("Describe the person you saw: ")
    while description is not None and not description:
        description = read("Describe the person you saw (not empty): ")
    if description is None:
        return []
    show(session.start(description))
    proposed_after = -1  # how many rankings the current proposal has seen (proposed again only after a new one)
    while True:
        if proposed_after != len(session.results):
            proposal = questioner.propose(session) if questioner is not None else None
            proposed_after = len(session.results)
        print(_describe_proposal(proposal) if proposal else "No question proposed: ask your own (ask QUESTION).",
              file=out)
        line = read("> ")
        try:
            command = parse_witness_line(line or "")
            if command.kind == "done":
                break
            if command.kind == "help":
                print(CHAT_COMMANDS, file=out)
            elif command.kind == "reject":
                show(session.reject(command.ranks))
            elif command.kind == "ask":
                answer = read("Answer: ")
                if answer:
                    show(session.add_round(command.text, answer))
                else:
                    print("(no answer: round skipped)", file=out)
            elif proposal is None:
                raise ValueError("no question was proposed: type ask QUESTION to ask one")
            else:
                show(session.add_round(proposal.question, command.text))
        except ValueError as error:  # a typing slip costs one line, not the search
            print(f"error: {one_line(error)}", file=out)
    return list(session.results)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diana.processing.search.cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model_name_or_path", required=True,
                         help="DiaNA model folder (an export or a training output) or Hub id")
        sub.add_argument("--revision", help="Hub revision (commit) when --model_name_or_path is a Hub id")
        sub.add_argument("--tokenizer_dir", help="tokenizer folder when the model folder has no processor files")
        sub.add_argument("--device", help="cpu / cuda (default: cuda if available; under accelerate launch, "
                                          "each process's own device)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    index = commands.add_parser("index", help="encode a folder of images or a data set split into a gallery index")
    common(index)
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images_dir", help="folder of images (searched recursively)")
    source.add_argument("--data_dir", help="ChatPedes-layout folder; with --split")
    index.add_argument("--split", default="test", choices=CHATPEDES_SPLITS, help="split of --data_dir")
    index.add_argument("--validation_persons", type=int, default=0,
                       help="persons carved out of train into validation, as in the training run (--split validation)")
    index.add_argument("--validation_seed", type=int, default=0, help="seed of that carve-out")
    index.add_argument("--index_path", required=True,
                       help="the index: a folder of shards, or one file if the name ends in .safetensors")
    index.add_argument("--add", action="store_true", help="add new images to the existing --index_path")
    index.add_argument("--with_attributes", action="store_true",
                       help="also store attribute embeddings (attribute / fused modes)")
    index.add_argument("--batch_size", type=int, default=32, help="images per forward pass (per process)")
    index.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images (per process)")
    index.add_argument("--on_bad_image", choices=["error", "skip"], default="error",
                       help="unreadable image: stop with its name, or skip it and count it")
    index.add_argument("--ann", choices=["auto", "build", "none"], default="auto",
                       help=f"build the approximate-search structure and save it beside the shards: auto = from "
                            f"{ANN_MIN_IMAGES:,} images (folder indexes only)")

    search = commands.add_parser(
        "search", help="search an index by dialogue (interactive, or --dialogue_file FILE)",
        description="Search an index by dialogue: chat on stdin (the system proposes the questions), or "
                    "replay the dialogues of --dialogue_file.",
        epilog=CHAT_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(search)
    search.add_argument("--index_path", required=True, help="index made by the index command (a folder, or one .safetensors file)")
    search.add_argument("--dialogue_file", help="JSON dialogue file (batch); without it, chat on stdin")
    search.add_argument("--top_k", type=int, default=10, help="photos shown after every step")
    search.add_argument("--score_mode", choices=["global", "attribute", "fused"], help="default: the model's")
    search.add_argument("--backend", choices=["auto", "exact", "ann", "faiss"], default="auto",
                        help="exact (float16 scan + float32 re-score: the exact ranking), ann (the index's FAISS "
                             "inverted file, re-scored; global score only), auto (ann from 250,000 images in global "
                             "mode, else exact) or faiss (a FAISS index built at start-up)")
    search.add_argument("--faiss_factory", default="Flat",
                        help="FAISS index factory: Flat (exact) or e.g. IVF4096,Flat / HNSW32 for millions of images")
    search.add_argument("--contact_sheet", help="PNG with the top-k photos of every step (redrawn after each)")
    search.add_argument("--output_json", help="write every step's ranking to this JSON file")
    search.add_argument("--question_bank", help="JSON question bank the system proposes from (default: the "
                        "SynthPedes bank, the questions of the built-in data generator)")
    search.add_argument("--policy", default="info_gain", choices=CHAT_POLICIES,
                        help="how the next question is picked: info_gain (the bank question whose answers would "
                             "split the current top candidates most evenly), random, or none (you ask)")
    search.add_argument("--seed", type=int, default=0, help="seed of --policy random")
    search.add_argument("--rejection_weight", type=float,
                        help='how far "not N" moves the search from the rejected photos, in [0, 1] '
                             "(default: the model config's rejection_weight)")
    return parser


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses every argument that cannot work before the model loads (a 1.2B-parameter model takes a
    while), naming the flag, the value and the valid ones.

    Raises:
        UserInputError (ValueError).
    """
    require_device("--device", args.device)
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    require_path("--tokenizer_dir", args.tokenizer_dir, "folder")
    if args.command == "index":
        validate_index_arguments(args)
        return
    require_range("--top_k", args.top_k, 1)
    require_range("--rejection_weight", args.rejection_weight, 0, 1)
    require_path("--index_path", args.index_path, "folder" if Path(args.index_path).is_dir() else "file")  # a folder or one file
    require_path("--dialogue_file", args.dialogue_file, "file")
    require_path("--question_bank", args.question_bank, "file")
    if args.backend in ("faiss", "ann") and not faiss_available():
        raise UserInputError(f"--backend {args.backend} needs the faiss package (pip install faiss-cpu), or use "
                             "--backend exact")
    if args.backend in ("faiss", "ann") and args.score_mode not in (None, "global"):
        raise UserInputError(f"--score_mode {args.score_mode}: --backend {args.backend} scores the global embeddings "
                             "only (use --backend exact for attribute / fused)")


def build_questioner(args: argparse.Namespace) -> Any:
    """The questioner of --policy over --question_bank (None for --policy none)."""
    if args.policy == "none":
        return None
    bank = QuestionBank.load(args.question_bank) if args.question_bank else QuestionBank.from_synthpedes()
    return make_policy(args.policy, bank, **({"seed": args.seed} if args.policy == "random" else {}))


def validate_index_arguments(args: argparse.Namespace) -> None:
    """The `index` subcommand's checks (before the model loads)."""
    require_path("--images_dir", args.images_dir, "folder")
    require_path("--data_dir", args.data_dir, "folder")
    require_range("--batch_size", args.batch_size, 1)
    require_range("--num_workers", args.num_workers, 0)
    require_range("--validation_persons", args.validation_persons, 0)
    if args.split == "validation" and args.data_dir and args.validation_persons <= 0:
        raise UserInputError("--split validation needs --validation_persons N (as in the training run)")
    target = Path(args.index_path)
    if not args.add and target.exists():
        raise FileExistsError(f"{target} exists: use --add to extend it, or another --index_path")
    if args.add and not target.exists():
        raise FileNotFoundError(f"--add: there is no index {target} to extend yet")
    if args.ann == "build" and target.suffix == ".safetensors":
        raise UserInputError("--ann build: a single-file index (.safetensors) holds no ANN; give a folder --index_path")


def process_group() -> tuple[ProcessGroup, str | None]:
    """This process's rank among those `accelerate launch` started (rank 0 of 1 without it) and its device."""
    from accelerate import PartialState  # only the index subcommand needs it

    state = PartialState()
    return ProcessGroup(state.process_index, state.num_processes, state.wait_for_everyone), str(state.device)


def run_index(args: argparse.Namespace, out: TextIO) -> int:
    """The `index` subcommand: every process encodes a share, the main one merges and saves."""
    group, process_device = process_group()
    device = args.device or (process_device if group.world_size > 1 else None)
    model, processor = load_model_and_processor(args.model_name_or_path, args.tokenizer_dir, device, args.dtype,
                                                args.revision)
    target = Path(args.index_path)
    if args.add:
        index = GalleryIndex.load(target, model, processor)
    else:
        index = GalleryIndex.empty(model, processor, with_attributes=args.with_attributes)
    if args.images_dir:
        paths, ids = list_images(args.images_dir), None
    else:
        splits = load_chatpedes(args.data_dir, validation_persons=args.validation_persons,
                                validation_seed=args.validation_seed)
        if args.split not in splits:
            raise KeyError(f"--split {args.split!r}: {args.data_dir} has splits {sorted(splits)}")
        paths, ids = dataset_paths_and_ids(splits[args.split])
    started = time.perf_counter()
    report = index_images(index, paths, model, processor, group, target, ids=ids, batch_size=args.batch_size,
                          num_workers=args.num_workers, on_bad_image=args.on_bad_image)
    seconds = time.perf_counter() - started
    if not group.is_main:
        return 0
    wants_ann = args.ann == "build" or (args.ann == "auto" and len(index) >= ANN_MIN_IMAGES)
    if wants_ann and target.suffix != ".safetensors" and (index.ann is None or len(index.ann) != len(index)):
        index.build_ann()
        index.save(target)
    print(f"{target}: {report}; {len(index)} images in the index; encoded in {seconds:.2f} s"
          + (f" by {group.world_size} processes" if group.world_size > 1 else ""), file=out)
    if report.skipped_unreadable:
        print("unreadable: " + ", ".join(report.skipped_unreadable), file=out)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    validate_arguments(args)
    if args.command == "index":
        return run_index(args, out)
    dialogues = read_dialogues(args.dialogue_file) if args.dialogue_file else None
    # A bad question bank fails before the model loads.
    questioner = build_questioner(args) if not dialogues else None
    model, processor = load_model_and_processor(args.model_name_or_path, args.tokenizer_dir, args.device, args.dtype,
                                                args.revision)
    index = GalleryIndex.load(args.index_path, model, processor)
    session = ChatSearchSession(model, processor, index, k=args.top_k, mode=args.score_mode, backend=args.backend,
                                faiss_factory=args.faiss_factory, check_index=False,
                                rejection_weight=args.rejection_weight)
    if dialogues:
        results = run_dialogues(session, dialogues, args.contact_sheet, out)
    else:
        results = [chat_loop(session, args.contact_sheet, stdin, out, questioner)]
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            [[r.__dict__ for r in dialogue] for dialogue in results], indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
