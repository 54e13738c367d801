"""Tokenizers for the Hunyuan family (pure Python, no JAX).

* ``TiktokenTokenizer``: A13B / Large ``hy.tiktoken`` (HYTokenizer semantics, HUNYUAN_SPEC.md §4).
* ``HFTokenizer``: Hy3 ``tokenizer.json`` via the ``tokenizers`` package.
* ``ByteTokenizer``: the tiny default model's byte-level vocabulary.
* ``StreamDecoder``: incremental detokenizer that never emits half a UTF-8 character.
* ``load_tokenizer``: pick one from a model directory (never touches the network).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import unicodedata
from abc import ABC, abstractmethod
from typing import Any, Iterable

# Pre-tokenizer of HYTokenizer (tokenization_hy.py). Note the single-digit \p{N}.
HY_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|"""
    r"""[^\r\n\p{L}\p{N}]?\p{L}+|"""
    r"""\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|"""
    r"""\s+(?!\S)|"""
    r"""\s+"""
)
# Specials appended after the BPE ranks, in this order, then <|extra_i|>.
HY_SPECIAL_HEAD = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>")
A13B_NUM_EXTRAS = 205  # A13B: 127957 ranks + 5 + 205 = 128167
LARGE_NUM_EXTRAS = 204  # Large: one fewer extra (tokenization_hy.py of Tencent-Hunyuan-Large)


class Tokenizer(ABC):
    """Minimal interface shared by every tokenizer the project uses."""

    vocab_size: int
    eos_ids: list[int]
    pad_id: int | None
    bos_id: int | None

    @abstractmethod
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, special-token strings in text become single ids."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special tokens are rendered as their strings."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of one token string (special or regular); KeyError if absent."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """String form of one id (bytes tokens decoded with replacement)."""

    def token_bytes(self, token_id: int) -> bytes | None:
        """Raw bytes of one id, or None if the tokenizer cannot say (StreamDecoder then re-decodes)."""
        return None

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns only complete characters.

    Byte-level tokenizers (tiktoken, byte) feed raw bytes into an incremental UTF-8
    decoder, so a multi-byte character split over several ids is held back until whole.
    Other tokenizers use the prefix-window re-decode trick (as in vLLM/TGI).
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # window start for the re-decode path
        self._read = 0  # ids already emitted (re-decode path)

    def push(self, token_id: int) -> str:
        b = self.tok.token_bytes(token_id)
        if b is not None:
            return self._utf8.decode(b)
        self._ids.append(token_id)
        prefix_text = self.tok.decode(self._ids[self._prefix:self._read])
        new_text = self.tok.decode(self._ids[self._prefix:])
        # A trailing U+FFFD means an incomplete character: wait for more ids.
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return out
        return ""

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: emit whatever is left (incomplete bytes become U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        if self._read < len(self._ids):
            prefix_text = self.tok.decode(self._ids[self._prefix:self._read])
            out += self.tok.decode(self._ids[self._prefix:])[len(prefix_text):]
            self._prefix = self._read = len(self._ids)
        return out


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read ``base64(token) rank`` lines. Like HYTokenizer, the rank is the line order."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            token = base64.b64decode(line.split()[0])
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: duplicated token {token!r}; the vocab file is corrupt")
            ranks[token] = len(ranks)
    return ranks


class TiktokenTokenizer(Tokenizer):
    """HYTokenizer re-done over the ``tiktoken`` package (A13B, Large)."""

    def __init__(self, ranks: dict[bytes, int], num_extras: int = A13B_NUM_EXTRAS, *,
                 eos_ids: list[int] | None = None, pad_id: int | None = None, bos_id: int | None = None):
        import tiktoken

        n = len(ranks)
        names = list(HY_SPECIAL_HEAD) + [f"<|extra_{i}|>" for i in range(num_extras)]
        self.special_tokens = {name: n + i for i, name in enumerate(names)}
        self._ranks = ranks
        self._enc = tiktoken.Encoding("HunYuan", pat_str=HY_PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        self._id_to_bytes = {v: k for k, v in ranks.items()}
        self.num_ranks = n
        self.vocab_size = self._enc.n_vocab
        st = self.special_tokens
        # generation_config.json of A13B: eos = [<|eos|>, <|extra_5|>] (eod); pad = <|pad|>.
        default_eos = [st["<|eos|>"]] + ([st["<|extra_5|>"]] if num_extras > 5 else [])
        self.eos_ids = list(eos_ids) if eos_ids else default_eos
        self.pad_id = st["<|pad|>"] if pad_id is None else pad_id
        # HYTokenizer's bos_token is <|startoftext|>; the template emits it, encode() never adds it.
        self.bos_id = st["<|startoftext|>"] if bos_id is None else bos_id

    @classmethod
    def from_file(cls, path: str, num_extras: int = A13B_NUM_EXTRAS, **kw: Any) -> "TiktokenTokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tiktoken vocab {path!r} not found; pass the model's hy.tiktoken")
        return cls(load_tiktoken_ranks(path), num_extras, **kw)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # HYTokenizer.tokenize NFC-normalises first; do the same for identical ids.
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all", disallowed_special=())
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        b = token.encode("utf-8")
        if b in self._ranks:
            return self._ranks[b]
        raise KeyError(f"token {token!r} is not in the vocabulary")

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self._bytes(token_id).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        try:
            return self._id_to_bytes[token_id]
        except KeyError:
            raise KeyError(f"id {token_id} is outside the vocabulary (size {self.vocab_size})") from None

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        return self._bytes(token_id)


class HFTokenizer(Tokenizer):
    """A ``tokenizers`` JSON tokenizer (Hy3). Specials come from its added tokens."""

    def __init__(self, tok: Any, *, eos_ids: list[int] | None = None, pad_id: int | None = None,
                 bos_id: int | None = None):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_ids = list(eos_ids or [])
        self.pad_id = pad_id
        self.bos_id = bos_id
        self._byte_of: dict[str, int] | None = None   # token_bytes' tables, built on first use
        self._added: dict[int, str] = {}

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tok

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} not found; pass the model's tokenizer.json")
        return cls(_Tok.from_file(path), **kw)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # encode_special_tokens=True makes added specials plain text (allow_special=False).
        old = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = not allow_special
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = old

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        t = self._tok.id_to_token(token_id)
        if t is None:
            raise KeyError(f"id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return t

    def token_bytes(self, token_id: int) -> bytes:
        """Byte-level BPE pieces map back through GPT-2's byte alphabet; added tokens are their
        text; other models' pieces are their decoded text."""
        if self._byte_of is None:
            model = json.loads(self._tok.to_str())
            self._added = {t["id"]: t["content"] for t in model.get("added_tokens") or []}
            dec = json.dumps(model.get("decoder") or {})
            self._byte_of = _gpt2_byte_decoder() if '"ByteLevel"' in dec else {}
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.id_to_token(token_id)
        if self._byte_of:
            return bytes(self._byte_of[c] for c in piece)
        return self.decode([token_id]).encode()


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens in it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


