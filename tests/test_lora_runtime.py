"""LoRA adapters loaded and unloaded while serving (``allow_runtime_lora_updating``): answers as an
engine started with the adapter gives them, a prefix cache never shared between two loads under one
name, refusals by kind, across an engine process, and over vLLM's two HTTP routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_process import run_server
from tiny_models import make_lora_adapter

from inferd import LLM, SamplingParams
from inferd.engine.async_llm import AsyncLLM
from inferd.engine.core import LoraUpdateError
from inferd.engine.input_processor import PromptError

PROMPTS = [list(range(5, 45)), list(range(60, 70))]


@pytest.fixture(scope="module")
def base(tiny_model_factory) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-lora")
    return {
        "one": make_lora_adapter(base, root / "one", seed=11),
        # Another rank and fewer targets: the stacked weights are rebuilt around it.
        "two": make_lora_adapter(base, root / "two", seed=12, rank=2, targets=("q_proj", "down_proj")),
    }


def _greedy(llm: LLM, adapter: str | None) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter=adapter)
    return [out.token_ids for out in llm.generate(PROMPTS, params)]


def _static(base: Path, name: str, folder: Path) -> list[list[int]]:
    """What an engine started with the adapter answers."""
    return _greedy(LLM(base, kv_cache_memory="8MiB", lora_modules={name: str(folder)}), name)


def test_loaded_adapters_answer_as_at_start_up_and_unloaded_ones_are_refused(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    plain = _greedy(llm, None)
    llm.engine.load_adapter("one", str(adapters["one"]))
    one = _greedy(llm, "one")
    assert one == _static(base, "one", adapters["one"]) and one != plain
    llm.engine.load_adapter("two", str(adapters["two"]))
    assert _greedy(llm, "two") == _static(base, "two", adapters["two"])
    assert _greedy(llm, "one") == one and _greedy(llm, None) == plain
    llm.engine.unload_adapter("one")
    with pytest.raises(PromptError, match="no LoRA adapter 'one'"):
        _greedy(llm, "one")
    assert _greedy(llm, None) == plain and _greedy(llm, "two") == _static(base, "two", adapters["two"])
    llm.engine.unload_adapter("two")  # right after a step that used it
    assert _greedy(llm, None) == plain  # every projection back to the base model's alone


def test_a_name_loaded_again_never_reads_its_predecessors_cached_blocks(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    llm.engine.load_adapter("style", str(adapters["one"]))
    _greedy(llm, "style")  # its prompts' blocks are now cached under this load of "style"
    llm.engine.unload_adapter("style")
    llm.engine.load_adapter("style", str(adapters["two"]))
    assert _greedy(llm, "style") == _static(base, "style", adapters["two"])
    assert llm.engine.stats().prefix_hits == 0


def test_updates_that_cannot_be_made_are_refused_by_kind(base: Path, adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fixed = LLM(base, kv_cache_memory="8MiB", lora_modules={"one": str(adapters["one"])})
    with pytest.raises(LoraUpdateError, match="allow_runtime_lora_updating"):
        fixed.engine.load_adapter("two", str(adapters["two"]))
    llm = LLM(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    llm.engine.load_adapter("one", str(adapters["one"]))
    cases = [
        (lambda: llm.engine.load_adapter("one", str(adapters["two"])), "invalid", "already loaded"),
        (lambda: llm.engine.load_adapter("bad", str(tmp_path)), "invalid", "adapter_config.json"),
        (lambda: llm.engine.unload_adapter("none"), "not_found", "no LoRA adapter 'none'"),
    ]
    for update, kind, message in cases:
        with pytest.raises(LoraUpdateError, match=message) as caught:
            update()
        assert caught.value.kind == kind
    # A request that waits or runs keeps its adapter.
    llm.engine.add_request("busy", PROMPTS[0], SamplingParams(max_tokens=4, adapter="one"))
    with pytest.raises(LoraUpdateError, match="in use by 1 request") as caught:
        llm.engine.unload_adapter("one")
    assert caught.value.kind == "in_use"
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.engine.unload_adapter("one")
    assert llm.engine.inputs.lora_names == ()


async def test_updates_cross_to_an_engine_process(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    expected = _static(base, "one", adapters["one"])
    llm = AsyncLLM.from_options(
        base, engine_process=True, kv_cache_memory="8MiB", allow_runtime_lora_updating=True
    )
    llm.start()
    try:
        before = llm.stats()  # from the core before any step (the metrics' LoRA gauge reads them)
        assert (before.running_adapters, before.num_adapters) == ((), 0)
        await llm.load_adapter("one", str(adapters["one"]))
        assert llm.lora_names == ("one",)
        assert llm.stats().num_adapters == 1  # the update's answer brings the core's stats
        assert not llm.engine.has_unfinished()  # an update brings no step: the engine thread may idle
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter="one")
        for index, prompt in enumerate(PROMPTS):
            outputs = [out async for out in llm.generate(f"r{index}", prompt, params)]
            assert outputs[-1].token_ids == expected[index]
        with pytest.raises(LoraUpdateError) as caught:
            await llm.unload_adapter("none")
        assert caught.value.kind == "not_found"
        await llm.unload_adapter("one")
        assert llm.lora_names == ()
    finally:
        llm.shutdown()


def test_served_load_and_unload_routes(base: Path, adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    expected = _static(base, "one", adapters["one"])
    with run_server(base, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny",
                    "--allow-runtime-lora-updating") as server:  # fmt: skip
        url = server.base_url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        loaded = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "one", "lora_path": str(adapters["one"])}
        )
        assert loaded.status_code == 200, loaded.text
        assert [card.id for card in client.models.list().data] == ["tiny", "one"]
        reply = client.completions.create(model="one", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert reply.choices[0].text == LLM(base, kv_cache_memory="8MiB").engine.tokenizer.decode(expected[0])
        refusals = [
            ("load", {"lora_name": "one", "lora_path": str(adapters["two"])}, 400),
            ("load", {"lora_name": "tiny", "lora_path": str(adapters["two"])}, 400),
            # TGI's clients send these for the base model; a comma would split the adapter labels.
            ("load", {"lora_name": "tgi", "lora_path": str(adapters["two"])}, 400),
            ("load", {"lora_name": "dummy", "lora_path": str(adapters["two"])}, 400),
            ("load", {"lora_name": "x,y", "lora_path": str(adapters["two"])}, 400),
            ("load", {"lora_name": "bad", "lora_path": str(tmp_path)}, 400),
            ("unload", {"lora_name": "none"}, 404),
        ]
        for route, body, status in refusals:
            response = httpx.post(f"{url}/v1/{route}_lora_adapter", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["param"] == "lora_name"
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "one"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="one", prompt=PROMPTS[0], max_tokens=2)
    with run_server(base, "--kv-cache-memory", "8MiB") as plain:
        body = {"lora_name": "one", "lora_path": str(adapters["one"])}
        assert httpx.post(f"{plain.base_url}/v1/load_lora_adapter", json=body).status_code == 404


def test_no_two_names_share_a_prefix_cache_salt(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    """A start-up adapter named like a later load's salt could otherwise share its cached blocks."""
    llm = LLM(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True,
              lora_modules={"1:y": str(adapters["one"]), "y#1": str(adapters["one"])})  # fmt: skip
    _greedy(llm, "1:y")
    _greedy(llm, "y#1")
    llm.engine.load_adapter("y", str(adapters["two"]))
    assert _greedy(llm, "y") == _static(base, "y", adapters["two"])


