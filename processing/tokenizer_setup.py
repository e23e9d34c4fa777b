"""Obtain Meta's Llama-3.2 tokenizer from PyPI and convert it once into Hugging Face files.

DiaNA's dialogue tower is Llama-3.2-1B, so the processor needs Meta's tokenizer. Its licence
(Llama 3.2 Community License) forbids committing it, and the Hub is unreachable here, but the
same file ships inside Meta's `llama-models==0.3.0` wheel on PyPI
(`llama_models/llama3/tokenizer.model`, tiktoken format: 128,000 BPE ranks; the 256 special
tokens and the split pattern are defined in `llama_models/llama3/tokenizer.py`).

`python -m diana.processing.tokenizer_setup` (run by `scripts/setup.sh`):

1. `pip download --no-deps llama-models==0.3.0` into the cache folder (`$DIANA_CACHE`, default
   `<repo>/.cache/diana`), unless the wheel is already there;
2. checks the sha256 of `tokenizer.model` and `tokenizer.py` inside it against the constants
   below (recorded once when this module was written);
3. reads the pattern and special tokens from that `tokenizer.py` (parsed with `ast`, never
   imported), converts with `transformers.convert_slow_tokenizer.TikTokenConverter`, checks the
   result against `tiktoken` on a few strings, and saves a `PreTrainedTokenizerFast` (BOS added,
   no EOS, right padding, pad `<|finetune_right_pad_id|>`) into
   `<cache>/llama-3.2-tokenizer/` (or `$DIANA_TOKENIZER_DIR`).

A second run only verifies the saved folder. Nothing touches the network once it has run.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from diana.modeling_diana.configuration_diana import DEFAULT_TEXT_CONFIG

from .cli_errors import ArgumentParser, run_cli
from .processing_diana import BOS_TOKEN, PAD_TOKEN

LLAMA_MODELS_VERSION = "0.3.0"
WHEEL_NAME = f"llama_models-{LLAMA_MODELS_VERSION}-py3-none-any.whl"
TOKENIZER_MODEL_MEMBER = "llama_models/llama3/tokenizer.model"
TOKENIZER_PY_MEMBER = "llama_models/llama3/tokenizer.py"
# sha256 of the two members of llama_models-0.3.0-py3-none-any.whl, computed once (Nov 2026).
TOKENIZER_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
TOKENIZER_PY_SHA256 = "03651bf842642adf7ae2fcb5afe4cd211c7fdb23180babc42a9c635d4bc8fc11"

NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
EOS_TOKEN = "<|end_of_text|>"
MASK_TOKEN = "<|reserved_special_token_0|>"
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = (DEFAULT_TEXT_CONFIG[f"{name}_token_id"] for name in ("bos", "eos", "pad"))
MASK_TOKEN_ID = 128_002

SETUP_COMMAND = "python -m diana.processing.tokenizer_setup"
STAMP_FILE = "diana_tokenizer_setup.json"
# Strings the converted tokenizer must split exactly like tiktoken (newlines after punctuation,
# digits, contractions, non-ASCII: the places where a wrong pre-tokenizer shows).
_CHECK_STRINGS = (
    "You are an intelligent system designed to retrieve pedestrian images from dialogues.\n\n"
    "ASSISTANT: Please describe the person you saw.\nUSER: A woman in a red coat.\n",
    "He's wearing 12345 black shoes!!\n\n  and a hat ... isn't he? Café, naïve, 東京 👟",
)


def _repo_root() -> Path | None:
    """The repository root when running from a checkout / editable install, else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.cfg").is_file() and (root / "processing").is_dir() else None


def cache_root() -> Path:
    """Folder holding the downloaded wheel, the extracted source files and the converted tokenizer.

    `$DIANA_CACHE` if set, else `<repo>/.cache/diana` (git-ignored), else `~/.cache/diana`.
    """
    if os.environ.get("DIANA_CACHE"):
        return Path(os.environ["DIANA_CACHE"]).expanduser()
    root = _repo_root()
    return (root / ".cache" / "diana") if root is not None else Path.home() / ".cache" / "diana"


def default_tokenizer_dir() -> Path:
    """The converted Llama-3.2 tokenizer folder: `$DIANA_TOKENIZER_DIR` or `<cache>/llama-3.2-tokenizer`."""
    if os.environ.get("DIANA_TOKENIZER_DIR"):
        return Path(os.environ["DIANA_TOKENIZER_DIR"]).expanduser()
    return cache_root() / "llama-3.2-tokenizer"


def source_dir() -> Path:
    """Where the verified `tokenizer.model` / `tokenizer.py` from the wheel are kept (for tiktoken checks)."""
    return cache_root() / f"llama-models-{LLAMA_MODELS_VERSION}"


