"""Structured outputs: a grammar matched byte by byte, and the tokens each of its states allows.

`tool_choice` "required", {"function": {"name": ...}} or "auto" with `strict` tools, and
`response_format` json_object / json_schema or vLLM's `structured_outputs` / `guided_json` /
`guided_choice` constrain a reply to a grammar: the engine samples every token of such a request
from `Guide.allowed_bits()`, the tokens whose bytes keep the text a prefix of the grammar's
language (stop tokens once it is complete), so tool calls and JSON replies parse and follow their
schema. Tool calls are forced in the model's own format (A13B's JSON array, Hy3's XML-like tags),
which the reply parser already reads; reasoning stays free.

A grammar is a tree of interned `Node`s. A parse position is a stack of nodes still to match (an
interned cons list), a state the set of stacks an NFA simulation holds after closure, interned to
an int. A state's token mask is computed for the whole vocabulary at once, depth by depth over the
tokens' bytes with numpy, and cached: inside a string, a number or free text the state repeats, so
most steps are a lookup.

JSON subset (xgrammar's defaults): object properties in schema order, required ones always and
optional ones maybe, no others when `properties` is given; at most one space after ':' and ','.
Keywords: type, enum, const, anyOf, oneOf, allOf (one entry), $ref into $defs / definitions,
properties, required, additionalProperties, items, minItems (0 or more than 0). String lengths,
patterns, formats and numeric ranges are not enforced.
"""
from __future__ import annotations

import json
import weakref
from typing import Any, Optional, Sequence

import numpy as np

from hunyuan_jax.chat.templates import HY3_OPENSOURCE, HY3_PREVIEW, NO_THINK_SUFFIX, _family

MAX_INT_DIGITS = 16     # digits of a number's integer part, fraction and exponent: a model cannot
MAX_EXP_DIGITS = 3      # run a number on forever
MASK_CACHE = 4096       # cached masks per grammar (packed bits: V / 8 bytes each)
GRAMMAR_CACHE = 64      # compiled chat grammars kept for later requests with the same schema
_GRAMMARS: dict = {}


class Node:
  """One grammar node; interned, so identity is equality and hashing is cheap."""
  __slots__ = ("kind", "a", "b")

  def __init__(self, kind: str, a: Any = None, b: Any = None):
    self.kind, self.a, self.b = kind, a, b

  def __repr__(self):
    return f"Node({self.kind}, {self.a!r}, {self.b!r})"


class _Cell:
  """A stack cell: node on top of rest (None = the empty stack)."""
  __slots__ = ("node", "rest")

  def __init__(self, node: Node, rest: Optional["_Cell"]):
    self.node, self.rest = node, rest


class Builder:
  """Interns nodes. One per grammar; schema compilation and matching share it."""

  def __init__(self):
    self._nodes: dict = {}
    self.rules: dict[str, Node] = {}
    self.empty = self.seq()
    self.ws = self.alt(self.empty, self.lit(" "))
    self.string = self.seq(self.lit('"'), self.node("str"))

  def node(self, kind: str, a: Any = None, b: Any = None) -> Node:
    key = (kind, a, b)
    n = self._nodes.get(key)
    if n is None:
      n = self._nodes[key] = Node(kind, a, b)
    return n

  def lit(self, s) -> Node:
    s = s.encode() if isinstance(s, str) else s
    return self.node("lit", s) if s else self.node("seq", ())

  def seq(self, *xs: Node) -> Node:
    return xs[0] if len(xs) == 1 else self.node("seq", tuple(xs))

  def alt(self, *xs: Node) -> Node:
    xs = tuple(dict.fromkeys(xs))
    return xs[0] if len(xs) == 1 else self.node("alt", xs)

  def opt(self, x: Node) -> Node:
    return self.alt(self.empty, x)

  def ref(self, name: str) -> Node:
    return self.node("ref", name)

  def rep(self, item: Node, close: str) -> Node:
    """(',' ws item)* close: the tail of a list whose first item has been matched."""
    return self.node("rep", item, close.encode())

  def until(self, terminator: str) -> Node:
    """Free text up to and including the first occurrence of `terminator`."""
    return self.text(terminator)

  def text(self, end: str = "", avoid: str = "") -> Node:
    """Free text that never contains `avoid`: up to and including `end`, or (no end) any length."""
    return self.node("text", (end.encode(), avoid.encode()), b"")

  def number(self, integer: bool) -> Node:
    return self.node("num", integer, ("s", 0))

  # ------------------------------------------------------------------ JSON
  def any_json(self) -> Node:
    if "value" not in self.rules:
      v, o, a = self.ref("value"), self.ref("object"), self.ref("array")
      pair = self.seq(self.string, self.lit(":"), self.ws, v)
      self.rules["value"] = self.alt(self.string, self.number(False), o, a, self.lit("true"), self.lit("false"),
                                     self.lit("null"))
      self.rules["object"] = self.alt(self.lit("{}"), self.seq(self.lit("{"), pair, self.rep(pair, "}")))
      self.rules["array"] = self.alt(self.lit("[]"), self.seq(self.lit("["), v, self.rep(v, "]")))
    return self.ref("value")

  def json_text(self, value: Any) -> Node:
    return self.lit(json.dumps(value, ensure_ascii=False))


