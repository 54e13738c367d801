"""Reasoning / answer / tool-call parsing of Hunyuan outputs, streaming and not.

``parse_output`` is ``StreamParser`` fed the whole text at once, and StreamParser decides a tag only
once the text seen so far settles it (a possible tag prefix at the end is held back). So streaming and
non-streaming give identical results for every chunking, and no tag leaks into reasoning or content
(unlike vllm#58127, where a split ``</answer>`` reaches the client).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from hunyuan_jax.chat.templates import HY3_OPENSOURCE, HY3_PREVIEW, _family

@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


# Per state: (marker, next state or None to just drop the marker). Newline variants absorb the
# canonical "<think>\n…\n</think>\n<answer>\n…\n</answer>" framing; the longest match wins.
_THINK_OPEN = [("<think>\n", "think"), ("<think>", "think")]
_THINK_CLOSE = [(s, "after") for s in ("\n</think>\n", "\n</think>", "</think>\n", "</think>")]
_ANS_OPEN = [("<answer>\n", "answer"), ("<answer>", "answer")]
_ANS_CLOSE = [("\n</answer>", "start"), ("</answer>", "start")]
_A13B_MARKERS: dict[str, list[tuple[str, str | None]]] = {
    "start": _THINK_OPEN + _ANS_OPEN + [("</think>", None), ("</answer>", None)],
    "think": _THINK_CLOSE + _ANS_OPEN + [("<think>", None), ("</answer>", None)],
    "after": _ANS_OPEN + [("<think>", None), ("</think>", None), ("</answer>", None)],
    "answer": _ANS_CLOSE + [("<think>", None), ("</think>", None), ("<answer>", None)],
}
_HY3_TAGS = [(HY3_PREVIEW.think, HY3_PREVIEW.think_end), (HY3_OPENSOURCE.think, HY3_OPENSOURCE.think_end)]
_HY3_MARKERS: dict[str, list[tuple[str, str | None]]] = {
    "start": [(o, "think") for o, _ in _HY3_TAGS] + [(c, None) for _, c in _HY3_TAGS],
    "think": [(c, "start") for _, c in _HY3_TAGS] + [(o, None) for o, _ in _HY3_TAGS],
}
_TOOL_OPEN = ("<tool_calls>", "<tool_calls:opensource>")


class StreamParser:
    """Incremental splitter of model text into reasoning / content deltas plus tool calls.

    ``push(delta)`` returns ``[{"reasoning": s} | {"content": s}, ...]``; ``finish()`` returns the
    remaining deltas and the tool calls. ``in_reasoning=True`` when the prompt already opened a
    think block (Hy3 with reasoning_effort low/high ends the prompt with ``<think>``).
    ``self.tool_calls`` grows as each ``</tool_calls>`` closes, for servers that stream calls early.
    Tool-call ids are ``call_0``, ``call_1``, ... in output order, identical in both modes.
    """

    def __init__(self, family: str, tools_enabled: bool = False, *, in_reasoning: bool = False,
                 tools: list[Any] | None = None):
        fam = _family(family)
        self.hy3 = fam.startswith("hy3")
        self.tools_enabled = tools_enabled
        self.tools = tools
        self.markers = {k: list(v) for k, v in (_HY3_MARKERS if self.hy3 else _A13B_MARKERS).items()}
        if tools_enabled:  # tool calls are parsed from content only, never from reasoning
            for st in self.markers:
                if st != "think":
                    self.markers[st] += [(t, "tool") for t in _TOOL_OPEN]
        self.state = "think" if in_reasoning else "start"
        self._buf = ""
        self._tool_text = ""
        self._tool_return = "start"
        self._tool_close = ""
        self._lead: str | None = "" if (tools_enabled and not self.hy3) else None  # "助手：" check
        self.tool_calls: list[dict[str, Any]] = []

    def push(self, text: str) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        self._buf += text
        self._run(out, final=False)
        return _merge(out)

    def finish(self) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
        out: list[dict[str, str]] = []
        self._run(out, final=True)
        if self.state == "tool":  # unclosed block: parse what we have
            self._close_tool(out)
            self.state = self._tool_return
        if self._lead:
            self._emit_content(out, "", final=True)
        return _merge(out), self.tool_calls

    # -- internals

    def _emit(self, out: list[dict[str, str]], text: str) -> None:
        if not text:
            return
        if self.state == "think":
            out.append({"reasoning": text})
        else:
            self._emit_content(out, text, final=False)

    def _emit_content(self, out: list[dict[str, str]], text: str, final: bool) -> None:
        if self._lead is not None:  # A13B tool prompts make plain replies start with "助手："
            self._lead += text
            if not final and "助手：".startswith(self._lead):
                return
            text = self._lead[3:] if self._lead.startswith("助手：") else self._lead
            self._lead = None
        if text:
            out.append({"content": text})

    def _run(self, out: list[dict[str, str]], final: bool) -> None:
        while self._buf:
            if self.state == "tool":
                i = self._buf.find(self._tool_close)
                if i < 0:
                    keep = 0 if final else _partial_suffix(self._buf, [self._tool_close])
                    self._tool_text += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._tool_text += self._buf[:i]
                self._buf = self._buf[i + len(self._tool_close):]
                self._close_tool(out)
                self.state = self._tool_return
                continue
            hit = self._find(self.markers[self.state], final)
            if hit is None:  # no tag anywhere: all text is safe
                self._emit(out, self._buf)
                self._buf = ""
                return
            pos, marker, nxt = hit
            if marker is None:  # a tag may start at pos: emit up to it and wait for more text
                self._emit(out, self._buf[:pos])
                self._buf = self._buf[pos:]
                return
            self._emit(out, self._buf[:pos])
            self._buf = self._buf[pos + len(marker):]
            if nxt == "tool":
                self._tool_return, self._tool_text = self.state, ""
                self._tool_close = marker.replace("<", "</", 1)
            if nxt is not None:
                self.state = nxt

    def _find(self, markers: list[tuple[str, str | None]], final: bool) -> tuple[int, str | None, str | None] | None:
        """Earliest position holding a tag or (when not final) a possible tag prefix."""
        buf = self._buf
        for pos in range(len(buf)):
            if buf[pos] not in "<\n":
                continue
            rest = buf[pos:]
            full = [(m, n) for m, n in markers if rest.startswith(m)]
            partial = not final and any(len(rest) < len(m) and m.startswith(rest) for m, _ in markers)
            if partial:
                return pos, None, None
            if full:
                m, n = max(full, key=lambda x: len(x[0]))
                return pos, m, n
        return None

    def _close_tool(self, out: list[dict[str, str]]) -> None:
        calls = _hy3_calls(self._tool_text, self.tools) if self.hy3 else _a13b_calls(self._tool_text)
        if calls is None:  # unparseable block: keep its text (without tags) as content
            self._emit_content(out, self._tool_text, final=False)
        else:
            for name, args in calls:
                self.tool_calls.append({"id": f"call_{len(self.tool_calls)}", "type": "function",
                                        "function": {"name": name, "arguments": args}})
        self._tool_text = ""


def _partial_suffix(buf: str, tags: list[str]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some tag."""
    best = 0
    for t in tags:
        for k in range(min(len(t) - 1, len(buf)), 0, -1):
            if buf.endswith(t[:k]):
                best = max(best, k)
                break
    return best


