"""OpenAI-compatible HTTP server on the standard library (ThreadingHTTPServer; no fastapi needed).

    client threads (one per connection)            engine thread
    parse + validate -> render chat -> encode  ->  Engine.submit ... step() ... Request.events
    read Request.events (per-request queue)    <-  Delta(token ids, text, finish_reason)
    -> StreamParser -> SSE chunks / one JSON

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and
vLLM's POST /tokenize and /detokenize and GET /metrics (Prometheus, vLLM's metric names).
A client that goes away (write fails, or its socket reads EOF while we wait) has its request
cancelled, which frees the slot at the engine's next step.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from hunyuan_jax.chat import StreamParser, opens_reasoning, parse_output, render_chat
from hunyuan_jax.serve import openai_api as oa
from hunyuan_jax.serve import structured
from hunyuan_jax.serve.openai_api import APIError

MAX_BODY = 64 << 20
MAX_PROMPTS = 256   # prompts in one completions request (each choice of each takes an engine slot in turn)


@dataclasses.dataclass
class ServeContext:
  engine: Any                      # hunyuan_jax.serve.engine.Engine (or anything with submit/cancel/max_len)
  tokenizer: Any
  model_name: str
  family: str                      # chat family for render_chat / StreamParser
  defaults: dict = dataclasses.field(default_factory=dict)        # generation_config sampling defaults
  chat_defaults: dict = dataclasses.field(default_factory=dict)   # default chat_template_kwargs
  api_key: Optional[str] = None
  quiet: bool = False


class ClientGone(Exception):
  pass


class Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  ctx: ServeContext  # set by make_server on a subclass

  # ------------------------------------------------------------------ plumbing
  def log_message(self, fmt, *args):
    if not self.ctx.quiet:
      sys.stderr.write("serve: %s %s\n" % (self.address_string(), fmt % args))

  def _send_json(self, status: int, obj: dict):
    self._send(status, "application/json", json.dumps(obj, ensure_ascii=False).encode())

  def _send(self, status: int, content_type: str, data: bytes):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _guard(self, fn):
    try:
      fn()
    except APIError as e:
      self._send_json(e.status, e.body())
    except (BrokenPipeError, ConnectionResetError, ClientGone):
      self.close_connection = True
    except Exception as e:  # a bug: report it as a 500, keep serving
      traceback.print_exc()
      self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body())

  def _check_auth(self):
    key = self.ctx.api_key
    if key and self.headers.get("Authorization", "") != f"Bearer {key}":
      raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

  def _body(self) -> dict:
    n = self.headers.get("Content-Length")
    if n is None or not n.isdigit():
      raise APIError(411, "send a Content-Length header with the JSON body")
    if int(n) > MAX_BODY:
      raise APIError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
    raw = self.rfile.read(int(n))
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != self.ctx.model_name:
      raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.ctx.model_name}'",
                     "model", "model_not_found")
    return body

  def do_GET(self):
    def run():
      path = self.path.split("?")[0]
      if path == "/health":
        return self._send_json(200, {"status": "ok", "active": self.ctx.engine.num_active()})
      if path == "/metrics":   # open like /health (vLLM's is): scrapers send no bearer token
        return self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                          self.ctx.engine.metrics_text(self.ctx.model_name).encode())
      self._check_auth()
      if path == "/v1/models":
        return self._send_json(200, {"object": "list", "data": [
            {"id": self.ctx.model_name, "object": "model", "created": 0, "owned_by": "hunyuan-jax",
             "max_model_len": self.ctx.engine.max_len}]})
      raise APIError(404, f"no route GET {path}")
    self._guard(run)

  def do_POST(self):
    def run():
      path = self.path.split("?")[0]
      self._check_auth()
      if path == "/tokenize":
        return self._tokenize(self._body())
      if path == "/detokenize":
        return self._detokenize(self._body())
      if path not in ("/v1/chat/completions", "/v1/completions"):
        raise APIError(404, f"no route POST {path}")
      self._complete(self._body(), chat=path == "/v1/chat/completions")
    self._guard(run)

  # ------------------------------------------------------------------ requests
  def _chat_prompt(self, body: dict):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise APIError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    extra = body.get("chat_template_kwargs") or {}
    if body.get("reasoning_effort") is not None and isinstance(extra, dict):
      extra = {"reasoning_effort": body["reasoning_effort"], **extra}
    try:
      kw = {**self.ctx.chat_defaults, **oa.chat_kwargs(extra, "chat_template_kwargs")}
    except ValueError as e:
      raise APIError(400, str(e), "chat_template_kwargs") from None
    tools = body.get("tools") or None
    choice = body.get("tool_choice", "auto")
    if tools is not None and not isinstance(tools, list):
      raise APIError(400, "'tools' must be a list of {type: function, function: {...}}", "tools")
    if not (choice in ("auto", "none", "required", None) or isinstance(choice, dict)):
      raise APIError(400, f"tool_choice={choice!r} must be 'auto', 'none', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if choice == "none":
      tools = None
    try:
      prompt = render_chat(messages, self.ctx.family, tools=tools, **kw)
    except ValueError as e:
      raise APIError(400, str(e), "messages") from None
    return prompt, tools

  def _chat_grammar(self, body: dict, prompt: str, tools):
    """The grammar the reply must follow (structured outputs), or None."""
    choice = body.get("tool_choice", "auto")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
      raise APIError(400, "'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    forced = choice not in ("auto", "none", None)
    try:
      grammar = structured.chat_grammar(self.ctx.family, prompt, tools=tools, tool_choice=choice,
                                        constraint=None if forced else self._constraint(body),
                                        parallel_tool_calls=parallel)
    except structured.SchemaError as e:
      raise APIError(400, str(e), "tool_choice" if forced else self._constraint_field(body)) from None
    return grammar

  def _constraint(self, body: dict):
    try:
      return structured.answer_constraint(body)
    except structured.SchemaError as e:
      raise APIError(400, str(e), self._constraint_field(body)) from None

  @staticmethod
  def _constraint_field(body: dict) -> str:
    return next((k for k in ("structured_outputs", "guided_json", "guided_choice", "guided_regex", "guided_grammar")
                 if body.get(k) is not None), "response_format")

  def _prompts(self, body: dict) -> list:
    """OpenAI's prompt forms -> [(token ids, text or None)]: a string, a list of token ids, or a
    batch of either (lm-evaluation-harness sends batches)."""
    p = body.get("prompt")
    ids_ok = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str) or ids_ok(p):
      p = [p]
    if isinstance(p, list) and 0 < len(p) <= MAX_PROMPTS and all((isinstance(x, str) and x) or ids_ok(x) for x in p):
      return [(self.ctx.tokenizer.encode(x), x) if isinstance(x, str) else (x, None) for x in p]
    raise APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of up to "
                   f"{MAX_PROMPTS} of either", "prompt")

  def _prompt_ids(self, body: dict) -> list:
    prompts = self._prompts(body)
    if len(prompts) != 1:
      raise APIError(400, "send one prompt here", "prompt")
    return prompts[0][0]

  def _tokenize(self, body: dict):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""
    if "messages" in body:
      ids = self.ctx.tokenizer.encode(self._chat_prompt(body)[0])
    else:
      ids = self._prompt_ids(body)
    self._send_json(200, {"count": len(ids), "max_model_len": self.ctx.engine.max_len, "tokens": ids})

  def _detokenize(self, body: dict):
    ids = body.get("tokens")
    if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
      raise APIError(400, "'tokens' must be a list of token ids", "tokens")
    try:
      self._send_json(200, {"prompt": self.ctx.tokenizer.decode(ids)})
    except (KeyError, ValueError, IndexError) as e:
      raise APIError(400, f"'tokens' holds an id outside the vocabulary: {e}", "tokens") from None

  def _complete(self, body: dict, chat: bool):
    ctx = self.ctx
    tools, in_reasoning, grammar, budget = None, False, None, None
    if chat:
      prompt, tools = self._chat_prompt(body)
      grammar = self._chat_grammar(body, prompt, tools)
      budget = body.get("thinking_token_budget")
      if budget is not None:
        if not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0):
          raise APIError(400, "'thinking_token_budget' must be a non-negative integer", "thinking_token_budget")
        grammar = grammar or structured.free_reply_grammar(ctx.family, prompt)
      in_reasoning = opens_reasoning(prompt)
      ids = ctx.tokenizer.encode(prompt)
    prompts = [(ids, None)] if chat else self._prompts(body)
    if not chat:
      try:
        grammar = structured.completion_grammar(self._constraint(body))
      except structured.SchemaError as e:
        raise APIError(400, str(e), self._constraint_field(body)) from None
    n = oa.num_choices(body)
    jobs = []   # (prompt ids, params, echo): n choices per prompt, choice index = prompt * n + i
    for ids, text in prompts:
      params = oa.sampling_from_body(body, ctx.defaults, len(ids), ctx.engine.max_len, chat)
      echo = None
      if not chat and body.get("echo"):   # the prompt's text (and logprobs) ahead of the completion
        echo = text if text is not None else ctx.tokenizer.decode(ids)
      jobs += [(ids, p, echo) for p in oa.choice_params(params, n)]
    reqs = []
    try:
      try:
        for ids, p, _ in jobs:
          reqs.append(ctx.engine.submit(ids, p, guide=None if grammar is None else ctx.engine.guide(grammar, budget)))
      except ValueError as e:   # what only the engine knows (the vocabulary, its stop ids)
        raise oa.invalid_request(e, "messages" if chat else "prompt") from None
      outs = [_Choice(i, r, StreamParser(ctx.family, bool(tools), in_reasoning=in_reasoning, tools=tools)
                      if chat else None, echo=job[2]) for i, (r, job) in enumerate(zip(reqs, jobs))]
      maker = oa.ChunkMaker(ctx.model_name, chat)
      n_prompt = sum(len(ids) for ids, _ in prompts)

      def usage(completion_tokens: int) -> dict:   # each prompt counts once, as its first choice saw it
        return oa.usage(n_prompt, completion_tokens, sum(c.req.cached for c in outs[::n]))
      if body.get("stream"):
        opts = body.get("stream_options") or {}
        self._stream(outs, maker, chat, tools, bool(opts.get("include_usage")), usage,
                     bool(opts.get("continuous_usage_stats")))
      else:
        self._respond(outs, maker, chat, tools, in_reasoning, usage)
    finally:
      for r in reqs:
        if not r.done:
          ctx.engine.cancel(r)

  def _client_gone(self) -> bool:
    try:
      r, _, _ = select.select([self.connection], [], [], 0)
      return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
      return True

  def _events(self, outs):
    """(choice, Delta) as the engine emits them, over all choices, until each has finished."""
    live = list(outs)
    while live:
      got = False
      for c in list(live):
        try:
          d = c.req.events.get(timeout=0.2 if len(live) == 1 else 0)
        except queue.Empty:
          continue
        got = True
        yield c, d
        if d.finish_reason:
          live.remove(c)
      if not got:
        if self._client_gone():
          raise ClientGone() from None
        if len(live) > 1:
          time.sleep(0.005)

  def _logprobs(self, req, chat: bool, entries, offset: int = 0, echo: bool = False):
    """The `logprobs` of a chunk or response holding `entries` (None unless the request asked);
    legacy completions also -> the text offset after them."""
    if req.params.logprobs is None:
      return (None, offset) if not chat else None
    if chat:
      return oa.chat_logprobs(entries, self.ctx.tokenizer)
    ids = [e.token_id for e in entries]
    if echo:   # the prompt's tokens first (the first has no logprob)
      ids, entries = req.prompt_ids + ids, (req.prompt_logprobs or [None] * len(req.prompt_ids)) + entries
    return oa.completion_logprobs(ids, entries, self.ctx.tokenizer, offset)

  def _respond(self, outs, maker, chat, tools, in_reasoning, usage):
    for _ in self._events(outs):
      pass
    choices = []
    for c in outs:
      r = c.req
      if not chat:
        logprobs, _ = self._logprobs(r, False, r.logprobs, echo=c.echo is not None)
        choices.append(maker.choice(c.index, (c.echo or "") + r.text, oa.finish_reason(r.finish_reason, []),
                                    logprobs))
        continue
      out = parse_output(r.text, self.ctx.family, tools_enabled=bool(tools), in_reasoning=in_reasoning, tools=tools)
      choices.append(maker.choice(c.index, oa.chat_message(out.reasoning, out.content, out.tool_calls),
                                  oa.finish_reason(r.finish_reason, out.tool_calls), self._logprobs(r, True, r.logprobs)))
    self._send_json(200, maker.response(choices, usage(sum(len(c.req.output_ids) for c in outs))))

  def _sse(self, obj):
    self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode())
                     + b"\n\n")
    self.wfile.flush()

  def _stream(self, outs, maker, chat, tools, include_usage, usage, continuous_usage=False):
    """SSE chunks, each for one choice (`index`). A token's logprobs ride on the first chunk of its
    choice sent after it arrives (a token whose text is held back, e.g. a possible stop string,
    passes them on), so the chunks' logprobs joined are the non-streamed response's. With
    `continuous_usage` (vLLM's continuous_usage_stats) every chunk carries the usage so far."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True

    def so_far():
      return usage(sum(x.tokens for x in outs)) if continuous_usage else None

    def send(c, delta, finish=None):
      if chat:
        logprobs = self._logprobs(c.req, True, c.held)
      else:
        logprobs, c.offset = self._logprobs(c.req, False, c.held, c.offset)
      self._sse(maker.chunk(delta, finish, logprobs=logprobs, index=c.index, usage_so_far=so_far()))
      c.held = []

    for c in outs:
      if chat:
        self._sse(maker.chunk({"role": "assistant", "content": ""}, index=c.index, usage_so_far=so_far()))
    for c, d in self._events(outs):
      if c.echo is not None and not c.started:   # prompt logprobs are set before the first token arrives
        logprobs, c.offset = self._logprobs(c.req, False, [], echo=True)
        self._sse(maker.chunk({"content": c.echo}, logprobs=logprobs, index=c.index, usage_so_far=so_far()))
      c.started = True
      c.held += d.logprobs
      c.tokens += len(d.token_ids)
      if not chat:
        if d.text or d.finish_reason:
          send(c, {"content": d.text}, oa.finish_reason(d.finish_reason, []) if d.finish_reason else None)
        continue
      deltas = c.parser.push(d.text)
      calls = c.parser.tool_calls
      if d.finish_reason:
        tail, calls = c.parser.finish()
        deltas += tail
      for x in deltas:
        send(c, oa.chat_delta(x))
      for k in range(c.sent_calls, len(calls)):
        send(c, oa.tool_call_delta(k, calls[k]))
      c.sent_calls = len(calls)
      if d.finish_reason:
        send(c, {}, oa.finish_reason(d.finish_reason, calls))
    if include_usage:
      self._sse(maker.chunk(usage_=usage(sum(len(c.req.output_ids) for c in outs))))
    self._sse(b"[DONE]")


@dataclasses.dataclass(eq=False)
class _Choice:
  """One choice of a request (`n` > 1 or a batch of prompts makes several), and its streaming state."""
  index: int
  req: Any
  parser: Any = None        # StreamParser (chat)
  echo: Optional[str] = None   # completions' echo: the prompt's text, sent ahead of the choice's
  sent_calls: int = 0
  held: list = dataclasses.field(default_factory=list)   # logprobs not yet sent
  offset: int = 0           # legacy completions' text offset
  started: bool = False
  tokens: int = 0           # completion tokens received so far


class _HTTPServer(ThreadingHTTPServer):
  daemon_threads = True
  # The listen backlog: the standard library's 5 leaves a burst of clients to SYN retries
  # (uvicorn, under vLLM, listens with 2048).
  request_queue_size = 1024


class Server:
  """The HTTP server plus the engine thread; `start()` for tests, `serve_forever()` for the CLI."""

  def __init__(self, ctx: ServeContext, host: str = "127.0.0.1", port: int = 8000, run_engine: bool = True):
    handler = type("BoundHandler", (Handler,), {"ctx": ctx})
    self.ctx = ctx
    self.httpd = _HTTPServer((host, port), handler)
    self._stop = threading.Event()
    self._threads = []
    if run_engine:
      self._threads.append(threading.Thread(target=ctx.engine.run_forever, args=(self._stop,), daemon=True,
                                            name="engine"))

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> "Server":
    self._threads.append(threading.Thread(target=self.httpd.serve_forever, daemon=True, name="http"))
    for t in self._threads:
      t.start()
    return self

  def serve_forever(self) -> None:
    for t in self._threads:
      t.start()
    try:
      self.httpd.serve_forever()
    finally:
      self.shutdown()

  def shutdown(self) -> None:
    self._stop.set()
    self.httpd.shutdown()
    self.httpd.server_close()
    deadline = time.time() + 5
    for t in self._threads:
      t.join(max(0.0, deadline - time.time()))
