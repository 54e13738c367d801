"""End to end with the official `openai` client against a running server.

Two servers: the tiny random model behind the real engine (batching, usage, errors, disconnects,
API key), and a scripted engine that replays fixed model text in ragged pieces (reasoning and
tool calls, which a random model never writes). Both bind 127.0.0.1 on a free port.
"""
import http.client
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from hunyuan_jax.chat import render_chat
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import forward, init_params
from hunyuan_jax.serve.engine import Delta, Engine, Request
from hunyuan_jax.serve.sampling import SamplingParams
from hunyuan_jax.serve.server import ServeContext, Server
from hunyuan_jax.tokenizer import ByteTokenizer

MAX_LEN = 64
USER = [{"role": "user", "content": "hi"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def real():
  cfg = ModelConfig.from_pretrained("tiny").replace(dtype="float32", param_dtype="float32")
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1))
  tok = ByteTokenizer()
  engine = Engine(cfg, params, max_slots=4, max_len=MAX_LEN, prefill_chunk=16, kv_block=MAX_LEN, tokenizer=tok)
  submitted = []
  submit = engine.submit
  engine.submit = lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1]
  srv = Server(ServeContext(engine, tok, "tiny", "tiny", quiet=True), port=0).start()
  yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0), submitted
  srv.shutdown()


def _chat(client, stream=False, **kw):
  args = dict(model="tiny", messages=USER, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
  args.update(kw)
  if not stream:
    return client.chat.completions.create(**args)
  return list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))


def _joined(chunks, field):
  return "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks if c.choices)


def test_models_health_and_default_bind(real):
  srv, client, _ = real
  assert [m.id for m in client.models.list().data] == ["tiny"]
  assert srv.httpd.server_address[0] == "127.0.0.1"
  status, body = _raw(srv, "GET", "/health")
  assert status == 200 and body["status"] == "ok"


def test_stream_equals_non_stream_with_usage(real):
  _, client, _ = real
  full = _chat(client)
  chunks = _chat(client, stream=True)
  prompt_tokens = len(ByteTokenizer().encode(render_chat(USER, "tiny")))
  assert full.usage.prompt_tokens == prompt_tokens and full.usage.completion_tokens == 12
  assert chunks[0].choices[0].delta.role == "assistant"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
  assert chunks[-1].usage.prompt_tokens == prompt_tokens
  assert _joined(chunks, "content") == full.choices[0].message.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason == "length"
  # legacy completions: same text both ways
  comp = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0.0)
  streamed = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0.0, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text


def test_continuous_usage_stats_count_up_to_the_final_usage(real):
  _, client, _ = real
  for kind in ("chat", "completions"):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if kind == "chat":
      chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=9, temperature=0.0,
                                                   stream=True, stream_options=opts, extra_body=NO_EOS))
    else:
      chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=9, temperature=0.0,
                                              stream=True, stream_options=opts, extra_body=NO_EOS))
    running = [c.usage.completion_tokens for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks) and running == sorted(running)
    assert running[-1] == chunks[-1].usage.completion_tokens == 9
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}


def test_concurrent_requests_batch_and_match_alone(real):
  _, client, _ = real
  prompts = [[{"role": "user", "content": "x" * n}] for n in (1, 9, 17, 30, 5)]
  alone = [_chat(client, messages=m).choices[0].message.content for m in prompts]
  got = [None] * len(prompts)

  def go(i):
    got[i] = _chat(client, messages=prompts[i]).choices[0].message.content
  threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert got == alone


def _raw(srv, method, path, body=None, headers=None):
  host, port = srv.httpd.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
  resp = conn.getresponse()
  out = resp.status, json.loads(resp.read())
  conn.close()
  return out


