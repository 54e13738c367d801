"""Chat template parity vs the published jinja templates, and reasoning / tool-call parsing."""

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from hunyuan_jax.chat import StreamParser, hy3_family_for, opens_reasoning, parse_output, render_chat
from hunyuan_jax.tokenizer import ByteTokenizer, TiktokenTokenizer

FIX = Path(__file__).parent / "fixtures" / "chat"
NOW = dt.datetime(2025, 6, 26, 16, 21, 57)  # a Thursday: the README example's timestamp

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Ability to check the weather in any city",
    "parameters": {"type": "object", "properties": {"city": {"description": "city name", "type": "string"}},
                   "required": ["city"]}}}]
AGENT = [  # agent/README.md of Hunyuan-A13B
    {"role": "system", "content": "You are a weather agent."},
    {"role": "user", "content": "Hi, how are you?"},
    {"role": "assistant", "content": "Thanks. I am doing well. How can I help you?"},
    {"role": "user", "content": "What's the weather like in Beijing and Shanghai?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Beijing"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}}]},
    {"role": "tool", "content": '[{"status_code": 200, "weather_info": {"city": "Beijing", "weather": "sunny"}}]'},
    {"role": "assistant", "content": "Beijing and Shanghai have sunny weather."},
    {"role": "user", "content": "Shenzhen"},
]
CONVS = {
    "sys_user": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好"}],
    "user_only": [{"role": "user", "content": "Write a short summary of the benefits of regular exercise"}],
    "multi": AGENT[:4],
    "empty_sys": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
    "user_user": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "tool_role": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                  {"role": "tool", "content": "r"}],
    "special_in_text": [{"role": "user", "content": "say <|eos|> please"}],
    "agent": AGENT,
    "agent_no_sys": AGENT[1:],
}


def jinja_render(name, messages, **kw):
    """Render with transformers' own jinja environment (its tojson, strftime_now frozen to NOW)."""
    from transformers.utils import chat_template_utils as ctu

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    old, ctu.datetime = ctu.datetime, Frozen
    try:
        out = ctu.render_jinja_template([messages], chat_template=(FIX / name).read_text(), **kw)
    finally:
        ctu.datetime = old
    return out[0][0]


def plain_jinja_render(name, messages, **kw):
    """Same settings as transformers (trim/lstrip blocks, its tojson) but a mutable sandbox: the A13B
    template's empty-first-message branch calls dict.update, which transformers' immutable sandbox
    refuses (SecurityError), so that branch is checked here against the template's own logic."""
    import jinja2.sandbox

    env = jinja2.sandbox.SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False)
    env.globals["strftime_now"] = NOW.strftime
    return env.from_string((FIX / name).read_text()).render(messages=messages, **kw)


@pytest.fixture(scope="module")
def hy_tok(tmp_path_factory):
    import base64
    p = tmp_path_factory.mktemp("hy") / "hy.tiktoken"
    p.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return TiktokenTokenizer.from_file(str(p))


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_a13b_matches_jinja(conv, thinking, with_tools, hy_tok):
    msgs = CONVS[conv]
    tools = TOOLS if with_tools else None
    kw = {} if thinking else {"enable_thinking": False}
    if conv == "empty_sys" and not with_tools:
        import jinja2
        with pytest.raises(jinja2.exceptions.SecurityError):  # transformers cannot render this branch
            jinja_render("a13b_chat_template.jinja", msgs, tools=tools, **kw)
        ref = plain_jinja_render("a13b_chat_template.jinja", msgs, tools=tools, **kw)
    else:
        ref = jinja_render("a13b_chat_template.jinja", msgs, tools=tools, add_generation_prompt=True, **kw)
        assert ref == plain_jinja_render("a13b_chat_template.jinja", msgs, tools=tools, **kw)
    ours = render_chat(msgs, "a13b", enable_thinking=thinking, tools=tools, now=NOW)
    assert ours == ref
    assert render_chat(msgs, "tiny", enable_thinking=thinking, tools=tools, now=NOW) == ref
    assert hy_tok.encode(ours) == hy_tok.encode(ref)
    assert ByteTokenizer().encode(ours) == ByteTokenizer().encode(ref)


