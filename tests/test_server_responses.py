"""OpenAI's Responses API on a real `inferd serve`, driven by the official `openai` SDK: answers as
output items (the thinking, the text, forced function calls), the typed event stream, structured
output, stored responses and continued conversations, and the API's errors."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response
from server_process import ServerProcess, run_server
from tiny_models import THINK_END, with_think_end_token

from inferd.server.openai.chat_answer import ShapedText
from inferd.server.openai.response_store import ResponseStore, StoredResponse
from inferd.server.openai.responses import _EventWriter, _StreamedItems
from inferd.server.tool_calls import ParsedToolCall

# "</think>" first: the thinking ends at once and the answer follows (the random model would
# otherwise think to its token budget).
ANSWER_NOW = {"logit_bias": {str(THINK_END): 100}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = with_think_end_token(tiny_model_factory("qwen3"), tmp_path_factory.mktemp("responses") / "model")
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "--reasoning-parser", "qwen3")
    with run_server(folder, *args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _create(client: openai.OpenAI, **fields: Any) -> Any:
    extra = fields.pop("extra_body", {})
    return client.responses.create(model="tiny", temperature=0, extra_body=extra, **fields)


def test_an_answer_is_its_message_and_matches_the_chat_answer(client: openai.OpenAI) -> None:
    response = _create(client, input="To be, or not", max_output_tokens=12, extra_body=ANSWER_NOW)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "To be, or not"}], max_completion_tokens=12,
        temperature=0, logit_bias=ANSWER_NOW["logit_bias"],
    )  # fmt: skip
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"]  # the thinking was empty
    assert response.output_text == chat.choices[0].message.content and response.output_text
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == 12 and response.usage.total_tokens == chat.usage.total_tokens
    assert response.usage.output_tokens_details.reasoning_tokens == 1  # the "</think>" token


def test_the_thinking_is_a_reasoning_item(client: openai.OpenAI) -> None:
    """Without the bias the random model never ends its thinking: all of the answer is reasoning."""
    response = _create(client, input="Think", max_output_tokens=6, instructions="Be brief.")
    chat = client.chat.completions.create(
        model="tiny", temperature=0, max_completion_tokens=6,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Think"}],
    )  # fmt: skip
    assert [item.type for item in response.output] == ["reasoning"]
    assert response.output[0].content[0].text == chat.choices[0].message.reasoning_content
    assert response.output_text == "" and response.instructions == "Be brief."
    assert response.usage.output_tokens_details.reasoning_tokens == response.usage.output_tokens == 6


def test_a_stream_is_numbered_typed_events_that_add_up_to_the_response(client: openai.OpenAI) -> None:
    fields = {"input": "Café", "max_output_tokens": 10, "extra_body": {**ANSWER_NOW, "top_logprobs": 2}}
    whole = _create(client, **fields)
    events = list(_create(client, stream=True, **fields))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert kinds[2:6] == ["response.output_item.added", "response.content_part.added",
                          "response.output_text.delta", "response.output_text.delta"]  # fmt: skip
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-4:-1] == closing
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    assert "".join(e.delta for e in deltas) == final.output_text == whole.output_text
    # Every token's log-probabilities, the "</think>" token's with the first text.
    streamed = [lp.token for e in deltas for lp in e.logprobs]
    assert streamed == [lp.token for lp in whole.output[0].content[0].logprobs] and len(streamed) == 10
    assert all(len(lp.top_logprobs) == 2 for lp in whole.output[0].content[0].logprobs)
    assert final.usage.output_tokens == 10 and events[0].response.status == "in_progress"


def test_the_sdks_stream_helper_reads_a_streamed_reasoning_and_message(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tiny", input="Think", max_output_tokens=5, temperature=0) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    # Cut off by its budget: the stream ends with response.incomplete (the SDK's get_final_response
    # takes only response.completed, as OpenAI sends it for a finished answer).
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning"] and final.output[0].content[0].text


def test_text_format_json_schema_answers_parse(client: openai.OpenAI) -> None:
    class Size(pydantic.BaseModel):
        ok: bool
        size: str = pydantic.Field(max_length=3)

    parsed = client.responses.parse(model="tiny", input="Size?", text_format=Size, max_output_tokens=40,
                                    temperature=1.0, extra_body={**ANSWER_NOW, "seed": 3})  # fmt: skip
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Size)
    loose = _create(client, input="Any JSON", max_output_tokens=40, text={"format": {"type": "json_object"}},
                    extra_body=ANSWER_NOW)  # fmt: skip
    assert isinstance(json.loads(loose.output_text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_is_a_function_call_item(client: openai.OpenAI, stream: bool) -> None:
    named = {"type": "function", "name": "get_weather"}
    fields = {"input": "Weather in Paris?", "tools": [WEATHER], "max_output_tokens": 40,
              "extra_body": ANSWER_NOW, "tool_choice": named}  # fmt: skip
    if stream:
        events = list(_create(client, stream=True, **fields))
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(done) == 1 and done[0].name == "get_weather"
        response = events[-1].response
    else:
        response = _create(client, **fields)
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"} and calls[0].call_id
    # The call and its output, sent back, are the chat's assistant and tool turns.
    call_id, arguments = calls[0].call_id, calls[0].arguments
    follow_up = _create(client, max_output_tokens=3, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": call_id, "output": "sunny"},
    ])  # fmt: skip
    chat = client.chat.completions.create(model="tiny", max_completion_tokens=3, temperature=0, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": calls[0].call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"},
    ])  # fmt: skip
    assert follow_up.usage.input_tokens == chat.usage.prompt_tokens


def test_a_stored_response_is_read_back_continued_and_deleted(client: openai.OpenAI) -> None:
    first = _create(client, input="Hello", max_output_tokens=4, extra_body=ANSWER_NOW)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = _create(client, input="Again", max_output_tokens=4, previous_response_id=first.id)
    chat = client.chat.completions.create(model="tiny", max_completion_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Again"},
    ])  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        _create(client, input="Hi", max_output_tokens=2, previous_response_id=first.id)
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
    unstored = _create(client, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_stored_responses_input_items_are_its_conversation_a_page_at_a_time(client: openai.OpenAI) -> None:
    """The SDK's input_items.list: the earlier turns' input and output, then this turn's input, each
    with an id, newest first unless asked otherwise; paged with limit and after."""
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    first = _create(client, input=[{"role": "user", "content": "Hello"}, call,
                                   {"type": "function_call_output", "call_id": "call_1", "output": "42"}],
                    max_output_tokens=4, extra_body=ANSWER_NOW)  # fmt: skip
    second = _create(client, input="Again", max_output_tokens=4, previous_response_id=first.id)
    oldest_first = list(client.responses.input_items.list(second.id, order="asc"))
    kinds = [(item.type, getattr(item, "role", None)) for item in oldest_first]
    assert kinds == [("message", "user"), ("function_call", None), ("function_call_output", None),
                     ("message", "assistant"), ("message", "user")]  # fmt: skip
    assert oldest_first[0].content[0].text == "Hello" and oldest_first[-1].content[0].text == "Again"
    assert oldest_first[3].id == first.output[0].id and oldest_first[1].call_id == "call_1"
    ids = [item.id for item in oldest_first]
    assert len(set(ids)) == 5 and ids[0].startswith("msg_") and ids[1].startswith("fc_")
    page = client.responses.input_items.list(second.id, limit=2)  # newest first by default
    assert [item.id for item in page.data] == ids[:-3:-1] and page.has_more
    rest = client.responses.input_items.list(second.id, limit=10, after=page.data[-1].id)
    assert [item.id for item in rest.data] == ids[-3::-1] and not rest.has_more
    # Its own conversation only: the first turn lists its three items.
    assert len(client.responses.input_items.list(first.id).data) == 3
    for query, param in (({"limit": 0}, "limit"), ({"after": "msg_nope"}, "after")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.input_items.list(second.id, **query)  # type: ignore[arg-type]
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input",
            "'input_image' parts are not supported",
        ),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools", "only function tools"),
        ({"input": "Hi", "background": True, "store": False}, "background", "must be stored"),
        ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
        ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text", "text.format.type"),
        ({"input": "Hi " * 600}, "input", "maximum context length"),  # the chat path's error, renamed
        ({"input": []}, "input", "no message"),
        (
            {"input": [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}]},
            "input",
            "parts are not supported",
        ),
        # The client's own words in a message stay as they are: a tool named as a chat field.
        (
            {"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "max_tokens"}},
            "tool_choice",
            "'max_tokens'",
        ),
        ({"input": "Hi", "tools": [{"type": "function", "parameters": {}}]}, "tools", "tools[0].name"),
        (
            {"input": "Hi", "tools": [{"type": "function", "name": "f", "parameters": "abc"}]},
            "tools",
            "tools[0].parameters: must be a JSON Schema object",
        ),
        # In this API's own shape ({"type": "function", "name": ...}), not the chat endpoint's.
        (
            {"input": "Hi", "tools": [WEATHER], "tool_choice": "banana"},
            "tool_choice",
            "'type': 'function', 'name'",
        ),
        ({"input": "Hi", "conversation": "conv_1"}, "conversation", "not supported"),
        ({"input": "Hi", "metadata": {"k": "v" * 513}}, "metadata", "at most 16 pairs"),
        ({"input": "Hi", "max_output_tokens": 100000}, "input", "max_output_tokens asks for"),
        (
            {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": [1]}}},
            "text.format.schema",
            "text.format.schema",
        ),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="tiny", **fields)
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == param and message in body["message"]


def test_a_whole_response_and_a_stream_give_the_same_items(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    """A thinking that ends part-way (a mild bias towards "</think>"), then text cut off by the
    budget: the reasoning item is completed and the message incomplete either way; the whole
    response validates as the SDK's Response type, every required field there."""
    fields = {"input": "Well?", "max_output_tokens": 60, "temperature": 1.0,
              "extra_body": {"seed": 1, "logit_bias": {str(THINK_END): 2.5}}}  # fmt: skip
    whole = client.responses.create(model="tiny", **fields)
    streamed = list(client.responses.create(model="tiny", stream=True, **fields))[-1].response
    shape = [(item.type, item.status) for item in whole.output]
    assert shape == [("reasoning", "completed"), ("message", "incomplete")]
    assert [(item.type, item.status) for item in streamed.output] == shape
    assert streamed.output_text == whole.output_text
    raw = httpx.get(f"{server.base_url}/v1/responses/{whole.id}").json()
    Response.model_validate(raw)  # strict: raises on a missing or mistyped field


