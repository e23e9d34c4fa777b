"""Search speed: exact vs FAISS top-k over a random gallery, and a chat round with the key/value
cache vs re-encoding the whole dialogue.

    python -m diana.training.benchmarks.search --gallery-size 200000 --dim 768
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import TextIO

import torch
from transformers import LlamaConfig, Swinv2Config

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.processing import build_processor
from diana.processing.cli_errors import ArgumentParser, require_model_folder, require_path, require_range, run_cli
from diana.processing.model_loading import load_model_and_processor
from diana.processing.search import ChatSearchSession, GalleryIndex, exact_topk, faiss_available
from diana.processing.search.fingerprints import model_fingerprint, processor_fingerprint

from .harness import synchronize, time_fn


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diana.training.benchmarks.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="DiaNA folder (default: a random model with a mid-size Llama tower)")
    parser.add_argument("--tokenizer-dir", help="tokenizer folder for the random model")
    parser.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--gallery-size", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768, help="embedding width of the random gallery")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def benchmark(args: argparse.Namespace, out: TextIO) -> None:
    """Print the two speed claims of the search module as measured figures."""
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


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_range("--gallery-size", args.gallery_size, max(1, args.top_k))
    require_range("--dim", args.dim, 1)
    require_range("--repeats", args.repeats, 1)
    if args.model:
        require_model_folder("--model", args.model, allow_hub_id=True)
    require_path("--tokenizer-dir", args.tokenizer_dir, "folder")
    benchmark(args, out or sys.stdout)
    return 0


if __name__ == "__main__":
    run_cli(main)
