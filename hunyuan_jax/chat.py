"""Chat templates and output parsing for Hunyuan A13B / Large / Hy3 (pure Python).

Rendering reproduces the published jinja templates (fixtures in tests/fixtures/chat/):
A13B = ``models/tokenizer_config.json`` of Tencent-Hunyuan/Hunyuan-A13B, Large = the one of
Tencent-Hunyuan-Large. The Hy3 ``chat_template.jinja`` itself was not available; Hy3 follows the
markup documented by the Hy3 finetune templates and ms-swift (see ``_render_hy3``).

Parsing: ``parse_output`` is ``StreamParser`` fed the whole text at once, and StreamParser decides
a tag only once the text seen settles it, so streaming and non-streaming results are identical
for every chunking, and no tag ever leaks into reasoning or content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

FAMILIES = ("a13b", "large", "hy3", "hy3_opensource", "tiny")
ROLES = ("system", "user", "assistant", "tool")
SOT, EX0, EX4, EOS = "<|startoftext|>", "<|extra_0|>", "<|extra_4|>", "<|eos|>"
NO_THINK_SUFFIX = "<think>\n\n</think>\n"

# Strings of the A13B tool path, verbatim from its template.
_FMT = ('<tool_calls>[{"name": "func_name1", "arguments": {"argument1": "value1", "argument2": "value2"}},...]'
        '</tool_calls>')
_TOOL_PREAMBLE = (
    "你是一位函数组合专家。你会得到一个问题和一组可能的函数。根据问题，你需要进行一个或多个函数/工具调用以实现目的。\n"
    "如果没有一个函数可以使用，请直接使用自然语言回复用户，以助手：开头。\n"
    "如果给定的问题缺少函数所需的参数，请使用自然语言进行提问，向用户询问必要信息，以助手：开头。\n"
    "如果调用结果已经足够回答用户问题，请对历史结果进行总结，使用自然语言回复用户，以助手：开头。\n"
    f"你应该只在工具调用部分返回函数调用。如果你决定调用任何函数，你必须将其格式化为{_FMT}。你不应该在回复中包含任何其他文本。"
    "以下是你可以调用的函数列表，格式为JSON。\n")
_TOOL_SYS_TAIL = (f"\n\n如果你决定返回函数调用，请将其格式化为{_FMT}，不得包含其他文本。如果额外要求里有格式要求，请忽略，以此处为准。\n"
                  "否则，请参考开头说的三种情况，以助手：开头进行回复。\n\n如果额外要求里有时间信息，就以额外要求里的时间为准，否则，参考当前时间：")
_TOOL_USER_TAIL = (f"\n如果你决定返回函数调用，请将其格式化为{_FMT}，不得包含其他文本。\n"
                   "否则，请参考开头说的三种情况，以助手：开头进行回复。\n\n当前时间：")
_WEEKDAYS_CN = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")


@dataclass(frozen=True)
class Hy3Markup:
    """Hy3 control strings. Hy3-preview has bare names; the Hy3 release appends ':opensource'."""
    bos: str
    user: str
    assistant: str
    eos: str
    think: str
    think_end: str
    reasoning_mode: str
    tk: str  # suffix inside the XML-like tool tags

    def tag(self, name: str, close: bool = False) -> str:
        return f"<{'/' if close else ''}{name}{self.tk}>"


HY3_PREVIEW = Hy3Markup("<｜hy_begin▁of▁sentence｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>", "<｜hy_eos｜>",
                        "<think>", "</think>", "<｜reasoning_mode｜>", "")
HY3_OPENSOURCE = Hy3Markup("<｜hy_begin_of_sentence:opensource｜>", "<｜hy_User:opensource｜>",
                           "<｜hy_Assistant:opensource｜>", "<｜hy_eos:opensource｜>", "<think:opensource>",
                           "</think:opensource>", "<｜reasoning_mode:opensource｜>", ":opensource")
HY3_EFFORTS = ("no_think", "low", "high")


def _family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown chat family {family!r}; use one of {FAMILIES}")
    return "a13b" if family == "tiny" else family


def _text(content: Any, where: str) -> str:
    """Message content as a string: str, None, or OpenAI text parts (joined by newlines like vLLM)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: content part {j} must be {{'type': 'text', 'text': str}}, got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; use one of {ROLES}")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f"message {i}: tool_calls must be a list")
            for k, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"message {i}: tool_calls[{k}] needs function.name (OpenAI format)")
        out.append({**m, "content": _text(m.get("content"), f"message {i}")})
    return out