BAD = [
    (b"{not json", 400, None, None),
    ({"model": "gpt-9", "messages": USER}, 404, "model", "model_not_found"),
    ({"model": "tiny"}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": USER, "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
    ({"messages": USER, "max_tokens": -3}, 400, "max_tokens", None),
    ({"messages": USER, "temperature": -1}, 400, "temperature", None),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature", None),
    ({"messages": USER, "top_p": 5}, 400, "top_p", None),
    ({"messages": USER, "presence_penalty": 9}, 400, "presence_penalty", None),
    ({"messages": USER, "n": 17}, 400, "n", None),
    ({"messages": USER, "n": 0}, 400, "n", None),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": USER, "logprobs": 3}, 400, "logprobs", None),
    ({"messages": USER, "tool_choice": "required", "tools": []}, 400, "tool_choice", None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": "yes"}}, 400, "chat_template_kwargs", None),
    ({"messages": USER, "logit_bias": {"5": 200}}, 400, "logit_bias", None),
    ({"messages": USER, "logit_bias": {"the": 1}}, 400, "logit_bias", None),
    ({"messages": USER, "logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ({"messages": USER, "logit_bias": [1, 2]}, 400, "logit_bias", None),
    ({"messages": USER, "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{s}-{p}-{i}" for i, (_, s, p, _) in enumerate(BAD)])
def test_bad_input_gets_error_json_and_server_keeps_serving(real, body, status, param, code):
  srv, client, _ = real
  got_status, got = _raw(srv, "POST", "/v1/chat/completions", body)
  assert got_status == status, got
  err = got["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  assert err["param"] == param and err["code"] == code
  assert _chat(client, max_tokens=2).choices[0].finish_reason == "length"


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _uncached_logprobs(engine, ids):
  """log-softmax of the no-cache forward: row j is the distribution of ids[j + 1]."""
  out = forward(engine.params, jnp.asarray([ids]), jnp.arange(len(ids))[None], cfg=engine.cfg)
  return _log_softmax(out.logits[0])


def test_chat_logprobs_stream_equals_non_stream(real):
  srv, client, submitted = real
  full = _chat(client, logprobs=True, top_logprobs=3)
  out_ids = submitted[-1].output_ids
  content = full.choices[0].logprobs.content
  assert len(content) == full.usage.completion_tokens == 12
  for e in content:   # greedy: every token is its position's most likely one
    assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
    assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    assert bytes(e.bytes).decode("utf-8", "replace") == e.token
  chunks = _chat(client, stream=True, logprobs=True, top_logprobs=3)
  streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
  assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
  # the values are the model's: log-softmax of the uncached logits at each generated position
  prompt = ByteTokenizer().encode(render_chat(USER, "tiny"))
  ids = prompt + out_ids
  ref = _uncached_logprobs(srv.ctx.engine, ids)
  got = [e.logprob for e in content]
  np.testing.assert_allclose(got, [ref[len(prompt) + j - 1, ids[len(prompt) + j]] for j in range(12)], atol=1e-4)
  assert _chat(client).choices[0].logprobs is None


def test_completions_echo_logprobs_as_lm_eval_asks(real):
  """lm-evaluation-harness's loglikelihood request: echo, logprobs 1, max_tokens 1, temperature 0."""
  srv, client, submitted = real
  prompt = "The cat sat"
  ask = dict(model="tiny", prompt=prompt, max_tokens=1, temperature=0.0, logprobs=1, echo=True,
             extra_body={"ignore_eos": True})
  full = client.completions.create(**ask).choices[0]
  lp = full.logprobs
  ids = ByteTokenizer().encode(prompt)
  assert full.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
  assert "".join(lp.tokens) == full.text and lp.text_offset[:3] == [0, 1, 2]
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  all_ids = ids + submitted[-1].output_ids
  ref = _uncached_logprobs(srv.ctx.engine, all_ids)
  np.testing.assert_allclose(lp.token_logprobs[1:], [ref[j - 1, all_ids[j]] for j in range(1, len(all_ids))],
                             atol=1e-4)
  assert all(len(t) == 1 for t in lp.top_logprobs[1:])
  assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())   # greedy
  chunks = list(client.completions.create(stream=True, **ask))
  assert "".join(c.choices[0].text for c in chunks) == full.text
  streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
  assert streamed == lp.token_logprobs
  plain = client.completions.create(**{**ask, "logprobs": None}).choices[0]
  assert plain.text == full.text and plain.logprobs is None


def test_completions_take_a_batch_of_prompts(real):
  """OpenAI's batched `prompt` (lm-evaluation-harness sends batches, as strings or token ids):
  prompt k's choice i has index k * n + i and is what the prompt gets alone; echo is per prompt."""
  _, client, _ = real
  texts = ["ab", "The cat sat", "xyz"]
  ask = dict(model="tiny", max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True})
  alone = [client.completions.create(prompt=t, **ask).choices[0].text for t in texts]
  tok = ByteTokenizer()
  for prompt in (texts, [tok.encode(t) for t in texts]):
    out = client.completions.create(prompt=prompt, n=2, echo=True, **ask)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [t + a for t, a in zip(texts, alone) for _ in range(2)]
    assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) and out.usage.completion_tokens == 30
    chunks = list(client.completions.create(prompt=prompt, n=2, echo=True, stream=True, **ask))
    joined = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(6)]
    assert joined == [c.text for c in out.choices]
  with pytest.raises(openai.BadRequestError, match="prompt"):
    client.completions.create(prompt=["ok", ""], **ask)
  with pytest.raises(openai.BadRequestError, match="prompt"):
    client.completions.create(prompt=["ok"] * 257, **ask)


def test_n_choices_stream_equals_non_stream(real):
  """n seeded samples: choice i draws with seed + i, so they differ, and streaming (chunks of the
  choices interleaved, told apart by index) gives each choice the same text."""
  _, client, _ = real
  ask = dict(n=3, temperature=1.0, seed=11, max_tokens=8)
  full = _chat(client, **ask)
  texts = [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]
  assert [c.index for c in full.choices] == [0, 1, 2] and len(set(texts)) > 1
  assert full.usage.completion_tokens == 3 * 8
  chunks = _chat(client, stream=True, **ask)
  streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
              for i in range(3)]
  assert streamed == texts and chunks[-1].usage.completion_tokens == 3 * 8
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"] * 3
  assert _chat(client, temperature=1.0, seed=11, max_tokens=8).choices[0].message.content == texts[0]
  comp = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0.0, n=2)
  assert [c.index for c in comp.choices] == [0, 1] and comp.choices[0].text == comp.choices[1].text