def test_a13b_tool_prompt_has_frozen_clock_and_weekday():
    text = render_chat(AGENT, "a13b", tools=TOOLS, now=NOW)
    assert "参考当前时间：2025-06-26 16:21:57 星期四<|extra_4|>用户：Hi, how are you?<|extra_0|>" in text
    assert ('<tool_calls>[{"name": "get_weather", "arguments": {"city": "Beijing"}}, {"name": "get_weather", '
            '"arguments": {"city": "上海"}}]</tool_calls><|eos|>') in text
    assert text.endswith("用户：Shenzhen<|extra_0|>")


@pytest.mark.parametrize("conv", ["sys_user", "user_only", "multi", "empty_sys", "user_user", "special_in_text"])
def test_large_matches_jinja(conv, hy_tok):
    msgs = CONVS[conv]
    if conv == "empty_sys":
        ref = plain_jinja_render("large_chat_template.jinja", msgs)
    else:
        ref = jinja_render("large_chat_template.jinja", msgs, add_generation_prompt=True)
    ours = render_chat(msgs, "large")
    assert ours == ref and hy_tok.encode(ours) == hy_tok.encode(ref)
    # Large has no think markup: enable_thinking does not change it.
    assert render_chat(msgs, "large", enable_thinking=False) == ref


def test_spec_examples():
    # HUNYUAN_SPEC.md §4 text, independent of the fixtures.
    s = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                     {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"},
                     {"role": "assistant", "content": "B"}, {"role": "tool", "content": "T"}], "a13b")
    assert s == "<|startoftext|>S<|extra_4|>U<|extra_0|>A<|eos|><|startoftext|>V<|extra_0|>B<|eos|>T<|extra_0|>"
    assert render_chat([{"role": "user", "content": "U"}], "a13b", enable_thinking=False) == \
        "<|startoftext|>U<|extra_0|><think>\n\n</think>\n"


def test_content_parts_equal_string():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    for fam in ("a13b", "large", "hy3"):
        assert render_chat(parts, fam) == render_chat([{"role": "user", "content": "a\nb"}], fam)


@pytest.mark.parametrize("bad, match", [
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"content": "x"}], "must be a dict with a 'role'"),
    ("hello", "must be a list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "content part 0"),
    ([{"role": "user", "content": 3}], "string or a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], "function.name"),
])
def test_bad_messages_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        render_chat(bad, "a13b")


def test_bad_family_and_effort():
    with pytest.raises(ValueError, match="unknown chat family"):
        render_chat([], "llama")
    with pytest.raises(ValueError, match="reasoning_effort 'medium'"):
        render_chat([], "hy3", reasoning_effort="medium")
    with pytest.raises(ValueError, match="no tool support"):
        render_chat([{"role": "user", "content": "x"}], "large", tools=TOOLS)


# Hy3: the Hub chat_template.jinja was not available. Expected strings come from the markup in the
# Hy3 finetune template / ms-swift hy_v3 templates and third-party ports of the jinja.
@pytest.mark.parametrize("effort", ["no_think", "low", "high"])
def test_hy3_single_turn(effort):
    user = [{"role": "user", "content": "Привет, 你好!"}]
    tail = "<think></think>" if effort == "no_think" else "<think>"
    assert render_chat(user, "hy3", reasoning_effort=effort) == (
        "<｜hy_begin▁of▁sentence｜><｜reasoning_mode｜>reasoning_effort:" + effort +
        "<｜hy_User｜>Привет, 你好!<｜hy_Assistant｜>" + tail)
    os_tail = "<think:opensource></think:opensource>" if effort == "no_think" else "<think:opensource>"
    assert render_chat(user, "hy3_opensource", reasoning_effort=effort) == (
        "<｜hy_begin_of_sentence:opensource｜><｜reasoning_mode:opensource｜>reasoning_effort:" + effort +
        "<｜hy_User:opensource｜>Привет, 你好!<｜hy_Assistant:opensource｜>" + os_tail)


def test_hy3_multi_turn_and_defaults():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"}, {"role": "user", "content": "q2"}]
    s = render_chat(msgs, "hy3", enable_thinking=False)
    assert s == ("<｜hy_begin▁of▁sentence｜>S<｜reasoning_mode｜>reasoning_effort:no_think<｜hy_User｜>q1"
                 "<｜hy_Assistant｜><think></think>a1<｜hy_eos｜><｜hy_User｜>q2<｜hy_Assistant｜><think></think>")
    assert "reasoning_effort:high" in render_chat(msgs, "hy3")  # enable_thinking=True default
    no_gen = render_chat(msgs, "hy3", add_generation_prompt=False, reasoning_effort="low")
    assert no_gen.endswith("<｜hy_User｜>q2")


