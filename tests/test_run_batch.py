"""`inferd run-batch`: requests in OpenAI's batch file format answered offline by the server's routes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferd import LLM, SamplingParams
from inferd.cli import main
from inferd.engine.admission import QueueLimits
from inferd.engine.async_llm import AsyncLLM
from inferd.entrypoints.run_batch import answer_lines
from inferd.server.app import create_app
from inferd.server.config import ServerConfig


def _line(custom_id: str, url: str, body: dict[str, object]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_the_cli_answers_each_line_in_order_as_the_routes_do(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = [
        _line("chat", "/v1/chat/completions",
              {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        _line("text", "/v1/completions", {"model": "tiny", "prompt": "To be, or not", "max_tokens": 6,
                                          "temperature": 0, "ignore_eos": True}),
        _line("vector", "/v1/embeddings", {"model": "tiny", "input": "To be"}),
        _line("bad", "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 0}),
        "",  # blank lines are skipped
    ]  # fmt: skip
    source, sink = tmp_path / "in.jsonl", tmp_path / "results" / "out.jsonl"  # its folder made for it
    source.write_text("\n".join(requests) + "\n")
    # An output that cannot be written is a usage error before the model loads, not after the run.
    (tmp_path / "file").write_text("")
    unwritable = [
        "run-batch",
        "/no/such/model",
        "-i",
        str(source),
        "-o",
        str(tmp_path / "file" / "out.jsonl"),
    ]
    assert main(unwritable) == 2 and "--output-file: cannot write" in capsys.readouterr().err
    # A folder as the input: a message, not IsADirectoryError's traceback.
    folder_input = ["run-batch", "/no/such/model", "-i", str(tmp_path), "-o", str(tmp_path / "o.jsonl")]
    assert main(folder_input) == 2 and "inferd: error:" in capsys.readouterr().err
    never = tmp_path / "never.jsonl"  # checked without being made: a run that fails leaves nothing
    assert main(["run-batch", "/no/such/model", "-i", str(source), "-o", str(never)]) == 2
    assert not never.exists()
    args = ["run-batch", str(tiny_llama), "-i", str(source), "-o", str(sink), "--served-model-name", "tiny"]
    assert main([*args, "--kv-cache-memory", "8MiB"]) == 0
    assert "4 requests, 3 answered, 1 failed" in capsys.readouterr().err
    results = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["chat", "text", "vector", "bad"]
    assert [r["response"]["status_code"] for r in results] == [200, 200, 200, 400]
    assert all(r["error"] is None and r["id"].startswith("batch_req_") for r in results)
    chat, text, vector, bad = (r["response"]["body"] for r in results)
    assert chat["object"] == "chat.completion" and results[0]["response"]["request_id"] == chat["id"]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = LLM(tiny_llama, kv_cache_memory="4MiB").generate("To be, or not", greedy)[0].text
    assert text["choices"][0]["text"] == expected
    assert len(vector["data"][0]["embedding"]) > 0
    assert bad["error"]["param"] == "max_tokens"  # the route's own error body


async def test_lines_that_cannot_be_sent_get_an_error_and_no_response(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    lines = [
        "not json",
        json.dumps(["a", "list"]),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/models"}),
        _line("tgi", "/generate", {"inputs": "To be"}),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions", "body": "To be"}),
        _line("streamed", "/v1/completions", {"prompt": "To be", "stream": True}),
        '{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"temperature": NaN}}',
        '{"custom_id": ' + "1" * 5000 + "}",  # past the 4,300-digit limit: ended the whole run
        # The output line would repeat it, and writing that failed after every line was answered.
        '{"custom_id": "bad\\ud800id", "method": "POST", "url": "/v1/completions", "body": {}}',
    ]
    results = await answer_lines(app, lines, max_concurrency=4)
    assert all(r["response"] is None for r in results)
    assert [r["custom_id"] for r in results] == [
        None,
        None,
        None,
        "get",
        "tgi",
        "nobody",
        "streamed",
        "nan",
        None,
        None,
    ]
    messages = [r["error"]["message"] for r in results]
    for message, expected in zip(
        messages,
        [
            "not JSON",
            "not a JSON object",
            "custom_id",
            "a POST",
            "url: a batch takes",
            "body:",
            "body.stream",
            "body: Out of range float values",
            "not JSON",
            "custom_id: must be valid text",
        ],
        strict=True,
    ):
        assert expected in message, message


@pytest.mark.timeout(120)
async def test_a_full_queue_is_waited_out_not_answered_429(tiny_llama: Path) -> None:
    """Eight requests at once against a queue of one: each 429 is sent again after Retry-After."""
    llm = AsyncLLM.from_options(
        tiny_llama, engine_process=False, kv_cache_memory="8MiB", queue_limits=QueueLimits(max_requests=1)
    )
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 3, "temperature": 0}
    results = await answer_lines(app, [_line(str(i), "/v1/completions", body) for i in range(8)], 8)
    assert [r["response"]["status_code"] for r in results] == [200] * 8
    assert len({r["response"]["body"]["choices"][0]["text"] for r in results}) == 1
