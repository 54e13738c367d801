"""Tokenizer tests: synthetic hy.tiktoken, HF tokenizers JSON, byte-level, streaming detokenizer."""

import base64
import json
import os

import pytest

from hunyuan_jax.chat import render_chat
from hunyuan_jax.tokenizer import (A13B_NUM_EXTRAS, BYTE_VOCAB_SIZE, LARGE_NUM_EXTRAS, ByteTokenizer,
                                   HFTokenizer, StreamDecoder, TiktokenTokenizer, load_tokenizer)

CN = "你好，世界！混元模型支持中文。🌍 e\u0301"  # CJK, emoji (4 bytes), combining accent
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", "你".encode(), "你好".encode(),
          b"<t", b"hi", b"nk", b"<think", b"<think>"]


def write_tiktoken(path, extra=()):
    toks = [bytes([i]) for i in range(256)] + MERGES + list(extra)
    with open(path, "w") as f:
        for rank, t in enumerate(toks):
            f.write(f"{base64.b64encode(t).decode()} {rank}\n")
    return len(toks)


@pytest.fixture()
def hy_dir(tmp_path):
    n = write_tiktoken(tmp_path / "hy.tiktoken")
    return tmp_path, n


def test_tiktoken_special_ids_exact(hy_dir):
    d, n = hy_dir
    tok = TiktokenTokenizer.from_file(str(d / "hy.tiktoken"))
    assert tok.token_to_id("<|endoftext|>") == n
    assert tok.token_to_id("<|startoftext|>") == n + 1
    assert tok.token_to_id("<|bos|>") == n + 2
    assert tok.token_to_id("<|eos|>") == n + 3
    assert tok.token_to_id("<|pad|>") == n + 4
    assert tok.token_to_id("<|extra_0|>") == n + 5
    assert tok.token_to_id("<|extra_4|>") == n + 9
    assert tok.token_to_id("<|extra_204|>") == n + 5 + 204
    assert tok.vocab_size == n + 5 + A13B_NUM_EXTRAS
    assert tok.eos_ids == [n + 3, n + 10]  # <|eos|>, <|extra_5|> as generation_config.json
    assert tok.pad_id == n + 4 and tok.bos_id == n + 1
    large = TiktokenTokenizer.from_file(str(d / "hy.tiktoken"), LARGE_NUM_EXTRAS)
    assert large.vocab_size == n + 5 + 204
    with pytest.raises(KeyError):
        large.token_to_id("<|extra_204|>")


def test_tiktoken_roundtrip_and_merges(hy_dir):
    d, _ = hy_dir
    tok = TiktokenTokenizer.from_file(str(d / "hy.tiktoken"))
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids] == ["hello", " world"]
    assert tok.encode("你好") == [tok.token_to_id("你好")]
    for text in ["hello world", "Line1\r\n\n  indented\t123456", "你好，世界", "a'll b'S"]:
        assert tok.decode(tok.encode(text)) == text
    # HYTokenizer NFC-normalises before encoding.
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.decode(tok.encode(CN)) == CN.replace("e\u0301", "\u00e9")


def test_tiktoken_specials_in_user_text(hy_dir):
    d, n = hy_dir
    tok = TiktokenTokenizer.from_file(str(d / "hy.tiktoken"))
    ids = tok.encode("hi<|extra_0|>there<|eos|>")
    assert n + 5 in ids and n + 3 in ids
    assert tok.decode(ids) == "hi<|extra_0|>there<|eos|>"
    plain = tok.encode("hi<|extra_0|>", allow_special=False)
    assert all(i < n for i in plain) and tok.decode(plain) == "hi<|extra_0|>"
    # <think> is plain BPE text, not a special token (spec §4).
    # The pre-tokenizer splits it as "<think" + ">".
    assert tok.encode("<think>") == [tok.token_to_id("<think"), tok.token_to_id(">")]


def test_tiktoken_duplicate_vocab_rejected(tmp_path):
    write_tiktoken(tmp_path / "hy.tiktoken", extra=[b"he"])
    with pytest.raises(ValueError, match="duplicated"):
        TiktokenTokenizer.from_file(str(tmp_path / "hy.tiktoken"))


def test_load_tokenizer_reads_configs(hy_dir):
    d, n = hy_dir
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 3, n + 10], "pad_token_id": n + 4}))
    tok = load_tokenizer(str(d))
    assert isinstance(tok, TiktokenTokenizer) and tok.eos_ids == [n + 3, n + 10] and tok.pad_id == n + 4
    (d / "config.json").write_text(json.dumps({"use_cla": True}))
    assert load_tokenizer(str(d)).vocab_size == n + 5 + LARGE_NUM_EXTRAS
    assert isinstance(load_tokenizer(str(d / "hy.tiktoken")), TiktokenTokenizer)


def test_load_tokenizer_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hy.tiktoken.*tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


HY3_SPECIALS = ["<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>", "<｜hy_eos｜>",
                "<｜reasoning_mode｜>", "<think>", "</think>"]


def build_hf(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=HY3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox", CN * 3, "reasoning effort high low"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜hy_eos｜>", "bos_token": HY3_SPECIALS[0]}))
    return tmp_path


def test_hf_tokenizer(tmp_path):
    d = build_hf(tmp_path)
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    eos = tok.token_to_id("<｜hy_eos｜>")
    assert tok.eos_ids == [eos] and tok.bos_id == tok.token_to_id(HY3_SPECIALS[0])
    for text in ["hello world", CN, "tab\tnew\nline"]:
        assert tok.decode(tok.encode(text)) == text
    prompt = render_chat([{"role": "user", "content": "hello"}], "hy3", reasoning_effort="low")
    ids = tok.encode(prompt)
    for s in ["<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>", "<think>"]:
        assert tok.token_to_id(s) in ids  # each marker is a single id
    assert tok.decode(ids) == prompt
    plain = tok.encode("<｜hy_eos｜>", allow_special=False)
    assert eos not in plain and len(plain) > 1
    assert tok.encode("<｜hy_eos｜>") == [eos]  # flag restored


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == BYTE_VOCAB_SIZE <= 272
    for text in [CN, "plain ascii", "<|not_special|> <|", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    prompt = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}], "tiny",
                         enable_thinking=False)
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|startoftext|>") and tok.token_to_id("<|extra_4|>") in ids
    assert ids[len("S") + 2 + len("你好".encode())] == tok.token_to_id("<|extra_0|>")
    assert tok.decode(ids) == prompt and max(ids) < tok.vocab_size
    assert tok.eos_ids == [tok.token_to_id("<|eos|>")]


def _stream(tok, text):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    return pieces


@pytest.mark.parametrize("kind", ["byte", "tiktoken", "hf"])
def test_stream_decoder_never_splits_utf8(kind, tmp_path):
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "tiktoken":
        write_tiktoken(tmp_path / "hy.tiktoken")
        tok = TiktokenTokenizer.from_file(str(tmp_path / "hy.tiktoken"))
    else:
        tok = load_tokenizer(str(build_hf(tmp_path)))
    text = "混元：你好🌍世界！<|eos|>ok" if kind != "hf" else "混元：你好🌍世界！<｜hy_eos｜>ok"
    expect = tok.decode(tok.encode(text))
    pieces = _stream(tok, text)
    assert "".join(pieces) == expect
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0 or kind == "hf"  # multi-byte chars were held back


def test_stream_decoder_flushes_truncated_char():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    assert dec.push_many(list("好".encode())[:2]) == ""
    assert dec.flush() == "\ufffd"
