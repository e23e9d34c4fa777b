"""Terminal front end of the chat search: build / extend a gallery index, then search it by dialogue.

    # encode a folder of photos once (or a data set split), then add more later
    python -m diana.processing.search_cli index --model MODEL_DIR --images photos/ --output gallery.safetensors
    python -m diana.processing.search_cli index --model MODEL_DIR --images more/ --output gallery.safetensors --add
    python -m diana.processing.search_cli index --model MODEL_DIR --chatpedes DATA_DIR --split test --output test.safetensors

    # chat interactively (stdin), or replay dialogues from a JSON file
    python -m diana.processing.search_cli search --model MODEL_DIR --index gallery.safetensors
    python -m diana.processing.search_cli search --model MODEL_DIR --index gallery.safetensors \
        --dialogue dialogue.json --top-k 8 --contact-sheet top.png

The ranking is printed after every round; ``--contact-sheet`` saves a picture with one row per
round and the top-k photos labelled with rank and score. A dialogue file holds one dialogue in any
form the processor accepts (ChatPedes rounds, (question, answer) pairs, {"question", "answer"}
dicts, a plain description) or ``{"dialogues": [dialogue, ...]}`` for several.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from .cli_errors import (
    ArgumentParser, UserInputError, looks_like_hub_id, require_device, require_model_folder, require_path, require_range,
    run_cli,
)
from .search import ChatSearchSession, GalleryIndex, RoundResult, faiss_available, save_contact_sheet

CHATPEDES_SPLITS = ("train", "validation", "test")


def load_model_and_processor(model_dir: str, tokenizer_dir: str | None = None, device: str | None = None,
                             dtype: str = "float32", revision: str | None = None) -> tuple[Any, Any]:
    """A DiaNA model (eval mode) and processor from a local folder or a Hub repository id.

    A folder without processor files (e.g. a converted official checkpoint) gets the default
    fine-tuning processor at the model's image size.
    """
    from diana.modeling_diana import DiaNAModel

    from . import build_processor
    from .processing_diana import DiaNAProcessor

    folder = Path(model_dir)
    require_model_folder("--model", model_dir, allow_hub_id=True)
    is_hub_id = looks_like_hub_id(model_dir)
    model = DiaNAModel.from_pretrained(model_dir, dtype=getattr(torch, dtype), revision=revision).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if is_hub_id or (folder / "processor_config.json").is_file():
        processor = DiaNAProcessor.from_pretrained(model_dir, revision=revision)
    else:
        size = model.config.vision_config.image_size
        processor = build_processor(tokenizer_dir=tokenizer_dir, image_size=tuple(size) if isinstance(size, (list, tuple)) else (size, size))
    return model, processor


def read_dialogues(path: str | Path) -> list[Any]:
    """Dialogues of a JSON file: one dialogue, or ``{"dialogues": [...]}``; each is checked."""
    from .processing_diana import normalize_dialogue

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
    """The ranking after one round, one line per photo."""
    flag = "  [truncated at max_length]" if result.truncated else ""
    lines = [f"round {result.round_index} (+{result.new_tokens} tokens){flag}",
             f"  Q: {result.question}", f"  A: {result.answer}"]
    for rank, (score, path, person) in enumerate(zip(result.scores, result.paths, result.ids), start=1):
        label = f"  (id {person})" if person >= 0 else ""
        lines.append(f"  {rank:>3}. {score:+.4f}  {path}{label}")
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


def chat_loop(session: ChatSearchSession, contact_sheet: str | None, stdin: TextIO, out: TextIO) -> list[RoundResult]:
    """Interactive search: a description, then question/answer rounds until an empty question."""
    def ask(prompt: str) -> str | None:
        print(prompt, end="", file=out, flush=True)
        line = stdin.readline()
        return None if not line else line.strip()

    description = ask("Describe the person you saw: ")
    while description is not None and not description:
        description = ask("Describe the person you saw (not empty): ")
    if description is None:
        return []
    print(format_round(session.start(description)), file=out)
    while True:
        if contact_sheet:
            save_contact_sheet(session.results, contact_sheet, title=f"top-{session.k} per round")
        question = ask("Next question (empty line to finish): ")
        if not question:
            break
        answer = ask("Answer: ")
        if not answer:
            print("(no answer: round skipped)", file=out)
            continue
        print(format_round(session.add_round(question, answer)), file=out)
    if contact_sheet:
        print(f"contact sheet: {contact_sheet}", file=out)
    return list(session.results)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diana.processing.search_cli", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help="DiaNA model folder (an export or a training output) or Hub id")
        sub.add_argument("--revision", help="Hub revision (commit) when --model is a Hub id")
        sub.add_argument("--tokenizer-dir", help="tokenizer folder when the model folder has no processor files")
        sub.add_argument("--device", help="cpu / cuda (default: cuda if available)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    index = commands.add_parser("index", help="encode a folder of images or a data set split into an index file")
    common(index)
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively)")
    source.add_argument("--chatpedes", metavar="DATA_DIR", help="ChatPedes-layout folder; with --split")
    index.add_argument("--split", default="test", choices=CHATPEDES_SPLITS, help="split of --chatpedes")
    index.add_argument("--validation-persons", type=int, default=0,
                       help="persons carved out of train into validation, as in the training run (--split validation)")
    index.add_argument("--validation-seed", type=int, default=0, help="seed of that carve-out")
    index.add_argument("--output", required=True, help="index file (.safetensors)")
    index.add_argument("--add", action="store_true", help="add new images to the existing --output index")
    index.add_argument("--with-attributes", action="store_true", help="also store attribute embeddings (attribute / fused modes)")
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                       help="unreadable image: stop with its name, or skip it and count it")

    search = commands.add_parser("search", help="search an index by dialogue (interactive, or --dialogue FILE)")
    common(search)
    search.add_argument("--index", required=True, help="index file made by the index command")
    search.add_argument("--dialogue", help="JSON dialogue file (batch); without it, chat on stdin")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--mode", choices=["global", "attribute", "fused"], help="score mode (default: the model's)")
    search.add_argument("--backend", choices=["exact", "faiss"], default="exact",
                        help="exact chunked matrix products, or FAISS (global score only)")
    search.add_argument("--faiss-factory", default="Flat",
                        help="FAISS index factory: Flat (exact) or e.g. IVF4096,Flat / HNSW32 for millions of images")
    search.add_argument("--contact-sheet", help="PNG with the top-k photos of every round")
    search.add_argument("--output-json", help="write every round's ranking to this JSON file")
    bench = commands.add_parser("benchmark", help="print timings: exact vs FAISS top-k, cached rounds vs re-encoding")
    bench.add_argument("--model", help="DiaNA folder (default: a random model with a mid-size Llama tower)")
    bench.add_argument("--tokenizer-dir", help="tokenizer folder for the random model")
    bench.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--gallery-size", type=int, default=200_000)
    bench.add_argument("--dim", type=int, default=768, help="embedding width of the random gallery")
    bench.add_argument("--top-k", type=int, default=10)
    bench.add_argument("--repeats", type=int, default=5)
    return parser


def benchmark(args: argparse.Namespace, out: TextIO) -> None:
    """Print the two speed claims of the search module as measured figures."""
    import platform
    import time

    # The benchmark suite's timer: median of timed calls after a warm-up, CUDA synchronised around each.
    from diana.training.benchmarks.harness import synchronize, time_fn

    from .search import exact_topk, faiss_available

    device = "cpu"  # the random gallery below lives on the host

    def timed(function) -> float:
        return time_fn(function, device=device, warmup=1, repeats=args.repeats, max_seconds=float("inf")).median_s

    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}", file=out)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery_size, args.dim), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(1, args.dim), dim=-1)
    index = GalleryIndex(gallery, [str(i) for i in range(args.gallery_size)], "benchmark", "benchmark")
    exact = timed(lambda: exact_topk(query, gallery, args.top_k))
    print(f"exact top-{args.top_k} over {args.gallery_size:,} x {args.dim}: {exact * 1e3:.1f} ms / query", file=out)
    if faiss_available():
        index.search(query, args.top_k, backend="faiss")  # builds the FAISS index once
        flat = timed(lambda: index.search(query, args.top_k, backend="faiss"))
        same = torch.equal(index.search(query, args.top_k, backend="faiss")[1], exact_topk(query, gallery, args.top_k)[1])
        print(f"FAISS IndexFlatIP top-{args.top_k}: {flat * 1e3:.1f} ms / query (same ranking: {same})", file=out)

    if args.model:
        model, processor = load_model_and_processor(args.model, args.tokenizer_dir, args.device, args.dtype)
    else:
        from transformers import LlamaConfig, Swinv2Config

        from diana.modeling_diana import DiaNAConfig, DiaNAModel

        from . import build_processor

        # Tiny image tower (unused here), a mid-size dialogue tower: the round cost is the Llama pass.
        config = DiaNAConfig(
            vision_config=Swinv2Config(image_size=[64, 32], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
            text_config=LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                    num_key_value_heads=4, vocab_size=128256, max_position_embeddings=1024,
                                    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004),
            projection_dim=128, num_attribute_queries=4, refiner_num_heads=4,
        )
        model = DiaNAModel(config).eval()
        processor = build_processor(tokenizer_dir=args.tokenizer_dir, image_size=(64, 32))
    from .search import model_fingerprint, processor_fingerprint

    index = GalleryIndex(torch.nn.functional.normalize(torch.randn(1000, model.config.projection_dim), dim=-1),
                         [str(i) for i in range(1000)], model_fingerprint(model), processor_fingerprint(processor))
    rounds = [("Please describe the person you saw.", "A woman in her thirties wearing a long red wool coat, black "
               "trousers and black ankle boots, walking quickly.")] + [
        (f"Question {r}: what else did you notice about her?", f"Detail {r}: she had a small black leather backpack, "
         "long brown hair tied in a ponytail, and white headphones around her neck.") for r in range(2, 9)]
    device = next(model.parameters()).device
    print(f"dialogue tower: hidden {model.config.text_config.hidden_size}, {model.config.text_config.num_hidden_layers} "
          f"layers, {args.dtype} on {device}", file=out)
    print("round  tokens(total/new)  cached round ms  re-encode ms", file=out)
    session = ChatSearchSession(model, processor, index, k=args.top_k, mode="global", check_index=False)
    for number in range(1, len(rounds) + 1):
        def cached_round():
            session.reset()
            for question, answer in rounds[: number - 1]:
                session.add_round(question, answer)
        cached_round()
        times = []
        for _ in range(args.repeats):
            cached_round()  # replay the earlier rounds untimed; time only the new one
            synchronize(device)
            start = time.perf_counter()
            result = session.add_round(*rounds[number - 1])
            synchronize(device)
            times.append(time.perf_counter() - start)
        cached = sorted(times)[len(times) // 2]
        batch = processor(dialogues=[rounds[:number]], return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}

        def full() -> None:
            with torch.no_grad():
                encoding = model.encode_dialogues(batch["input_ids"], batch["attention_mask"])
                index.search(encoding.text_embeds.float(), args.top_k)
        rebuild = timed(full)
        total = int(batch["attention_mask"].sum())
        print(f"{number:>5}  {total:>6}/{result.new_tokens:<10} {cached * 1e3:>15.1f}  {rebuild * 1e3:>12.1f}", file=out)


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses every argument that cannot work before the model loads (a 1.2B-parameter model takes a
    while), naming the flag, the value and the valid ones.

    Raises:
        UserInputError (ValueError).
    """
    require_device("--device", args.device)
    if args.command != "index":
        require_range("--top-k", args.top_k, 1)
    if args.command == "benchmark":
        require_range("--gallery-size", args.gallery_size, max(1, args.top_k))
        require_range("--dim", args.dim, 1)
        require_range("--repeats", args.repeats, 1)
        if args.model:
            require_model_folder("--model", args.model, allow_hub_id=True)
        require_path("--tokenizer-dir", args.tokenizer_dir, "folder")
        return
    require_model_folder("--model", args.model, allow_hub_id=True)
    require_path("--tokenizer-dir", args.tokenizer_dir, "folder")
    if args.command == "index":
        require_path("--images", args.images, "folder")
        require_path("--chatpedes", args.chatpedes, "folder")
        require_range("--batch-size", args.batch_size, 1)
        require_range("--validation-persons", args.validation_persons, 0)
        if args.split == "validation" and args.chatpedes and args.validation_persons <= 0:
            raise UserInputError("--split validation needs --validation-persons N (as in the training run)")
        output = Path(args.output)
        if not args.add and output.exists():
            raise FileExistsError(f"{output} exists: use --add to extend it, or another --output")
        if args.add and not output.is_file():
            raise FileNotFoundError(f"--add: there is no index {output} to extend yet")
        return
    require_path("--index", args.index, "file")
    require_path("--dialogue", args.dialogue, "file")
    if args.backend == "faiss" and not faiss_available():
        raise UserInputError("--backend faiss needs the faiss package (pip install faiss-cpu), or use --backend exact")
    if args.backend == "faiss" and args.mode not in (None, "global"):
        raise UserInputError(f"--mode {args.mode}: --backend faiss scores the global embeddings only (use --backend "
                             "exact for attribute / fused)")


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    validate_arguments(args)
    if args.command == "benchmark":
        benchmark(args, out)
        return 0
    output = Path(args.output) if args.command == "index" else None
    dialogues = read_dialogues(args.dialogue) if args.command == "search" and args.dialogue else None
    model, processor = load_model_and_processor(args.model, args.tokenizer_dir, args.device, args.dtype, args.revision)
    if args.command == "index":
        if args.add:
            index = GalleryIndex.load(output, model, processor)
        else:
            index = GalleryIndex.empty(model, processor, with_attributes=args.with_attributes)
        if args.images:
            report = index.add_images(args.images, model, processor, batch_size=args.batch_size, on_bad_image=args.on_bad_image)
        else:
            from .chatpedes import load_chatpedes

            splits = load_chatpedes(args.chatpedes, validation_persons=args.validation_persons,
                                    validation_seed=args.validation_seed)
            if args.split not in splits:
                raise KeyError(f"--split {args.split!r}: {args.chatpedes} has splits {sorted(splits)}")
            report = index.add_dataset(splits[args.split], model, processor, batch_size=args.batch_size,
                                       on_bad_image=args.on_bad_image)
        index.save(output)
        print(f"{output}: {report}; {len(index)} images in the index", file=out)
        if report.skipped_unreadable:
            print("unreadable: " + ", ".join(report.skipped_unreadable), file=out)
        return 0

    index = GalleryIndex.load(args.index, model, processor)
    session = ChatSearchSession(model, processor, index, k=args.top_k, mode=args.mode, backend=args.backend,
                                faiss_factory=args.faiss_factory, check_index=False)
    if args.dialogue:
        results = run_dialogues(session, dialogues, args.contact_sheet, out)
    else:
        results = [chat_loop(session, args.contact_sheet, stdin, out)]
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            [[r.__dict__ for r in dialogue] for dialogue in results], indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