def test_a_stream_that_times_out_ends_with_an_error_and_is_not_stored(client: openai.OpenAI) -> None:
    events = list(
        _create(client, input="Hi", stream=True, max_output_tokens=400, extra_body={"timeout": 0.02})
    )
    assert events[-1].type == "error" and events[-1].code == "request_timeout"
    created = events[0].response.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created)


def _poll(server: ServerProcess, response_id: str) -> dict[str, Any]:
    """The stored response once it has ended (a bounded wait)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response: dict[str, Any] = httpx.get(f"{server.base_url}/v1/responses/{response_id}").json()
        if response["status"] not in ("queued", "in_progress"):
            return response
        time.sleep(0.02)
    raise AssertionError(f"{response_id} still {response['status']} after 30 s")


def _message_text(response: dict[str, Any]) -> str:
    return "".join(
        part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]
    )


def test_a_background_response_is_queued_then_polled_to_its_answer(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/responses"
    fields = {
        "model": "tiny",
        "input": "To be, or not",
        "max_output_tokens": 12,
        "temperature": 0,
        **ANSWER_NOW,
    }
    queued = httpx.post(url, json={**fields, "background": True}).json()
    assert (queued["status"], queued["background"], queued["output"]) == ("queued", True, [])
    done = _poll(server, queued["id"])
    Response.model_validate(done)
    whole = httpx.post(url, json=fields).json()
    assert done["background"] is True and done["status"] == whole["status"]
    assert _message_text(done) == _message_text(whole) and done["usage"] == whole["usage"]
    # Cancelling one that has ended leaves it as it is; one made in the foreground cannot be.
    assert httpx.post(f"{url}/{done['id']}/cancel").json() == done
    refused = httpx.post(f"{url}/{whole['id']}/cancel")
    assert refused.status_code == 400 and "only background responses" in refused.json()["error"]["message"]
    assert httpx.post(f"{url}/resp_nothing/cancel").status_code == 404


def test_a_streamed_background_response_is_read_on_after_a_dropped_connection(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """Its stream is the foreground stream's events with the response queued first; a reader
    that leaves early does not stop the answer, and ``GET ?stream=true&starting_after=N`` gives
    the events after N, the same ones, live or after the end."""
    fields = {"input": "To be, or not", "max_output_tokens": 12, "extra_body": ANSWER_NOW}
    events = list(_create(client, background=True, stream=True, **fields))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0].response.status == "queued" and events[0].response.background is True
    foreground = list(_create(client, stream=True, **fields))

    def structure(stream: list[Any]) -> list[str]:  # how many deltas depends on the timing
        return [e.type for e in stream if not e.type.endswith(".delta")]

    assert structure(events)[3:] == structure(foreground)[2:] and kinds[-1] == "response.incomplete"
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas == foreground[-1].response.output_text
    stored = client.responses.retrieve(final.id)
    assert stored.status == "incomplete" and stored.output_text == final.output_text
    resumed = list(client.responses.retrieve(final.id, stream=True, starting_after=4))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[5:]]

    # A reader that reads three events and leaves: the answer goes on to the end, and the rest
    # of its events are there to read.
    body = {"model": "tiny", "temperature": 0, "background": True, "stream": True, "input": "Hi",
            "max_output_tokens": 40, **ANSWER_NOW}  # fmt: skip
    first: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body) as streamed:
        for line in streamed.iter_lines():
            if line.startswith("data: "):
                first.append(json.loads(line[6:]))
            if len(first) == 3:
                break
    response_id = first[0]["response"]["id"]
    done = _poll(server, response_id)
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 40
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert rest[0].sequence_number == 3 and rest[-1].type == "response.incomplete"
    assert rest[-1].response.output_text == _message_text(done)
    assert len(list(client.responses.retrieve(response_id, stream=True))) == 3 + len(rest)


def test_a_streamed_background_response_ends_its_readers_when_it_fails_or_is_cancelled(
    server: ServerProcess,
) -> None:
    url = f"{server.base_url}/v1/responses"
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 400, "background": True, "stream": True}
    timed_out = httpx.post(url, json={**body, "timeout": 0.02})
    failed = [json.loads(line[6:]) for line in timed_out.text.splitlines() if line.startswith("data: ")]
    assert failed[-1]["type"] == "response.failed" and failed[-1]["response"]["status"] == "failed"
    assert failed[-1]["response"]["error"]["message"].endswith("(request_timeout)")
    assert _poll(server, failed[0]["response"]["id"])["status"] == "failed"
    with httpx.stream("POST", url, json=body) as streamed:
        lines = streamed.iter_lines()
        created = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        response_id = created["response"]["id"]
        assert httpx.post(f"{url}/{response_id}/cancel").json()["status"] == "cancelled"
        read_on = [line for line in lines if line.startswith("data: ")]  # ends: no hang
    assert all(json.loads(line[6:])["type"] != "response.completed" for line in read_on)


def test_only_a_streamed_background_response_streams_from_get(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/responses"
    whole = httpx.post(url, json={"model": "tiny", "input": "Hi", "max_output_tokens": 2}).json()
    refused = httpx.get(f"{url}/{whole['id']}", params={"stream": "true"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    assert "only a response created with background and stream" in refused.json()["error"]["message"]
    short = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "background": True}
    polled = httpx.post(url, json=short)
    _poll(server, polled.json()["id"])
    assert httpx.get(f"{url}/{polled.json()['id']}", params={"stream": "true"}).status_code == 400
    streamed = httpx.post(url, json={**short, "stream": True})
    response_id = json.loads(streamed.text.split("data: ", 1)[1].split("\n", 1)[0])["response"]["id"]
    negative = httpx.get(f"{url}/{response_id}", params={"stream": "true", "starting_after": -1})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "starting_after"
    assert httpx.get(f"{url}/resp_nothing", params={"stream": "true"}).status_code == 404
    # Deleted, its events go with it.
    assert httpx.delete(f"{url}/{response_id}").status_code == 200
    assert httpx.get(f"{url}/{response_id}", params={"stream": "true"}).status_code == 404


def test_the_event_logs_of_ended_responses_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running responses keep their logs; of the ended ones only the most recent, by count
    (``KEPT_EVENT_LOGS``) and by the size of their events (``KEPT_EVENT_CHARS``); a deleted one's
    log is not kept when its task ends, and its readers end when it is deleted."""
    from inferd.server.openai import responses

    monkeypatch.setattr(responses, "KEPT_EVENT_LOGS", 2)
    monkeypatch.setattr(responses, "KEPT_EVENT_CHARS", 100)
    background = responses.BackgroundResponses(None, ResponseStore())  # type: ignore[arg-type]
    logs = {name: responses._EventLog() for name in ("a", "b", "c", "big", "deleted", "running")}
    logs["big"].append("x" * 90)
    logs["c"].append("x" * 20)
    background._logs.update(logs)
    background._running.update(dict.fromkeys(logs))  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        background._ended(name)
    assert list(background._logs) == ["big", "deleted", "running", "b", "c"]
    assert logs["a"].closed and not logs["running"].closed
    background._ended("big")  # 110 characters with c's: c goes, though two may be kept
    assert list(background._logs) == ["deleted", "running", "big"]
    background.forget("deleted")  # before its task's end: its readers end all the same
    assert logs["deleted"].closed
    background._ended("deleted")
    assert list(background._logs) == ["running", "big"]