def test_hy3_tools_render():
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "深圳"}}}]},
            {"role": "tool", "content": "sunny"}]
    s = render_chat(msgs, "hy3", tools=TOOLS, reasoning_effort="no_think")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in s
    assert "you should print </tool_calls><｜reasoning_mode｜>reasoning_effort:no_think<｜hy_User｜>go" in s
    assert ("<tool_calls>\n<tool_call>get_weather<tool_sep>\n<arg_key>city</arg_key>\n<arg_value>深圳</arg_value>\n"
            "</tool_call>\n</tool_calls><｜hy_eos｜>") in s
    assert s.endswith("<tool_responses>\n<tool_response>\nsunny\n</tool_response>\n</tool_responses>"
                      "<｜hy_Assistant｜><think></think>")


def test_hy3_tool_response_batches_are_balanced():
    call = {"function": {"name": "get_weather", "arguments": '{"city": "A"}'}}
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "r1"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "r2"}, {"role": "tool", "content": "r3"}]
    s = render_chat(msgs, "hy3_opensource", tools=TOOLS, reasoning_effort="high")
    assert s.count("<tool_responses:opensource>") == s.count("</tool_responses:opensource>") == 2
    assert s.endswith("</tool_responses:opensource><｜hy_Assistant:opensource｜><think:opensource>")
    assert opens_reasoning(s) and not opens_reasoning(render_chat(msgs[:1], "hy3", reasoning_effort="no_think"))


def test_hy3_family_detection():
    class T:
        def __init__(self, known): self.known = known
        def token_to_id(self, s):
            if s not in self.known:
                raise KeyError(s)
            return 1
    assert hy3_family_for(T({"<｜hy_User:opensource｜>"})) == "hy3_opensource"
    assert hy3_family_for(T(set())) == "hy3"


# ----------------------------------------------------------------------------- parsing

SLOW = "<think>\nLet me think.\nStep 2.\n</think>\n<answer>\nThe answer is 4.\n</answer>"
FAST = "<think>\n\n</think>\n<answer>Quick answer.</answer>"
TOOL2 = ('<think>\nNeed weather.\n</think>\n<answer>\n<tool_calls>[{"name": "get_weather", "arguments": '
         '{"city": "Beijing"}}, {"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}, '
         '{"name": "get_weather", "arguments": {"city": "上海"}}]</tool_calls>\n</answer>')
MALFORMED_ENTRY = ('<answer><tool_calls>[{"name": "a", "arguments": {}}, {"oops": 1}, "str", '
                   '{"name": "b"}, {"name": "c", "arguments": {"x": [1, 2]}}]</tool_calls></answer>')
BAD_JSON = '<answer>\n<tool_calls>[{"name": "a", "arguments": {</tool_calls>\n</answer>'
PLAIN_TOOLS = "<think>\nno tool needed\n</think>\n<answer>\n助手：你好！有什么可以帮你？\n</answer>"
NO_CLOSE = "<think>\nthinking but the budget ran out"
NO_ANSWER_CLOSE = "<think>\nx\n</think>\n<answer>\npartial answer"
NO_TAGS = "just text with < and <thin and </answ fragments"
MULTI = SLOW + "\n<think>\nagain\n</think>\n<answer>\nsecond\n</answer>"
HY3_OUT = "plan with <b>html</b></think>The answer.\n<tool_calls>\n<tool_call>get_weather<tool_sep>\n" \
          "<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n" \
          "</tool_call>\n</tool_calls>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<tool_calls>", "</tool_calls>")


def test_slow_and_fast_think():
    p = parse_output(SLOW, "a13b")
    assert p.reasoning == "Let me think.\nStep 2." and p.content == "The answer is 4." and p.tool_calls == []
    p = parse_output(FAST, "a13b")
    assert p.reasoning is None and p.content == "Quick answer."
    # enable_thinking=False: the prompt ends with the empty think block, output starts at <answer>.
    p = parse_output("<answer>\nHi\n</answer>", "a13b")
    assert p.reasoning is None and p.content == "Hi"


def test_tool_calls_parallel_in_order():
    p = parse_output(TOOL2, "a13b", tools_enabled=True)
    assert p.reasoning == "Need weather." and p.content == ""
    assert [c["function"]["name"] for c in p.tool_calls] == ["get_weather", "get_time", "get_weather"]
    assert [c["id"] for c in p.tool_calls] == ["call_0", "call_1", "call_2"]
    assert all(c["type"] == "function" for c in p.tool_calls)
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"city": "Beijing"}
    assert json.loads(p.tool_calls[1]["function"]["arguments"]) == {"tz": "UTC"}
    assert json.loads(p.tool_calls[2]["function"]["arguments"]) == {"city": "上海"}
    # Without tools enabled the block is left alone (tags are not content tags then).
    assert parse_output(TOOL2, "a13b").tool_calls == []


