"""DiaNA benchmark suite: one command, a table on stdout and a JSON file.

`python -m diana.training.benchmarks.run [--suite cpu|gpu|all] [--tiny] --output_file FILE.json`

- `harness`: timing (warm-up, repeats, CUDA synchronisation, a time cap), FLOP counting
  (`torch.utils.flop_counter` on the meta device, so the paper config costs no compute), a
  measured bf16 matmul ceiling, peak memory, the largest batch that fits (binary search on OOM);
- `workloads`: ChatPedes-shaped dialogues and pedestrian-sized images;
- `naive`: the baseline of the official code (plain towers, padding to 400, every round prefix
  re-encoded), so every figure is a ratio measured in the same run;
- `cpu`, `gpu`: the two suites; `gpu_bundle.sh` packs the GPU suite with the wheels it needs.

Nothing here is part of the test suite's pass/fail: `tests/test_benchmarks.py` only checks that
the suites run on a tiny config and that the naive and fast paths agree numerically.
"""