class SchemaError(ValueError):
  pass


class _SchemaCompiler:
  def __init__(self, g: Builder, root: Any):
    self.g, self.root = g, root

  def compile(self, s: Any) -> Node:
    g = self.g
    if s is True or s == {} or s is None:
      return g.any_json()
    if not isinstance(s, dict):
      raise SchemaError(f"a JSON schema must be an object, got {s!r}")
    if "$ref" in s:
      return self._ref(s["$ref"])
    if "const" in s:
      return g.json_text(s["const"])
    if "enum" in s:
      if not s["enum"]:
        raise SchemaError("'enum' must list at least one value")
      return g.alt(*(g.json_text(v) for v in s["enum"]))
    for key in ("anyOf", "oneOf"):
      if key in s:
        return g.alt(*(self.compile(x) for x in s[key]))
    if "allOf" in s:
      if len(s["allOf"]) != 1:
        raise SchemaError("'allOf' with more than one schema is not supported; merge them into one")
      return self.compile({**{k: v for k, v in s.items() if k != "allOf"}, **s["allOf"][0]})
    t = s.get("type")
    if isinstance(t, list):
      return g.alt(*(self.compile({**s, "type": x}) for x in t))
    if t is None:
      t = "object" if "properties" in s else "array" if "items" in s else None
    if t is None:
      return g.any_json()
    if t == "string":
      return g.string
    if t in ("number", "integer"):
      return g.number(t == "integer")
    if t == "boolean":
      return g.alt(g.lit("true"), g.lit("false"))
    if t == "null":
      return g.lit("null")
    if t == "array":
      item = self.compile(s.get("items", True))
      some = g.seq(g.lit("["), item, g.rep(item, "]"))
      return some if s.get("minItems", 0) > 0 else g.alt(g.lit("[]"), some)
    if t == "object":
      return self._object(s)
    raise SchemaError(f"unknown JSON schema type {t!r}")

  def _ref(self, ref: str) -> Node:
    if ref not in self.g.rules:
      parts = ref.split("/")
      if parts[0] != "#" or len(parts) != 3 or parts[1] not in ("$defs", "definitions"):
        raise SchemaError(f"$ref {ref!r} is not supported; use '#/$defs/<name>'")
      target = (self.root.get(parts[1]) or {}).get(parts[2])
      if target is None:
        raise SchemaError(f"$ref {ref!r} names no definition")
      self.g.rules[ref] = self.g.empty   # a placeholder while compiling (recursive refs)
      self.g.rules[ref] = self.compile(target)
    return self.g.ref(ref)

  def _object(self, s: dict) -> Node:
    g = self.g
    props = s.get("properties") or {}
    if not props:
      extra = s.get("additionalProperties", True)
      if extra is False:
        return g.lit("{}")
      pair = g.seq(g.string, g.lit(":"), g.ws, self.compile(extra))
      return g.alt(g.lit("{}"), g.seq(g.lit("{"), pair, g.rep(pair, "}")))
    required = set(s.get("required") or ())
    unknown = required - set(props)
    if unknown:
      raise SchemaError(f"'required' names {sorted(unknown)} that 'properties' does not define")
    names = list(props)
    values = [self.compile(props[n]) for n in names]
    memo: dict = {}

    def members(i: int, first: bool) -> Node:   # the properties from i on, then '}'
      if i == len(names):
        return g.lit("}")
      if (i, first) not in memo:
        head = g.lit(json.dumps(names[i], ensure_ascii=False) + ":")
        m = g.seq(g.empty if first else g.seq(g.lit(","), g.ws), head, g.ws, values[i], members(i + 1, False))
        memo[i, first] = m if names[i] in required else g.alt(m, members(i + 1, first))
      return memo[i, first]

    return g.seq(g.lit("{"), members(0, True))


