"""The grammars of chat and completion requests: forced tool calls in each family's format, JSON
answers, and the family's reply markup around them (free reasoning where the prompt leaves it open)."""
from __future__ import annotations

import json
from typing import Any, Optional

from hunyuan_jax.chat.templates import HY3_OPENSOURCE, HY3_PREVIEW, NO_THINK_SUFFIX, _family
from hunyuan_jax.serve.structured.ebnf import ebnf_node
from hunyuan_jax.serve.structured.grammar import Builder, Grammar, Node, SchemaError
from hunyuan_jax.serve.structured.regex import regex_node, string_body
from hunyuan_jax.serve.structured.schema import _SchemaCompiler, schema_node

GRAMMAR_CACHE = 64      # compiled grammars kept for later requests with the same schema
_GRAMMARS: dict = {}


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
        raw = string_body(g, sub, json_string=False)
        value = g.seq(g.until(close), g.lit("\n")) if raw is None else g.seq(raw, g.lit(close + "\n"))
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
  {"json_object": True}, {"choice": [str, ...]}, {"regex": str}, {"grammar": EBNF str}. Raises
  SchemaError for what it cannot constrain."""
  so = body.get("structured_outputs")
  legacy = {k[len("guided_"):]: body[k] for k in ("guided_json", "guided_choice", "guided_regex", "guided_grammar")
            if body.get(k) is not None}
  if so is not None or legacy:
    if so is not None and not isinstance(so, dict):
      raise SchemaError("'structured_outputs' must be an object such as {'json': {...}} or {'choice': [...]}")
    asked = {k: v for k, v in {**(so or {}), **legacy}.items() if v not in (None, False)}
    kinds = set(asked) & {"json", "json_object", "choice", "regex", "grammar"}
    if len(kinds) != 1:
      raise SchemaError("structured outputs need exactly one of 'json', 'json_object', 'choice', 'regex', "
                        f"'grammar'; got {sorted(asked)}")
    kind = kinds.pop()
    value = asked[kind]
    if kind in ("regex", "grammar") and not (isinstance(value, str) and value):
      raise SchemaError(f"structured outputs '{kind}' must be a non-empty string")
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
  if "regex" in constraint:
    return regex_node(g, constraint["regex"])
  if "grammar" in constraint:
    return ebnf_node(g, constraint["grammar"])
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
