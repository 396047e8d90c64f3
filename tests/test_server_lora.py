"""LoRA adapters on a real `inferd serve --lora-modules`, its engine in a process of its own (the
adapter's name crosses the process boundary): asked for by OpenAI's `model` field and TGI's
`adapter_id`, listed by `/v1/models`, and answered as the offline engine answers with them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from server_process import ServerProcess, run_server
from tiny_models import make_lora_adapter

from inferd import LLM, SamplingParams

PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def adapter(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_lora_adapter(tiny_model_factory("qwen3"), tmp_path_factory.mktemp("lora") / "style", seed=5)


@pytest.fixture(scope="module")
def server(tiny_model_factory, adapter) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "--engine-process",
            "--lora-modules", f"style={adapter}")  # fmt: skip
    with run_server(tiny_model_factory("qwen3"), *args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_adapter_beside_its_base(client: openai.OpenAI) -> None:
    cards = client.models.list().data
    assert [(c.id, getattr(c, "parent", None)) for c in cards] == [("tiny", None), ("style", "tiny")]


def test_the_adapter_answers_as_the_offline_engine_with_it(
    client: openai.OpenAI, server: ServerProcess, tiny_model_factory, adapter
) -> None:  # type: ignore[no-untyped-def]
    offline = LLM(tiny_model_factory("qwen3"), kv_cache_memory="8MiB", lora_modules={"style": str(adapter)})
    greedy = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}
    expected = {
        name: offline.generate([PROMPT], SamplingParams(**greedy, adapter=name))[0].text  # type: ignore[arg-type]
        for name in (None, "style")
    }
    assert expected["style"] != expected[None]
    for model, name in (("style", "style"), ("tiny", None)):
        result = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        assert result.model == model and result.choices[0].text == expected[name]
    hello = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="style", messages=hello, max_tokens=3)  # type: ignore[arg-type]
    assert chat.model == "style"
    tgi = httpx.post(f"{server.base_url}/generate", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 10, "adapter_id": "style"}}).json()  # fmt: skip
    # TGI's greedy default stops at EOS, which the random model need not reach in 10 tokens.
    assert tgi["generated_text"] and expected["style"].startswith(tgi["generated_text"])
    # Counted per adapter as they end: a completion, a chat and a TGI request.
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'inferd:lora_requests_total{adapter="style",model_name="tiny"} 3.0' in metrics


def test_an_unknown_model_or_adapter_is_a_404_naming_what_is_served(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
    assert "'tiny', 'style'" in str(error.value)
    tgi = httpx.post(f"{server.base_url}/generate", json={"inputs": PROMPT,
                     "parameters": {"max_new_tokens": 2, "adapter_id": "other"}})  # fmt: skip
    assert tgi.status_code == 404
