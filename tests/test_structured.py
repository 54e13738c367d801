"""Structured outputs: schema grammars, token masks, guided engine requests, and the server's
tool_choice required / named and response_format through the official openai client."""
import datetime
import json
import random

import jax
import numpy as np
import pytest

from hunyuan_jax.chat import parse_output, render_chat
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import init_params
from hunyuan_jax.serve import structured as st
from hunyuan_jax.serve.structured.vocab import _bytes_or_none
from hunyuan_jax.serve.engine import Engine
from hunyuan_jax.serve.sampling import SamplingParams
from hunyuan_jax.tokenizer import ByteTokenizer, HFTokenizer

jsonschema = pytest.importorskip("jsonschema")   # in the test extra

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"},
    "hourly": {"type": "boolean"}, "temps": {"type": "array", "items": {"type": "number"}},
    "note": {"type": ["string", "null"]}}, "required": ["city", "unit"], "additionalProperties": False}


def _state(grammar, text: str) -> int:
  sid = grammar.start
  for b in text.encode():
    sid = grammar.step(sid, b)
    if sid < 0:
      return -1
  return sid


def _accepts(grammar, text: str) -> bool:
  sid = _state(grammar, text)
  return sid >= 0 and grammar.accepting(sid)


def _schema_grammar(schema):
  g = st.Builder()
  return st.Grammar(g, st.schema_node(g, schema))


VALID = ['{"city": "Paris", "unit": "celsius"}',
         '{"city":"P\\u00e9ri \\"x\\"","unit":"fahrenheit","days":-12,"hourly":false}',
         '{"city": "東京", "unit": "celsius", "temps": [1.5, -2e3, 0, 3E+2], "note": null}',
         '{"city": "", "unit": "celsius", "temps": [], "note": "ok"}']
INVALID = ['{"unit": "celsius"}',                         # missing required city
           '{"city": "a", "unit": "kelvin"}',              # not in the enum
           '{"unit": "celsius", "city": "a"}',             # out of schema order
           '{"city": "a", "unit": "celsius", "x": 1}',     # additional property
           '{"city": "a", "unit": "celsius", "days": 1.5}',  # integer
           '{"city": "a", "unit": "celsius", "days": 01}',   # leading zero
           '{"city": "a",, "unit": "celsius"}', '{"city": "a", "unit": "celsius"',
           '{ "city": "a", "unit": "celsius"}', '{"city": "a\x01", "unit": "celsius"}']


def test_schema_grammar_accepts_the_valid_texts_and_rejects_the_others():
  grammar = _schema_grammar(WEATHER)
  for text in VALID:
    jsonschema.validate(json.loads(text), WEATHER)
    assert _accepts(grammar, text), text
  for text in INVALID:
    assert not _accepts(grammar, text), text


@pytest.mark.parametrize("family", ["tiny", "hy3", "hy3_opensource"])
def test_forced_calls_in_the_model_format_parse_back(family):
  """The template's own rendering of a call is in the grammar, and the reply parser reads it back."""
  from hunyuan_jax.chat import templates
  schema = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": [
      "celsius", "fahrenheit"]}, "days": {"type": "integer"}, "hourly": {"type": "boolean"}}, "required": ["city"]}
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
  args = {"city": "Paris, \"FR\"", "unit": "celsius", "days": 3}
  call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}
  user = [{"role": "user", "content": "weather?"}]
  if family == "tiny":
    prompt = render_chat(user, family, tools=tools)
    body = "<tool_calls>[" + json.dumps({"name": "get_weather", "arguments": args}) + "]</tool_calls>"
    reply = "<think>\nI call it.\n</think>\n<answer>\n" + body + "\n</answer>"
  else:
    mk = templates.HY3_OPENSOURCE if family == "hy3_opensource" else templates.HY3_PREVIEW
    prompt = render_chat(user, family, tools=tools, reasoning_effort="high")
    reply = "I call it." + mk.think_end + "\n" + templates._hy3_tool_calls([call], mk)
  for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
    grammar = st.chat_grammar(family, prompt, tools=tools, tool_choice=choice)
    assert _accepts(grammar, reply), reply
    assert not _accepts(grammar, reply.replace("celsius", "kelvin"))
  out = parse_output(reply, family, tools_enabled=True, tools=tools, in_reasoning=family != "tiny")
  assert out.reasoning.strip() == "I call it." and not out.content.strip()
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
      ("get_weather", args)]


