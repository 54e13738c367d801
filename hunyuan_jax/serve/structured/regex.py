"""Regular expressions as grammar nodes: vLLM's `structured_outputs.regex`, JSON-schema `pattern`
and `format`, and the character classes of EBNF grammars.

The whole text must match (as `re.fullmatch`; `^` and `$` at the ends are accepted and change
nothing). Syntax: literals and escapes (\\n \\t \\xHH \\uHHHH ...), `.`, classes `[...]` / `[^...]`
with ranges, \\d \\w \\s and their negations (ASCII, as `re.ASCII`), groups `(...)`, `(?:...)`,
`(?P<name>...)`, alternation, and the quantifiers * + ? {n} {n,} {n,m} (lazy forms match the same
texts). Backreferences, lookaround, word boundaries and inline flags raise SchemaError: they are
not regular, or change what the rest means.

Characters are code points; a class becomes the UTF-8 byte sequences of its ranges. With
`json_string`, the expression matches a JSON string's *decoded* value: each character is written
as JSON writes it (quote, backslash and control characters escaped), so `"` + node + `"` is a JSON
string whose value matches the expression.
"""
from __future__ import annotations

import decimal
import functools
import json

from hunyuan_jax.serve.structured.grammar import Builder, Node, SchemaError

MAX_CODE = 0x10FFFF
MAX_REPEAT = 1000        # the largest {n,m} bound: each count is a node
_SURROGATES = (0xD800, 0xDFFF)
_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0", "a": "\a"}
_JSON_SPECIAL = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]   # written escaped inside a JSON string


def _normalise(ranges) -> list:
  """Sorted, merged, surrogate-free code point ranges."""
  out: list = []
  for lo, hi in sorted(ranges):
    if out and lo <= out[-1][1] + 1:
      out[-1] = (out[-1][0], max(out[-1][1], hi))
    else:
      out.append((lo, hi))
  return _minus(out, [_SURROGATES])


def _minus(ranges, remove) -> list:
  out = []
  for lo, hi in ranges:
    for rlo, rhi in remove:
      if rhi < lo or rlo > hi:
        continue
      if rlo > lo:
        out.append((lo, rlo - 1))
      lo = rhi + 1
      if lo > hi:
        break
    if lo <= hi:
      out.append((lo, hi))
  return out


def _complement(ranges) -> list:
  return _minus([(0, MAX_CODE)], _normalise(ranges))


def _utf8_sequences(lo: int, hi: int) -> list:
  """The code points [lo, hi] as UTF-8: a list of byte-range sequences ((b0lo, b0hi), ...), each
  a product of ranges (the split of Russ Cox's utf8 ranges: at encoding lengths, then wherever a
  continuation byte would not run over its whole range)."""
  out, todo = [], [(lo, hi)]
  while todo:
    a, b = todo.pop()
    edge = next((e for e in (0x7F, 0x7FF, 0xFFFF) if a <= e < b), None)
    if edge is not None:
      todo += [(a, edge), (edge + 1, b)]
      continue
    for i in range(1, 4):
      m = (1 << (6 * i)) - 1
      if a & ~m != b & ~m:
        if a & m:
          todo += [(a, a | m), ((a | m) + 1, b)]
          break
        if b & m != m:
          todo += [(a, (b & ~m) - 1), (b & ~m, b)]
          break
    else:
      out.append(tuple(zip(chr(a).encode(), chr(b).encode())))
  return out


def byte_range(g: Builder, lo: int, hi: int) -> Node:
  """One byte in [lo, hi] (a 256-bit mask node)."""
  return g.node("bytes", ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))


def class_node(g: Builder, ranges, json_string: bool = False) -> Node:
  """One character from the code point `ranges` (JSON-escaped where `json_string`)."""
  ranges = _normalise(ranges)
  alts = []
  if json_string:
    special = [c for a, b in _JSON_SPECIAL for c in range(a, b + 1) if any(lo <= c <= hi for lo, hi in ranges)]
    alts += [g.lit(json.dumps(chr(c))[1:-1]) for c in special]
    ranges = _minus(ranges, _JSON_SPECIAL)
  singles = 0   # one-byte characters merge into one mask
  for lo, hi in ranges:
    for seq in _utf8_sequences(lo, hi):
      if len(seq) == 1:
        singles |= ((1 << (seq[0][1] + 1)) - 1) ^ ((1 << seq[0][0]) - 1)
      else:
        alts.append(g.seq(*(byte_range(g, a, b) for a, b in seq)))
  if singles:
    alts.insert(0, g.node("bytes", singles))
  if not alts:
    raise SchemaError("a character class that matches no character")
  return g.alt(*alts)


