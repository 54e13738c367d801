"""Serving metrics in the Prometheus text format (GET /metrics), under vLLM's names.

The names, kinds and labels are vLLM's (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`,
...), so the Grafana dashboards and alerts written for a vLLM deployment read this server as they
are. The engine thread records; the HTTP thread renders (plain ints and floats: a scrape may see
one update half applied, never a broken value).
"""
from __future__ import annotations

import bisect
import time

# vLLM's bucket bounds (seconds) for each histogram
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
  def __init__(self, bounds):
    self.bounds, self.counts, self.sum = tuple(bounds), [0] * (len(bounds) + 1), 0.0

  def observe(self, x: float):
    self.counts[bisect.bisect_left(self.bounds, x)] += 1
    self.sum += x

  def lines(self, name: str, labels: str) -> list:
    out, total = [], 0
    for bound, n in zip(self.bounds + (float("inf"),), self.counts):
      total += n
      le = "+Inf" if bound == float("inf") else repr(bound)
      out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
    return out + [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {total}"]


class EngineMetrics:
  """What the engine records over its life: token and request counts, prefix-cache hits, latencies."""

  def __init__(self):
    self.prompt_tokens = self.generation_tokens = 0
    self.prefix_queries = self.prefix_hits = 0      # prompt tokens looked up / found in the prefix cache
    self.finished = dict.fromkeys(FINISH_REASONS, 0)
    self.ttft = Histogram(TTFT_BUCKETS)
    self.inter_token = Histogram(TOKEN_BUCKETS)
    self.e2e = Histogram(REQUEST_BUCKETS)

  def admitted(self, prompt_tokens: int, cached: int):
    self.prompt_tokens += prompt_tokens
    self.prefix_queries += prompt_tokens
    self.prefix_hits += cached

  def token(self, arrived: float, last: float, first: bool) -> float:
    """One generated token of a request that arrived at `arrived` and last emitted at `last`;
    returns now."""
    now = time.monotonic()
    self.generation_tokens += 1
    (self.ttft.observe(now - arrived) if first else self.inter_token.observe(now - last))
    return now

  def finish(self, reason: str, arrived: float):
    self.finished[reason] = self.finished.get(reason, 0) + 1
    self.e2e.observe(time.monotonic() - arrived)

  def render(self, model: str, running: int, waiting: int, cache_usage: float) -> str:
    labels = f'model_name="{_escape(model)}"'
    out = []

    def metric(name, kind, help_, values):
      out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
      out.extend(values)

    metric("vllm:num_requests_running", "gauge", "Requests in a slot (prefill or decode).",
           [f"vllm:num_requests_running{{{labels}}} {running}"])
    metric("vllm:num_requests_waiting", "gauge", "Requests waiting for a slot.",
           [f"vllm:num_requests_waiting{{{labels}}} {waiting}"])
    metric("vllm:kv_cache_usage_perc", "gauge", "Fraction of the KV cache rows held by running requests (1 = full).",
           [f"vllm:kv_cache_usage_perc{{{labels}}} {cache_usage!r}"])
    for name, help_, value in (
        ("vllm:prompt_tokens", "Prompt tokens admitted.", self.prompt_tokens),
        ("vllm:generation_tokens", "Tokens generated.", self.generation_tokens),
        ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", self.prefix_queries),
        ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).", self.prefix_hits)):
      metric(name + "_total", "counter", help_, [f"{name}_total{{{labels}}} {value}"])
    metric("vllm:request_success_total", "counter", "Finished requests by finish reason.",
           [f'vllm:request_success_total{{{labels},finished_reason="{r}"}} {n}' for r, n in self.finished.items()])
    for name, help_, hist in (
        ("vllm:time_to_first_token_seconds", "Time from submission to the first token.", self.ttft),
        ("vllm:inter_token_latency_seconds", "Time between a request's successive tokens.", self.inter_token),
        ("vllm:e2e_request_latency_seconds", "Time from submission to the end of the request.", self.e2e)):
      metric(name, "histogram", help_, hist.lines(name, labels))
    return "\n".join(out) + "\n"


def _escape(s: str) -> str:
  return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
