"""One command for the benchmark suite: prints a table and writes JSON.

    python -m diana.training.benchmarks.run --suite cpu --output_file outputs/bench_cpu.json
    python -m diana.training.benchmarks.run --suite gpu --output_file $OUT/bench_gpu.json
    python -m diana.training.benchmarks.run --suite all --tiny --output_file /tmp/bench_tiny.json
    python -m diana.training.benchmarks.run --suite search --gallery_size 1000000 --output_file outputs/bench_search.json

`--tiny` shrinks every model and size so the whole thing runs on a CPU in seconds: it checks that
the scripts work, its numbers mean nothing. The GPU suite falls back to the CPU when no GPU is
visible (only sensible with `--tiny`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# Offline by construction: nothing here may reach the Hub (random weights, a local tokenizer).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from diana.processing.cli_errors import ArgumentParser, require_device, require_path, require_range, run_cli  # noqa: E402
from diana.training.benchmarks import cpu, gpu, harness, search


def build_parser() -> argparse.ArgumentParser:

    parser = ArgumentParser(prog="python -m diana.training.benchmarks.run", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("cpu", "gpu", "search", "all"), default="cpu",
                        help="which suite to run (all = cpu + gpu; the gpu suite runs the search figures too)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a check of the scripts, not a measurement")
    parser.add_argument("--output_file", required=True, help="JSON file to write")
    parser.add_argument("--device", default=None, help="GPU suite device (default cuda when available, else cpu)")
    parser.add_argument("--gallery_size", type=int, default=None,
                        help="search suite: synthetic gallery rows (default 1,000,000; 5,000 with --tiny)")
    gpu.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:

    args = build_parser().parse_args(argv)
    require_range("--train_batch_size", args.train_batch_size, 1)
    require_path("--tokenizer_dir", args.tokenizer_dir, "folder")
    require_device("--device", args.device)
    out_path = Path(args.output_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"command": "python -m diana.training.benchmarks.run " + " ".join(argv or sys.argv[1:])}
    tables = []
    if args.suite in ("cpu", "all"):
        payload["cpu"] = cpu.run_cpu_suite(tiny=args.tiny, tokenizer_dir=args.tokenizer_dir)
        tables.append(harness.format_table(cpu.table_rows(payload["cpu"]), "CPU suite" + (" (tiny)" if args.tiny else "")))
        harness.write_json(out_path, payload)  # keep the CPU figures if the GPU suite fails
    if args.suite == "search":
        require_range("--gallery_size", args.gallery_size, 10)
        payload["search"] = search.run_search_suite(tiny=args.tiny, device=args.device, tokenizer_dir=args.tokenizer_dir,
                                                    gallery_size=args.gallery_size)
        tables.append(harness.format_table(search.table_rows(payload["search"]), "search" + (" (tiny)" if args.tiny else "")))
    if args.suite in ("gpu", "all"):
        settings, fast = gpu.from_arguments(args)
        def save_partial(partial: dict[str, Any]) -> None:
            harness.write_json(out_path, {**payload, "gpu": partial})

        payload["gpu"] = gpu.run_gpu_suite(tiny=args.tiny, device=args.device, settings=settings, fast=fast,
                                           tokenizer_dir=args.tokenizer_dir, checkpoint=save_partial)
        tables.append(harness.format_table(gpu.table_rows(payload["gpu"]), "GPU suite" + (" (tiny)" if args.tiny else "")))
    harness.write_json(out_path, payload)
    print("\n\n".join(tables))
    print(f"\nJSON written to {out_path}")
    return payload


if __name__ == "__main__":
    run_cli(main)