def source_tokenizer_model_path() -> Path:
    """Path of the verified tiktoken file `tokenizer.model` extracted from the wheel."""
    return source_dir() / "tokenizer.model"


def missing_tokenizer_message(path: Path) -> str:
    """The error text shown whenever the tokenizer folder is absent."""
    return (
        f"No Llama-3.2 tokenizer found at {path}. Run `{SETUP_COMMAND}` (part of scripts/setup.sh) "
        "once to fetch Meta's tokenizer from PyPI (llama-models==0.3.0) and convert it, or pass "
        "tokenizer_dir=<a folder with your own download of meta-llama/Llama-3.2-1B>."
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (one `base64(token) rank` per line) into {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise ValueError(f"tokenizer.model line {line_no} is not 'base64 rank': {line[:80]!r}") from err
    return ranks


def parse_llama3_tokenizer_source(source: str) -> tuple[str, list[str]]:
    """Read the split pattern and the ordered special tokens from the wheel's `tokenizer.py`.

    The file is parsed, never imported (it imports `tiktoken` and sibling modules of the wheel).

    Returns:
        (pattern, special_tokens): special_tokens has `NUM_SPECIAL_TOKENS` entries, the i-th has
        id `NUM_BASE_TOKENS + i`.
    """
    tree = ast.parse(source)
    pattern = None
    named: list[str] | None = None
    num_reserved = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if name == "pat_str" and isinstance(value, ast.Constant):
                pattern = value.value
            elif name == "num_reserved_special_tokens" and isinstance(value, ast.Constant):
                num_reserved = value.value
            elif name == "special_tokens" and isinstance(value, ast.List) and named is None:
                named = [elt.value for elt in value.elts if isinstance(elt, ast.Constant)]
    # The reserved tokens are generated by an f-string; accept the source only if it still reads as
    # it did when this parser was written, otherwise the ids below could silently shift.
    reserved_rule = (
        'f"<|reserved_special_token_{2 + i}|>" for i in range(self.num_reserved_special_tokens - len(special_tokens))'
    )
    if pattern is None or named is None or num_reserved is None or reserved_rule not in source:
        raise ValueError("llama_models/llama3/tokenizer.py no longer has the expected pat_str / special_tokens layout")
    specials = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(num_reserved - len(named))]
    if len(specials) != NUM_SPECIAL_TOKENS or len(set(specials)) != len(specials):
        raise ValueError(f"expected {NUM_SPECIAL_TOKENS} distinct special tokens, parsed {len(specials)}")
    return pattern, specials


def build_tiktoken_encoding(model_path: Path | None = None, source_path: Path | None = None):
    """A `tiktoken.Encoding` equal to Meta's reference tokenizer (used to check the conversion)."""
    import tiktoken

    model_path = model_path or source_tokenizer_model_path()
    source_path = source_path or source_dir() / "tokenizer.py"
    pattern, specials = parse_llama3_tokenizer_source(source_path.read_text(encoding="utf-8"))
    ranks = parse_tiktoken_ranks(model_path.read_bytes())
    return tiktoken.Encoding(
        name="llama3",
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={tok: len(ranks) + i for i, tok in enumerate(specials)},
    )


def download_wheel(wheels_dir: Path | None = None) -> Path:
    """The `llama-models` wheel in `wheels_dir` (default `<cache>/wheels`), fetched from PyPI if absent."""
    wheels_dir = wheels_dir if wheels_dir is not None else cache_root() / "wheels"
    wheel = wheels_dir / WHEEL_NAME
    if wheel.is_file():
        return wheel
    wheels_dir.mkdir(parents=True, exist_ok=True)
    print(f"tokenizer_setup: downloading llama-models=={LLAMA_MODELS_VERSION} from PyPI", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           f"llama-models=={LLAMA_MODELS_VERSION}", "-d", str(wheels_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download llama-models=={LLAMA_MODELS_VERSION} ({' '.join(cmd)}):\n{result.stderr.strip()}"
        )
    return wheel


def extract_verified_sources(wheel: Path) -> tuple[bytes, str]:
    """`tokenizer.model` bytes and `tokenizer.py` text from the wheel, after checking their sha256."""
    with zipfile.ZipFile(wheel) as zf:
        model_bytes = zf.read(TOKENIZER_MODEL_MEMBER)
        source_bytes = zf.read(TOKENIZER_PY_MEMBER)
    for member, data, expected in (
        (TOKENIZER_MODEL_MEMBER, model_bytes, TOKENIZER_MODEL_SHA256),
        (TOKENIZER_PY_MEMBER, source_bytes, TOKENIZER_PY_SHA256),
    ):
        if _sha256(data) != expected:
            raise RuntimeError(
                f"sha256 mismatch for {member} in {wheel}: got {_sha256(data)}, expected {expected}. "
                "Delete the wheel and run the set-up again."
            )
    return model_bytes, source_bytes.decode("utf-8")


def convert(model_bytes: bytes, source: str):
    """Convert the tiktoken file into a `PreTrainedTokenizerFast` configured for DiaNA."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern, specials = parse_llama3_tokenizer_source(source)
    ranks = parse_tiktoken_ranks(model_bytes)
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"tokenizer.model has {len(ranks)} ranks, expected {NUM_BASE_TOKENS}")

    class _LocalTikTokenConverter(TikTokenConverter):
        # The stock loader copies the file into tiktoken's temp cache; the ranks are already parsed.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    converter = _LocalTikTokenConverter(vocab_file="<in memory>", pattern=pattern, extra_special_tokens=specials)
    backend = converter.converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # As in the paper: BOS prepended, no EOS; right padding because the model pools the last
        # non-pad token.
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        truncation_side="right",
        model_max_length=131_072,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    return tokenizer


def verify_tokenizer(tokenizer, encoding=None) -> None:
    """Check special ids, BOS/EOS/padding behaviour and (if given) agreement with tiktoken."""
    expected = {BOS_TOKEN: BOS_TOKEN_ID, EOS_TOKEN: EOS_TOKEN_ID, PAD_TOKEN: PAD_TOKEN_ID, MASK_TOKEN: MASK_TOKEN_ID}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected}
    if got != expected or len(tokenizer) != NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS:
        raise RuntimeError(f"converted tokenizer has wrong special ids {got} or size {len(tokenizer)}")
    if tokenizer.pad_token_id != PAD_TOKEN_ID or tokenizer.padding_side != "right":
        raise RuntimeError("converted tokenizer must pad on the right with <|finetune_right_pad_id|>")
    for text in _CHECK_STRINGS:
        ids = tokenizer(text)["input_ids"]
        if ids[0] != BOS_TOKEN_ID or ids[-1] == EOS_TOKEN_ID:
            raise RuntimeError("converted tokenizer must add BOS and no EOS")
        if encoding is not None and ids[1:] != encoding.encode(text, disallowed_special=()):
            raise RuntimeError(f"converted tokenizer disagrees with tiktoken on {text!r}")


def _read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def setup_tokenizer(out_dir: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify and convert the tokenizer into `out_dir`; only verify when already done.

    Returns:
        The tokenizer folder.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir) if out_dir is not None else default_tokenizer_dir()
    stamp = _read_stamp(out_dir)
    done = (
        not force
        and stamp is not None
        and stamp.get("tokenizer_model_sha256") == TOKENIZER_MODEL_SHA256
        and (out_dir / "tokenizer.json").is_file()
        and source_tokenizer_model_path().is_file()
    )
    if done:
        if _sha256(source_tokenizer_model_path().read_bytes()) != TOKENIZER_MODEL_SHA256:
            raise RuntimeError(f"{source_tokenizer_model_path()} was modified; run `{SETUP_COMMAND} --force`")
        verify_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(out_dir)))
        print(f"tokenizer_setup: verified {out_dir}", file=sys.stderr)
        return out_dir

    wheel = download_wheel()
    model_bytes, source = extract_verified_sources(wheel)
    src = source_dir()
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(model_bytes)
    (src / "tokenizer.py").write_text(source, encoding="utf-8")

    print("tokenizer_setup: converting tokenizer.model to Hugging Face files", file=sys.stderr)
    tokenizer = convert(model_bytes, source)
    verify_tokenizer(tokenizer, build_tiktoken_encoding(src / "tokenizer.model", src / "tokenizer.py"))

    # Write next to the target and rename, so an interrupted run never leaves a half folder behind
    # that a later run would take for a finished one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared like any cache
    tokenizer.save_pretrained(str(tmp))
    (tmp / STAMP_FILE).write_text(json.dumps({
        "source": f"pypi:llama-models=={LLAMA_MODELS_VERSION}/{TOKENIZER_MODEL_MEMBER}",
        "tokenizer_model_sha256": TOKENIZER_MODEL_SHA256,
        "tokenizer_py_sha256": TOKENIZER_PY_SHA256,
        "license": "Llama 3.2 Community License (do not commit these files)",
    }, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    verify_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(out_dir)))
    print(f"tokenizer_setup: wrote {out_dir}", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m diana.processing.tokenizer_setup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="folder to write the tokenizer to (default: default_tokenizer_dir())")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is verified")
    args = parser.parse_args(argv)
    setup_tokenizer(args.output_dir, force=args.force)


if __name__ == "__main__":
    # Its RuntimeErrors are set-up failures the user acts on (download, modified source, checksum).
    run_cli(main, also=(RuntimeError,))