@pytest.mark.parametrize("family", ["tiny", "hy3"])
def test_auto_with_a_strict_tool_holds_calls_to_their_schema_and_lets_answers_be(family):
  from hunyuan_jax.chat import templates
  tools = [{"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
      "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
  user = [{"role": "user", "content": "time?"}]
  prompt = render_chat(user, family, tools=tools, **({"reasoning_effort": "high"} if family == "hy3" else {}))
  grammar = st.chat_grammar(family, prompt, tools=tools, tool_choice="auto")
  call = {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
  bad = {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "PST"}'}}
  if family == "tiny":
    wrap = lambda answer: "<think>\nhm\n</think>\n<answer>" + answer + "</answer>"
    calls = lambda c: "\n<tool_calls>[" + json.dumps({"name": "get_time", "arguments": json.loads(
        c["function"]["arguments"])}) + "]</tool_calls>\n"
  else:
    wrap = lambda answer: "hm" + templates.HY3_PREVIEW.think_end + answer
    calls = lambda c: "\n" + templates._hy3_tool_calls([c], templates.HY3_PREVIEW)
  assert _accepts(grammar, wrap(calls(call)))
  assert _accepts(grammar, wrap("\nIt is noon; no tool needed.\n"))
  assert not _accepts(grammar, wrap(calls(bad)))
  assert not _accepts(grammar, wrap("Let me call <tool_calls>[{}]</tool_calls>"))   # an unchecked call
  assert st.chat_grammar(family, prompt, tools=[{**tools[0], "function": {**tools[0]["function"], "strict": False}}],
                         tool_choice="auto") is None


def _random_json(rng, depth=0):
  kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
  k = rng.choice(kinds)
  if k == "str":
    return "".join(rng.choice('ab "\\/\n\té中') for _ in range(rng.randrange(4)))
  if k == "int":
    return rng.randrange(-10**6, 10**6)
  if k == "float":
    return rng.uniform(-1e4, 1e4)
  if k == "bool":
    return rng.random() < 0.5
  if k == "null":
    return None
  if k == "list":
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
  return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(3))}


def test_any_json_grammar_takes_what_json_dumps_writes():
  g = st.Builder()
  grammar = st.Grammar(g, g.any_json())
  rng = random.Random(0)
  for _ in range(200):
    value = _random_json(rng)
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False), json.dumps(value, separators=(",", ":"))):
      assert _accepts(grammar, text), text
      if isinstance(value, (dict, list)):   # a proper prefix of a container is never complete
        assert not _accepts(grammar, text[:-1]), text
  for text in ["[1,]", "{'a': 1}", "tru", "1.", "-", "[1 2]", '{"a" 1}', "NaN"]:
    assert not _accepts(grammar, text), text