def char_node(g: Builder, c: str, json_string: bool = False) -> Node:
  return g.lit(json.dumps(c, ensure_ascii=False)[1:-1] if json_string else c)


def repeat(g: Builder, x: Node, lo: int, hi) -> Node:
  """x{lo,hi}; hi None = unbounded."""
  if hi is not None and lo > hi:
    raise SchemaError(f"a repeat {{{lo},{hi}}} whose minimum is above its maximum")
  if max(lo, hi or 0) > MAX_REPEAT:
    raise SchemaError(f"a repeat bound above {MAX_REPEAT} is not supported")
  tail = g.node("star", x) if hi is None else g.empty
  for _ in range((hi or lo) - lo):
    tail = g.opt(g.seq(x, tail))
  return g.seq(*([x] * lo), tail)


class _Parser:
  """Recursive descent: alternation > sequence > quantified atom."""

  def __init__(self, g: Builder, pattern: str, json_string: bool):
    if not isinstance(pattern, str):
      raise SchemaError(f"a regular expression must be a string, got {pattern!r}")
    self.g, self.p, self.i, self.json = g, pattern, 0, json_string
    if self.p.startswith("^") or self.p.startswith("\\A"):
      self.i = 1 if self.p[0] == "^" else 2
    self.end = len(self.p)
    for tail in ("$", "\\Z", "\\z"):
      if self.p.endswith(tail) and not self.p.endswith("\\" + tail) and len(self.p) - len(tail) >= self.i:
        self.end = len(self.p) - len(tail)
        break

  def error(self, why: str):
    raise SchemaError(f"regular expression {self.p!r} at offset {self.i}: {why}")

  def parse(self) -> Node:
    node = self.alternation()
    if self.i < self.end:
      self.error("unbalanced ')'")
    return node

  def peek(self) -> str:
    return self.p[self.i] if self.i < self.end else ""

  def alternation(self) -> Node:
    alts = [self.sequence()]
    while self.peek() == "|":
      self.i += 1
      alts.append(self.sequence())
    return self.g.alt(*alts)

  def sequence(self) -> Node:
    items = []
    while self.peek() not in ("", "|", ")"):
      items.append(self.quantified(self.atom()))
    return self.g.seq(*items) if items else self.g.empty

  def quantified(self, x: Node) -> Node:
    while True:
      c = self.peek()
      bounds = self._bounds() if c == "{" else None
      if c in ("*", "+", "?"):
        self.i += 1
        lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
      elif bounds is not None:
        lo, hi = bounds
      else:
        return x
      if self.peek() == "?":
        self.i += 1   # lazy: the same texts
      elif self.peek() == "+":
        self.error("possessive quantifiers are not supported")
      x = repeat(self.g, x, lo, hi)

  def _bounds(self):
    """{n} {n,} {n,m} {,m} at self.i -> (lo, hi), moving past it; None (and no move) if not one."""
    close = self.p.find("}", self.i, self.end)
    body = self.p[self.i + 1:close] if close > 0 else ""
    parts = body.split(",")
    if close < 0 or len(parts) > 2 or not all(x.isdigit() or (x == "" and len(parts) == 2) for x in parts) \
        or body in ("", ","):
      return None
    self.i = close + 1
    lo = int(parts[0] or 0)
    hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
    return lo, hi

  def atom(self) -> Node:
    g, c = self.g, self.peek()
    self.i += 1
    if c == "(":
      if self.p.startswith("?:", self.i):
        self.i += 2
      elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3]
                                                not in ("=", "!")):
        close = self.p.find(">", self.i)
        if close < 0:
          self.error("an unterminated group name")
        self.i = close + 1
      elif self.p.startswith("?", self.i):
        self.error("lookaround, conditionals and inline flags are not supported")
      node = self.alternation()
      if self.peek() != ")":
        self.error("missing ')'")
      self.i += 1
      return node
    if c == "[":
      return class_node(g, self.char_class(), self.json)
    if c == ".":
      return class_node(g, _complement([(0x0A, 0x0A)]), self.json)
    if c == "\\":
      ranges = self.escape(in_class=False)
      return class_node(g, ranges, self.json)
    if c in ("*", "+", "?", "{"):
      if c == "{":
        return char_node(g, c, self.json)
      self.error(f"nothing to repeat before {c!r}")
    if c in ("^", "$"):
      self.error("anchors are only supported at the start and the end")
    if c == ")":
      self.error("unbalanced ')'")
    return char_node(g, c, self.json)

  def escape(self, in_class: bool) -> list:
    """After a backslash: -> code point ranges."""
    if self.i >= len(self.p):
      self.error("a trailing backslash")
    c = self.p[self.i]
    self.i += 1
    if c.lower() in _CLASS_ESCAPES:
      r = _CLASS_ESCAPES[c.lower()]
      return _complement(r) if c.isupper() else list(r)
    if c in _CHAR_ESCAPES:
      return [(ord(_CHAR_ESCAPES[c]),) * 2]
    if c in ("x", "u", "U"):
      n = {"x": 2, "u": 4, "U": 8}[c]
      digits = self.p[self.i:self.i + n]
      if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
        self.error(f"\\{c} needs {n} hex digits")
      self.i += n
      return [(int(digits, 16),) * 2]
    if c.isdigit() or c in "bBAZzkpPN" and not (in_class and c == "b"):
      self.error(f"\\{c} (backreferences, boundaries, Unicode properties) is not supported")
    if in_class and c == "b":
      return [(8, 8)]
    if c.isalnum():
      self.error(f"unknown escape \\{c}")
    return [(ord(c), ord(c))]

  def char_class(self) -> list:
    """After '[': -> code point ranges (negated where it starts with '^')."""
    negate = self.peek() == "^"
    self.i += negate
    ranges, first = [], True
    while True:
      if self.i >= len(self.p):
        self.error("missing ']'")
      c = self.p[self.i]
      if c == "]" and not first:
        self.i += 1
        break
      first = False
      self.i += 1
      if c == "\\":
        got = self.escape(in_class=True)
        if len(got) != 1 or got[0][0] != got[0][1]:
          ranges += got
          continue
        lo = got[0][0]
      elif c == "[" and self.p.startswith(":", self.i):
        self.error("POSIX classes like [:alpha:] are not supported; write the ranges")
      else:
        lo = ord(c)
      if self.p.startswith("-", self.i) and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
        self.i += 1
        c2 = self.p[self.i]
        self.i += 1
        if c2 == "\\":
          got = self.escape(in_class=True)
          if len(got) != 1 or got[0][0] != got[0][1]:
            self.error("a range must end at a character")
          hi = got[0][0]
        else:
          hi = ord(c2)
        if hi < lo:
          self.error(f"a bad range {chr(lo)!r}-{chr(hi)!r}")
        ranges.append((lo, hi))
      else:
        ranges.append((lo, lo))
    return _complement(ranges) if negate else ranges


