"""Regular expressions, JSON-schema string / integer / array keywords and EBNF grammars as grammars:
each checked against an oracle (`re.fullmatch`, json, uuid, ipaddress) on texts drawn from the
grammar and on texts drawn at random."""
import ipaddress
import json
import random
import re
import uuid

import pytest

from hunyuan_jax.serve import structured as st
from hunyuan_jax.serve.structured.ebnf import ebnf_node
from hunyuan_jax.serve.structured.regex import FORMATS


def _grammar(node_fn, *args):
  g = st.Builder()
  return st.Grammar(g, node_fn(g, *args))


def _accepts(grammar, text: str) -> bool:
  sid = grammar.start
  for b in text.encode():
    sid = grammar.step(sid, b)
    if sid < 0:
      return False
  return grammar.accepting(sid)


def _walk(grammar, rng, max_bytes=60):
  """A random text of the grammar's language: random allowed bytes, stopping (where complete) with
  probability 1/4 a byte, or the first complete text past max_bytes; None if none is reached."""
  sid, out = grammar.start, bytearray()
  for _ in range(4 * max_bytes):
    done = grammar.accepting(sid)
    if done and (len(out) > max_bytes or rng.random() < 0.25 or not grammar.can_continue(sid)):
      return out.decode()
    moves: dict = {}   # next state -> its bytes: a uniform state, then a byte (else a closing
    for b in range(256):   # quote, one byte of ~200 inside a string, would almost never be drawn)
      if grammar.step(sid, b) >= 0:
        moves.setdefault(grammar.step(sid, b), []).append(b)
    if not moves:
      return None
    sid = rng.choice(sorted(moves))
    out.append(rng.choice(moves[sid]))
  return None


PATTERNS = [r"\d{3}-\d{4}", r"(ab|c)*d?", r"[^a-c\n]+", r"^a.b$", r"[\w.+-]+@[a-z]+\.(com|org)", r"a{2,3}b{,2}",
            r"\{x}", r'"[^"]*"', r"(?:0|[1-9]\d*)(\.\d+)?", r"(?P<y>\d{4})-(?P<m>0[1-9]|1[0-2])", r"[\u00e0-\u00ff]+x?",
            r"[^\x00-\x7f]{1,3}", r"\s*\S+\s*", r"(a|b)+?c", r"[a-f\d]{2}|[-.]", r"x\x41\t\\\.", r"[]a]+", r"[^]a]"]
ALPHABET = "abcdxyz0123456789-.@_ \n\t\"\\{}ABàéÿ中😀"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_matches_what_re_fullmatch_matches(pattern):
  grammar = _grammar(st.regex_node, pattern)
  rng = random.Random(pattern)
  walked = [t for t in (_walk(grammar, rng) for _ in range(60)) if t is not None]
  assert len(walked) >= 30
  for text in walked:
    assert re.fullmatch(pattern, text, re.ASCII), (pattern, text)
  for _ in range(400):   # random and mutated texts: the same verdict as re (ASCII \d \w \s, as ECMAScript)
    if rng.random() < 0.5 and walked:
      t = list(rng.choice(walked))
      if t:
        t[rng.randrange(len(t))] = rng.choice(ALPHABET)
      text = "".join(t)
    else:
      text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(8)))
    assert _accepts(grammar, text) == bool(re.fullmatch(pattern, text, re.ASCII)), (pattern, text)


@pytest.mark.parametrize("pattern", [r'[^"]*', r".*", r'\d+"\\x', r"[\x00-\x1f\"\\]{2}", r"a\nb|é"])
def test_json_string_regex_constrains_the_decoded_value(pattern):
  """Inside a JSON string the grammar writes each character as JSON does; the decoded value
  matches the expression."""
  g = st.Builder()
  grammar = st.Grammar(g, g.seq(g.lit('"'), st.regex_node(g, pattern, True), g.lit('"')))
  rng = random.Random(pattern)
  walked = [t for t in (_walk(grammar, rng) for _ in range(60)) if t is not None]
  assert len(walked) >= 30
  for text in walked:
    value = json.loads(text)
    assert re.fullmatch(pattern, value, re.S if pattern == ".*" else 0) or pattern == ".*" and "\n" not in value
    assert json.dumps(value, ensure_ascii=False) == text    # the canonical escapes only


@pytest.mark.parametrize("pattern,why", [(r"(a)\1", "backreferences"), (r"(?=a)a", "lookaround"),
                                         (r"\bx", "boundaries"), (r"(?i)a", "inline flags"), (r"a++", "possessive"),
                                         (r"*a", "nothing to repeat"),
                                         (r"a{3,2}", "above its maximum"), (r"(ab", "missing"), (r"ab)", "unbalanced"),
                                         (r"a^b", "anchors"), (r"[z-a]", "bad range"), (r"a{1001}", "1000"),
                                         (r"[[:alpha:]]", "POSIX")])
def test_regex_rejects_what_it_cannot_match_with_the_reason(pattern, why):
  with pytest.raises(st.SchemaError, match=why):
    st.regex_node(st.Builder(), pattern)