def test_prefix_cache_shows_in_usage(real):
  """A prompt extending a finished one reuses its rows; usage.prompt_tokens_details.cached_tokens
  counts them (OpenAI's field), streamed or not, and the text is what a fresh prefill gives."""
  srv, client, submitted = real
  text = "the quick brown fox jumps"
  client.completions.create(model="tiny", prompt=text, max_tokens=4, temperature=0.0, extra_body=NO_EOS)
  first = submitted[-1]
  longer = dict(model="tiny", prompt=text + " over the lazy dog", max_tokens=5, temperature=0.0, extra_body=NO_EOS)
  chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **longer))
  second = submitted[-1]
  held = first.prompt_ids + first.output_ids[:-1]
  shared = next((k for k, (a, b) in enumerate(zip(second.prompt_ids[:-1], held)) if a != b),
                min(len(held), len(second.prompt_ids) - 1))
  assert shared >= len(first.prompt_ids)
  assert second.cached == chunks[-1].usage.prompt_tokens_details.cached_tokens == shared
  fresh = client.completions.create(echo=True, logprobs=1, **longer)   # echo's logprobs compute every row
  assert fresh.usage.prompt_tokens_details.cached_tokens == 0
  assert fresh.choices[0].text == longer["prompt"] + "".join(c.choices[0].text for c in chunks if c.choices)


def _metrics(srv) -> dict:
  """GET /metrics parsed by prometheus_client: {(sample name, label items): value}."""
  from prometheus_client.parser import text_string_to_metric_families
  host, port = srv.httpd.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  conn.request("GET", "/metrics")
  resp = conn.getresponse()
  assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
  text = resp.read().decode()
  conn.close()
  return {(x.name, tuple(sorted(x.labels.items()))): x.value
          for f in text_string_to_metric_families(text) for x in f.samples}


def test_metrics_count_tokens_requests_and_latencies(real):
  srv, client, submitted = real
  model = (("model_name", "tiny"),)
  before = _metrics(srv)
  out = client.completions.create(model="tiny", prompt="metrics please", max_tokens=5, temperature=0.0,
                                  extra_body=NO_EOS)
  req = submitted[-1]
  for _ in range(100):   # the engine frees the slot just after the last event
    after = _metrics(srv)
    if after[("vllm:num_requests_running", model)] == 0:
      break
    time.sleep(0.02)
  delta = lambda name, labels=(): after[(name, tuple(sorted(model + labels)))] - before[(name, tuple(sorted(model + labels)))]
  assert delta("vllm:generation_tokens_total") == out.usage.completion_tokens == 5
  assert delta("vllm:prompt_tokens_total") == delta("vllm:prefix_cache_queries_total") == out.usage.prompt_tokens
  assert delta("vllm:prefix_cache_hits_total") == req.cached
  assert delta("vllm:request_success_total", (("finished_reason", "length"),)) == 1
  assert delta("vllm:time_to_first_token_seconds_count") == 1
  assert delta("vllm:inter_token_latency_seconds_count") == 4
  assert delta("vllm:e2e_request_latency_seconds_count") == 1
  assert after[("vllm:num_requests_running", model)] == after[("vllm:num_requests_waiting", model)] == 0
  assert after[("vllm:kv_cache_usage_perc", model)] == 0.0
  inf = after[("vllm:time_to_first_token_seconds_bucket", tuple(sorted(model + (("le", "+Inf"),))))]
  assert inf == after[("vllm:time_to_first_token_seconds_count", model)]


