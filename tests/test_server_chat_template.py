"""The chat template: the server's --chat-template in place of the model's, a request's own refused,
and an assistant turn's reasoning handed to the template."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from inferd.cli import build_parser
from inferd.engine.async_llm import AsyncLLM
from inferd.engine.tokenizer import ChatTemplateError
from inferd.server.app import create_app
from inferd.server.config import ServerConfig
from inferd.server.serve_cli import _chat_template, server_config

# Shows each turn's role, thinking and text, so the rendered prompt says what reached the template.
TEMPLATE = (
    "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.reasoning_content or '' }}|{{ m.content }}\n{% endfor %}"
)
CONVERSATION = [
    {"role": "user", "content": "Is it raining?"},
    {"role": "assistant", "content": "No.", "reasoning_content": "The sky is clear."},
    {"role": "user", "content": "Sure?"},
]


@pytest.fixture
async def client(tiny_llama: Path) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncLLM]]:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny", chat_template=TEMPLATE))
    llm.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield http, llm
    finally:
        llm.shutdown()


async def test_the_servers_template_renders_chats_with_each_turns_reasoning(client) -> None:  # type: ignore[no-untyped-def]
    http, llm = client
    expected = "<user>|Is it raining?\n<assistant>The sky is clear.|No.\n<user>|Sure?\n"
    tokens = (await http.post("/tokenize", json={"model": "tiny", "messages": CONVERSATION})).json()["tokens"]
    assert tokens == llm.tokenizer.encode(expected, add_special_tokens=False)
    # vLLM's newer name for the same field.
    renamed = [{**m, "reasoning": m.pop("reasoning_content")} if "reasoning_content" in m else m
               for m in [dict(m) for m in CONVERSATION]]  # fmt: skip
    again = (await http.post("/tokenize", json={"model": "tiny", "messages": renamed})).json()["tokens"]
    assert again == tokens
    body = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 1}
    answer = await http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == len(tokens)


async def test_documents_reach_the_template_as_vllm_passes_them(client) -> None:  # type: ignore[no-untyped-def]
    http, llm = client
    documents = [{"title": "Rain", "text": "It rains in Paris."}]
    body = {"model": "tiny", "messages": CONVERSATION[:1], "max_tokens": 1, "documents": documents}
    answer = (await http.post("/v1/chat/completions", json={**body, "return_token_ids": True})).json()
    expected = "[Rain: It rains in Paris.]<user>|Is it raining?\n"
    assert answer["prompt_token_ids"] == llm.tokenizer.encode(expected, add_special_tokens=False)


async def test_chat_echo_is_a_400_naming_it(client) -> None:  # type: ignore[no-untyped-def]
    http, _ = client
    chat = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 1, "echo": True}
    answer = await http.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "echo", answer.text


async def test_a_requests_own_template_and_an_empty_tokenize_are_400s(client) -> None:  # type: ignore[no-untyped-def]
    http, _ = client
    body = {"model": "tiny", "messages": CONVERSATION, "chat_template": "{{ messages }}"}
    answer = await http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "chat_template"
    answer = await http.post("/tokenize", json={"model": "tiny"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"


def test_the_flag_takes_a_file_or_a_template(tmp_path: Path) -> None:
    file = tmp_path / "chat.jinja"
    file.write_text(TEMPLATE)
    assert _chat_template(str(file)) == TEMPLATE == _chat_template(TEMPLATE)
    long_template = (
        TEMPLATE + "{# a real template runs to kilobytes #}" * 100
    )  # longer than a file name may be
    assert _chat_template(long_template) == long_template
    for neither in (str(tmp_path / "missing.jinja"), "x" * 600):
        with pytest.raises(argparse.ArgumentTypeError, match="neither a file nor a Jinja template"):
            _chat_template(neither)
    args = build_parser().parse_args(["serve", "--chat-template", str(file)])
    assert server_config(args).chat_template == TEMPLATE


def test_a_template_that_does_not_compile_stops_the_server_from_starting(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    with pytest.raises(ChatTemplateError, match="--chat-template does not compile"):
        create_app(llm, ServerConfig(chat_template="{% for m in messages %}"))