def _values(schema, n=80, seed=0):
  grammar = _grammar(st.schema_node, schema)
  rng = random.Random(seed)
  walked = [t for t in (_walk(grammar, rng, 80) for _ in range(n)) if t is not None]
  assert len(walked) >= n // 2
  return grammar, [json.loads(t) for t in walked]


@pytest.mark.parametrize("fmt,check", [
    ("date", None), ("time", None), ("date-time", None), ("email", lambda v: "@" in v),
    ("uuid", lambda v: str(uuid.UUID(v)) == v.lower()), ("ipv4", lambda v: ipaddress.IPv4Address(v) is not None)])
def test_string_formats(fmt, check):
  grammar, values = _values({"type": "string", "format": fmt})
  for v in values:
    assert re.fullmatch(FORMATS[fmt], v) and (check is None or check(v)), v
  assert not _accepts(grammar, '"not a value"')


def test_string_pattern_and_lengths():
  grammar, values = _values({"type": "string", "pattern": r"^[A-Z]{2}-\d{2,4}$"})
  assert all(re.fullmatch(r"[A-Z]{2}-\d{2,4}", v) for v in values)
  assert not _accepts(grammar, '"AB-1"') and _accepts(grammar, '"AB-123"')
  grammar, values = _values({"type": "string", "minLength": 2, "maxLength": 5})
  assert all(2 <= len(v) <= 5 for v in values) and {len(v) for v in values} >= {2, 3, 4, 5}
  for text, ok in [('"a"', False), ('"ab"', True), ('"é中😀\\n\\""', True), ('"abcdef"', False),
                   ('"\\u00e9"', False)]:
    assert _accepts(grammar, text) == ok, text   # escapes are JSON's canonical ones (é is written raw)


@pytest.mark.parametrize("bounds", [dict(minimum=0, maximum=100), dict(minimum=-37, maximum=1234),
                                    dict(exclusiveMinimum=-5, exclusiveMaximum=5), dict(minimum=18),
                                    dict(maximum=-3), dict(minimum=2.5, maximum=7.9), dict(minimum=999, maximum=999),
                                    dict(minimum=0, exclusiveMinimum=True, maximum=10)])
def test_integer_ranges(bounds):
  schema = {"type": "integer", **bounds}
  grammar = _grammar(st.schema_node, schema)
  lo = bounds.get("minimum", -float("inf"))
  hi = bounds.get("maximum", float("inf"))
  if bounds.get("exclusiveMinimum") is True:
    lo = lo + 1
  elif "exclusiveMinimum" in bounds:
    lo = bounds["exclusiveMinimum"] + 1
  if "exclusiveMaximum" in bounds:
    hi = bounds["exclusiveMaximum"] - 1
  for n in list(range(-1300, 1300)) + [10**6, -10**6, 10**15]:
    assert _accepts(grammar, str(n)) == (lo <= n <= hi), (n, bounds)
  for text in ["-0", "007", "1.0", "+1", ""]:
    assert not _accepts(grammar, text)


@pytest.mark.parametrize("m", [1, 3, 7, 10, 25, 1000])
def test_integer_multiple_of(m):
  for t in ("integer", "number"):   # a whole step on a number: its multiples are integers
    grammar = _grammar(st.schema_node, {"type": t, "multipleOf": m})
    for n in list(range(-1200, 1200)) + [10**15, -7 * 10**14, 10**15 + 1]:
      assert _accepts(grammar, str(n)) == (n % m == 0), (n, m)
    for text in ["-0", "00", "0" + str(m), "1.0", "+" + str(m), "", str(m) + ".0", "1" + "0" * 16]:
      assert not _accepts(grammar, text), text


@pytest.mark.parametrize("schema,why", [
    ({"type": "number", "multipleOf": 0.01}, "positive whole number"),
    ({"type": "integer", "multipleOf": 0}, "positive whole number"),
    ({"type": "integer", "multipleOf": 5, "minimum": 0}, "together with minimum"),
    ({"type": "integer", "multipleOf": 10**6}, "from 1 to 1000")])
def test_multiple_of_the_grammar_cannot_hold_is_refused(schema, why):
  with pytest.raises(st.SchemaError, match=why):
    _grammar(st.schema_node, schema)