def test_concurrent_prompts_sharing_a_prefix_get_their_uncached_tokens(real):
  """Concurrent completions with one 26-byte preamble: later ones start from rows an earlier one
  computed (a copy, or a wait for its prefill), and each gets the tokens of the no-cache forward."""
  srv, client, submitted = real
  texts = [f"shared preamble, 26 bytes. q{i}{'?' * i}" for i in range(6)]
  n_before = len(submitted)

  def go(text):
    client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0.0, extra_body=NO_EOS)
  threads = [threading.Thread(target=go, args=(t,)) for t in texts]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  reqs = submitted[n_before:]
  assert len(reqs) == len(texts) and all(r.done for r in reqs)
  assert sum(r.cached >= 26 for r in reqs) >= len(texts) - 4   # 4 slots: at most 4 start cold
  engine = srv.ctx.engine
  logits = jax.jit(lambda t: forward(engine.params, t, jnp.arange(MAX_LEN)[None], cfg=engine.cfg).logits[0])
  for r in reqs:   # the no-cache forward at one padded length (causal: the padding reaches no prefix)
    ids = list(r.prompt_ids)
    for _ in range(6):
      ids.append(int(np.argmax(logits(jnp.asarray([ids + [0] * (MAX_LEN - len(ids))]))[len(ids) - 1])))
    assert r.output_ids == ids[len(r.prompt_ids):]


def test_stop_strings_with_and_without_the_stop_in_the_text(real):
  """OpenAI's `stop` cuts the text before the stop string; vLLM's include_stop_str_in_output keeps
  it. Streamed chunks join to the same text."""
  _, client, _ = real
  ask = dict(model="tiny", prompt="stop strings", max_tokens=12, temperature=0.0)
  free = client.completions.create(extra_body=NO_EOS, **ask).choices[0].text
  stop = free[4:6]
  cut = free[:free.find(stop)]
  for include, want in ((False, cut), (True, cut + stop)):
    extra = {**NO_EOS, "include_stop_str_in_output": include}
    out = client.completions.create(stop=[stop], extra_body=extra, **ask).choices[0]
    chunks = client.completions.create(stop=[stop], stream=True, extra_body=extra, **ask)
    assert out.text == want and out.finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_tokenize_counts_match_usage(real):
  srv, client, _ = real
  status, tok = _raw(srv, "POST", "/tokenize", {"model": "tiny", "messages": USER})
  assert status == 200 and tok["count"] == len(tok["tokens"]) == _chat(client, max_tokens=1).usage.prompt_tokens
  assert tok["max_model_len"] == MAX_LEN
  assert _raw(srv, "POST", "/detokenize", {"tokens": tok["tokens"]}) == (200, {"prompt": render_chat(USER, "tiny")})
  status, tok = _raw(srv, "POST", "/tokenize", {"prompt": "abc"})
  assert tok["tokens"] == ByteTokenizer().encode("abc")
  assert _raw(srv, "POST", "/detokenize", {"tokens": "abc"})[0] == 400


def test_logit_bias_and_min_tokens_through_the_client(real):
  """OpenAI's logit_bias (string keys) and vLLM's min_tokens: an EOS pushed to the top ends the
  reply right after min_tokens tokens, in chat and completions, streamed or not."""
  _, client, _ = real
  eos = str(ByteTokenizer().eos_ids[0])
  for stream in (False, True):
    out = _chat(client, stream, logit_bias={eos: 100}, extra_body={"min_tokens": 3})
    final = out if not stream else out[-1]
    reason = out.choices[0].finish_reason if not stream else [c for c in out if c.choices][-1].choices[0].finish_reason
    assert final.usage.completion_tokens == 4 and reason == "stop"
  c = client.completions.create(model="tiny", prompt="ab", max_tokens=10, temperature=0.0, logit_bias={eos: 100},
                                extra_body={"min_tokens": 2})
  assert c.usage.completion_tokens == 3 and c.choices[0].finish_reason == "stop"


def test_default_chat_template_kwargs_flag():
  from hunyuan_jax.serve.openai_api import chat_defaults_from
  assert chat_defaults_from(None) == {"enable_thinking": True}
  assert chat_defaults_from('{"reasoning_effort": "low"}', False) == {"enable_thinking": False,
                                                                      "reasoning_effort": "low"}
  assert chat_defaults_from('{"enable_thinking": false}', True) == {"enable_thinking": False}
  for bad in ("{not json", "[1]", '{"temperature": 0.5}', '{"enable_thinking": "no"}'):
    with pytest.raises(ValueError, match="default_chat_template_kwargs"):
      chat_defaults_from(bad)


