"""Structured outputs over the protocols of a real `inferd serve` with its engine in a process of its
own (the constraint crosses the process boundary): OpenAI's response_format, vLLM's fields and
TGI's grammar, each with its protocol's errors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
from huggingface_hub import InferenceClient
from server_process import ServerProcess, run_server
from tiny_models import THINK_END, with_think_end_token

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = with_think_end_token(tiny_model_factory("qwen3"), tmp_path_factory.mktemp("thinking") / "model")
    # With Qwen3's reasoning parser (answers start inside their thinking): a constraint starts
    # after "</think>", which the chat requests here make the likeliest token, so it comes first.
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "--engine-process")
    with run_server(folder, *args, "--reasoning-parser", "qwen3") as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, stream: bool = False, think_first: bool = True, **extra: Any) -> Any:
    """A chat request; ``think_first``: "</think>" made the likeliest token, so the thinking ends at
    once and a constraint starts (the random model would never end it otherwise)."""
    bias = {"logit_bias": {str(THINK_END): 100}} if think_first else {}
    fields = {"max_tokens": 60, "temperature": 1.0, "seed": 7, **bias, **extra}
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Is it ok?"}],
        stream=stream,  # type: ignore[call-overload]
        **fields,
    )


def test_chat_json_schema_answers_parse_streamed_and_not(client: openai.OpenAI) -> None:
    plain = _chat(client, think_first=False).choices[0].message
    assert plain.reasoning_content and not plain.content  # the parser is on: no </think>, all thinking
    # A tag in a message is no sign that this answer's thinking is closed.
    quoting = (
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say </think> please"}], max_tokens=8
        )
        .choices[0]
        .message
    )
    assert getattr(quoting, "reasoning_content", None) and not quoting.content
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    whole = _chat(client, response_format=response_format, n=3)
    for choice in whole.choices:
        # "</think>" came first: no thinking, and the constraint held from the next token on.
        assert getattr(choice.message, "reasoning_content", None) is None
        value = json.loads(choice.message.content)
        assert set(value) == {"ok", "size"} and value["size"] in ("S", "M", "L")
        assert choice.finish_reason == "stop"
    pieces = [
        c.choices[0].delta.content or "" for c in _chat(client, stream=True, response_format=response_format)
    ]
    assert "".join(pieces) == whole.choices[0].message.content  # same seed, same answer


def test_the_sdks_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """What `client.chat.completions.parse(response_format=Model)` sends: a strict schema with
    $defs, nested models, Literal enums, bounded integers and an Optional field (anyOf with null)."""

    class Mood(pydantic.BaseModel):
        speaker: Literal["ROMEO", "JULIET"]
        happy: bool
        lines: int = pydantic.Field(ge=1, le=5)

    class Scene(pydantic.BaseModel):
        moods: list[Mood] = pydantic.Field(max_length=2)
        place: Literal["Verona", "Mantua"] | None

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    answer = parse(
        model="tiny",
        messages=[{"role": "user", "content": "A scene"}],
        response_format=Scene,
        max_tokens=120,
        seed=3,
        logit_bias={str(THINK_END): 100},  # the thinking ends at once (see the fixture)
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Scene)
    assert all(1 <= mood.lines <= 5 for mood in choice.message.parsed.moods)


def test_json_object_and_vllm_fields(client: openai.OpenAI) -> None:
    answer = _chat(client, response_format={"type": "json_object"}, max_tokens=200).choices[0]
    assert answer.message.content.startswith("{")
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.message.content), dict)
    choice = client.completions.create(
        model="tiny", prompt="Pick", max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    ).choices[0]
    assert choice.text in ("left", "right") and choice.finish_reason == "stop"
    regex = client.completions.create(
        model="tiny",
        prompt="Code",
        max_tokens=10,
        # vLLM's options beside the constraint are taken (inferd already behaves as they ask).
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}", "disable_any_whitespace": True}},
    ).choices[0]
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", regex.text)
    schema = client.completions.create(
        model="tiny", prompt="Json", max_tokens=40, extra_body={"guided_json": json.dumps(SCHEMA)}
    ).choices[0]
    assert json.loads(schema.text)["size"] in ("S", "M", "L")


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format", "schema"),
        ({"response_format": {"type": "xml"}}, "response_format", "type"),
        # Neither OpenAI's json_schema nor TGI's value: named in OpenAI's terms.
        ({"response_format": {"type": "json_schema"}}, "response_format", ".json_schema: needs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
         "response_format", "bogus"),
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"guided_grammar": "root ::= x{2,1}"}, "guided_grammar", "GBNF"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": '{"const": ' + "1" * 5000 + "}"}, "guided_json", "not valid JSON"),  # a 500 before
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "unsupported"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "one structured"),
        # Compiles alone, but names a token the tokenizer does not have: checked over the tokenizer.
        ({"guided_grammar": 'start: "a" <|no_such_token|>'}, "guided_grammar", "no_such_token"),
        ({"structured_outputs": {"grammar": 'start: "a" <[99999]>'}}, "structured_outputs", "too large"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, extra_body=extra)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"], error


def test_a_structured_answer_after_the_thinking_is_all_answer(client: openai.OpenAI) -> None:
    """Its JSON may hold the start tag's text: that opens no new thinking."""
    schema = {"type": "object", "properties": {"q": {"const": "<think>x"}}, "required": ["q"]}
    answer = _chat(
        client, response_format={"type": "json_schema", "json_schema": {"name": "q", "schema": schema}}
    )
    message = answer.choices[0].message
    assert json.loads(message.content) == {"q": "<think>x"} and not getattr(
        message, "reasoning_content", None
    )