NUMBER_BOUNDS = [{"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
                 {"minimum": -1.5, "exclusiveMaximum": 2.25}, {"exclusiveMaximum": 0}, {"exclusiveMinimum": 0.05},
                 {"exclusiveMinimum": -3.7, "maximum": -1.25}, {"minimum": 1.5, "maximum": 1.5},
                 {"minimum": 0.001, "maximum": 0.0015}, {"maximum": 0, "minimum": -0.5, "exclusiveMinimum": True},
                 {"minimum": 10, "maximum": 100.5, "exclusiveMaximum": 100.5}]


@pytest.mark.parametrize("bounds", NUMBER_BOUNDS)
def test_number_ranges(bounds):
  """A bounded number holds exactly the decimals in its interval (no exponent; '-0' may go either
  way), over spellings near the bounds, and every text drawn from it parses inside it."""
  from decimal import Decimal, InvalidOperation
  from hunyuan_jax.serve.structured.schema import _number_bounds
  schema = {"type": "number", **bounds}
  grammar = _grammar(st.schema_node, schema)
  lo, lo_incl, hi, hi_incl = _number_bounds(schema)
  inside = lambda v: ((lo is None or (v >= lo if lo_incl else v > lo)) and
                      (hi is None or (v <= hi if hi_incl else v < hi)))
  rng = random.Random(str(bounds))
  texts = {"-0", "0.0", "1.", "01", ".5", "-", "1e3", "+1", "", "1.5", "-1.5", "100.5", "0.0015", "-3.7"}
  for _ in range(1500):
    frac = rng.choice(["", ".5", ".25", ".0", ".05", ".0015", ".001", ".00149", ".7", ".69",
                       "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4)))])
    texts.add(rng.choice(["", "-"]) + rng.choice(["0", "1", "2", "3", "9", "10", "99", "100", "101"]) + frac)
  for text in texts:
    json_number = re.fullmatch(r"-?(0|[1-9]\d*)(\.\d+)?", text) is not None
    if json_number and Decimal(text) == 0 and text.startswith("-"):
      continue
    assert _accepts(grammar, text) == (json_number and inside(Decimal(text))), (text, bounds)
  walked = [t for t in (_walk(grammar, rng, 12) for _ in range(40)) if t is not None]
  assert len(walked) > 30 and all(inside(Decimal(t)) for t in walked)


def test_array_item_counts():
  schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
  grammar, values = _values(schema)
  assert all(2 <= len(v) <= 4 for v in values)
  for k in range(7):
    assert _accepts(grammar, json.dumps(list(range(k)))) == (2 <= k <= 4), k
  assert _accepts(_grammar(st.schema_node, {"type": "array", "maxItems": 0}), "[]")


JSON_EBNF = r'''
# llama.cpp's grammars/json.gbnf, as written there
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''


def test_ebnf_json_grammar_from_llama_cpp():
  grammar = _grammar(ebnf_node, JSON_EBNF)
  rng = random.Random(0)
  for _ in range(60):
    text = _walk(grammar, rng, 120)
    if text is not None:
      json.loads(text)
  for text in ['{"a": [1, 2.5, "x\\n", {"b": null}], "c": true}', "{}", '{"é": -0.5e3}']:
    assert _accepts(grammar, text), text
  for text in ['{"a" 1}', "[1]", '{"a": 01}', "{'a': 1}"]:
    assert not _accepts(grammar, text), text


def test_ebnf_rules_repeats_and_errors():
  grammar = _grammar(ebnf_node, 'root ::= answer ("\\n" answer)*\nanswer ::= "yes" | "no" | [0-9]{1,3} # or a count\n')
  for text, ok in [("yes", True), ("yes\nno\n12", True), ("1234", False), ("maybe", False), ("no\n", False)]:
    assert _accepts(grammar, text) == ok, text
  for text, why in [('root ::= root "a" | "b"', "left-recursive"),
                    ('root ::= a\na ::= b? a "x"\nb ::= "y"', "left-rec"),
                    ("root ::= missing", "undefined"), ('x ::= "a"', "'root' rule"), ('root ::= "a', "unterminated"),
                    ('root ::= ("a"', "missing"), ('root ::= "a"\nroot ::= "b"', "twice"), ("hello", "EBNF rules")]:
    with pytest.raises(st.SchemaError, match=why):
      ebnf_node(st.Builder(), text)


@pytest.mark.parametrize("family", ["tiny", "hy3"])
def test_tool_string_patterns_hold_in_both_call_formats(family):
  """A tool argument's `pattern` and `format` bind the value: JSON-escaped in A13B's JSON calls,
  raw in Hy3's tag-delimited ones."""
  from hunyuan_jax.chat import render_chat, templates
  schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                             "day": {"type": "string", "format": "date"}}, "required": ["code", "day"]}
  tools = [{"type": "function", "function": {"name": "book", "parameters": schema}}]
  user = [{"role": "user", "content": "book it"}]

  def reply(args):
    if family == "tiny":
      return ("<think>\nok\n</think>\n<answer>\n<tool_calls>[" + json.dumps({"name": "book", "arguments": args})
              + "]</tool_calls>\n</answer>")
    call = {"type": "function", "function": {"name": "book", "arguments": json.dumps(args)}}
    return "ok" + templates.HY3_PREVIEW.think_end + "\n" + templates._hy3_tool_calls([call], templates.HY3_PREVIEW)
  prompt = render_chat(user, family, tools=tools, **({} if family == "tiny" else {"reasoning_effort": "high"}))
  grammar = st.chat_grammar(family, prompt, tools=tools, tool_choice="required")
  assert _accepts(grammar, reply({"code": "PAR", "day": "2026-11-24"}))
  for bad in ({"code": "Paris", "day": "2026-11-24"}, {"code": "PAR", "day": "24/11/2026"}):
    assert not _accepts(grammar, reply(bad)), bad