def _tojson(x: Any) -> str:
    # transformers overrides jinja's tojson with this (no HTML escaping, no key sorting).
    return json.dumps(x, ensure_ascii=False)


def _render_a13b_tools(msgs: list[dict[str, Any]], tools: list[Any], now: datetime) -> str:
    when = now.strftime("%Y-%m-%d %H:%M:%S") + " " + _WEEKDAYS_CN[now.weekday()]
    out = []
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if i == 0:  # the preamble rides on the first message (system or user); others stay raw
            tmp = _TOOL_PREAMBLE + "\n" + _tojson(tools) + "\n"
            if role == "system":
                content = SOT + tmp + "\n额外要求：\n" + content + _TOOL_SYS_TAIL + when + EX4
            elif role == "user":
                content = SOT + tmp + _TOOL_USER_TAIL + when + EX4 + "用户：" + content + EX0
        elif role == "user":
            content = "用户：" + content + EX0
        elif role == "assistant":
            if m.get("tool_calls") is not None:
                calls = []
                for c in m["tool_calls"]:
                    args = c["function"].get("arguments")
                    args = args if isinstance(args, str) else _tojson(args)
                    calls.append('{"name": "' + c["function"]["name"] + '", "arguments": ' + args + "}")
                content = content + "<tool_calls>[" + ", ".join(calls) + "]</tool_calls>"
            else:
                content = "助手：" + content
            content += EOS
        elif role == "tool":
            content = "<tool_response>" + content + "</tool_response>" + EX0
        out.append(content)
    return "".join(out)


def _render_a13b_plain(msgs: list[dict[str, Any]], with_tool_role: bool) -> str:
    out, has_head = [], True
    for i, m in enumerate(msgs):
        role, content = m["role"], m["content"]
        if i == 0:
            if content == "":
                has_head = False
            elif role == "system":
                content = SOT + content + EX4
        if role == "user":
            # Replicates the template, including its double <|startoftext|> after an empty head.
            if i == 1 and not has_head:
                content = SOT + content
            content = content + EX0 if (i == 1 and has_head) else SOT + content + EX0
        elif role == "assistant":
            content += EOS
        elif role == "tool" and with_tool_role:  # Large's template has no tool branch
            content += EX0
        out.append(content)
    return "".join(out)


def _render_hy3(msgs: list[dict[str, Any]], mk: Hy3Markup, effort: str, tools: list[Any] | None,
                add_generation_prompt: bool) -> str:
    """Hy3 markup. The real chat_template.jinja could not be read; this follows the Hy3 finetune
    template (BOS, system text untagged, <User>q<Assistant>a<eos>), ms-swift's hy_v3 templates
    (reasoning-mode marker, <think></think> prefixes) and third-party ports of the jinja."""
    mode = f"{mk.reasoning_mode}reasoning_effort:{effort}"
    system = "".join(m["content"] for m in msgs if m["role"] == "system")
    out = [mk.bos, system]
    if tools:
        t = mk.tag
        out.append(("\n\n" if system else "") + "# Tools\n\nYou may call one or more functions to assist with the "
                   "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                   + "\n".join(_tojson(x) for x in tools) + "\n</tools>\n\n"
                   f"For function call returns, you should first print {t('tool_calls')}\n"
                   "For each function call, you should return object like:\n"
                   f"{t('tool_call')}{{function-name}}{t('tool_sep')}\n"
                   f"{t('arg_key')}{{arg-key-1}}{t('arg_key', True)}\n{t('arg_value')}{{arg-value-1}}{t('arg_value', True)}\n"
                   f"{t('arg_key')}{{arg-key-2}}{t('arg_key', True)}\n{t('arg_value')}{{arg-value-2}}{t('arg_value', True)}\n"
                   f"...\n{t('tool_call', True)}\nAt the end of function call returns, you should print "
                   f"{t('tool_calls', True)}" + mode)
    else:
        out.append(mode)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    last_user = users[-1] if users else -1
    in_tools, opened, last_is_assistant = False, False, False
    for i, m in enumerate(msgs):
        role = m["role"]
        if role != "tool" and in_tools:
            out.append(mk.tag("tool_responses", True))
            in_tools = False
        if role == "user":
            out.append(mk.user + m["content"])
        elif role == "assistant":
            # History turns keep their reasoning only after the last user turn (or with tools).
            keep = bool(tools) or i > last_user
            reasoning = (m.get("reasoning") or m.get("reasoning_content") or "") if keep else ""
            out.append(mk.assistant + mk.think + reasoning + mk.think_end + m["content"])
            if m.get("tool_calls"):
                out.append(_hy3_tool_calls(m["tool_calls"], mk) + mk.eos)
            elif i + 1 != len(msgs):
                out.append(mk.eos)
        elif role == "tool":
            if not opened:
                out.append(mk.tag("tool_responses") + "\n")
                opened = True
            out.append(mk.tag("tool_response") + "\n" + m["content"] + "\n" + mk.tag("tool_response", True) + "\n")
            in_tools = True
        last_is_assistant = role == "assistant"
    if in_tools:
        out.append(mk.tag("tool_responses", True))
    if add_generation_prompt and not last_is_assistant:
        out.append(mk.assistant + mk.think + (mk.think_end if effort == "no_think" else ""))
    return "".join(out)