def test_a_prompt_that_closed_the_thinking_has_its_constraint_from_the_first_token(
    client: openai.OpenAI,
) -> None:
    """A prefilled answer that ends the thinking (as Qwen3's template does with enable_thinking
    false): no "</think>" is coming, and the constraint holds from the start."""
    messages = [{"role": "user", "content": "Is it ok?"}, {"role": "assistant", "content": "</think>"}]
    answer = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    message = answer.choices[0].message
    assert json.loads(message.content)["size"] in ("S", "M", "L")
    assert not getattr(message, "reasoning_content", None)
    # The prefill closed it and went on: its own tags decide, not only the prompt's last characters.
    messages[-1]["content"] = "</think>The code is "
    code = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        extra_body={
            "continue_final_message": True,
            "add_generation_prompt": False,
            "guided_regex": "[0-9]{3}",
        },
    )
    assert re.fullmatch("[0-9]{3}", code.choices[0].message.content)


def test_tgi_grammar_json_and_regex(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    text = client.text_generation("Json", max_new_tokens=40, grammar={"type": "json", "value": SCHEMA})
    assert json.loads(text)["size"] in ("S", "M", "L")
    code = client.text_generation(
        "Code",
        max_new_tokens=10,
        do_sample=True,
        grammar={"type": "regex", "value": "[a-f]{4}"},
        details=True,
    )
    assert re.fullmatch("[a-f]{4}", code.generated_text)
    assert code.details is not None and code.details.finish_reason == "eos_token"  # as TGI ends it
    bad = httpx.post(
        f"{server.base_url}/generate",
        json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}},
    )
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    assert bad.json()["error"].startswith("grammar")


# get_weather's parameters as Pydantic writes them: a reference into the schema's own $defs.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"]}}},
    {"type": "function", "function": {"name": "ping"}},
]  # fmt: skip


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]


