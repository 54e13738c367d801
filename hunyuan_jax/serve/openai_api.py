"""OpenAI request validation and response shapes (no HTTP here; see server.py).

Every problem a client can cause becomes an `APIError` with OpenAI's error body
{"error": {"message", "type", "param", "code"}} and the matching 4xx status.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Optional

from hunyuan_jax.serve.sampling import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
  def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
               type_: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type_ or {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, "")}
MAX_CHOICES = 16   # `n`: each choice takes a slot of the engine
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def _number(body: dict, name: str, kind=float):
  v = body.get(name)
  if v is None:
    return None
  ok = isinstance(v, (int, float)) and not isinstance(v, bool)
  if kind is int:
    ok = ok and float(v).is_integer()
  if not ok:
    raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", name)
  return kind(v)


def _logprob_count(body: dict, name: str) -> Optional[int]:
  n = _number(body, name, int)
  if n is not None and not 0 <= n <= MAX_LOGPROBS:
    raise APIError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}], got {n}", name)
  return n


def _logprob_fields(body: dict, chat: bool) -> dict:
  """OpenAI's two spellings -> SamplingParams.logprobs / prompt_logprobs.

  Chat: `logprobs` true/false and `top_logprobs` (alternatives, needs logprobs true).
  Completions: `logprobs` is the number of alternatives; with `echo` the prompt's tokens get them too.
  """
  if chat:
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
      raise APIError(400, f"'logprobs' must be true or false, got {on!r}", "logprobs")
    top = _logprob_count(body, "top_logprobs")
    if top is not None and not on:
      raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {"logprobs": top or 0} if on else {}
  if body.get("top_logprobs") is not None:
    raise APIError(400, "'top_logprobs' is a chat completions field; on completions 'logprobs' is the count",
                   "top_logprobs")
  n = _logprob_count(body, "logprobs")
  echo = body.get("echo")
  if echo is not None and not isinstance(echo, bool):
    raise APIError(400, f"'echo' must be true or false, got {echo!r}", "echo")
  if n is None:
    return {}
  return {"logprobs": n, "prompt_logprobs": n if echo else None}


def _logit_bias(body: dict) -> Optional[dict]:
  """OpenAI's {"<token id>": bias} (JSON keys are strings) -> {int id: float bias}."""
  bias = body.get("logit_bias")
  if bias is None:
    return None
  if not isinstance(bias, dict):
    raise APIError(400, "'logit_bias' must be an object mapping token ids to biases in [-100, 100]", "logit_bias")
  out = {}
  for k, v in bias.items():
    try:
      t = int(k)
    except ValueError:
      raise APIError(400, f"'logit_bias' key {k!r} is not a token id (an integer)", "logit_bias") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise APIError(400, f"'logit_bias' value for {k!r} must be a number, got {v!r}", "logit_bias")
    out[t] = float(v)
  return out


CHAT_KWARGS = {"enable_thinking": bool, "reasoning_effort": str}   # what the chat renderers take


def chat_kwargs(given: Any, name: str) -> dict:
  """`given` checked against CHAT_KWARGS; the ValueError names `name` (the field or flag)."""
  if not isinstance(given, dict):
    raise ValueError(f"'{name}' must be an object")
  for k, v in given.items():
    if k not in CHAT_KWARGS or not isinstance(v, CHAT_KWARGS[k]):
      raise ValueError(f"{name} {k}={v!r} is not supported; use enable_thinking (bool) or reasoning_effort (str)")
  return dict(given)


def chat_defaults_from(text: Optional[str], enable_thinking: bool = True) -> dict:
  """The server's default chat_template_kwargs: vLLM's --default-chat-template-kwargs (a JSON
  object) over --enable_thinking. Raises ValueError naming the flag and the accepted keys."""
  try:
    given = json.loads(text) if text else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"--default_chat_template_kwargs is not JSON ({e}); "
                     "e.g. '{\"enable_thinking\": false}'") from None
  return {"enable_thinking": enable_thinking, **chat_kwargs(given, "--default_chat_template_kwargs")}


def num_choices(body: dict) -> int:
  n = _number(body, "n", int)
  if n is not None and not 1 <= n <= MAX_CHOICES:
    raise APIError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", "n")
  return n or 1


def choice_params(params: SamplingParams, n: int) -> list:
  """One SamplingParams per choice; a seeded request gives choice i the seed + i (reproducible, and
  the choices differ)."""
  return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


