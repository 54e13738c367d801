"""Chat templates of Hunyuan A13B / Large / Hy3 as plain Python.

A13B reproduces ``models/tokenizer_config.json`` of Tencent-Hunyuan/Hunyuan-A13B and Large the one of
Tencent-Hunyuan-Large (both stored as jinja fixtures in tests/fixtures/chat/ and checked string-for-string).
The Hy3 ``chat_template.jinja`` itself was not available; Hy3 follows the markup documented by the Hy3
finetune template, ms-swift's hy_v3 templates and third-party ports of the jinja (see ``_render_hy3``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    in_tools, last_is_assistant = False, False
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
            if not in_tools:  # one <tool_responses> block per run of tool messages
                out.append(mk.tag("tool_responses") + "\n")
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