def _merge(deltas: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for d in deltas:
        if out and out[-1].keys() == d.keys():
            k = next(iter(d))
            out[-1] = {k: out[-1][k] + d[k]}
        else:
            out.append(d)
    return out


def _a13b_calls(text: str) -> list[tuple[str, str]] | None:
    """JSON array of {"name", "arguments"}; malformed entries are skipped (as vLLM's hunyuan parser)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list):
        return None
    calls = []
    for c in data:
        if isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c:
            args = c["arguments"]
            calls.append((c["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls


_HY3_CALL = re.compile(r"<tool_call(?::opensource)?>(.*?)<tool_sep(?::opensource)?>(.*?)</tool_call(?::opensource)?>", re.S)
_HY3_ARG = re.compile(r"<arg_key(?::opensource)?>(.*?)</arg_key(?::opensource)?>\s*"
                      r"<arg_value(?::opensource)?>(.*?)</arg_value(?::opensource)?>", re.S)


def _hy3_calls(text: str, tools: list[Any] | None) -> list[tuple[str, str]] | None:
    """Hy3 XML-like calls. Values are JSON when they parse, unless the tool schema says string."""
    calls = []
    for name, body in _HY3_CALL.findall(text):
        name = name.strip()
        props = _schema_props(tools, name)
        args: dict[str, Any] = {}
        for k, v in _HY3_ARG.findall(body):
            if props.get(k, {}).get("type") == "string":
                args[k] = v
            else:
                try:
                    args[k] = json.loads(v)
                except json.JSONDecodeError:
                    args[k] = v
        calls.append((name, json.dumps(args, ensure_ascii=False)))
    return calls or None


def _schema_props(tools: list[Any] | None, name: str) -> dict[str, Any]:
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if fn.get("name") == name:
            return (fn.get("parameters") or {}).get("properties") or {}
    return {}


def parse_output(text: str, family: str, *, tools_enabled: bool = False, in_reasoning: bool = False,
                 tools: list[Any] | None = None) -> ParsedOutput:
    """Split a finished generation into reasoning / content / tool_calls (same rules as StreamParser)."""
    p = StreamParser(family, tools_enabled, in_reasoning=in_reasoning, tools=tools)
    deltas = p.push(text)
    tail, calls = p.finish()
    reasoning = "".join(d.get("reasoning", "") for d in deltas + tail)
    content = "".join(d.get("content", "") for d in deltas + tail)
    return ParsedOutput(reasoning or None, content, calls)


def opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt leaves a think block open (Hy3 low/high): pass it as in_reasoning."""
    return prompt.endswith((HY3_PREVIEW.think, HY3_OPENSOURCE.think))