def regex_node(g: Builder, pattern: str, json_string: bool = False) -> Node:
  """The texts `pattern` matches whole (JSON-escaped where `json_string`, see the module)."""
  return _Parser(g, pattern, json_string).parse()


# ---------------------------------------------------------------------- JSON-schema strings
FORMATS = {   # JSON-schema `format` -> the regular expression its strings follow (xgrammar's set)
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "time": r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    "date-time": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?"
                 r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "email": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9]([A-Za-z0-9-]*"
             r"[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+",
}


def string_body(g: Builder, s: dict, json_string: bool = True):
  """A string schema's value under `pattern` (whole-value match), else `format`, else minLength /
  maxLength (counted in code points, as JSON Schema counts them); None when none is given.
  json_string: written inside a JSON string's quotes (else raw, as Hy3's tool arguments)."""
  if "pattern" in s:
    return regex_node(g, s["pattern"], json_string)
  if s.get("format") in FORMATS:
    return regex_node(g, FORMATS[s["format"]], json_string)
  if "minLength" in s or "maxLength" in s:
    lo, hi = s.get("minLength", 0), s.get("maxLength")
    if not (isinstance(lo, int) and lo >= 0 and (hi is None or isinstance(hi, int) and hi >= 0)):
      raise SchemaError(f"minLength / maxLength must be non-negative integers, got {lo!r} / {hi!r}")
    return repeat(g, class_node(g, [(0, MAX_CODE)], json_string), lo, hi)
  return None