def test_recursive_refs():
  tree = {"$defs": {"node": {"type": "object", "properties": {
      "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
      "required": ["v", "kids"]}}, "$ref": "#/$defs/node"}
  grammar = _schema_grammar(tree)
  assert _accepts(grammar, '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}')
  assert not _accepts(grammar, '{"v": 1, "kids": [{"v": 2}]}')
  with pytest.raises(st.SchemaError, match="names no definition"):
    _schema_grammar({"$ref": "#/$defs/missing"})


def _bpe_tokenizer(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|eos|>", "<tool_calls>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [json.dumps({"city": c, "unit": u, "days": d, "temps": [1.5, -2.0]}) for c in ("Paris", "東京", "New York")
            for u in ("celsius", "fahrenheit") for d in (1, 12, 300)]
  tok.train_from_iterator(corpus * 5 + ["<think>I should call get_weather.</think>\n<answer>\n"] * 5, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  return HFTokenizer.from_file(str(tmp_path / "tokenizer.json"), eos_ids=[0])


def test_hf_token_bytes_spell_the_encoded_text(tmp_path):
  tok = _bpe_tokenizer(tmp_path)
  for text in VALID + ["<tool_calls>[] é中 \n\t"]:
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


@pytest.mark.parametrize("vocab", ["bytes", "bpe"])
def test_masks_match_a_token_by_token_walk(vocab, tmp_path):
  """The vectorised mask of each state on a reply's path equals walking every token's bytes."""
  tok = ByteTokenizer() if vocab == "bytes" else _bpe_tokenizer(tmp_path)
  size = tok.vocab_size + 5   # model vocabularies are padded past the tokenizer's
  table = st.token_table(tok, size, tok.eos_ids)
  tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
  grammar = st.chat_grammar("a13b", "hi<|extra_0|>", tools=tools, tool_choice="required")
  reply = ('<think>Call "get_weather", </thin</think>\n<answer>\n<tool_calls>[{"name": "get_weather", "arguments": '
           + VALID[2] + '}]</tool_calls>\n</answer>')
  guide = st.Guide(grammar, table)
  for t in tok.encode(reply) + [tok.eos_ids[0]]:
    got = np.unpackbits(guide.allowed_bits())[:size].astype(bool)
    want = np.zeros(size, bool)
    for i in range(size):
      b = _bytes_or_none(tok, i) if i < tok.vocab_size else None
      if i in tok.eos_ids:
        want[i] = grammar.accepting(guide.state)
      elif b:
        sid = guide.state
        for x in b:
          sid = grammar.step(sid, x) if sid >= 0 else -1
        want[i] = sid >= 0
    np.testing.assert_array_equal(got, want)
    assert got[t] and guide.advance(t)
  assert guide.finished


@pytest.fixture(scope="module")
def engine():
  cfg = ModelConfig.from_pretrained("tiny").replace(dtype="float32", param_dtype="float32")
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
  return Engine(cfg, params, max_slots=3, max_len=2048, prefill_chunk=512, kv_block=256, tokenizer=ByteTokenizer())


# Bounded values: a random model must be able to finish the reply (a string may never close).
SMALL = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"},
                                          "hourly": {"type": "boolean"}}, "required": ["unit", "days", "hourly"]}
SMALL_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SMALL}},
               {"type": "function", "function": {"name": "get_time", "parameters": {
                   "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]


def test_guided_requests_follow_the_grammar_and_leave_neighbours_alone(engine):
  tok = engine.tokenizer
  prompt = render_chat([{"role": "user", "content": "weather?"}], "tiny", tools=SMALL_TOOLS, enable_thinking=False)
  named = {"type": "function", "function": {"name": "get_weather"}}
  grammar = st.chat_grammar("tiny", prompt, tools=SMALL_TOOLS, tool_choice=named)
  plain = tok.encode("hello there")
  alone = engine.generate([plain], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].output_ids
  for temperature in (0.0, 1.0):
    guided = engine.submit(tok.encode(prompt), SamplingParams(temperature=temperature, seed=7, max_tokens=400),
                           guide=engine.guide(grammar))
    other = engine.submit(plain, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    while not (guided.done and other.done):
      engine.step()
    assert guided.finish_reason == "stop", guided.text
    assert _accepts(grammar, guided.text)
    calls = parse_output(guided.text, "tiny", tools_enabled=True).tool_calls
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), SMALL)
    assert other.output_ids == alone


def test_guided_reasoning_stays_free_until_it_closes(engine):
  """With thinking on, the reply starts '<think>' and reasons freely; cut by max_tokens there."""
  tok = engine.tokenizer
  prompt = render_chat([{"role": "user", "content": "hi"}], "tiny")
  grammar = st.chat_grammar("tiny", prompt, constraint={"json_object": True})
  r = engine.submit(tok.encode(prompt), SamplingParams(temperature=1.0, seed=1, max_tokens=30),
                    guide=engine.guide(grammar))
  while not r.done:
    engine.step()
  assert r.finish_reason == "length" and r.text.startswith("<think>") and _state(grammar, r.text) >= 0


@pytest.mark.parametrize("family", ["tiny", "hy3"])
def test_a_spent_thinking_budget_forces_the_reasoning_closed(family):
  """vLLM's thinking_token_budget: after that many reasoning tokens the close is forced, in any
  tokenisation the model picks; the reply then goes on (here: a random walk through the masks)."""
  from hunyuan_jax.chat import templates
  prompt = render_chat([{"role": "user", "content": "hi"}], family, reasoning_effort="high")
  grammar = st.free_reply_grammar(family, prompt)
  assert st.free_reply_grammar(family, render_chat([{"role": "user", "content": "hi"}], family,
                                                   enable_thinking=False)) is None
  close = "\n</think>\n" if family == "tiny" else templates.HY3_PREVIEW.think_end
  rng = np.random.default_rng(0)
  for budget in (0, 3, 12):
    tok = ByteTokenizer()
    guide = st.Guide(grammar, st.token_table(tok, tok.vocab_size, tok.eos_ids), think_budget=budget)
    raw, starts = b"", []
    for _ in range(60):
      allowed = np.flatnonzero(np.unpackbits(guide.allowed_bits())[:tok.vocab_size])
      t = int(rng.choice([a for a in allowed if a not in tok.eos_ids] or allowed))
      assert guide.advance(t)
      starts.append(len(raw))
      raw += tok.token_bytes(t)
    opener = b"<think>" if family == "tiny" else b""
    end = raw.find(close.encode())
    assert raw.startswith(opener) and end >= 0, raw
    reasoning_tokens = [i for i in starts if len(opener) <= i < end]
    assert len(reasoning_tokens) == budget, (budget, raw)   # random text never closes on its own


# ------------------------------------------------------------------ server, openai client
class _FrozenClock(datetime.datetime):
  @classmethod
  def now(cls, tz=None):
    return cls(2026, 11, 24, 12, 0, 0)


@pytest.fixture(scope="module")
def client(engine):
  openai = pytest.importorskip("openai")
  from hunyuan_jax.chat import templates
  from hunyuan_jax.serve.server import ServeContext, Server
  srv = Server(ServeContext(engine, engine.tokenizer, "tiny", "tiny", quiet=True,
                            chat_defaults={"enable_thinking": False}), port=0).start()
  with pytest.MonkeyPatch.context() as mp:   # the A13B tool preamble holds the time: same prompt twice
    mp.setattr(templates, "datetime", _FrozenClock)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
  srv.shutdown()


def _both(client, **kw):
  """(non-streamed message, streamed chunks) of one greedy request."""
  args = dict(model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}], max_tokens=300,
              temperature=0.0)
  args.update(kw)
  return (client.chat.completions.create(**args).choices[0],
          list(client.chat.completions.create(stream=True, **args)))


