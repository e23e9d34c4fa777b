"""Search at gallery scale, every figure beside its naive baseline in the same run: the machine's
memory bandwidth, exact top-k (plain float32 chunked products vs the float16 scan + exact re-score),
the ANN (FAISS inverted file) with recall@k against exact, one chat round (tokens, search and the
questioner's proposal) on the main job's model size, and indexing images/s with 1 and 2 processes
(``accelerate launch``).

    python -m diana.training.benchmarks.search --gallery_size 1000000 --output_file outputs/bench_search.json
    python -m diana.training.benchmarks.search --tiny --output_file /tmp/search_tiny.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.processing import build_processor
from diana.processing.cli_errors import ArgumentParser, require_device, require_path, require_range, run_cli
from diana.processing.search import ChatSearchSession, GalleryIndex, faiss_available
from diana.processing.search.ann import recall_at_k
from diana.processing.search.questioner import QuestionBank, make_policy
from diana.processing.search.topk import scan_blocks

from . import harness, naive

MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "synthpedes_small.yaml"
ROUNDS = [("Please describe the person you saw.", "A woman in her thirties wearing a long red wool coat, black "
           "trousers and black ankle boots, walking quickly.")] + [
    (f"Question {r}: what else did you notice about her?", f"Detail {r}: a small black leather backpack, long brown "
     "hair tied in a ponytail, white headphones around her neck.") for r in range(2, 7)]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m diana.training.benchmarks.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_file", help="JSON file to write (default: print only)")
    parser.add_argument("--gallery_size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768, help="embedding width of the synthetic gallery")
    parser.add_argument("--images_per_person", type=int, default=4, help="gallery images drawn around each person")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--recall_queries", type=int, default=200, help="queries of the recall@k figure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index_images", type=int, default=256, help="images encoded by the indexing figure (0: skip)")
    parser.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: the project cache)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a check of the script, not a measurement")
    return parser


def clustered_gallery(size: int, dim: int, per_person: int, seed: int = 0,
                      persons_per_group: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings drawn like real ones: persons who share a look (a group: a clothing
    colour, a bag) lie near their group's centre (cosine ~0.6), ``per_person`` images lie near their
    person's (cosine ~0.7). Returns the gallery (rows in person order) and the person centres."""
    generator = torch.Generator().manual_seed(seed)
    persons = -(-size // per_person)
    groups = -(-persons // persons_per_group)
    group_centres = torch.nn.functional.normalize(torch.randn(groups, dim, generator=generator), dim=-1)
    person_noise = torch.randn(persons, dim, generator=generator) / dim ** 0.5
    centres = torch.nn.functional.normalize(
        group_centres[torch.arange(persons) // persons_per_group] + 0.8 * person_noise, dim=-1)
    gallery = torch.empty(size, dim)
    for start in range(0, size, 65536):
        rows = torch.arange(start, min(start + 65536, size))
        noise = torch.randn(rows.numel(), dim, generator=generator) / dim ** 0.5
        gallery[rows] = torch.nn.functional.normalize(centres[rows // per_person] + 1.0 * noise, dim=-1)
    return gallery, centres


def person_queries(centres: torch.Tensor, count: int, seed: int = 1) -> torch.Tensor:
    """Dialogue-like queries: a person's centre seen through noise (as a description is)."""
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randint(0, centres.shape[0], (count,), generator=generator)
    noise = torch.randn(count, centres.shape[1], generator=generator) / centres.shape[1] ** 0.5
    return torch.nn.functional.normalize(centres[picked] + 0.8 * noise, dim=-1)


def memory_bandwidth(buffer: torch.Tensor, repeats: int) -> dict[str, float]:
    """Plain read (a sum) and copy of ``buffer`` (on its device), in bytes/s: the ceiling of any scan of it."""
    target = torch.empty_like(buffer)
    flat = buffer.view(torch.float32) if buffer.dtype == torch.float16 and buffer.shape[-1] % 2 == 0 else buffer
    device = buffer.device
    read = harness.time_fn(lambda: flat.sum(), device=device, warmup=1, repeats=repeats).min_s
    copy = harness.time_fn(lambda: target.copy_(buffer), device=device, warmup=1, repeats=repeats).min_s
    size = buffer.numel() * buffer.element_size()
    return {"bytes": size, "read_bytes_per_s": size / read, "copy_bytes_per_s": 2 * size / copy}


def exact_figures(index: GalleryIndex, gallery: torch.Tensor, query: torch.Tensor, k: int, repeats: int,
                  device: str) -> dict[str, Any]:
    """Naive float32 chunked products (the previous exact_topk) vs the float16 scan + exact re-score."""
    def timed(fn):
        return harness.time_fn(fn, device=device, warmup=1, repeats=repeats, max_seconds=120).min_s

    plain = timed(lambda: naive.plain_exact_topk(query, gallery, k))
    fast = timed(lambda: index.search(query, k, backend="exact"))
    scan_only = timed(lambda: scan_blocks(query, [b.scan for b in index.blocks], 1024))
    same = torch.equal(index.search(query, k)[1], naive.plain_exact_topk(query, gallery, k)[1])
    scanned = sum(b.scan.numel() * b.scan.element_size() for b in index.blocks)
    return {"naive_fp32_s": plain, "fp16_rescore_s": fast, "fp16_scan_only_s": scan_only, "same_ranking": same,
            "bytes_scanned": scanned, "scan_bytes_per_s": scanned / fast, "naive_bytes_per_s": gallery.numel() * 4 / plain}


def ann_figures(index: GalleryIndex, gallery: torch.Tensor, queries: torch.Tensor, k: int,
                repeats: int) -> dict[str, Any]:
    """Build time, one-query time and recall@k of the ANN against the exact ranking."""
    start = time.perf_counter()
    ann = index.build_ann()
    build = time.perf_counter() - start
    one = harness.time_fn(lambda: index.search(queries[:1], k, backend="ann"), warmup=1, repeats=max(repeats, 20)).median_s
    # The truth of many queries: batched float32 products (one matrix product per chunk, fast) rank as
    # the exact search does up to last-bit ties, which recall@k does not notice.
    truth = naive.plain_exact_topk(queries, gallery, k)[1]
    found = index.search(queries, k, backend="ann")[1]
    return {"factory": ann.factory, "nprobe": ann.nprobe, "build_s": build, "query_s": one,
            f"recall_at_{k}": recall_at_k(found, truth), "recall_queries": queries.shape[0]}


def main_job_model(tiny: bool, tokenizer_dir: str | None) -> tuple[DiaNAModel, Any]:
    """A random model of the main job's size (training/configs/models/synthpedes_small.yaml)."""
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    model = DiaNAModel(DiaNAConfig(**config)).eval()
    processor = build_processor(tokenizer_dir=tokenizer_dir, image_size=tuple(config["vision_config"]["image_size"]))
    return model, processor


def chat_round_figures(index: GalleryIndex, model: DiaNAModel, processor: Any, k: int, repeats: int,
                       backend: str) -> dict[str, Any]:
    """One chat round as the witness waits for it, per round: the new tokens through the tower on the
    session's cache + the gallery search (`add_round`), then the questioner's proposal of the next
    question (`info_gain` over SynthPedes' bank and the top 50, on the search the round made).

    A projection to the gallery's width stands in for the model's own (a random model's 64-wide
    vectors cannot search a 768-wide gallery); it costs one small matrix product.
    """
    session = ChatSearchSession(model, processor, index, k=k, mode="global", backend=backend, check_index=False)
    questioner = make_policy("info_gain", QuestionBank.from_synthpedes())
    widen = torch.nn.Linear(model.config.projection_dim, index.dim, bias=False).to(next(model.parameters()).device)
    encode_text = model.encode_text_tokens

    def widened(*args, **kwargs):
        encoding = encode_text(*args, **kwargs)
        encoding.text_embeds = torch.nn.functional.normalize(widen(encoding.text_embeds), dim=-1)
        return encoding

    model.encode_text_tokens = widened
    per_round = []
    try:
        for number in range(1, len(ROUNDS) + 1):
            searches, proposals = [], []
            for _ in range(repeats):
                session.reset()
                for question, answer in ROUNDS[: number - 1]:
                    session.add_round(question, answer)
                start = time.perf_counter()
                result = session.add_round(*ROUNDS[number - 1])
                middle = time.perf_counter()
                questioner.propose(session)
                searches.append(middle - start)
                proposals.append(time.perf_counter() - middle)
            median = len(searches) // 2
            round_s, propose_s = sorted(searches)[median], sorted(proposals)[median]
            per_round.append({"round": number, "new_tokens": result.new_tokens, "round_s": round_s,
                              "propose_s": propose_s, "s": round_s + propose_s})
    finally:
        del model.encode_text_tokens
    return {"backend": backend, "text_hidden": model.config.text_config.hidden_size,
            "text_layers": model.config.text_config.num_hidden_layers, "rounds": per_round,
            "max_round_s": max(r["s"] for r in per_round)}


def indexing_figures(model: DiaNAModel, processor: Any, count: int, processes: tuple[int, ...],
                     use_cpu: bool = True) -> dict[str, Any]:
    """Images/s of the `index` command under `accelerate launch` with each number of ``processes``."""
    results: dict[str, Any] = {"images": count}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        rng = np.random.default_rng(0)
        (root / "photos").mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (256, 128, 3), dtype=np.uint8)).save(root / "photos" / f"{i:05d}.jpg")
        for number in processes:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(number),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "diana.processing.search.cli", "index", "--model_name_or_path", str(root / "model"),
                       "--images_dir", str(root / "photos"), "--index_path", str(root / f"index_{number}"),
                       "--num_workers", "1", "--batch_size", "32"]
            environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // number))}
            if use_cpu:
                environment["ACCELERATE_USE_CPU"] = "1"
            done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800, check=False)
            if done.returncode:
                raise RuntimeError(f"indexing with {number} processes failed: {done.stderr[-2000:]}")
            seconds = float(re.search(r"encoded in ([0-9.]+) s", done.stdout).group(1))
            results[f"{number}_process_images_per_s"] = count / seconds
    return results


def run_search_suite(*, tiny: bool = False, device: str | None = None, tokenizer_dir: str | None = None,
                     gallery_size: int | None = None, dim: int | None = None, top_k: int = 10, repeats: int = 5,
                     recall_queries: int | None = None, index_images: int | None = None,
                     images_per_person: int = 4) -> dict[str, Any]:
    """Every search figure; see the module docstring."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = gallery_size or (5000 if tiny else 1_000_000)
    dim = dim or (64 if tiny else 768)
    results: dict[str, Any] = {"environment": harness.environment(device), "load_average": os.getloadavg(),
                               "gallery_size": size, "dim": dim, "top_k": top_k}
    gallery, centres = clustered_gallery(size, dim, images_per_person)
    index = GalleryIndex(gallery, [str(i) for i in range(size)], "benchmark", "benchmark")
    for block in index.blocks:  # the scanned copy lives where the search runs; exact rows stay on the host
        block.scan = block.scan.to(device)
    results["bandwidth"] = memory_bandwidth(index.blocks[0].scan, repeats)
    queries = person_queries(centres, recall_queries or (20 if tiny else 200))
    query = queries[:1].to(device)
    results["exact"] = exact_figures(index, gallery.to(device) if device != "cpu" else gallery, query, top_k, repeats, device)
    results["exact"]["fraction_of_read_bandwidth"] = (
        results["exact"]["scan_bytes_per_s"] / results["bandwidth"]["read_bytes_per_s"])
    if faiss_available():
        results["ann"] = ann_figures(index, gallery, queries, top_k, repeats)
        results["ann"]["speedup_over_naive_exact"] = results["exact"]["naive_fp32_s"] / results["ann"]["query_s"]
    model, processor = main_job_model(tiny, tokenizer_dir)
    model.to(device)
    backend = "ann" if "ann" in results else "exact"
    threads = torch.get_num_threads()
    results["chat_round"] = chat_round_figures(index, model, processor, top_k, repeats, backend)
    if device == "cpu" and threads > 1:
        # A 64-wide tower is latency-bound: on a busy machine one thread need not wait for a second core.
        torch.set_num_threads(1)
        try:
            results["chat_round_one_thread"] = chat_round_figures(index, model, processor, top_k, repeats, backend)
        finally:
            torch.set_num_threads(threads)
    results["load_average_end"] = os.getloadavg()
    del index, gallery
    count = index_images if index_images is not None else (16 if tiny else 256)
    if count:  # two processes share the CPU; a GPU machine here has one GPU, so one process
        results["indexing"] = indexing_figures(model.cpu(), processor, count, (1, 2) if device == "cpu" else (1,),
                                               use_cpu=device == "cpu")
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    fmt = harness.fmt
    size = f"{results['gallery_size']:,} x {results['dim']}"
    bandwidth, exact = results["bandwidth"], results["exact"]
    rows = [
        ("memory bandwidth: read / copy", fmt(bandwidth["read_bytes_per_s"] / 1e9, "GB/s"),
         f"copy {fmt(bandwidth['copy_bytes_per_s'] / 1e9, 'GB/s')} over {bandwidth['bytes'] / 1e9:.2f} GB; "
         f"load {results['load_average'][0]:.1f} -> {results['load_average_end'][0]:.1f}"),
        (f"exact top-{results['top_k']}, naive fp32 (1 query)", fmt(exact["naive_fp32_s"] * 1e3, "ms"),
         f"{size}: {fmt(exact['naive_bytes_per_s'] / 1e9, 'GB/s')}"),
        (f"exact top-{results['top_k']}, fp16 scan + fp32 re-score", fmt(exact["fp16_rescore_s"] * 1e3, "ms"),
         f"{fmt(exact['scan_bytes_per_s'] / 1e9, 'GB/s')} = {100 * exact['fraction_of_read_bandwidth']:.0f}% of read "
         f"bandwidth; {fmt(exact['naive_fp32_s'] / exact['fp16_rescore_s'], 'x')} naive; same ranking: {exact['same_ranking']}"),
    ]
    if "ann" in results:
        ann = results["ann"]
        recall = ann[f"recall_at_{results['top_k']}"]
        rows.append((f"ANN {ann['factory']} nprobe {ann['nprobe']} (1 query)", fmt(ann["query_s"] * 1e3, "ms"),
                     f"recall@{results['top_k']} {recall:.3f} ({ann['recall_queries']} queries); "
                     f"{fmt(ann['speedup_over_naive_exact'], 'x')} naive exact; build {fmt(ann['build_s'], 's')}"))
    for key, threads in (("chat_round", "all threads"), ("chat_round_one_thread", "1 thread")):
        if key in results:
            chat = results[key]
            slowest = max(chat["rounds"], key=lambda r: r["s"])
            note = (f"slowest of {len(chat['rounds'])} rounds (medians of repeats): round {fmt(slowest['round_s'] * 1e3, 'ms')}"
                    f" + proposal {fmt(slowest['propose_s'] * 1e3, 'ms')}; tower L{chat['text_layers']} "
                    f"h{chat['text_hidden']}, {threads}")
            rows.append((f"chat round (tower on cache + {chat['backend']} search + info_gain proposal)",
                         fmt(chat["max_round_s"] * 1e3, "ms"), note))
    if "indexing" in results:
        indexing = results["indexing"]
        two = f"2 processes {fmt(indexing['2_process_images_per_s'], 'img/s')}; " if "2_process_images_per_s" in indexing else ""
        rows.append(("indexing (index command), 1 process", fmt(indexing["1_process_images_per_s"], "img/s"),
                     f"{two}{indexing['images']} images 256x128 JPEG, accelerate launch, 1 decode worker each"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    require_range("--gallery_size", args.gallery_size, max(1, args.top_k))
    require_range("--dim", args.dim, 2)
    require_range("--repeats", args.repeats, 1)
    require_range("--recall_queries", args.recall_queries, 1)
    require_range("--index_images", args.index_images, 0)
    require_device("--device", args.device)
    require_path("--tokenizer_dir", args.tokenizer_dir, "folder")
    results = run_search_suite(
        tiny=args.tiny, device=args.device, tokenizer_dir=args.tokenizer_dir,
        gallery_size=args.gallery_size if not args.tiny else None, dim=args.dim if not args.tiny else None,
        top_k=args.top_k, repeats=args.repeats, recall_queries=None if args.tiny else args.recall_queries,
        index_images=None if args.tiny else args.index_images, images_per_person=args.images_per_person,
    )
    print(harness.format_table(table_rows(results), "search" + (" (tiny)" if args.tiny else "")))
    if args.output_file:
        harness.write_json(Path(args.output_file), {"search": results})
    return results


if __name__ == "__main__":
    run_cli(main)
