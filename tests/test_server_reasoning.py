"""`--reasoning-parser`: a chat answer's thinking as `reasoning_content`, apart from its `content`,
the same whether the answer streams or not, and however its deltas cut the tags."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from scripted_frontend import ScriptedFrontend
from server_process import run_server

from inferd.sampling_params import SamplingParams
from inferd.server.openai.chat import ChatJob, chat, stream_chat
from inferd.server.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningSplitter

QWEN3 = REASONING_FORMATS["qwen3"]
DEEPSEEK_R1 = REASONING_FORMATS["deepseek_r1"]


def split_reasoning(form: ReasoningFormat, text: str) -> tuple[str | None, str]:
    """A whole answer's (reasoning or None, content)."""
    splitter = ReasoningSplitter(form)
    reasoning, content = splitter.feed(text)
    rest_reasoning, rest_content = splitter.finish()
    return (reasoning + rest_reasoning) or None, content + rest_content


@pytest.mark.parametrize(
    ("form", "text", "expected"),
    [
        (QWEN3, "<think>\nis a < b?\n</think>\n\nYes.", ("\nis a < b?\n", "\n\nYes.")),
        # Thinking-2507 models: the template opened the thinking, the answer only closes it.
        (QWEN3, "Thinking...\n</think>\n\nThe answer.", ("Thinking...\n", "\n\nThe answer.")),
        (QWEN3, "<think>cut off by max_tokens", ("cut off by max_tokens", "")),
        (DEEPSEEK_R1, "opened by the template</think>Answer", ("opened by the template", "Answer")),
        (DEEPSEEK_R1, "<think>written again</think>Answer", ("written again", "Answer")),
        (DEEPSEEK_R1, "never closed", ("never closed", "")),
    ],
)
def test_a_whole_answer_splits_at_the_tags(form: Any, text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(form, text) == expected


@pytest.mark.parametrize("form", [QWEN3, DEEPSEEK_R1])
def test_deltas_split_as_the_whole_answer_does_wherever_they_cut(form: Any) -> None:
    rng = random.Random(0)
    texts = [
        "<think>\nis a < b?\n</think>\n\nYes <th, <",
        "<think>x</think>y<think>z</think>w",
        "ab</thi",
        "<<think>>",
    ]
    for text in texts:
        whole = split_reasoning(form, text)
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(6, len(text) - 1))))
            splitter, reasoning, content = ReasoningSplitter(form), "", ""
            for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
                more_reasoning, more_content = splitter.feed(text[start:end])
                reasoning, content = reasoning + more_reasoning, content + more_content
            rest_reasoning, rest_content = splitter.finish()
            assert ((reasoning + rest_reasoning) or None, content + rest_content) == whole, (text, cuts)


DELTAS = ["<thi", "nk>\nWhy", "? Because.</th", "ink>\n\nIt is", " so. <"]


async def test_the_stream_and_the_response_carry_the_same_split() -> None:
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False,
                  reasoning=QWEN3)  # fmt: skip
    events = [e[len("data: ") : -2] async for e in stream_chat(ScriptedFrontend(DELTAS), job)]  # type: ignore[arg-type]
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    streamed_reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.get("content") or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == ("\nWhy? Because.", "\n\nIt is so. <")
    assert not any("<" in (d.get("reasoning_content") or "") for d in deltas)  # no tag leaks out
    response = await chat(ScriptedFrontend(DELTAS), job)  # type: ignore[arg-type]
    message = response.choices[0].message
    assert (message.reasoning_content, message.content) == (streamed_reasoning, streamed_content)
    plain = ChatJob("chatcmpl-y", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False)
    unsplit = (await chat(ScriptedFrontend(DELTAS), plain)).choices[0].message  # type: ignore[arg-type]
    assert (unsplit.reasoning_content, unsplit.content) == (None, "".join(DELTAS))


def test_the_server_flag(tiny_llama: Path) -> None:
    """deepseek_r1 reads an answer without an end tag as all thinking: the tiny model's whole text
    moves to reasoning_content, in the response and in the stream."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "skip_special_tokens": False}  # fmt: skip
    url_args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny")
    with run_server(tiny_llama, *url_args) as server:
        plain = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30).json()
    text = plain["choices"][0]["message"]["content"]
    assert text and plain["choices"][0]["message"]["reasoning_content"] is None
    with run_server(tiny_llama, *url_args, "--reasoning-parser", "deepseek_r1") as server:
        url = f"{server.base_url}/v1/chat/completions"
        message = httpx.post(url, json=body, timeout=30).json()["choices"][0]["message"]
        no_thinking = {**body, "chat_template_kwargs": {"enable_thinking": False}}
        unsplit = httpx.post(url, json=no_thinking, timeout=30).json()["choices"][0]["message"]
        # vLLM's include_reasoning false: the thinking is split off and left out.
        left_out = {**body, "include_reasoning": False}
        without = httpx.post(url, json=left_out, timeout=30).json()["choices"][0]["message"]
        with httpx.stream("POST", url, json={**left_out, "stream": True}, timeout=30) as response:
            quiet = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    assert (message["reasoning_content"], message["content"]) == (text, "")
    # No thinking asked for (Qwen3's switch, as vLLM reads it): nothing is split off.
    assert (unsplit["reasoning_content"], unsplit["content"]) == (None, text)
    deltas = [json.loads(line)["choices"][0]["delta"] for line in lines]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == text
    assert (without["reasoning_content"], without["content"]) == (None, "")
    assert quiet and not any(chunk["choices"][0]["delta"].get("reasoning_content") for chunk in quiet)
