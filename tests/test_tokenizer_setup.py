"""The Llama-3.2 tokenizer set-up: PyPI wheel -> sha256-checked tiktoken file -> Hugging Face files."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from transformers import AutoTokenizer

from diana.processing import build_processor
from diana.processing import tokenizer_setup as ts

# Strings where a wrong pattern or byte mapping would show: punctuation before newlines, runs of
# spaces and newlines, digits (split in groups of 3), contractions, accents, CJK, emoji, and
# text that spells a special token (Meta's encode treats it as plain text).
TRICKY = [
    "A woman in a red coat.\nASSISTANT: Was she carrying a bag?\nUSER: Yes, a black backpack.",
    "He's 1234567 cm tall!!\n\n\n   and  wears   shoes\t\tI'LL see;\r\nok",
    "Café crème, naïve façade — 東京の人 👟👜 ¿qué?",
    "trailing spaces   ",
    "<|begin_of_text|> is text here",
]


def test_default_dirs_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIANA_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("DIANA_TOKENIZER_DIR", raising=False)
    assert ts.cache_root() == tmp_path / "c"
    assert ts.default_tokenizer_dir() == tmp_path / "c" / "llama-3.2-tokenizer"
    monkeypatch.setenv("DIANA_TOKENIZER_DIR", str(tmp_path / "t"))
    assert ts.default_tokenizer_dir() == tmp_path / "t"


def test_special_tokens_parsed_from_wheel_source():
    wheel = ts.download_wheel()
    _, source = ts.extract_verified_sources(wheel)
    pattern, specials = ts.parse_llama3_tokenizer_source(source)
    assert len(specials) == 256 and len(set(specials)) == 256
    ids = {tok: 128000 + i for i, tok in enumerate(specials)}
    assert ids["<|begin_of_text|>"] == 128000
    assert ids["<|end_of_text|>"] == 128001
    assert ids["<|reserved_special_token_0|>"] == 128002
    assert ids["<|finetune_right_pad_id|>"] == 128004
    assert ids["<|eot_id|>"] == 128009
    assert specials[-1] == "<|reserved_special_token_245|>"
    assert pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    # A source whose reserved-token rule changed must be refused, not silently mis-numbered.
    with pytest.raises(ValueError, match="layout"):
        ts.parse_llama3_tokenizer_source(source.replace("{2 + i}", "{3 + i}"))


def test_tampered_wheel_is_rejected(tmp_path):
    wheel = ts.download_wheel()
    tampered = tmp_path / ts.WHEEL_NAME
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tampered, "w") as dst:
        for member in (ts.TOKENIZER_MODEL_MEMBER, ts.TOKENIZER_PY_MEMBER):
            data = src.read(member)
            if member == ts.TOKENIZER_MODEL_MEMBER:
                data = data.replace(b" 0\n", b" 1\n", 1)  # one rank changed
            dst.writestr(member, data)
    with pytest.raises(RuntimeError, match="sha256 mismatch for llama_models/llama3/tokenizer.model"):
        ts.extract_verified_sources(tampered)


def test_converted_tokenizer_matches_meta_reference(tokenizer_dir, meta_tokenizer):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128001, 128004)
    assert tok.convert_tokens_to_ids("<|reserved_special_token_0|>") == 128002
    assert tok.padding_side == "right"
    for text in TRICKY[:-1]:
        # BOS added by the tokenizer itself, no EOS: same as Meta's encode(bos=True, eos=False).
        assert tok(text)["input_ids"] == meta_tokenizer.encode(text, bos=True, eos=False)
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Over the whole base vocabulary the two agree token by token (byte-level round trip).
    for token_id in range(0, 128000, 997):
        piece = meta_tokenizer.model.decode_single_token_bytes(token_id)
        assert tok.convert_ids_to_tokens(token_id) == "".join(
            _BYTE_TO_UNICODE[b] for b in piece
        ), token_id
    batch = tok(["a", "a longer text"], padding=True)
    assert batch["input_ids"][0][-1] == 128004 and batch["attention_mask"][0][-1] == 0


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable character table (Hugging Face byte-level BPE vocabulary keys).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_TO_UNICODE = _bytes_to_unicode()


def test_setup_converts_once_then_only_verifies(tmp_path, monkeypatch, capsys, tokenizer_dir):
    # A fresh cache seeded with the already-downloaded wheel: the whole set-up runs offline.
    made_by_setup_sh = ts.cache_root() / "llama-3.2-tokenizer"
    (tmp_path / "wheels").mkdir()
    shutil.copy(ts.download_wheel(), tmp_path / "wheels" / ts.WHEEL_NAME)
    monkeypatch.setenv("DIANA_CACHE", str(tmp_path))
    monkeypatch.delenv("DIANA_TOKENIZER_DIR", raising=False)

    out = ts.setup_tokenizer()
    assert out == tmp_path / "llama-3.2-tokenizer"
    assert "wrote" in capsys.readouterr().err
    stamp = json.loads((out / ts.STAMP_FILE).read_text())
    assert stamp["tokenizer_model_sha256"] == ts.TOKENIZER_MODEL_SHA256
    assert ts.source_tokenizer_model_path().is_file()
    # The conversion is deterministic: identical to the folder scripts/setup.sh made.
    assert (out / "tokenizer.json").read_bytes() == (made_by_setup_sh / "tokenizer.json").read_bytes()

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ts.main([])
    assert "verified" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # A modified source file is noticed on the verification run.
    ts.source_tokenizer_model_path().write_bytes(b"x")
    with pytest.raises(RuntimeError, match="modified"):
        ts.setup_tokenizer()


def test_missing_tokenizer_names_the_setup_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m diana\.processing\.tokenizer_setup"):
        build_processor(tokenizer_dir=tmp_path / "nothing-here")