def _streamed_calls(chunks):
  calls = {}
  for c in chunks:
    for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
      call = calls.setdefault(d.index, {"name": "", "arguments": ""})
      call["name"] += d.function.name or ""
      call["arguments"] += d.function.arguments or ""
  return [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_server_tool_choice_forces_schema_valid_calls(client, choice):
  # One call: a random model's greedy reply would add calls until max_tokens.
  full, chunks = _both(client, tools=SMALL_TOOLS, tool_choice=choice, parallel_tool_calls=False)
  calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in full.message.tool_calls]
  assert calls and full.finish_reason == "tool_calls" and not full.message.content
  if isinstance(choice, dict):
    assert [c["name"] for c in calls] == ["get_time"]
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SMALL_TOOLS}
  for c in calls:
    jsonschema.validate(json.loads(c["arguments"]), schemas[c["name"]])
  assert _streamed_calls(chunks) == calls
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_server_auto_with_strict_tools(client):
  strict = [{**t, "function": {**t["function"], "strict": True}} for t in SMALL_TOOLS]
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in SMALL_TOOLS}
  for seed in range(3):
    full, chunks = _both(client, tools=strict, max_tokens=60, temperature=1.0, seed=seed)
    for c in full.message.tool_calls or []:
      jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    assert "<tool_calls>" not in (full.message.content or "")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (full.message.content or "")


def test_server_thinking_token_budget(client):
  for budget in (0, 5):
    full = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=1.0, seed=budget,
        logprobs=True, extra_body={"thinking_token_budget": budget, "chat_template_kwargs": {"enable_thinking": True}})
    raw, starts = b"", []
    for entry in full.choices[0].logprobs.content:
      starts.append(len(raw))
      raw += bytes(entry.bytes)
    end = raw.find(b"\n</think>\n")
    assert raw.startswith(b"<think>") and end > 0
    assert len([i for i in starts if len(b"<think>") <= i < end]) == budget
  with pytest.raises(Exception, match="thinking_token_budget"):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                   extra_body={"thinking_token_budget": -1})