def schema_node(g: Builder, schema: Any) -> Node:
  return _SchemaCompiler(g, schema if isinstance(schema, dict) else {}).compile(schema)


# ---------------------------------------------------------------------- matching
_DEAD = object()
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGITS = frozenset(b"0123456789")


class Grammar:
  """A compiled grammar: states as ints, `step(state, byte)`, and token masks per state."""

  def __init__(self, g: Builder, root: Node, think_end: str = "", think_close: str = ""):
    """think_end: the end of the reply's free reasoning (a text node), if it has one;
    think_close: the text a spent `thinking_token_budget` forces there."""
    self.g = g
    self.think_end, self.think_close = think_end.encode(), think_close.encode()
    self._cells: dict = {}
    self._closures: dict = {}
    self._state_ids: dict = {}
    self._states: list = []
    self._steps: dict = {}
    self._masks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    self.start = self._state(self._closure(self._cell(root, None)))

  # -- states
  def _cell(self, node: Node, rest: Optional[_Cell]) -> _Cell:
    key = (node, rest)
    c = self._cells.get(key)
    if c is None:
      c = self._cells[key] = _Cell(node, rest)
    return c

  def _state(self, stacks: frozenset) -> int:
    sid = self._state_ids.get(stacks)
    if sid is None:
      sid = self._state_ids[stacks] = len(self._states)
      self._states.append(stacks)
    return sid

  def accepting(self, sid: int) -> bool:
    return None in self._states[sid]

  def can_continue(self, sid: int) -> bool:
    return any(s is not None for s in self._states[sid])

  def in_reasoning(self, sid: int) -> bool:
    """Inside the free reasoning: every parse is in the text that `think_end` ends."""
    stacks = self._states[sid]
    return bool(self.think_end) and all(s is not None and s.node.kind == "text" and s.node.a[0] == self.think_end
                                        for s in stacks)

  def _closure(self, stack: Optional[_Cell]) -> frozenset:
    """The stacks reachable without consuming a byte whose top consumes bytes (None = complete)."""
    hit = self._closures.get(stack)
    if hit is None:
      out: set = set()
      self._close(stack, out, set())
      hit = self._closures[stack] = frozenset(out)
    return hit

  def _close(self, stack: Optional[_Cell], out: set, seen: set) -> None:
    if stack in seen:
      return
    seen.add(stack)
    if stack is None:
      out.add(None)
      return
    node, rest, g = stack.node, stack.rest, self.g
    k = node.kind
    if k == "seq":
      for x in reversed(node.a):
        rest = self._cell(x, rest)
      self._close(rest, out, seen)
    elif k == "alt":
      for x in node.a:
        self._close(self._cell(x, rest), out, seen)
    elif k == "ref":
      self._close(self._cell(g.rules[node.a], rest), out, seen)
    elif k == "star":   # item*
      self._close(rest, out, seen)
      self._close(self._cell(node.a, self._cell(node, rest)), out, seen)
    elif k == "rep":
      self._close(self._cell(g.lit(node.b), rest), out, seen)
      self._close(self._cell(g.seq(g.lit(","), g.ws, node.a, node), rest), out, seen)
    else:
      out.add(stack)
      if (k == "num" and _num_accepts(node)) or (k == "text" and not node.a[0]):
        self._close(rest, out, seen)

  def step(self, sid: int, byte: int) -> int:
    """The state after `byte`, or -1 where the grammar allows no such byte."""
    key = sid * 256 + byte
    nxt = self._steps.get(key)
    if nxt is None:
      out: set = set()
      for stack in self._states[sid]:
        if stack is not None:
          moved = self._consume(stack, byte)
          if moved is not _DEAD:
            out |= self._closure(moved)
      nxt = self._steps[key] = self._state(frozenset(out)) if out else -1
    return nxt

  def _consume(self, stack: _Cell, b: int):
    node, rest, g = stack.node, stack.rest, self.g
    k = node.kind
    if k == "lit":
      s = node.a
      if s[0] != b:
        return _DEAD
      return self._cell(g.lit(s[1:]), rest) if len(s) > 1 else rest
    if k == "str":   # inside a JSON string, after its opening quote
      if b == 0x22:
        return rest
      if b == 0x5C:
        return self._cell(g.node("esc"), rest)
      return _DEAD if b < 0x20 else stack
    if k == "esc":
      if b in _ESCAPES:
        return self._cell(g.node("str"), rest)
      return self._cell(g.node("hex", 4), rest) if b == ord("u") else _DEAD
    if k == "hex":
      if b not in _HEX:
        return _DEAD
      return self._cell(g.node("hex", node.a - 1) if node.a > 1 else g.node("str"), rest)
    if k == "num":
      st = _num_step(node.a, node.b, b)
      return _DEAD if st is None else self._cell(g.node("num", node.a, st), rest)
    if k == "text":
      end, avoid = node.a
      tail = _pattern_suffix(node.b + bytes([b]), node.a)
      if avoid and tail == avoid:
        return _DEAD
      if end and tail == end:
        return rest
      return stack if tail == node.b else self._cell(g.node("text", node.a, tail), rest)
    raise AssertionError(k)

  # -- token masks
  def mask(self, sid: int, table: "TokenTable") -> np.ndarray:
    """Packed bits [ceil(V / 8)] of the tokens allowed in state `sid` (stop tokens only when complete)."""
    masks = self._masks.setdefault(table, {})   # a grammar serves any vocabulary
    hit = masks.get(sid)
    if hit is not None:
      return hit
    allowed = np.zeros(table.vocab_size, bool)
    idx, cur, depth = table.ids, np.full(len(table.ids), sid, np.int64), 0
    while len(idx):   # no sorts: the (state, byte) pairs that occur, found by counting
      states = np.flatnonzero(np.bincount(cur))
      slot = np.zeros(states[-1] + 1, np.int64)
      slot[states] = np.arange(len(states))
      key = slot[cur] * 256 + table.columns[depth][idx]
      moves = np.full(len(states) * 256, -1, np.int64)
      for k in np.flatnonzero(np.bincount(key)):
        moves[k] = self.step(int(states[k >> 8]), int(k & 255))
      nxt = moves[key]
      alive = nxt >= 0
      ended = alive & (table.lengths[idx] == depth + 1)
      allowed[idx[ended]] = True
      keep = alive & ~ended
      idx, cur, depth = idx[keep], nxt[keep], depth + 1
    if self.accepting(sid):
      allowed[table.stop_ids] = True
    if len(masks) >= MASK_CACHE:
      masks.clear()
    bits = masks[sid] = np.packbits(allowed)
    return bits


