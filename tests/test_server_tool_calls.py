"""`--tool-call-parser`: chat requests may offer tools; the answer's calls (hermes' `<tool_call>`
blocks, Llama's JSON or Python calls, Mistral's `[TOOL_CALLS]`) become OpenAI `tool_calls`, alike in
responses and streams, however the deltas cut them."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import httpx
from scripted_frontend import ScriptedFrontend
from server_process import run_server

from inferd.sampling_params import SamplingParams
from inferd.server.openai.chat import ChatJob, chat, stream_chat, template_messages
from inferd.server.openai.protocol import ChatMessage
from inferd.server.tool_calls import ParsedToolCall, tool_call_reader

CALLS = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def read_tool_calls(text: str, parser: str = "hermes") -> tuple[str, list[ParsedToolCall]]:
    """A whole answer's (content, calls)."""
    reader = tool_call_reader(parser)
    content, calls = reader.feed(text)
    rest, more = reader.finish()
    return content + rest, calls + more


def _named(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


def test_a_whole_answer_reads_its_calls() -> None:
    content, calls = read_tool_calls(CALLS)
    assert _named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert content == "Let me look.\n\n" and len({call.id for call in calls}) == 2
    # Not a call: not JSON, no name, or never closed. Left as written.
    for text in (
        "a <tool_call>not json</tool_call> b",
        '<tool_call>{"x": 1}</tool_call>',
        '<tool_call>{"name": "f"',
    ):
        assert read_tool_calls(text) == (text, [])


# Each parser's answers: calls, and texts that are not (left as content, as written).
ANSWERS = {
    "hermes": (CALLS, "plain <tool", "a <tool_call>not json</tool_call> b", '<tool_call>{"name": "f"'),
    "llama3_json": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"zone": "CET"}}',
        ' {"name": "get_weather", "parameters": {"city": "Paris"}}',
        "{not a call}",
        "The answer is {x}.",
        '{"name": "f", "parameters": {"a": 1}} and some words',
    ),
    "pythonic": (
        '[get_weather(city="Paris"), get_time(zone="CET")]',
        '<|python_start|>[get_weather(city="Paris", days=[1, 2], metric=True)]<|python_end|>',
        "[1, 2, 3]",
        "[f(x)]",
        "Sure: [f(a=1)]",
    ),
    "mistral": (
        'Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
        "[TOOL_CALLS] not json",
        "plain [TOOL_CA",
    ),
}


def test_each_parser_reads_its_calls_and_leaves_the_rest_as_written() -> None:
    read = {parser: [read_tool_calls(text, parser) for text in texts] for parser, texts in ANSWERS.items()}
    weather_and_time = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert [(content, _named(calls)) for content, calls in read["llama3_json"][:2]] == [
        ("", weather_and_time),
        ("", weather_and_time[:1]),
    ]
    assert [(content, []) for content in ANSWERS["llama3_json"][2:]] == read["llama3_json"][2:]
    assert (read["pythonic"][0][0], _named(read["pythonic"][0][1])) == ("", weather_and_time)
    days = ("get_weather", {"city": "Paris", "days": [1, 2], "metric": True})
    assert (read["pythonic"][1][0], _named(read["pythonic"][1][1])) == ("", [days])
    assert [(content, []) for content in ANSWERS["pythonic"][2:]] == read["pythonic"][2:]
    mistral = read["mistral"]
    assert (mistral[0][0], _named(mistral[0][1])) == ("Let me look.", weather_and_time[:1])
    assert (mistral[1][0], _named(mistral[1][1])) == ("", weather_and_time)
    assert [(content, []) for content in ANSWERS["mistral"][2:]] == mistral[2:]
    # Mistral's template takes back only ids of nine letters and digits.
    assert all(len(call.id) == 9 and call.id.isalnum() for _, calls in mistral[:2] for call in calls)


