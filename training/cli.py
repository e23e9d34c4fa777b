"""The `diana` command: one entry point whose subcommands are the project's commands.

    diana train --config stage2_synthpedes_small ...   (= python training/run_stage.py; for several
                                                        processes: accelerate launch training/run_stage.py)
    diana evaluate --model_name_or_path DIR ...        (= python -m diana.training.evaluation.evaluate_model)
    diana index ... / diana search ...                 (= python -m diana.processing.search.cli index|search)
    diana export --model_name_or_path DIR ...          (= python -m diana.hub_cards.export)

Each subcommand hands the rest of the line to that command's own parser, so `diana SUB --help` shows
its flags, and its errors are the command's one-line errors (exit status 2).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

from diana.processing.cli_errors import UserInputError, run_cli

# subcommand -> (module whose `main(argv)` runs it, arguments put before the user's, what it does)
SUBCOMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "setup-tokenizer": ("diana.processing.tokenizer_setup", (), "fetch and convert the Llama-3.2 tokenizer"),
    "synthpedes": ("diana.processing.data.synthpedes", (), "generate SynthPedes data in both layouts"),
    "train": ("diana.training.run_stage", (), "train one stage (0, 1 or 2) from a preset"),
    "main-job": ("diana.training.main_job", (), "the whole SynthPedes job of `make main`"),
    "evaluate": ("diana.training.evaluation.evaluate_model", (), "per-round retrieval evaluation of a model"),
    "evaluate-interactive": ("diana.training.evaluation.interactive", (),
                             "simulated-witness evaluation of questioner policies, per round"),
    "probe": ("diana.training.evaluation.attribute_probe", (), "attribute probe of a model's embeddings (SynthPedes)"),
    "index": ("diana.processing.search.cli", ("index",), "index a folder of photos or a data set split"),
    "search": ("diana.processing.search.cli", ("search",), "chat with an indexed gallery"),
    "build-question-bank": ("diana.processing.search.question_bank", ("build",),
                            "build a questioner's question bank (JSON) from dialogues or SynthPedes"),
    "export": ("diana.hub_cards.export", (), "export a Hub-ready folder (card, code, checks), optionally push"),
    "convert": ("diana.hub_cards.convert_official_checkpoint", (), "convert an official DiaNA checkpoint"),
    "benchmark": ("diana.training.benchmarks.run", (), "the CPU / GPU benchmark suites"),
}
# How `diana --help` groups them (every subcommand once).
GROUPS: dict[str, tuple[str, ...]] = {
    "set up and data": ("setup-tokenizer", "synthpedes"),
    "train and evaluate": ("train", "main-job", "evaluate", "evaluate-interactive", "probe"),
    "search a gallery": ("index", "search", "build-question-bank"),
    "publish": ("export", "convert"),
    "measure": ("benchmark",),
}
# Errors that a subcommand raises only for what the user can fix, beyond the shared ones.
_ALSO_USER_ERRORS: dict[str, tuple[type[BaseException], ...]] = {"setup-tokenizer": (RuntimeError,)}


def usage() -> str:
    """The `diana --help` text: one line per subcommand, in groups."""
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: diana SUBCOMMAND [ARGS ...]   (diana SUBCOMMAND --help for its flags)"]
    for group, names in GROUPS.items():
        lines += ["", f"{group}:"] + [f"  {name:<{width}}  {SUBCOMMANDS[name][2]}" for name in names]
    return "\n".join(lines)


def resolve(argv: Sequence[str]) -> tuple[Callable[[list[str]], Any], list[str]]:
    """(the subcommand's `main`, the argument list for it) for `diana argv...`."""
    if not argv:
        raise UserInputError(f"a subcommand is needed: one of {', '.join(SUBCOMMANDS)} (diana --help)")
    name, *rest = argv
    if name not in SUBCOMMANDS:
        raise UserInputError(f"unknown subcommand {name!r}: one of {', '.join(SUBCOMMANDS)}")
    module, prefix, _ = SUBCOMMANDS[name]
    return importlib.import_module(module).main, [*prefix, *rest]


def dispatch(argv: list[str]) -> Any:
    """Runs `diana argv...`: the subcommand's `main` on the rest of the line; returns its result."""
    command, rest = resolve(argv)
    return command(rest)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (setup.cfg): `diana SUBCOMMAND ...`; exits like the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        sys.exit(0)
    run_cli(dispatch, argv, also=_ALSO_USER_ERRORS.get(argv[0] if argv else "", ()))


if __name__ == "__main__":
    main()