def _num_accepts(node: Node) -> bool:
  return node.b[0] in ("z", "i", "f", "x")


def _num_step(integer: bool, st: tuple, b: int) -> Optional[tuple]:
  """JSON number DFA; states (name, digits so far in the current part)."""
  name, n = st
  digit = b in _DIGITS
  if name in ("s", "m"):
    if b == ord("-") and name == "s":
      return ("m", 0)
    return ("z", 1) if b == ord("0") else ("i", 1) if digit else None
  if name in ("z", "i"):
    if digit:
      return ("i", n + 1) if name == "i" and n < MAX_INT_DIGITS else None
    if integer:
      return None
    return ("d", 0) if b == ord(".") else ("e", 0) if b in b"eE" else None
  if name in ("d", "f"):
    if digit:
      return ("f", n + 1) if n < MAX_INT_DIGITS else None
    return ("e", 0) if name == "f" and b in b"eE" else None
  if name in ("e", "es"):
    if b in b"+-" and name == "e":
      return ("es", 0)
    return ("x", 1) if digit else None
  if name == "x":
    return ("x", n + 1) if digit and n < MAX_EXP_DIGITS else None
  raise AssertionError(name)


def _pattern_suffix(text: bytes, patterns: tuple) -> bytes:
  """The longest suffix of `text` that is a prefix of one of `patterns` (all the matcher needs to
  remember of free text: the state stays put while no pattern starts)."""
  for k in range(len(text), 0, -1):
    if any(p.startswith(text[-k:]) for p in patterns if p):
      return text[-k:]
  return b""