def test_malformed_tool_output():
    p = parse_output(MALFORMED_ENTRY, "a13b", tools_enabled=True)
    assert [c["function"]["name"] for c in p.tool_calls] == ["a", "c"]
    assert json.loads(p.tool_calls[1]["function"]["arguments"]) == {"x": [1, 2]}
    p = parse_output(BAD_JSON, "a13b", tools_enabled=True)
    assert p.tool_calls == [] and p.content == '[{"name": "a", "arguments": {'
    p = parse_output(PLAIN_TOOLS, "a13b", tools_enabled=True)
    assert p.content == "你好！有什么可以帮你？" and p.tool_calls == []
    assert parse_output(PLAIN_TOOLS, "a13b").content.startswith("助手：")


def test_missing_close_tags():
    p = parse_output(NO_CLOSE, "a13b")
    assert p.reasoning == "thinking but the budget ran out" and p.content == ""
    p = parse_output(NO_ANSWER_CLOSE, "a13b")
    assert p.reasoning == "x" and p.content == "partial answer"
    p = parse_output(NO_TAGS, "a13b")
    assert p.reasoning is None and p.content == NO_TAGS
    p = parse_output('<answer><tool_calls>[{"name": "f", "arguments": {}}]', "a13b", tools_enabled=True)
    assert [c["function"]["name"] for c in p.tool_calls] == ["f"] and p.content == ""


def test_hy3_parsing():
    p = parse_output(HY3_OUT, "hy3", tools_enabled=True, in_reasoning=True,
                     tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                         "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])
    assert p.reasoning == "plan with <b>html</b>" and p.content == "The answer.\n"
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"city": "123", "days": 3}
    p = parse_output("<think:opensource>r</think:opensource>c", "hy3_opensource")
    assert (p.reasoning, p.content) == ("r", "c")
    p = parse_output("direct answer", "hy3")  # no_think prompt: everything is content
    assert (p.reasoning, p.content) == (None, "direct answer")


def _stream(text, family, chunks, **kw):
    sp = StreamParser(family, **kw)
    deltas = []
    for c in chunks:
        deltas += sp.push(c)
    tail, calls = sp.finish()
    deltas += tail
    for d in deltas:
        (k, v), = d.items()
        assert k in ("reasoning", "content") and v
        if family == "a13b":  # tool tags are content only when tool parsing is off
            tags = TAGS if kw.get("tools_enabled") else TAGS[:4]
            assert not any(t in v for t in tags), f"tag leaked in {d}"
    reasoning = "".join(d.get("reasoning", "") for d in deltas) or None
    return reasoning, "".join(d.get("content", "") for d in deltas), calls


def _chunkings(text, rng, n):
    yield [text]
    yield list(text)
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text, family, kw", [
    (SLOW, "a13b", {}), (FAST, "a13b", {}), (TOOL2, "a13b", {"tools_enabled": True}),
    (MALFORMED_ENTRY, "a13b", {"tools_enabled": True}), (BAD_JSON, "a13b", {"tools_enabled": True}),
    (PLAIN_TOOLS, "a13b", {"tools_enabled": True}), (NO_CLOSE, "a13b", {}), (NO_ANSWER_CLOSE, "a13b", {}),
    (NO_TAGS, "a13b", {}), (MULTI, "a13b", {}), (TOOL2, "a13b", {}),
    (HY3_OUT, "hy3", {"tools_enabled": True, "in_reasoning": True}),
])
def test_streaming_equals_non_streaming(text, family, kw):
    ref = parse_output(text, family, **kw)
    rng = random.Random(len(text))
    for chunks in _chunkings(text, rng, 150):
        assert _stream(text, family, chunks, **kw) == (ref.reasoning, ref.content, ref.tool_calls), chunks


def test_answer_close_never_leaks_vllm_58127():
    # vllm#58127: streaming leaks "</answer>" when "\n</answer>" arrives split across tokens.
    chunks = ["<think>\nr\n</think>\n<answer>\n", "done", "\n", "</", "answer", ">"]
    assert _stream(None, "a13b", chunks) == ("r", "done", [])
