"""Grammars matched byte by byte: interned nodes, the NFA over them, token masks.

A grammar is a tree of interned `Node`s. A parse position is a stack of nodes still to match (an
interned cons list), a state the set of stacks an NFA simulation holds after closure, interned to
an int. A state's token mask is computed for the whole vocabulary at once, depth by depth over the
tokens' bytes with numpy, and cached: inside a string, a number or free text the state repeats, so
most steps are a lookup.

Node kinds: lit (bytes), seq, alt, ref (a named rule), star (item*), rep (the tail of a JSON list),
bytes (one byte of a 256-bit mask), str / esc / hex (inside a JSON string), num (a JSON number),
text (free text up to an end, avoiding a string). schema.py and regex.py build them.
"""
from __future__ import annotations

import json
import weakref
from typing import Any, Optional

import numpy as np

MAX_INT_DIGITS = 16     # digits of a number's integer part, fraction and exponent: a model cannot
MAX_EXP_DIGITS = 3      # run a number on forever
MASK_CACHE = 4096       # cached masks per grammar (packed bits: V / 8 bytes each)


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
    if k == "bytes":   # one byte from a 256-bit mask (regular expressions' character classes)
      return rest if node.a >> b & 1 else _DEAD
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