def sampling_from_body(body: dict, defaults: dict, prompt_len: int, max_len: int,
                       chat: bool = True) -> SamplingParams:
  """Request fields over the model's generation_config defaults -> validated SamplingParams."""
  for name, allowed in _UNSUPPORTED.items():
    if name in body and body[name] not in allowed:
      raise APIError(400, f"'{name}'={body[name]!r} is not supported by this server; leave it out", name)
  kw: dict[str, Any] = dict(defaults)
  for name in _FLOATS:
    v = _number(body, name)
    if v is not None:
      kw[name] = v
  for name in ("top_k", "seed", "min_tokens"):
    v = _number(body, name, int)
    if v is not None:
      kw[name] = v
  if kw.get("top_k") == -1:
    kw["top_k"] = 0
  room = max_len - prompt_len
  if prompt_len >= max_len:
    raise APIError(400, f"This model's maximum context length is {max_len} tokens, but the prompt has "
                   f"{prompt_len} tokens; shorten the messages or the prompt", "messages", "context_length_exceeded")
  max_tokens = _number(body, "max_completion_tokens", int)
  name = "max_completion_tokens"
  if max_tokens is None:
    max_tokens, name = _number(body, "max_tokens", int), "max_tokens"
  if max_tokens is not None:
    if max_tokens < 1:
      raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", name)
    if max_tokens > room:
      raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has "
                     f"{prompt_len} and '{name}' asks for {max_tokens} more. Lower '{name}' to {room} or less",
                     name, "context_length_exceeded")
  kw["max_tokens"] = max_tokens or room
  stop = body.get("stop")
  if stop is not None:
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
      raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    kw["stop"] = stop
  ids = body.get("stop_token_ids")
  if ids is not None:
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
      raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    kw["stop_token_ids"] = ids
  for flag in ("ignore_eos", "include_stop_str_in_output"):   # vLLM extras
    if body.get(flag) is not None:
      kw[flag] = bool(body[flag])
  bias = _logit_bias(body)
  if bias:
    kw["logit_bias"] = bias
  kw.update(_logprob_fields(body, chat))
  params = SamplingParams(**kw)
  try:
    params.validate()
  except ValueError as e:
    raise invalid_request(e, None) from None
  return params


def invalid_request(e: ValueError, param: Optional[str]) -> APIError:
  """A 400 for a SamplingParams / Engine.submit ValueError: its param is the field the message
  starts with ("logit_bias=... is invalid: ..."), else `param`."""
  field = str(e).split("=")[0]
  return APIError(400, str(e), field if field in _SAMPLING_FIELDS else param)


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
  """OpenAI's usage; `cached_tokens`: prompt tokens served from the prefix cache."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclasses.dataclass
class ChunkMaker:
  """Builds the chunk / response dicts of one request (same id and timestamp throughout)."""
  model: str
  chat: bool
  id: str = ""
  created: int = 0

  def __post_init__(self):
    self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")
    self.created = self.created or int(time.time())

  def chunk(self, delta: Optional[dict] = None, finish_reason: Optional[str] = None,
            usage_: Optional[dict] = None, logprobs: Optional[dict] = None, index: int = 0,
            usage_so_far: Optional[dict] = None) -> dict:
    """A streamed chunk: one choice's delta (with vLLM's continuous usage, `usage_so_far`), or,
    given `usage_`, the final usage chunk with no choices."""
    out = {"id": self.id, "created": self.created, "model": self.model,
           "object": "chat.completion.chunk" if self.chat else "text_completion"}
    if usage_so_far is not None:
      out["usage"] = usage_so_far
    if usage_ is not None:
      out.update(choices=[], usage=usage_)
    elif self.chat:
      out["choices"] = [{"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish_reason}]
    else:
      out["choices"] = [{"index": index, "text": (delta or {}).get("content", ""), "logprobs": logprobs,
                         "finish_reason": finish_reason}]
    return out

  def choice(self, index: int, message_or_text: Any, finish_reason: str, logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "message" if self.chat else "text": message_or_text, "logprobs": logprobs,
            "finish_reason": finish_reason}

  def response(self, choices: list, usage_: dict) -> dict:
    return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, "usage": usage_}


def chat_delta(d: dict) -> dict:
  """A StreamParser delta -> an OpenAI delta; reasoning goes out under both of vLLM's names."""
  if "reasoning" in d:
    return {"reasoning_content": d["reasoning"], "reasoning": d["reasoning"]}
  return {"content": d["content"]}


def tool_call_delta(index: int, call: dict) -> dict:
  return {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                          "function": {"name": call["function"]["name"],
                                       "arguments": call["function"]["arguments"]}}]}


def chat_message(reasoning: Optional[str], content: str, tool_calls: list) -> dict:
  msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not tool_calls) else None,
                         "reasoning_content": reasoning, "reasoning": reasoning}
  if tool_calls:
    msg["tool_calls"] = tool_calls
  return msg


def finish_reason(engine_reason: str, tool_calls: list) -> str:
  if tool_calls and engine_reason == "stop":
    return "tool_calls"
  return {"abort": "stop"}.get(engine_reason, engine_reason)


# ------------------------------------------------------------------ logprobs
def _lp(x: float) -> float:
  return max(x, -9999.0)   # JSON has no -inf (vLLM clamps the same way)


def _token(tokenizer, token_id: int) -> tuple[str, list]:
  raw = tokenizer.token_bytes(token_id)
  text = tokenizer.decode([token_id])
  return text, list(raw if raw is not None else text.encode())


def chat_logprobs(entries, tokenizer) -> dict:
  """Engine TokenLogprobs -> a chat choice's `logprobs` ({"content": [...]})."""
  def item(token_id, lp):
    text, raw = _token(tokenizer, token_id)
    return {"token": text, "logprob": _lp(lp), "bytes": raw}
  return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                      for e in entries]}


def completion_logprobs(token_ids, entries, tokenizer, offset: int = 0) -> tuple[dict, int]:
  """Legacy completions `logprobs` for these tokens (an entry is None for the prompt's first token,
  which nothing predicts), text offsets from `offset`; -> (the dict, the offset after them)."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for token_id, e in zip(token_ids, entries):
    text = tokenizer.decode([token_id])
    out["tokens"].append(text)
    out["token_logprobs"].append(None if e is None else _lp(e.logprob))
    out["top_logprobs"].append(None if e is None else {tokenizer.decode([t]): _lp(lp) for t, lp in e.top})
    out["text_offset"].append(offset)
    offset += len(text)
  return out, offset