# ---------------------------------------------------------------------- vocabulary
class TokenTable:
  """The vocabulary's bytes as a padded matrix, for masks over every token at once.

  Stop tokens are left out of the byte walk (a mask allows them only where the text is complete);
  other special tokens count as their text (a JSON string may hold "<|extra_0|>").
  """

  def __init__(self, token_bytes: Sequence[Optional[bytes]], vocab_size: int, stop_ids: Sequence[int]):
    self.vocab_size = vocab_size
    stop = set(int(i) for i in stop_ids)
    self.stop_ids = np.array(sorted(i for i in stop if 0 <= i < vocab_size), np.int64)
    lengths = np.zeros(vocab_size, np.int64)
    for i, b in enumerate(token_bytes[:vocab_size]):
      if b and i not in stop:
        lengths[i] = len(b)
    self.lengths = lengths
    self.bytes = np.zeros((vocab_size, max(1, int(lengths.max()))), np.uint8)
    for i in np.nonzero(lengths)[0]:
      self.bytes[i, :lengths[i]] = np.frombuffer(token_bytes[i], np.uint8)
    self.ids = np.nonzero(lengths)[0]
    self.columns = np.ascontiguousarray(self.bytes.T)   # [L, V]: byte d of every token, contiguous
    self._prefix_masks: dict = {}

  def prefix_mask(self, text: bytes) -> np.ndarray:
    """Packed bits of the tokens whose bytes begin `text` (forced text, in any tokenisation)."""
    if text not in self._prefix_masks:
      ok = (self.lengths > 0) & (self.lengths <= len(text))
      for d in range(min(len(text), self.columns.shape[0])):
        ok &= (self.columns[d] == text[d]) | (self.lengths <= d)
      self._prefix_masks[text] = np.packbits(ok)
    return self._prefix_masks[text]


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_table(tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> TokenTable:
  """The tokenizer's table (built once per tokenizer and vocabulary: seconds for 128K tokens)."""
  key = (vocab_size, tuple(sorted(stop_ids)))
  tables = _TABLES.setdefault(tokenizer, {})
  if key not in tables:
    n = min(vocab_size, tokenizer.vocab_size)
    tables[key] = TokenTable([_bytes_or_none(tokenizer, i) for i in range(n)], vocab_size, stop_ids)
  return tables[key]


def _bytes_or_none(tokenizer, i: int) -> Optional[bytes]:
  try:
    return tokenizer.token_bytes(i)
  except KeyError:   # a reserved id with no text
    return None


class Guide:
  """One request's position in its grammar: the tokens it may take next, and the token it took.

  think_budget (vLLM's `thinking_token_budget`): after that many reasoning tokens the reply must
  take the grammar's `think_close` text next (in whatever tokens the model picks for it).
  """

  def __init__(self, grammar: Grammar, table: TokenTable, think_budget: Optional[int] = None):
    self.grammar, self.table, self.state = grammar, table, grammar.start
    self.think_budget, self.think_tokens = think_budget, 0
    self._forced = b""
    self._spend_budget()

  def allowed_bits(self) -> np.ndarray:
    if self._forced:
      return self.table.prefix_mask(self._forced)
    return self.grammar.mask(self.state, self.table)

  def advance(self, token_id: int) -> bool:
    """Moves past a sampled token; False if the grammar does not allow it (then the state stays)."""
    if token_id in self.table.stop_ids:
      return not self._forced and self.grammar.accepting(self.state)
    n = int(self.table.lengths[token_id]) if 0 <= token_id < self.table.vocab_size else 0
    text = bytes(self.table.bytes[token_id, :n])
    if n == 0 or not self._forced.startswith(text[:len(self._forced)]):
      return False
    sid = self.state
    for b in text:
      sid = self.grammar.step(sid, b)
      if sid < 0:
        return False
    if self.think_budget is not None and self.grammar.in_reasoning(self.state):
      self.think_tokens += 1
    self._forced = self._forced[n:]
    self.state = sid
    self._spend_budget()
    return True

  def _spend_budget(self):
    if (self.think_budget is not None and self.think_tokens >= self.think_budget
        and self.grammar.in_reasoning(self.state)):
      self._forced, self.think_budget = self.grammar.think_close, None

  @property
  def finished(self) -> bool:
    """Complete, and no byte can follow: the reply is over without a stop token."""
    return self.grammar.accepting(self.state) and not self.grammar.can_continue(self.state)


# ---------------------------------------------------------------------- chat requests
def _tool_functions(tools: list) -> dict:
  out = {}
  for t in tools or []:
    fn = t.get("function", t) if isinstance(t, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
      raise SchemaError("each tool must be {type: function, function: {name, parameters}}")
    out[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
  return out


def _a13b_calls(g: Builder, functions: dict, exactly_one: bool) -> Node:
  """A13B's `<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>`."""
  items = []
  for name, params in functions.items():
    args = schema_node(g, params)
    items.append(g.seq(g.lit("{"), g.lit('"name":'), g.ws, g.json_text(name), g.lit(","), g.ws,
                       g.lit('"arguments":'), g.ws, args, g.lit("}")))
  item = g.alt(*items)
  calls = g.seq(g.lit("["), item, g.lit("]") if exactly_one else g.rep(item, "]"))
  return g.seq(g.lit("<tool_calls>"), calls, g.lit("</tool_calls>"))


def _hy3_calls(g: Builder, functions: dict, exactly_one: bool, markup) -> Node:
  """Hy3's tags: <tool_calls>\\n<tool_call>name<tool_sep>\\n<arg_key>k</arg_key>\\n<arg_value>v
  </arg_value>\\n...</tool_call>\\n</tool_calls>; string values raw, the others JSON."""
  t = markup.tag
  items = []
  for name, params in functions.items():
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    comp = _SchemaCompiler(g, params)
    args = g.empty
    for key in reversed(list(props)):
      sub = props[key]
      head = g.lit(f"{t('arg_key')}{key}{t('arg_key', True)}\n{t('arg_value')}")
      close = t("arg_value", True)
      sub = sub if isinstance(sub, dict) else {}
      fixed = sub["enum"] if "enum" in sub else [sub["const"]] if "const" in sub else None
      if fixed is not None and all(isinstance(v, str) for v in fixed):   # strings go raw, as rendered
        value = g.seq(g.alt(*(g.lit(v) for v in fixed)), g.lit(close + "\n"))
      elif sub.get("type") == "string":
        value = g.seq(g.until(close), g.lit("\n"))
      else:
        value = g.seq(comp.compile(sub), g.lit(close + "\n"))
      one = g.seq(head, value, args)
      args = one if key in required else g.alt(one, args)
    items.append(g.seq(g.lit(f"{t('tool_call')}{name}{t('tool_sep')}\n"), args, g.lit(t("tool_call", True) + "\n")))
  item = g.alt(*items)
  calls = item if exactly_one else g.seq(item, g.node("star", item))
  return g.seq(g.lit(t("tool_calls") + "\n"), calls, g.lit(t("tool_calls", True)))


def answer_constraint(body: dict) -> Optional[dict]:
  """What a request asks its answer to be, or None (free text): vLLM's `structured_outputs` (or the
  older `guided_json` / `guided_choice`), else OpenAI's `response_format`. One of {"json": schema},
  {"json_object": True}, {"choice": [str, ...]}. Raises SchemaError for what it cannot constrain."""
  so = body.get("structured_outputs")
  legacy = {k[len("guided_"):]: body[k] for k in ("guided_json", "guided_choice", "guided_regex", "guided_grammar")
            if body.get(k) is not None}
  if so is not None or legacy:
    if so is not None and not isinstance(so, dict):
      raise SchemaError("'structured_outputs' must be an object such as {'json': {...}} or {'choice': [...]}")
    asked = {k: v for k, v in {**(so or {}), **legacy}.items() if v not in (None, False)}
    kinds = set(asked) & {"json", "json_object", "choice", "regex", "grammar"}
    if len(kinds) != 1:
      raise SchemaError(f"structured outputs need exactly one of 'json', 'json_object', 'choice'; got {sorted(asked)}")
    kind = kinds.pop()
    if kind in ("regex", "grammar"):
      raise SchemaError(f"structured outputs '{kind}' is not supported; use 'json' or 'choice'")
    value = asked[kind]
    if kind == "json" and isinstance(value, str):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise SchemaError(f"structured outputs 'json' is not a JSON schema: {e}") from None
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
      raise SchemaError("structured outputs 'choice' must be a non-empty list of non-empty strings")
    return {kind: value}
  fmt = body.get("response_format")
  if fmt is None:
    return None
  kind = fmt.get("type") if isinstance(fmt, dict) else None
  if kind == "text":
    return None
  if kind == "json_object":
    return {"json_object": True}
  if kind == "json_schema":
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
      raise SchemaError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    return {"json": spec["schema"]}
  raise SchemaError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")


def _answer_node(g: Builder, constraint: dict) -> Node:
  if "json" in constraint:
    return schema_node(g, constraint["json"])
  if "choice" in constraint:
    return g.alt(*(g.lit(c) for c in constraint["choice"]))
  g.any_json()
  return g.ref("object")


def _cached(key: list, build) -> Grammar:
  """Grammars are reused across requests: their masks are cached per grammar."""
  key = json.dumps(key, sort_keys=True, default=str)
  if key not in _GRAMMARS:
    if len(_GRAMMARS) >= GRAMMAR_CACHE:
      _GRAMMARS.pop(next(iter(_GRAMMARS)))
    _GRAMMARS[key] = build()
  return _GRAMMARS[key]


def completion_grammar(constraint: Optional[dict]) -> Optional[Grammar]:
  """The grammar of a plain completion's text (no chat markup), or None."""
  if constraint is None:
    return None
  g = Builder()
  return _cached(["completion", constraint], lambda: Grammar(g, _answer_node(g, constraint)))


def chat_grammar(family: str, prompt: str, *, tools: Optional[list] = None, tool_choice: Any = None,
                 constraint: Optional[dict] = None, parallel_tool_calls: bool = True) -> Optional[Grammar]:
  """The grammar a chat reply must follow, or None when nothing constrains it.

  tool_choice "required": one or more calls of the tools (one with parallel_tool_calls False);
  {"type": "function", "function": {"name": n}}: exactly one call of n; "auto" with a tool that
  sets `strict`: calls held to their schemas, or an answer (free text that opens no tool call, or
  the `constraint`). Else `constraint` (`answer_constraint`) shapes the answer. Raises SchemaError
  (a 400) on what it cannot constrain.
  """
  fam = _family(family)
  strict_auto = tool_choice in ("auto", None) and any(
      isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("strict") is True
      for t in tools or [])
  forced = isinstance(tool_choice, dict) or tool_choice == "required"
  if not (forced or strict_auto) and constraint is None:
    return None
  frame = _frame_kind(fam, prompt)
  if not (forced or strict_auto):
    g = Builder()
    return _cached([fam, frame, constraint],
                   lambda: Grammar(g, _chat_frame(g, fam, frame, _answer_node(g, constraint)), *_reasoning_marks(fam, frame)))
  one = isinstance(tool_choice, dict) or not parallel_tool_calls
  answer = constraint if strict_auto else None
  return _cached([fam, frame, tools, tool_choice, one, strict_auto, answer],
                 lambda: _compile_calls(fam, frame, tools, tool_choice, one, strict_auto, answer))


def _compile_calls(fam: str, frame: str, tools, tool_choice, one_call: bool, or_answer: bool,
                   constraint: Optional[dict]) -> Grammar:
  g = Builder()
  functions = _tool_functions(tools)
  if not functions:
    raise SchemaError(f"tool_choice={tool_choice!r} needs a non-empty 'tools' list")
  if isinstance(tool_choice, dict):
    name = (tool_choice.get("function") or {}).get("name")
    if tool_choice.get("type") != "function" or name not in functions:
      raise SchemaError(f"tool_choice {tool_choice!r} must be {{'type': 'function', 'function': {{'name': n}}}} "
                        f"with n one of the tools {sorted(functions)}")
    functions = {name: functions[name]}
  if fam == "large":
    raise SchemaError("the Hunyuan-Large template has no tool support")
  if fam.startswith("hy3"):
    body = _hy3_calls(g, functions, one_call, HY3_OPENSOURCE if fam == "hy3_opensource" else HY3_PREVIEW)
  else:
    body = _a13b_calls(g, functions, one_call)
  if or_answer and constraint is not None:
    body, or_answer = g.alt(body, _answer_node(g, constraint)), False
  return Grammar(g, _chat_frame(g, fam, frame, body, or_text=or_answer), *_reasoning_marks(fam, frame))


def free_reply_grammar(family: str, prompt: str) -> Optional[Grammar]:
  """Any reply whose reasoning closes (for `thinking_token_budget` alone), or None when the prompt
  leaves no reasoning open."""
  fam = _family(family)
  frame = _frame_kind(fam, prompt)
  if frame != "think":
    return None
  end, _ = _reasoning_marks(fam, frame)

  def build():
    g = Builder()
    reasoning = g.until(end) if fam.startswith("hy3") else g.seq(g.lit("<think>"), g.until(end))
    return Grammar(g, g.seq(reasoning, g.text()), *_reasoning_marks(fam, frame))
  return _cached(["free", fam, frame], build)


def _reasoning_marks(fam: str, frame: str) -> tuple:
  """(the end of the reply's free reasoning, the text a spent thinking budget forces), or ("", "")."""
  if frame != "think":
    return "", ""
  if fam.startswith("hy3"):
    end = (HY3_OPENSOURCE if fam == "hy3_opensource" else HY3_PREVIEW).think_end
    return end, end
  return "</think>", "\n</think>\n"


def _frame_kind(fam: str, prompt: str) -> str:
  """How the reply opens: 'think' (free reasoning first), or straight to the answer."""
  if fam.startswith("hy3"):
    mk = HY3_OPENSOURCE if fam == "hy3_opensource" else HY3_PREVIEW
    return "think" if prompt.endswith(mk.think) else "answer"
  if fam == "large":
    return "answer"
  return "answer" if prompt.endswith(NO_THINK_SUFFIX) else "think"


def _chat_frame(g: Builder, fam: str, frame: str, body: Node, or_text: bool = False) -> Node:
  """The family's reply markup around `body` (or, with or_text, around free text that opens no
  tool call). Hy3: the prompt opened the think block already."""
  nl = g.opt(g.lit("\n"))
  if fam.startswith("hy3"):
    mk = HY3_OPENSOURCE if fam == "hy3_opensource" else HY3_PREVIEW
    if or_text:
      body = g.alt(body, g.text(avoid=mk.tag("tool_calls")))
    return g.seq(g.until(mk.think_end), nl, body) if frame == "think" else body
  if fam == "large":
    return body
  inner = g.seq(nl, body, nl, g.lit("</answer>"))
  if or_text:
    inner = g.alt(inner, g.text(end="</answer>", avoid="<tool_calls>"))
  answer = g.seq(g.lit("<answer>"), inner)
  return g.seq(g.lit("<think>"), g.until("</think>"), nl, answer) if frame == "think" else answer