def test_openai_client_raises_typed_errors(real):
  _, client, _ = real
  with pytest.raises(openai.BadRequestError, match="temperature"):
    _chat(client, temperature=-0.5)
  with pytest.raises(openai.NotFoundError):
    _chat(client, model="nope")
  assert _raw(real[0], "POST", "/v1/nowhere", {})[0] == 404


def test_client_disconnect_mid_stream_frees_slot(real):
  srv, client, submitted = real
  body = json.dumps({"messages": USER, "max_tokens": 55, "temperature": 0.0, "ignore_eos": True,
                     "stream": True}).encode()
  sock = socket.create_connection(srv.httpd.server_address[:2], timeout=60)
  sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
  assert sock.recv(64).startswith(b"HTTP/1.1 200")   # the stream has started
  sock.close()
  req = submitted[-1]
  deadline = time.time() + 60
  while not req.done and time.time() < deadline:
    time.sleep(0.05)
  assert req.finish_reason == "abort" and len(req.output_ids) < 55
  while srv.ctx.engine.num_active() and time.time() < deadline:
    time.sleep(0.05)
  assert srv.ctx.engine.num_active() == 0
  assert _chat(client, max_tokens=3).usage.completion_tokens == 3


def test_api_key(real):
  srv, _, _ = real
  keyed = Server(ServeContext(srv.ctx.engine, srv.ctx.tokenizer, "tiny", "tiny", api_key="sekret", quiet=True),
                 port=0, run_engine=False).start()
  try:
    status, body = _raw(keyed, "POST", "/v1/chat/completions", {"messages": USER})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      bad.models.list()
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret", max_retries=0)
    assert _chat(good, max_tokens=2).usage.completion_tokens == 2
    assert ("vllm:num_requests_waiting", (("model_name", "tiny"),)) in _metrics(keyed)   # scrapers send no key
  finally:
    keyed.shutdown()


# ------------------------------------------------------------------ scripted model text
class ScriptedEngine:
  """Replays `script` as ragged text deltas (1-4 chars) for every request; records prompts."""
  max_len = 4096

  def __init__(self, script):
    self.script, self.prompts = script, []

  def submit(self, ids, params: SamplingParams, guide=None):
    self.prompts.append(list(ids))
    req = Request(list(ids), params)
    pieces, i, k = [], 0, 0
    while i < len(self.script):
      n = 1 + (k % 4)
      pieces.append(self.script[i:i + n])
      i, k = i + n, k + 1
    for j, p in enumerate(pieces):
      req.output_ids.append(j)
      req.text += p
      req.events.put(Delta([j], p, "stop" if j == len(pieces) - 1 else None))
    req.finish_reason = "stop"
    return req

  def cancel(self, req):
    pass

  def num_active(self):
    return 0


@pytest.fixture()
def scripted():
  servers = []

  def make(script):
    eng = ScriptedEngine(script)
    srv = Server(ServeContext(eng, ByteTokenizer(), "tiny", "tiny", quiet=True), port=0, run_engine=False).start()
    servers.append(srv)
    return eng, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
  yield make
  for s in servers:
    s.shutdown()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_reasoning_split_same_in_stream_and_not(scripted):
  eng, client = scripted("<think>\nLet me think.\n</think>\n<answer>\nHello there!\n</answer>")
  full = _chat(client).choices[0].message
  assert full.content == "Hello there!" and full.reasoning_content == "Let me think."
  assert full.model_extra["reasoning"] == "Let me think."
  chunks = _chat(client, stream=True)
  assert _joined(chunks, "content") == full.content
  assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices) == \
      full.reasoning_content
  # enable_thinking=False reaches the template (A13B appends an empty think block)
  _chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
  assert ByteTokenizer().decode(eng.prompts[-1]).endswith("<think>\n\n</think>\n")


def test_tool_calls_stream_and_non_stream(scripted):
  _, client = scripted('<think>\nNeed weather.\n</think>\n<answer>\n<tool_calls>[{"name": "get_weather", '
                       '"arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
                       '</tool_calls>\n</answer>')
  full = _chat(client, tools=TOOLS).choices[0]
  assert full.finish_reason == "tool_calls"
  calls = [(c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls]
  assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
  chunks = _chat(client, stream=True, tools=TOOLS)
  deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
  assert [d.index for d in deltas] == [0, 1]
  assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == calls
  assert [d.id for d in deltas] == [c.id for c in full.message.tool_calls]
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
  assert _joined(chunks, "content") == (full.message.content or "")