def string_node(g: Builder, s: dict) -> Node:
  """A JSON string that follows the string schema `s`."""
  body = string_body(g, s)
  return g.string if body is None else g.seq(g.lit('"'), body, g.lit('"'))


def integer_range_node(g: Builder, lo, hi) -> Node:
  """A JSON integer in [lo, hi] (either None = unbounded), as digits: 0, or no leading zeros."""
  if lo is not None and hi is not None and lo > hi:
    raise SchemaError(f"an integer range [{lo}, {hi}] that holds no integer")
  alts = []
  if lo is None or lo < 0:   # negatives: '-' and the magnitudes [max(1, -hi), -lo]
    alts.append(g.seq(g.lit("-"), _magnitudes(g, max(1, -hi) if hi is not None else 1,
                                              None if lo is None else -lo)))
  if hi is None or hi >= 0:
    alts.append(_magnitudes(g, max(0, lo or 0), hi))
  return g.alt(*alts) if alts else g.empty


MAX_MULTIPLE_OF = 1000   # remainder states x digit positions x 10 digits stay a few 100K nodes


def integer_multiple_node(g: Builder, m: int) -> Node:
  """A JSON integer divisible by m: 0, or an optional '-' and up to MAX_INT_DIGITS digits whose
  running remainder (10 r + d) mod m ends at 0 (no leading zeros)."""
  from hunyuan_jax.serve.structured.grammar import MAX_INT_DIGITS
  if not 1 <= m <= MAX_MULTIPLE_OF:
    raise SchemaError(f"multipleOf {m}: integers take a multipleOf from 1 to {MAX_MULTIPLE_OF}")
  rest = functools.lru_cache(None)(lambda r, k: g.alt(
      *([g.empty] if r == 0 else []),
      *([g.seq(g.lit(str(d)), rest((10 * r + d) % m, k - 1)) for d in range(10)] if k else [])))
  magnitude = g.alt(*(g.seq(g.lit(str(d)), rest(d % m, MAX_INT_DIGITS - 1)) for d in range(1, 10)))
  return g.alt(g.lit("0"), g.seq(g.opt(g.lit("-")), magnitude))


def number_range_node(g: Builder, lo, lo_incl: bool, hi, hi_incl: bool) -> Node:
  """A JSON number (no exponent) in the interval from lo to hi (Decimals; None = unbounded; each
  end inclusive or not), up to MAX_INT_DIGITS fraction digits."""
  if lo is not None and hi is not None and (lo > hi or lo == hi and not (lo_incl and hi_incl)):
    raise SchemaError(f"a number range from {lo} to {hi} that holds no number")
  alts = []
  if lo is None or lo < 0:   # x <= 0: '-' and the magnitude -x, from max(0, -hi) up to -lo
    low, incl = (-hi, hi_incl) if hi is not None and hi <= 0 else (decimal.Decimal(0), True)
    alts.append(g.seq(g.lit("-"), _decimal_magnitudes(g, low, incl, None if lo is None else -lo, lo_incl)))
  if hi is None or hi > 0 or hi == 0 and hi_incl:
    low, incl = (lo, lo_incl) if lo is not None and lo >= 0 else (decimal.Decimal(0), True)
    alts.append(_decimal_magnitudes(g, low, incl, hi, hi_incl))
  return g.alt(*alts)


def _decimal_magnitudes(g: Builder, a, a_incl: bool, b, b_incl: bool) -> Node:
  """Non-negative decimals from a to b (b None = unbounded): an integer part, then a fraction."""
  from hunyuan_jax.serve.structured.grammar import MAX_INT_DIGITS
  fraction = functools.partial(_fraction, g, MAX_INT_DIGITS)
  ai, af = _split_decimal(a)
  bi, bf = _split_decimal(b) if b is not None else (None, None)
  if ai == bi:
    parts = [(str(ai), fraction(af, a_incl, bf, b_incl))]
  else:   # a's integer part, those between (any fraction), b's
    parts = [(str(ai), fraction(af, a_incl, None, False))]
    if b is None or ai + 1 <= bi - 1:
      parts.append((_magnitudes(g, ai + 1, None if b is None else bi - 1), fraction(None, False, None, False)))
    if b is not None:
      parts.append((str(bi), fraction(None, False, bf, b_incl)))
  return g.alt(*(g.seq(g.lit(i) if isinstance(i, str) else i, f) for i, f in parts if f is not None))


