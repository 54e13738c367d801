"""EBNF grammars (GBNF, as llama.cpp and xgrammar write them) as grammar nodes: vLLM's
`structured_outputs.grammar` / `guided_grammar`.

    root   ::= answer ("\\n" answer)*      # the reply must match `root`
    answer ::= "yes" | "no" | [0-9]{1,3}

A rule starts on a line with `name ::=` and runs to the next such line. Items: "strings" (with
\\n \\t \\" \\\\ \\xHH \\uHHHH escapes), [character classes] as in regex.py, `.` (any character), rule
names, ( groups ), alternation `|`, and the quantifiers * + ? {n} {n,} {n,m}; `#` comments.
Left recursion (a rule that can reach itself before reading a byte) raises SchemaError: the
matcher expands rules depth-first and would never stop; write it as a repetition.
"""
from __future__ import annotations

import re

from hunyuan_jax.serve.structured.grammar import Builder, Node, SchemaError
from hunyuan_jax.serve.structured.regex import MAX_CODE, _Parser, class_node

_RULE = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_-]*)[ \t]*::=", re.M)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
PREFIX = "ebnf:"   # rule names live beside the JSON rules in Builder.rules


class _RuleParser(_Parser):
  """One rule's body (regex.py's parser with EBNF atoms; whitespace and comments between items)."""

  def __init__(self, g: Builder, text: str, name: str):
    self.g, self.p, self.i, self.end, self.json, self.name = g, text, 0, len(text), False, name
    self.refs: set = set()

  def error(self, why: str):
    raise SchemaError(f"grammar rule {self.name!r}: {why} at {self.p[self.i:self.i + 20]!r}")

  def peek(self) -> str:
    while self.i < self.end:
      c = self.p[self.i]
      if c == "#":
        nl = self.p.find("\n", self.i)
        self.i = self.end if nl < 0 else nl + 1
      elif c.isspace():
        self.i += 1
      else:
        return c
    return ""

  def atom(self) -> Node:
    g, c = self.g, self.peek()
    if c == '"':
      return self.string()
    self.i += 1
    if c == "[":
      return class_node(g, self.char_class())
    if c == ".":
      return class_node(g, [(0, MAX_CODE)])
    if c == "(":
      node = self.alternation()
      if self.peek() != ")":
        self.error("missing ')'")
      self.i += 1
      return node
    m = _NAME.match(self.p, self.i - 1)
    if m is None:
      self.i -= 1
      self.error(f"unexpected {c!r}")
    self.i = m.end()
    self.refs.add(m.group())
    return g.ref(PREFIX + m.group())

  def string(self) -> Node:
    self.i += 1
    out = []
    while True:
      if self.i >= self.end:
        self.error("an unterminated string")
      c = self.p[self.i]
      self.i += 1
      if c == '"':
        return self.g.lit("".join(out))
      out.append(chr(self.escape(in_class=False)[0][0]) if c == "\\" else c)


def ebnf_node(g: Builder, text: str, root: str = "root") -> Node:
  """The language of rule `root` in the EBNF `text`."""
  if not isinstance(text, str):
    raise SchemaError(f"a grammar must be a string of EBNF rules, got {text!r}")
  heads = list(_RULE.finditer(text))
  if not heads or text[:heads[0].start()].strip() and not text[:heads[0].start()].lstrip().startswith("#"):
    raise SchemaError("a grammar must be EBNF rules 'name ::= ...', starting with one")
  bodies, refs = {}, {}
  for k, m in enumerate(heads):
    name = m.group(1)
    if name in bodies:
      raise SchemaError(f"grammar rule {name!r} is defined twice")
    body = text[m.end():heads[k + 1].start() if k + 1 < len(heads) else len(text)]
    parser = _RuleParser(g, body, name)
    bodies[name] = parser.parse()
    refs[name] = parser.refs
  if root not in bodies:
    raise SchemaError(f"a grammar needs a '{root}' rule: the reply must match it")
  for name, used in refs.items():
    missing = sorted(used - set(bodies))
    if missing:
      raise SchemaError(f"grammar rule {name!r} uses undefined rules {missing}")
  for name, node in bodies.items():
    g.rules[PREFIX + name] = node
  _reject_left_recursion(g, bodies)
  return g.ref(PREFIX + root)


def _reject_left_recursion(g: Builder, bodies: dict) -> None:
  nullable: dict = {name: False for name in bodies}

  def null(n: Node) -> bool:
    k = n.kind
    if k == "seq":
      return all(null(x) for x in n.a)
    if k == "alt":
      return any(null(x) for x in n.a)
    if k == "ref":
      return nullable[n.a[len(PREFIX):]]
    return k == "star"

  changed = True
  while changed:   # a fixpoint: rules nullable through other rules
    changed = False
    for name, node in bodies.items():
      if not nullable[name] and null(node):
        nullable[name] = changed = True

  def left(n: Node, out: set) -> set:
    """The rules reachable from n before a byte is read."""
    if n.kind == "seq":
      for x in n.a:
        left(x, out)
        if not null(x):
          break
    elif n.kind == "alt":
      for x in n.a:
        left(x, out)
    elif n.kind == "star":
      left(n.a, out)
    elif n.kind == "ref":
      out.add(n.a[len(PREFIX):])
    return out

  edges = {name: left(node, set()) for name, node in bodies.items()}
  for start in bodies:
    seen, todo = set(), list(edges[start])
    while todo:
      r = todo.pop()
      if r == start:
        raise SchemaError(f"grammar rule {start!r} is left-recursive (it reaches itself before reading "
                          "anything); write it as a repetition, e.g. list ::= item (\",\" item)*")
      if r not in seen:
        seen.add(r)
        todo += edges[r]