def test_deltas_read_as_the_whole_answer_does_wherever_they_cut() -> None:
    rng = random.Random(0)
    for parser, texts in ANSWERS.items():
        for text in texts:
            content, calls = read_tool_calls(text, parser)
            for _ in range(100):
                cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(6, len(text) - 1))))
                reader, streamed, streamed_calls = tool_call_reader(parser), "", []
                for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
                    more, parsed = reader.feed(text[start:end])
                    streamed, streamed_calls = streamed + more, streamed_calls + parsed
                rest, last = reader.finish()
                got = (streamed + rest, _named(streamed_calls + last))
                assert got == (content, _named(calls)), (parser, text, cuts)


def test_tool_turns_reach_the_template_as_templates_read_them() -> None:
    """Arguments as an object (Qwen's template writes them out with tojson), the call's id kept."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    messages = [
        ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]}),
        ChatMessage.model_validate({"role": "tool", "content": "18C", "tool_call_id": "call_1"}),
    ]
    assistant, tool = template_messages(messages)
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": {"city": "Paris"}}
    assert tool == {"role": "tool", "content": "18C", "tool_call_id": "call_1"}


async def test_the_stream_and_the_response_carry_the_same_calls() -> None:
    deltas = [CALLS[i : i + 7] for i in range(0, len(CALLS), 7)]
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False,
                  tool_parser="hermes")  # fmt: skip
    events = [json.loads(e[len("data: ") : -2]) async for e in stream_chat(ScriptedFrontend(deltas), job)  # type: ignore[arg-type]
              if e.startswith("data: {")]  # fmt: skip
    choices = [event["choices"][0] for event in events]
    streamed = [call for choice in choices for call in choice["delta"].get("tool_calls") or []]
    read = [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed]
    assert read == [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET"})]
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == "Let me look.\n\n"
    assert choices[-1]["finish_reason"] == "tool_calls"
    response = await chat(ScriptedFrontend(deltas), job)  # type: ignore[arg-type]
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look.\n\n"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in streamed]  # fmt: skip
    only_calls = await chat(ScriptedFrontend([CALLS.removeprefix("Let me look.\n")]), job)  # type: ignore[arg-type]
    assert only_calls.choices[0].message.content is None  # as OpenAI sends a turn of calls alone


async def test_a_turn_of_calls_alone_has_no_content_streamed_or_not() -> None:
    """The spaces between and around the blocks are not content when nothing else is said."""
    calls_alone = CALLS.removeprefix("Let me look.\n") + "\n"
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False,
                  tool_parser="hermes")  # fmt: skip
    for size in (1, 3, 1000):
        deltas = [calls_alone[i : i + size] for i in range(0, len(calls_alone), size)]
        events = [e async for e in stream_chat(ScriptedFrontend(deltas), job)]  # type: ignore[arg-type]
        choices = [json.loads(e[len("data: ") : -2])["choices"][0] for e in events if e.startswith("data: {")]
        assert all(not choice["delta"].get("content") for choice in choices), size
        response = await chat(ScriptedFrontend(deltas), job)  # type: ignore[arg-type]
        assert (
            response.choices[0].message.content is None and len(response.choices[0].message.tool_calls) == 2
        )


async def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False,
                  tool_parser="hermes", one_call=True)  # fmt: skip
    deltas = [CALLS[i : i + 5] for i in range(0, len(CALLS), 5)]
    events = [e async for e in stream_chat(ScriptedFrontend(deltas), job)]  # type: ignore[arg-type]
    choices = [json.loads(e[len("data: ") : -2])["choices"][0] for e in events if e.startswith("data: {")]
    streamed = [call["function"]["name"] for c in choices for call in c["delta"].get("tool_calls") or []]
    response = await chat(ScriptedFrontend(deltas), job)  # type: ignore[arg-type]
    assert (
        streamed == [call.function.name for call in response.choices[0].message.tool_calls] == ["get_weather"]
    )


def test_a_tool_use_template_renders_the_conversations_that_offer_tools(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """As Hermes models ship it: a named "tool_use" template beside the "default" one."""
    from inferd.engine.tokenizer import Tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    offered = "<tools>{{ tools | length }}</tools>{{ messages[0].content }}"
    named = [
        {"name": "default", "template": "{{ messages[0].content }}"},
        {"name": "tool_use", "template": offered},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tokenizer = Tokenizer(folder)
    hello = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(hello) == "hi"
    assert tokenizer.apply_chat_template(hello, template_kwargs={"tools": TOOLS}) == "<tools>1</tools>hi"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


class _Preparing:
    """A Frontend for prepare_chat: renders nothing, keeps the sampling fields it is given."""

    model_name = "m"
    tool_call_parser = "hermes"
    reasoning_format = None
    sampling_defaults: dict[str, Any] = {}
    max_tokens_cap = None
    max_model_len = 64

    def check_model(self, name: object) -> None: ...

    def adapter_for(self, name: object) -> None: ...

    def answering_name(self, name: object) -> str:
        return self.model_name

    def sampling_params(self, field_names: object, **fields: Any) -> SamplingParams:
        return SamplingParams(**fields)

    def render_chat(self, *_: Any) -> str:
        return "prompt"

    class tokenizer:  # noqa: N801 - stands in for the Frontend's tokenizer attribute
        @staticmethod
        def encode(text: str, add_special_tokens: bool = True) -> list[int]:
            return [1]

    def prepare(self, prompt: str | list[int], params: SamplingParams, field: str) -> list[int]:
        return [1]

    def new_request_id(self, prefix: str) -> str:
        return prefix


def test_offering_tools_keeps_special_tokens_in_the_text() -> None:
    """A model's <tool_call> may be a special token, which the answer's text must keep to be read."""
    from inferd.server.openai.chat import prepare_chat
    from inferd.server.openai.protocol import ChatCompletionRequest

    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    with_tools = prepare_chat(_Preparing(), ChatCompletionRequest.model_validate(body))  # type: ignore[arg-type]
    assert with_tools.tool_parser == "hermes" and not with_tools.params.skip_special_tokens
    none = ChatCompletionRequest.model_validate({**body, "tool_choice": "none"})
    assert prepare_chat(_Preparing(), none).params.skip_special_tokens  # type: ignore[arg-type]


def test_a_server_offers_tools_only_with_the_parser(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tools_part = "{% if tools %}[{{ tools | length }} tools]{% endif %}"
    template = tools_part + "{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    body = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(server: Any, **fields: Any) -> httpx.Response:
        return httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, **fields}, timeout=30)

    with run_server(folder, "--kv-cache-memory", "8MiB") as server:
        refused = post(server, tools=TOOLS)
        assert refused.status_code == 400 and "--tool-call-parser" in refused.json()["error"]["message"]
        assert post(server, tools=TOOLS, tool_choice="none").status_code == 200
    with run_server(folder, "--kv-cache-memory", "8MiB", "--tool-call-parser", "hermes") as server:
        plain = post(server).json()["usage"]["prompt_tokens"]
        offered = post(server, tools=TOOLS).json()["usage"]["prompt_tokens"]
        assert offered > plain  # the template wrote the tools into the prompt
        assert post(server, tools=TOOLS, tool_choice="none").json()["usage"]["prompt_tokens"] == plain
        # A function without arguments may say so with null parameters (the SDK's types allow it).
        no_arguments = [{"type": "function", "function": {"name": "now", "parameters": None}}]
        assert post(server, tools=no_arguments).status_code == 200

        for bad, param in (
            ({"tool_choice": {"type": "function", "function": {"name": "not_offered"}}}, "tool_choice"),
            ({"tools": [{"type": "web"}]}, "tools"),
            # A schema that is not an object, offered for the model to choose: refused all the same.
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "xyz"}}]}, "tools"),
            ({"tool_choice": "banana"}, "tool_choice"),
            ({"tools": None, "tool_choice": "banana"}, "tool_choice"),
        ):
            answer = post(server, **{"tools": TOOLS, **bad})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param
            assert "forcing a call" not in answer.json()["error"]["message"]


async def test_leading_calls_come_with_the_last_delta_and_other_answers_stream_as_they_come() -> None:
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False,
                  tool_parser="llama3_json")  # fmt: skip
    answer = ANSWERS["llama3_json"][0]
    deltas = [answer[i : i + 6] for i in range(0, len(answer), 6)]
    events = [e async for e in stream_chat(ScriptedFrontend(deltas), job)]  # type: ignore[arg-type]
    choices = [json.loads(e[len("data: ") : -2])["choices"][0] for e in events if e.startswith("data: {")]
    with_calls = [c for c in choices if c["delta"].get("tool_calls")]
    assert (
        len(with_calls) == 1 and with_calls[0] is choices[-1] and choices[-1]["finish_reason"] == "tool_calls"
    )
    assert [call["function"]["name"] for call in with_calls[0]["delta"]["tool_calls"]] == [
        "get_weather",
        "get_time",
    ]
    assert not any(c["delta"].get("content") for c in choices)
    prose = "The answer is {x}, as the notes say."
    deltas = [prose[i : i + 5] for i in range(0, len(prose), 5)]
    events = [e async for e in stream_chat(ScriptedFrontend(deltas), job)]  # type: ignore[arg-type]
    contents = [json.loads(e[len("data: ") : -2])["choices"][0]["delta"].get("content") for e in events
                if e.startswith("data: {")]  # fmt: skip
    assert "".join(c or "" for c in contents) == prose and sum(1 for c in contents if c) > 3


def test_what_is_not_a_call_stays_content_however_odd() -> None:
    """Other JSON, numbers too long to read, nesting past the parser's memory, values JSON cannot
    hold: each answer is content, as written, never an error out of the chat route."""
    odd = {
        "llama3_json": (
            '{"name": "Alice", "age": 30}',  # a JSON answer, not a call: no arguments
            '{"name": "f", "parameters": {"n": ' + "9" * 5000 + "}}",
            '{"name": "f", "parameters": {"x": NaN}}',
        ),
        "pythonic": (
            "[f(a=" + "-" * 6000 + "1)]",
            "[f(a=1e999)]",
            "[" * 50_000 + "f(a=1)" + "]" * 50_000,
            '[f(a="\\ud800")]',
        ),
        "mistral": ('[TOOL_CALLS][{"name": "f", "arguments": {"n": ' + "9" * 5000 + "}}]",),
        "hermes": (
            '<tool_call>{"name": "f", "arguments": {"n": ' + "9" * 5000 + "}}</tool_call>",
            # A lone surrogate's escape, in the arguments or the name: no answer could carry it
            # (a 500, or a stream cut off after its role chunk).
            '<tool_call>{"name": "f", "arguments": {"a": "\\ud800"}}</tool_call>',
            '<tool_call>{"name": "\\udc00", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "f", "arguments": "\\ud800"}</tool_call>',
        ),
    }
    for parser, texts in odd.items():
        for text in texts:
            assert read_tool_calls(text, parser) == (text, []), (parser, text[:40])


def test_mistrals_other_call_forms() -> None:
    """With a call id ([CALL_ID], kept), the arguments right after the name, and text after the
    array of calls."""
    forms = (
        '[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}',
        '[TOOL_CALLS]get_weather{"city": "Paris"}',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}] Hope that helps!',
    )
    read = [read_tool_calls(text, "mistral") for text in forms]
    weather = [("get_weather", {"city": "Paris"})]
    expected = [("", weather), ("", weather), ("Hope that helps!", weather)]  # the text after: content
    assert [(content, _named(calls)) for content, calls in read] == expected
    assert read[0][1][0].id == "abc123XYZ"
    # Text before an object that is no function's name is no call.
    prose = '[TOOL_CALLS]Here is the JSON: {"a": 1}'
    assert read_tool_calls(prose, "mistral") == (prose, [])