def test_server_response_format_json_schema(client):
  schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"]}
  fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
  full, chunks = _both(client, response_format=fmt)
  jsonschema.validate(json.loads(full.message.content), schema)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content


def test_answer_constraints_from_vllm_and_openai_fields():
  schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
  ask = st.answer_constraint
  assert ask({}) is None and ask({"response_format": {"type": "text"}}) is None
  assert ask({"response_format": {"type": "json_object"}}) == {"json_object": True}
  assert ask({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}) == {
      "json": schema}
  assert ask({"structured_outputs": {"json": json.dumps(schema)}}) == {"json": schema}
  assert ask({"guided_json": schema, "response_format": {"type": "json_object"}}) == {"json": schema}
  assert ask({"guided_choice": ["yes", "no"]}) == {"choice": ["yes", "no"]}
  assert ask({"guided_regex": "a+"}) == {"regex": "a+"} and ask({"structured_outputs": {"grammar": "root ::= \"x\""}})
  for bad, match in [({"structured_outputs": {"regex": ""}}, "non-empty string"),
                     ({"structured_outputs": {"json": schema, "choice": ["a"]}}, "exactly one"),
                     ({"guided_choice": []}, "non-empty"), ({"structured_outputs": "json"}, "must be an object")]:
    with pytest.raises(st.SchemaError, match=match):
      ask(bad)


def test_server_completions_and_chat_take_vllm_structured_outputs(client):
  choices = ["positive", "negative", "neutral"]
  for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
    out = client.completions.create(model="tiny", prompt="The review is", max_tokens=20, temperature=1.0, seed=2,
                                    extra_body=extra)
    assert out.choices[0].text in choices and out.choices[0].finish_reason == "stop"
  schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["n", "ok"]}
  out = client.completions.create(model="tiny", prompt="{", max_tokens=60, temperature=0.0,
                                  extra_body={"guided_json": schema})
  jsonschema.validate(json.loads(out.choices[0].text), schema)
  full, chunks = _both(client, extra_body={"structured_outputs": {"json": schema}})
  jsonschema.validate(json.loads(full.message.content), schema)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content


def test_server_regex_and_grammar_constraints(client):
  """vLLM's regex and (GBNF) grammar constraints, on completions and chat, streamed as not."""
  import re
  pattern = r"(yes|no), [0-9]{2,3} (apples|pears)"
  grammar = 'root ::= item (", " item){0,2}\nitem ::= [a-c]{1,2} "=" ("on" | "off")'
  for extra, check in [({"structured_outputs": {"regex": pattern}}, lambda t: re.fullmatch(pattern, t)),
                       ({"guided_regex": pattern}, lambda t: re.fullmatch(pattern, t)),
                       ({"guided_grammar": grammar},
                        lambda t: re.fullmatch(r"[a-c]{1,2}=(on|off)(, [a-c]{1,2}=(on|off)){0,2}", t))]:
    out = client.completions.create(model="tiny", prompt="Say:", max_tokens=40, temperature=1.0, seed=3,
                                    extra_body=extra)
    assert check(out.choices[0].text) and out.choices[0].finish_reason == "stop", out.choices[0].text
    full, chunks = _both(client, extra_body=extra)
    assert check(full.message.content), full.message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content


@pytest.mark.parametrize("kw,param", [
    (dict(tools=SMALL_TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "http://x"}}}),
     "response_format"),
    (dict(extra_body={"structured_outputs": {"regex": "([a-z]+"}}), "structured_outputs"),
    (dict(extra_body={"guided_grammar": 'root ::= root "a" | "b"'}), "guided_grammar"),
    (dict(extra_body={"guided_json": "{not json"}), "guided_json"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "number", "multipleOf": 0.5}}}),
     "response_format"),
])
def test_server_rejects_what_it_cannot_constrain(client, kw, param):
  import openai
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2, **kw)
  assert e.value.body["param"] == param and e.value.body["message"]
