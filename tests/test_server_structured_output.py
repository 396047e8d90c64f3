"""Structured outputs over the protocols of a real `inferd serve` with its engine in a process of its
own (the constraint crosses the process boundary): OpenAI's response_format, vLLM's fields and
TGI's grammar, each with its protocol's errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from server_process import ServerProcess, run_server

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_model_factory) -> Iterator[ServerProcess]:
    folder = tiny_model_factory("qwen3")
    with run_server(
        folder, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "--engine-process"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, stream: bool = False, **extra: Any) -> Any:
    fields = {"max_tokens": 60, "temperature": 1.0, "seed": 7, **extra}
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Is it ok?"}],
        stream=stream,  # type: ignore[call-overload]
        **fields,
    )


def test_chat_json_schema_answers_parse_streamed_and_not(client: openai.OpenAI) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    whole = _chat(client, response_format=response_format, n=3)
    for choice in whole.choices:
        value = json.loads(choice.message.content)
        assert set(value) == {"ok", "size"} and value["size"] in ("S", "M", "L")
        assert choice.finish_reason == "stop"
    pieces = [
        c.choices[0].delta.content or "" for c in _chat(client, stream=True, response_format=response_format)
    ]
    assert "".join(pieces) == whole.choices[0].message.content  # same seed, same answer


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
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}},
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
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
         "response_format", "bogus"),
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
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


def test_tgi_grammar_json_and_regex(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    text = client.text_generation("Json", max_new_tokens=40, grammar={"type": "json", "value": SCHEMA})
    assert json.loads(text)["size"] in ("S", "M", "L")
    code = client.text_generation(
        "Code", max_new_tokens=10, do_sample=True, grammar={"type": "regex", "value": "[a-f]{4}"}
    )
    assert re.fullmatch("[a-f]{4}", code)
    bad = httpx.post(
        f"{server.base_url}/generate",
        json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}},
    )
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
    assert bad.json()["error"].startswith("grammar")