def _split_decimal(x) -> tuple:
  """A non-negative Decimal -> (integer part, fraction digits without trailing zeros)."""
  whole = int(x)
  return whole, format(x - whole, "f").partition(".")[2].rstrip("0")


def _fraction(g: Builder, k: int, a, a_incl: bool, b, b_incl: bool) -> Node:
  """Nothing or '.' and 1 to k digits T, where 0.T is above fraction digits a (None: no bound;
  a_incl: or equal) and below b; None if no T is. Digit by digit: a digit that settles a bound
  lifts it."""
  memo: dict = {}

  def digits(a, a_incl, b, b_incl, k, empty_ok):
    key = (a, a_incl, b, b_incl, k, empty_ok)
    if key in memo:
      return memo[key]
    zero_ok = (a is None or a == "" and a_incl) and (b is None or b != "" or b_incl)   # T ends here: 0.T = 0.(digits so far)
    alts = [g.empty] if empty_ok and zero_ok else []
    if k > 0:
      groups: dict = {}   # the state after each digit -> the digits that lead there
      for d in range(10):
        na = _after_digit(a, a_incl, d, lower=True)
        nb = _after_digit(b, b_incl, d, lower=False)
        if na is not False and nb is not False:
          groups.setdefault((na, nb), []).append(d)
      for ((na, nai), (nb, nbi)), ds in groups.items():
        after = digits(na, nai, nb, nbi, k - 1, True)
        if after is not None:
          alts += [g.seq(byte_range(g, ord("0") + lo, ord("0") + hi), after) for lo, hi in _runs(ds)]
    memo[key] = g.alt(*alts) if alts else None
    return memo[key]

  rest = digits(a, a_incl, b, b_incl, k, False)
  zero_ok = (a is None or a == "" and a_incl) and (b is None or b != "" or b_incl)
  alts = ([g.empty] if zero_ok else []) + ([g.seq(g.lit("."), rest)] if rest is not None else [])
  return g.alt(*alts) if alts else None


def _after_digit(bound, incl: bool, d: int, lower: bool):
  """The bound left for the digits after d: (None, _) once d settles it, (rest, incl) when d
  equals its digit, False when d breaks it. An empty bound is 0: a lower one excludes 0 only if
  exclusive (then some later digit must be non-zero); below an upper 0 only zeros fit."""
  if bound is None:
    return None, False
  if bound == "":
    if lower:
      return (None, False) if incl or d > 0 else ("", False)
    return ("", True) if incl and d == 0 else False
  if d == int(bound[0]):
    return bound[1:], incl
  return (None, False) if (d > int(bound[0])) == lower else False


def _runs(ds: list) -> list:
  out = []
  for d in ds:
    if out and out[-1][1] == d - 1:
      out[-1][1] = d
    else:
      out.append([d, d])
  return out


def _magnitudes(g: Builder, lo: int, hi) -> Node:
  """Non-negative integers in [lo, hi] (hi None = up to 16 digits) by digit count."""
  from hunyuan_jax.serve.structured.grammar import MAX_INT_DIGITS
  top = 10 ** MAX_INT_DIGITS - 1 if hi is None else hi
  alts = []
  for n in range(len(str(lo)), len(str(top)) + 1):
    a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(top, 10 ** n - 1)
    if a <= b:
      alts.append(_same_length(g, str(a), str(b)))
  return g.alt(*alts)


def _same_length(g: Builder, a: str, b: str) -> Node:
  """The decimal strings of one length from a to b."""
  if not a:
    return g.empty
  digit = lambda x, y: byte_range(g, ord(x), ord(y))
  if a == "0" * len(a) and b == "9" * len(b):
    return g.seq(*[digit("0", "9")] * len(a))
  if a[0] == b[0]:
    return g.seq(g.lit(a[0]), _same_length(g, a[1:], b[1:]))
  n = len(a) - 1
  alts = [g.seq(g.lit(a[0]), _same_length(g, a[1:], "9" * n))]
  if int(b[0]) - int(a[0]) > 1:
    alts.append(g.seq(digit(chr(ord(a[0]) + 1), chr(ord(b[0]) - 1)), *[digit("0", "9")] * n))
  alts.append(g.seq(g.lit(b[0]), _same_length(g, "0" * n, b[1:])))
  return g.alt(*alts)
