"""`inferd serve --engine-process`: the core in a child process answers like the thread engine."""

from __future__ import annotations

import openai
from server_process import run_server

from inferd import LLM, SamplingParams


def test_engine_process_serves_the_same_greedy_text(tiny_llama) -> None:
    prompt = "To be, or not"
    expected = LLM(tiny_llama, kv_cache_memory="8MiB").generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0)
    )
    with run_server(tiny_llama, "--engine-process", "--kv-cache-memory", "8MiB") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0)
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model=server.model, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            if chunk.choices
        )
        samples = server.wait_for_metrics(lambda s: s.get("inferd:kv_cache_usage_perc", 1.0) == 0.0)
    assert reply.choices[0].text == streamed == expected[0].text
    assert samples["inferd:num_requests_running"] == 0