def _hy3_tool_calls(calls: list[dict[str, Any]], mk: Hy3Markup) -> str:
    t = mk.tag
    s = t("tool_calls") + "\n"
    for c in calls:
        args = c["function"].get("arguments") or {}
        if isinstance(args, str):
            args = json.loads(args)
        s += t("tool_call") + c["function"]["name"] + t("tool_sep") + "\n"
        for k, v in args.items():
            v = v if isinstance(v, str) else _tojson(v)
            s += f"{t('arg_key')}{k}{t('arg_key', True)}\n{t('arg_value')}{v}{t('arg_value', True)}\n"
        s += t("tool_call", True) + "\n"
    return s + t("tool_calls", True)


def render_chat(messages: list[dict[str, Any]], family: str, *, enable_thinking: bool = True,
                reasoning_effort: str | None = None, tools: list[Any] | None = None,
                add_generation_prompt: bool = True, now: datetime | None = None) -> str:
    """Prompt text for ``messages`` in the chat markup of ``family``.

    A13B/Large have no assistant header, so ``add_generation_prompt`` only matters for Hy3.
    ``now`` freezes the clock of the A13B tool preamble (default: the current local time).
    Hy3: ``reasoning_effort`` in {no_think, low, high}; when None it is 'high' if enable_thinking
    else 'no_think' (ms-swift's mapping).
    """
    fam = _family(family)
    msgs = _messages(messages)
    if fam == "a13b":
        if tools:
            text = _render_a13b_tools(msgs, tools, now or datetime.now())
        else:
            text = _render_a13b_plain(msgs, with_tool_role=True)
        return text + ("" if enable_thinking else NO_THINK_SUFFIX)
    if fam == "large":
        if tools:
            raise ValueError("the Hunyuan-Large template has no tool support; render with family='a13b' or drop tools")
        return _render_a13b_plain(msgs, with_tool_role=False)
    effort = reasoning_effort or ("high" if enable_thinking else "no_think")
    if effort not in HY3_EFFORTS:
        raise ValueError(f"reasoning_effort {effort!r} is not one of {HY3_EFFORTS}")
    return _render_hy3(msgs, HY3_OPENSOURCE if fam == "hy3_opensource" else HY3_PREVIEW, effort, tools,
                       add_generation_prompt)


def hy3_family_for(tok: Any) -> str:
    """'hy3_opensource' if the tokenizer knows the ':opensource' markers, else 'hy3'."""
    try:
        tok.token_to_id(HY3_OPENSOURCE.user)
        return "hy3_opensource"
    except KeyError:
        return "hy3"


# ----------------------------------------------------------------------------- parsing

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
        self.saw_reasoning = in_reasoning

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
            if nxt == "think":
                self.saw_reasoning = True
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
