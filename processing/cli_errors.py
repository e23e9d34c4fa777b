"""One-line command-line errors for every `python -m diana...` entry point, and the argument checks
they share.

A mistake a user can make (a wrong flag value, a missing file, a corrupt image, an index built by
another model, an existing output folder) ends the command with ONE line on stderr,
`error: <message>`, and exit status 2 (argparse's status for bad arguments). The message names the
flag or file, the bad value and, where there is a list, the valid values. `DIANA_DEBUG=1` in the
environment re-raises the exception with its full traceback instead.

    from diana.processing.cli_errors import ArgumentParser, run_cli

    def main(argv=None): ...

    if __name__ == "__main__":
        run_cli(main)

`main(argv)` itself raises (so that programs and tests calling it in-process see the exception);
only `run_cli` turns the exception into the line and the exit status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

DEBUG_ENV = "DIANA_DEBUG"
EXIT_USAGE = 2
# What a user's input raises here: bad values and annotations (ValueError, AnnotationError,
# IndexMismatchError, UserInputError) and files (FileNotFoundError, FileExistsError,
# PermissionError, PIL's UnidentifiedImageError are OSErrors). Anything else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# owner/name, as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UserInputError(ValueError):
    """An argument or input that cannot work; the message names the flag or file, the bad value and
    the valid ones."""


class OneLineArgumentErrors:
    """Mixin for argparse parsers: a parsing error (unknown flag, missing required flag, bad
    choice, unparsable number) raises `UserInputError` instead of printing the usage block and
    exiting, so that `run_cli` reports it on one line like every other error."""

    prog: str

    def error(self, message: str) -> NoReturn:
        raise UserInputError(f"{message} (see {self.prog} --help)")


class ArgumentParser(OneLineArgumentErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (sub-commands inherit the class)."""


def debug_requested() -> bool:
    """Whether `DIANA_DEBUG` asks for full tracebacks (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The exception's message with its whitespace (newlines included) collapsed to single spaces."""
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(message.split()) or type(error).__name__


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None,
            also: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Runs `main(argv)` and exits: 0 (or main's integer result) on success; on a user error
    prints `error: <message>` on one line to stderr and exits 2 (`DIANA_DEBUG=1`: re-raises).

    Args:
        main: the entry point; takes the argument list.
        argv: the arguments (default `sys.argv[1:]`).
        also: further exception types that this command raises only for what the user can fix.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = main(argv)
    except USER_ERRORS + tuple(also) as error:
        if debug_requested():
            raise
        _close_progress_bars()
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def _close_progress_bars() -> None:
    """Closes the progress bars the error interrupted, so that the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ---------------------------------------------------------------------------------------------- checks


def require_choice(flag: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises UserInputError unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise UserInputError(f"{flag} {value!r}: not one of {', '.join(map(str, choices))}")


def require_choices(flag: str, values: Sequence[Any] | None, choices: Iterable[Any]) -> None:
    """Raises UserInputError unless `values` is a non-empty list of distinct members of `choices`."""
    choices = list(choices)
    values = list(values or [])
    unknown = [v for v in values if v not in choices]
    if not values or unknown or len(set(values)) != len(values):
        what = f"unknown {unknown}" if unknown else "empty" if not values else f"repeated values in {values}"
        raise UserInputError(f"{flag}: {what}; give distinct values out of {', '.join(map(str, choices))}")


def require_range(flag: str, value: float | int | None, low: float | None = None, high: float | None = None,
                  *, high_inclusive: bool = True) -> None:
    """Raises UserInputError unless low <= value (<= or <) high; None (an unset option) passes."""
    if value is None:
        return
    too_low = low is not None and value < low
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        if low is not None and high is not None:
            bound = f"in [{low}, {high}{']' if high_inclusive else ')'}"
        elif low is not None:
            bound = f">= {low}"
        else:
            bound = f"{'<=' if high_inclusive else '<'} {high}"
        raise UserInputError(f"{flag} {value!r}: must be {bound}")


def require_path(flag: str, path: str | os.PathLike | None, kind: str = "file") -> None:
    """Raises UserInputError unless `path` (when given) exists as a `kind` ("file" or "folder")."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{flag}: {kind} not found: {path}")
    if kind == "folder" and not path.is_dir():
        raise UserInputError(f"{flag}: {path} is a file, not a folder")
    if kind == "file" and not path.is_file():
        raise UserInputError(f"{flag}: {path} is a folder, not a file")


def require_device(flag: str, device: str | None) -> None:
    """Raises UserInputError unless `device` (when given) is a device torch can name (cpu, cuda:1...)."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except RuntimeError as error:
        raise UserInputError(f"{flag} {device!r}: not a device ({error})") from error


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` can only be a Hub repository id: owner/name, not a local path (nothing of
    that name here, and no local folder `owner` that the user could have meant)."""
    return bool(_HUB_ID.match(value)) and not Path(value).exists() and not Path(value).parent.is_dir()


def require_model_folder(flag: str, value: str | None, *, allow_hub_id: bool = False) -> None:
    """Raises UserInputError unless `value` is a saved model folder (with config.json), or, where
    the command can download (`allow_hub_id`), a Hub repository id.

    A local path that does not exist says "model folder not found: <path>" rather than the Hub
    client's repository-id message.
    """
    if value is None:
        return
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"{flag}: {path} has no config.json (not a saved model folder)")
        return
    if path.exists():
        raise UserInputError(f"{flag}: {path} is a file, not a model folder")
    if allow_hub_id and looks_like_hub_id(value):
        if not _hub_offline() or _in_hub_cache(value):
            return
        raise UserInputError(f"{flag}: model folder not found: {value} (nor a Hub model in the local cache, and "
                             "HF_HUB_OFFLINE is set)")
    raise UserInputError(f"{flag}: model folder not found: {value}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


__all__ = [
    "ArgumentParser", "DEBUG_ENV", "OneLineArgumentErrors", "USER_ERRORS", "UserInputError", "debug_requested",
    "looks_like_hub_id", "one_line", "require_choice", "require_choices", "require_device", "require_model_folder",
    "require_path", "require_range", "run_cli",
]