def test_a_background_response_cancelled_aborts_its_engine_request(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/responses"
    aborted = "inferd:requests_aborted_total"
    before = server.metrics().get(aborted, 0.0)
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 400, "background": True}
    queued = httpx.post(url, json=body).json()
    cancelled = httpx.post(f"{url}/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["output"] == []
    assert httpx.get(f"{url}/{queued['id']}").json()["status"] == "cancelled"
    server.wait_for_metrics(lambda samples: samples.get(aborted, 0.0) > before)
    # A conversation does not go on from a response without its answer: cancelled, or not done yet.
    running = httpx.post(url, json=body).json()
    for previous, status in ((queued["id"], "cancelled"), (running["id"], "(queued|in_progress)")):
        refused = httpx.post(url, json={**body, "background": False, "previous_response_id": previous})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["param"] == "previous_response_id"
        assert re.search(f"is {status}; a conversation continues only from a completed", error["message"])
    httpx.post(f"{url}/{running['id']}/cancel")
    # Deleting one still being answered stops it too.
    queued = httpx.post(url, json=body).json()
    assert httpx.delete(f"{url}/{queued['id']}").json()["deleted"] is True
    time.sleep(0.2)  # a task still running would store its answer again
    assert httpx.get(f"{url}/{queued['id']}").status_code == 404


def test_a_background_response_that_times_out_is_stored_as_failed(server: ServerProcess) -> None:
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 400, "background": True, "timeout": 0.02}
    queued = httpx.post(f"{server.base_url}/v1/responses", json=body).json()
    failed = _poll(server, queued["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["error"]["message"].endswith("(request_timeout)")
    Response.model_validate(failed)


def test_the_store_drops_the_least_recently_used_past_its_count_or_bytes() -> None:
    store = ResponseStore(max_responses=3, max_bytes=400)

    def stored(size: int) -> StoredResponse:
        return StoredResponse.of({"pad": "x" * size}, [], [])

    for name in "abc":
        store.put(name, stored(10))
    assert store.get("a") is not None  # now the most recently used
    store.put("d", stored(10))
    assert [n for n in "abcd" if store.get(n) is None] == ["b"]
    store.put("e", stored(300))  # past 400 bytes: the oldest go until it fits
    assert len(store) <= 3 and store.bytes <= 400 and store.get("e") is not None
    store.put("huge", stored(1000))  # larger than the whole budget: not kept
    assert store.get("huge") is None and store.delete("e") and not store.delete("e")
    assert store.bytes == sum(store.get(n).size for n in "acd" if store.get(n) is not None)  # type: ignore[union-attr]


def test_streamed_items_close_as_the_answer_moves_from_thinking_to_text_to_calls() -> None:
    items = _StreamedItems(_EventWriter())
    call = ParsedToolCall(id="call_1", name="f", arguments="{}")
    sent = items.feed(ShapedText(reasoning="hm"), [])
    sent += items.feed(ShapedText(reasoning=".", content="Hi"), [{"token": "x"}])
    sent += items.feed(ShapedText(content="!", calls=[call]), [])
    sent += items.finish("completed")
    kinds = [json.loads(event.split("data: ", 1)[1])["type"] for event in sent]
    assert kinds == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]  # fmt: skip
    assert [item["type"] for item in items.output] == ["reasoning", "message", "function_call"]
    assert items.output[0]["content"][0]["text"] == "hm." and items.output[1]["content"][0]["text"] == "Hi!"
    assert items.output[1]["content"][0]["logprobs"] == [{"token": "x"}]


async def test_a_background_response_the_server_fails_on_is_stored_failed(
    tiny_model_factory, monkeypatch
) -> None:
    """Not only the API's own errors: an answer that breaks on the server's side (here, shaping
    its output) ends the response failed, and its stream with ``response.failed``, rather than
    leaving it in progress for ever; what broke is logged, not stored."""
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig
    from inferd.server.openai import responses

    def broken(self: Any, out: Any) -> list[str]:
        raise RuntimeError("shaping broke")

    monkeypatch.setattr(responses._Answer, "feed", broken)
    llm = AsyncLLM.from_options(tiny_model_factory("qwen3"), engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 4, "background": True}
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inferd")
    async with app.router.lifespan_context(app), client:
        streamed = await client.post("/v1/responses", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
        polled = (await client.post("/v1/responses", json=body)).json()
        for _ in range(500):
            stored = (await client.get(f"/v1/responses/{polled['id']}")).json()
            if stored["status"] not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.01)
    assert events[-1]["type"] == "response.failed"
    for failed in (events[-1]["response"], stored):
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        # As a route's 500: the message names the response; the exception's text is in the log only.
        assert (
            failed["id"] in failed["error"]["message"] and "shaping broke" not in failed["error"]["message"]
        )


def test_values_a_response_could_not_echo_are_400s(server: ServerProcess) -> None:
    """Found by fuzzing (each was a 500, a stream with a bare NaN in it, or a stored response whose
    reads failed): a response echoes its request's user, metadata, tools, text format, reasoning
    and input items, so a lone surrogate's escape or a NaN anywhere in the body is refused."""
    url = f"{server.base_url}/v1/responses"
    for extra, where in (
        ('"user": "\\ud800"', "body.user"),
        ('"metadata": {"k": "\\ud800"}', "body.metadata.k"),
        ('"tools": [{"type": "function", "name": "f", "description": NaN}]', "body.tools[0].description"),
        ('"reasoning": {"effort": Infinity}', "body.reasoning.effort"),
        ('"include": ["\\udc00"]', "body.include[0]"),
        (
            '"input": [{"type": "message", "role": "user", "content": "hi", "extra": NaN}]',
            "body.input[0].extra",
        ),
    ):
        for stream in ("false", "true"):
            head = (
                '"max_output_tokens": 2'
                if extra.startswith('"input"')
                else '"input": "hi", "max_output_tokens": 2'
            )
            body = "{" + f'{head}, "stream": {stream}, {extra}' + "}"
            answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
            assert answer.status_code == 400, (body, answer.text)
            assert where in answer.json()["error"]["message"], answer.text
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_an_error_quoting_a_lone_surrogate_still_renders(server: ServerProcess) -> None:
    """An error message that quotes the client's text writes a lone surrogate as its escape: the
    message itself failed to encode (a plain-text 500). And the embeddings route, which reads its
    own body, checks its timeout's type (a 500 for a string)."""
    from inferd.server.errors import InvalidRequestError

    error = InvalidRequestError("include: \ud800 cannot be included here", field="in\udc00clude")
    assert error.message == "include: \\ud800 cannot be included here" and error.field == "in\\udc00clude"
    for timeout in ('"x"', "[]", "true"):
        answer = httpx.post(
            f"{server.base_url}/v1/embeddings",
            content='{"input": "hi", "timeout": ' + timeout + "}",
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "timeout", answer.text