def test_a_named_tool_choice_is_a_call_of_that_function_with_its_arguments(client: openai.OpenAI) -> None:
    """No --tool-call-parser on this server: a forced call's answer is JSON, read without one."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = _chat(client, tools=TOOLS, tool_choice=named, n=2)
    for choice in whole.choices:
        [(name, arguments)] = _calls(choice.message)
        assert name == "get_weather" and arguments["unit"] in ("C", "F")
        # A named function is what was asked for: the turn ends with "stop", as OpenAI and vLLM say.
        assert choice.message.content is None and choice.finish_reason == "stop"
    streamed = [c.choices[0] for c in _chat(client, stream=True, tools=TOOLS, tool_choice=named) if c.choices]
    calls = [call for c in streamed if c.delta.tool_calls for call in c.delta.tool_calls]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == _calls(whole.choices[0].message)[0][1]  # same seed
    assert streamed[-1].finish_reason == "stop"
    assert not any(c.delta.content for c in streamed)
    # A function declared without parameters takes none.
    ping = _chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    assert _calls(ping.choices[0].message) == [("ping", {})]


def test_required_tool_choice_makes_at_least_one_call_of_the_offered_tools(client: openai.OpenAI) -> None:
    for parallel in (True, False):
        answer = _chat(
            client, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, max_tokens=200
        )
        choice = answer.choices[0]
        # Every call is bounded, but a random model may go on adding calls to an open array.
        if parallel and choice.finish_reason == "length":
            assert choice.message.content.startswith("[")
            continue
        calls = _calls(choice.message)
        assert 1 <= len(calls) and (parallel or len(calls) == 1)
        for name, arguments in calls:
            assert name in ("get_weather", "ping") and isinstance(arguments, dict)
            if name == "get_weather":
                assert arguments["unit"] in ("C", "F")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS}, "tools"),  # calls the model writes itself need --tool-call-parser
        ({"tools": [{"type": "function", "function": {"name": ["x"]}}], "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": None}}], "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_bad_tool_choices_are_400s(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, extra_body=extra)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param, error


def test_constrained_requests_are_counted_by_kind(server: ServerProcess, client: openai.OpenAI) -> None:
    def count(kind: str) -> float:
        return server.metrics().get(f"inferd:structured_output_requests_total{{kind={kind}}}", 0.0)

    before = {kind: count(kind) for kind in ("choice", "regex")}
    client.completions.create(
        model="tiny", prompt="x", max_tokens=5, n=2, extra_body={"guided_choice": ["a", "b"]}
    )
    client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body={"guided_regex": "[ab]"})
    client.completions.create(model="tiny", prompt="x", max_tokens=5)
    assert count("choice") - before["choice"] == 2  # one per engine request: n is 2
    assert count("regex") - before["regex"] == 1


def test_a_model_whose_tokenizer_cannot_make_masks_answers_400s(tiny_model_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("qwen3"), folder)
    config = json.loads((folder / "tokenizer.json").read_text())
    config["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}  # llguidance cannot read it
    (folder / "tokenizer.json").write_text(json.dumps(config))
    with run_server(folder, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny") as process:
        client = openai.OpenAI(base_url=f"{process.base_url}/v1", api_key="unused", max_retries=0)
        for extra in ({"guided_regex": "[ab]+"}, {"guided_choice": ["a", "b"]}):
            with pytest.raises(openai.BadRequestError, match="not available for this model's tokenizer"):
                client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=extra)
        # A forced call is a structured output too, made after the body's fields are read.
        with pytest.raises(openai.BadRequestError, match="not available for this model's tokenizer"):
            _chat(client, think_first=False, tools=TOOLS, tool_choice="required")
        assert client.completions.create(model="tiny", prompt="x", max_tokens=4).choices[0].text is not None


def test_constraints_that_cannot_be_met_or_run_are_the_clients_errors(server: ServerProcess) -> None:
    """Found by fuzzing (each a 500 on the OpenAI routes, a 424 on TGI's): limits that together
    leave no token, and a grammar the engine cannot run past its first token, are the request's
    own fault, answered 400 (TGI 422), also across the engine process this server runs."""
    url = f"{server.base_url}/v1/completions"
    prompt = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    for extra in (
        {"guided_choice": ["yes", "no"], "allowed_token_ids": [5, 6, 7]},
        {"response_format": {"type": "regex", "value": "a{1000000}"}},
        # No text matches them: the mask let EOS alone through, and the answer was an empty "stop".
        {"guided_regex": "[^\\s\\S]"},
        {"guided_regex": "a[^\\s\\S]"},  # after its first token
        {"guided_grammar": 'start: loop\nloop: loop "a"'},
    ):
        for stream in (False, True):
            answer = httpx.post(url, json={**prompt, **extra, "stream": stream}, timeout=60)
            if stream and answer.status_code == 200:  # an error after the stream began: its last event
                events = [line for line in answer.text.splitlines() if line.startswith("data: {")]
                assert json.loads(events[-1][len("data: ") :])["error"]["type"] == "invalid_request_error"
                continue
            assert answer.status_code == 400, (extra, answer.text)
            # Why, without the matcher's state and the whole grammar llguidance's error appends.
            message = answer.json()["error"]["message"]
            assert "<state>" not in message and "<grammar>" not in message and len(message) < 300, message
    tgi = httpx.post(
        f"{server.base_url}/generate",
        json={
            "inputs": "hello",
            "parameters": {"max_new_tokens": 3, "grammar": {"type": "regex", "value": "a{1000000}"}},
        },
        timeout=60,
    )
    assert tgi.status_code == 422, tgi.text
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