# Tiny model vocabulary: 256 bytes, then the specials the A13B-style template needs.
BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|startoftext|>", "<|extra_0|>", "<|extra_4|>",
                 "<|endoftext|>", "<|extra_5|>")
BYTE_VOCAB_SIZE = 272  # 256 + 8 specials + 8 reserved; a multiple of 16 for sharding


class ByteTokenizer(Tokenizer):
    """ids 0..255 are raw UTF-8 bytes; 256.. are BYTE_SPECIALS; the rest up to 272 are reserved."""

    def __init__(self) -> None:
        names = list(BYTE_SPECIALS) + [f"<|reserved_{i}|>" for i in range(BYTE_VOCAB_SIZE - 256 - len(BYTE_SPECIALS))]
        self.special_tokens = {name: 256 + i for i, name in enumerate(names)}
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        self.vocab_size = BYTE_VOCAB_SIZE
        self.eos_ids = [self.special_tokens["<|eos|>"]]
        self.pad_id = self.special_tokens["<|pad|>"]
        self.bos_id = self.special_tokens["<|bos|>"]
        # Longest first so no special is shadowed by a shorter one sharing its prefix.
        self._by_len = sorted(self.special_tokens, key=len, reverse=True)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        i = 0
        while i < len(text):
            j = text.find("<|", i)
            if j < 0:
                ids += text[i:].encode("utf-8")
                break
            ids += text[i:j].encode("utf-8")
            name = next((s for s in self._by_len if text.startswith(s, j)), None)
            if name is None:
                ids += b"<|"
                i = j + 2
            else:
                ids.append(self.special_tokens[name])
                i = j + len(name)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        b = token.encode("utf-8")
        if len(b) == 1:
            return b[0]
        raise KeyError(f"token {token!r} is not in the byte vocabulary")

    def id_to_token(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes([token_id])
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        raise KeyError(f"id {token_id} is outside the byte vocabulary (size {BYTE_VOCAB_SIZE})")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, list) else [x])]


def load_tokenizer(path: str, num_extras: int | None = None) -> Tokenizer:
    """Tokenizer for a model directory (or a direct ``hy.tiktoken`` / ``tokenizer.json`` path).

    Chooses by file present and reads eos/pad from generation_config.json, config.json and
    tokenizer_config.json when they exist. Local files only: nothing is fetched from a hub.
    """
    if path == "byte":
        return ByteTokenizer()
    if os.path.isfile(path):
        model_dir, name = os.path.dirname(path) or ".", os.path.basename(path)
    elif os.path.isdir(path):
        model_dir, name = path, None
        for cand in ("hy.tiktoken", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, cand)):
                name = cand
                break
        if name is None:
            raise FileNotFoundError(
                f"no tokenizer in {path!r}: expected 'hy.tiktoken' (A13B/Large) or 'tokenizer.json' (Hy3); "
                "download the model's tokenizer files into that directory")
    else:
        raise FileNotFoundError(f"{path!r} does not exist; pass a model directory or a tokenizer file")

    gen = _read_json(os.path.join(model_dir, "generation_config.json"))
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    tcfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    eos = _as_list(gen.get("eos_token_id")) or _as_list(cfg.get("eos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    full = os.path.join(model_dir, name)

    if name.endswith(".tiktoken"):
        # A13B has 205 extras (vocab 128167), Large 204; Large is the one with use_cla: true.
        if num_extras is None:
            num_extras = LARGE_NUM_EXTRAS if cfg.get("use_cla") else A13B_NUM_EXTRAS
        extras = num_extras
        tok = TiktokenTokenizer.from_file(full, extras, eos_ids=eos or None,
                                          pad_id=None if pad is None else int(pad))
        return tok
    if name.endswith(".json"):
        tok_h = HFTokenizer.from_file(full, eos_ids=eos, pad_id=None if pad is None else int(pad),
                                      bos_id=gen.get("bos_token_id", cfg.get("bos_token_id")))
        # tokenizer_config.json names tokens by string; use them when ids were not given.
        for key, attr in (("eos_token", "eos_ids"), ("pad_token", "pad_id"), ("bos_token", "bos_id")):
            val = tcfg.get(key)
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str) and not getattr(tok_h, attr):
                i = tok_h._tok.token_to_id(val)
                if i is not None:
                    setattr(tok_h, attr, [i] if attr == "eos_ids" else i)
        return tok_h
    raise ValueError(f"unknown tokenizer file {full!r}; expected hy.tiktoken or tokenizer.json")
