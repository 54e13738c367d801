"""JSON schemas as grammar nodes.

JSON subset (xgrammar's defaults): object properties in schema order, required ones always and
optional ones maybe, no others when `properties` is given; at most one space after ':' and ','.
Keywords: type, enum, const, anyOf, oneOf, allOf (one entry), $ref into $defs / definitions,
properties, required, additionalProperties, items, minItems / maxItems, and on strings `pattern`
(the whole value), `format` (regex.FORMATS) or minLength / maxLength, on integers and numbers
minimum / maximum and their exclusive forms (a bounded number is written without an exponent), or
a whole multipleOf (then an integer is written; with bounds, or a fractional step: a 400).
Not enforced: uniqueItems (no grammar holds it; tool schemas use it, so it is not refused); a
date's day is not checked against its month.
"""
from __future__ import annotations

import decimal
import json
import math
from typing import Any

from hunyuan_jax.serve.structured.grammar import Builder, Node, SchemaError
from hunyuan_jax.serve.structured.regex import (integer_multiple_node, integer_range_node, number_range_node,
                                                 repeat, string_node)


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
      return string_node(g, s)
    bounded = any(k in s for k in _BOUNDS)
    if t in ("integer", "number") and "multipleOf" in s:
      return integer_multiple_node(g, _integer_step(s, bounded))
    if t == "integer" and bounded:
      return integer_range_node(g, *_integer_bounds(s))
    if t == "number" and bounded:
      return number_range_node(g, *_number_bounds(s))
    if t in ("number", "integer"):
      return g.number(t == "integer")
    if t == "boolean":
      return g.alt(g.lit("true"), g.lit("false"))
    if t == "null":
      return g.lit("null")
    if t == "array":
      return self._array(s)
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

  def _array(self, s: dict) -> Node:
    g = self.g
    item = self.compile(s.get("items", True))
    lo, hi = s.get("minItems", 0), s.get("maxItems")
    if not (isinstance(lo, int) and lo >= 0 and (hi is None or isinstance(hi, int) and hi >= 0)):
      raise SchemaError(f"minItems / maxItems must be non-negative integers, got {lo!r} / {hi!r}")
    if hi == 0:
      return g.lit("[]")
    if lo <= 1 and hi is None:   # the common case: a rep node, no counting
      some = g.seq(g.lit("["), item, g.rep(item, "]"))
      return some if lo == 1 else g.alt(g.lit("[]"), some)
    more = repeat(g, g.seq(g.lit(","), g.ws, item), max(lo - 1, 0), None if hi is None else hi - 1)
    some = g.seq(g.lit("["), item, more, g.lit("]"))
    return some if lo > 0 else g.alt(g.lit("[]"), some)

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


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_step(s: dict, bounded: bool) -> int:
  """multipleOf as the grammar enforces it: a whole number, without bounds (a 400 otherwise)."""
  m = s["multipleOf"]
  if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 or m != int(m):
    raise SchemaError(f"multipleOf {m!r}: only a positive whole number is supported")
  if bounded:
    raise SchemaError("multipleOf together with minimum / maximum is not supported; use one of them")
  return int(m)


def _bound_values(s: dict, name: str, excl: str) -> tuple:
  """(inclusive value, exclusive value) of one side, each None where absent: draft 6 numbers,
  or draft 4's boolean exclusiveMinimum / exclusiveMaximum marking `name` exclusive."""
  v, x = s.get(name), s.get(excl)
  if isinstance(x, bool):
    x, v = (v if x else None), (None if x else v)
  for b in (v, x):
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
      raise SchemaError(f"'{name}' / '{excl}' must be numbers, got {b!r}")
  return v, x


def _integer_bounds(s: dict) -> tuple:
  """The schema's bounds -> the inclusive integer bounds (None = unbounded)."""
  def bound(name, excl, up):
    v, x = _bound_values(s, name, excl)
    cands = [math.ceil(v) if up else math.floor(v)] if v is not None else []
    if x is not None:
      cands.append(math.floor(x) + 1 if up else math.ceil(x) - 1)
    return (max if up else min)(cands) if cands else None
  return bound("minimum", "exclusiveMinimum", True), bound("maximum", "exclusiveMaximum", False)


def _number_bounds(s: dict) -> tuple:
  """The schema's bounds -> (lo, lo inclusive, hi, hi inclusive), Decimals (None = unbounded);
  where both forms bound one side the tighter wins, the exclusive one at a tie."""
  def bound(name, excl, up):
    v, x = (None if b is None else decimal.Decimal(repr(b)) for b in _bound_values(s, name, excl))
    if x is not None and (v is None or (x >= v if up else x <= v)):
      return x, False
    return v, True
  lo, lo_incl = bound("minimum", "exclusiveMinimum", True)
  hi, hi_incl = bound("maximum", "exclusiveMaximum", False)
  return lo, lo_incl, hi, hi_incl