def test_weights_of_a_type_not_computed_are_refused(base: Path, adapters, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "fp8"
    shutil.copytree(adapters["one"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(
        {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, folder / "adapter_model.safetensors"
    )
    llm = LLM(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    with pytest.raises(LoraUpdateError, match="float8_e4m3fn") as caught:
        llm.engine.load_adapter("fp8", str(folder))
    assert caught.value.kind == "invalid" and llm.engine.inputs.lora_names == ()


async def test_an_update_given_up_on_leaves_the_engine_serving(base: Path, adapters, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import time

    llm = AsyncLLM.from_options(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    runner = llm.engine.core.runner  # type: ignore[union-attr]
    slow_load = runner.load_adapter

    def load_slowly(name: str, path: Path) -> None:
        time.sleep(0.5)
        slow_load(name, path)

    monkeypatch.setattr(runner, "load_adapter", load_slowly)
    llm.start()
    try:
        loading = asyncio.ensure_future(llm.load_adapter("one", str(adapters["one"])))
        await asyncio.sleep(0.1)  # the engine thread is inside the load now
        loading.cancel()
        queued = asyncio.ensure_future(llm.load_adapter("two", str(adapters["two"])))
        await asyncio.sleep(0)
        queued.cancel()  # cancelled while still queued: never run
        with pytest.raises(asyncio.CancelledError):
            await loading
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        outputs = [out async for out in llm.generate("after", PROMPTS[0], params)]
        assert outputs[-1].finish_reason == "length" and llm.is_alive
        assert "two" not in llm.lora_names
    finally:
        llm.shutdown()


def _served(base: Path) -> tuple[AsyncLLM, Any, Any]:  # (llm, its Frontend, the metrics' registry)
    """A started engine that takes adapters at run time, and a server's frontend over it."""
    from prometheus_client import CollectorRegistry

    from inferd.server.frontend import Frontend
    from inferd.server.metrics import ServerMetrics

    llm = AsyncLLM.from_options(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    llm.start()
    registry = CollectorRegistry()
    return llm, Frontend(llm, "tiny", ServerMetrics(registry, "tiny", llm.stats)), registry


async def test_a_request_whose_adapter_went_away_meanwhile_is_a_404(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    from inferd.server.errors import ModelNotFoundError

    llm, frontend, registry = _served(base)
    try:
        await llm.load_adapter("one", str(adapters["one"]))
        params = frontend.sampling_params(max_tokens=4, adapter=frontend.adapter_for("one"))
        await llm.unload_adapter("one")  # after the request's checks, before its turn in the engine
        with pytest.raises(ModelNotFoundError, match="no longer served"):
            async for _ in frontend.generate("r", [PROMPTS[0]], params):
                pass
        base = frontend.sampling_params(max_tokens=4, ignore_eos=True)
        async for _ in frontend.generate("base", [PROMPTS[0]], base):  # one counted request, to compare
            pass
        # A refusal the client sees as a 404: no failed request, no request answered by "one".
        totals = {
            (s.name, s.labels.get("finished_reason") or s.labels.get("adapter")): s.value
            for family in registry.collect()
            for s in family.samples
            if s.name in ("inferd:request_success_total", "inferd:lora_requests_total")
        }
        assert totals.get(("inferd:request_success_total", "error"), 0) == 0
        assert totals.get(("inferd:lora_requests_total", "one"), 0) == 0
        assert totals[("inferd:request_success_total", "length")] == 1  # what is read counts requests
    finally:
        llm.shutdown()


async def test_an_unloaded_adapter_leaves_no_metric_series_behind(base: Path, adapters) -> None:  # type: ignore[no-untyped-def]
    """A series per adapter name ever loaded grew /metrics on a server that loads new names."""
    llm, frontend, registry = _served(base)
    try:

        def served_by(adapter: str) -> float | None:
            labels = {"model_name": "tiny", "adapter": adapter}
            return registry.get_sample_value("inferd:lora_requests_total", labels)

        for _ in range(2):
            await frontend.load_adapter("one", str(adapters["one"]))
            with frontend.holding_adapter("one"):
                params = frontend.sampling_params(max_tokens=2, adapter=frontend.adapter_for("one"))
                async for _ in frontend.generate("r", [PROMPTS[0]], params):
                    pass
            assert served_by("one") == 1
            await frontend.unload_adapter("one")
            assert served_by("one") is None and "one" not in frontend._adapter_holds
    finally:
        llm.shutdown()
